"""Tests of agejax.run_logging: run records, JSON lines, environments and prediction files."""

import json
import pathlib
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from agejax import parallel
from agejax import run_logging


_RECORD = {
    'data': 'real',
    'load': {'source': '/data/UTKFace.tar.gz'},
    'split': {'protocol': 'dedup', 'seed': 0, 'counts': [700, 150, 150]},
    'train': 650,
}
_IDENTITY = ('data', 'split', 'train', 'truncated_to')


class WriteRunRecordTest(parameterized.TestCase):

  def _write_twice(self, tmp, second):
    path = pathlib.Path(tmp) / 'run' / 'data_report.json'
    run_logging.write_run_record(path, _RECORD, _IDENTITY)
    run_logging.write_run_record(path, second, _IDENTITY)
    return path

  @parameterized.named_parameters(
      ('same', _RECORD),
      ('read_elsewhere', {**_RECORD, 'load': {'source': '/elsewhere/UTKFace.tar.gz'}}),
  )
  def test_same_inputs_rewrite(self, second):
    with tempfile.TemporaryDirectory() as tmp:
      path = self._write_twice(tmp, second)
      self.assertEqual(json.loads(path.read_text()), {**second, 'truncated_to': None})

  def test_inputs_an_older_record_lacks_are_not_compared(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = pathlib.Path(tmp) / 'data_report.json'
      path.write_text(json.dumps(_RECORD))  # written before 'truncated_to' existed
      run_logging.write_run_record(path, {**_RECORD, 'truncated_to': 256}, _IDENTITY)
      self.assertEqual(json.loads(path.read_text())['truncated_to'], 256)
      with self.assertRaisesRegex(ValueError, r'\(truncated_to differ\)'):
        run_logging.write_run_record(path, _RECORD, _IDENTITY)

  @parameterized.named_parameters(
      ('nested', {**_RECORD, 'split': {**_RECORD['split'], 'seed': 1}}, 'split'),
      ('value', {**_RECORD, 'train': 700}, 'train'),
      ('new_key', {**_RECORD, 'truncated_to': 256}, 'truncated_to'),
      ('two', {**_RECORD, 'data': 'synthetic', 'train': 1}, 'data, train'),
  )
  def test_other_inputs_raise_and_keep_the_file(self, second, keys):
    with tempfile.TemporaryDirectory() as tmp:
      path = pathlib.Path(tmp) / 'data_report.json'
      run_logging.write_run_record(path, _RECORD, _IDENTITY)
      saved = path.read_bytes()
      with self.assertRaisesRegex(ValueError, rf'{path} records other inputs \({keys} differ\)'):
        run_logging.write_run_record(path, second, _IDENTITY)
      self.assertEqual(path.read_bytes(), saved)

  def test_unreadable_file_is_named_and_kept(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = pathlib.Path(tmp) / 'data_report.json'
      path.write_text('{"data": ')
      with self.assertRaisesRegex(ValueError, f'{path} is unreadable'):
        run_logging.write_run_record(path, _RECORD, _IDENTITY)
      self.assertEqual(path.read_text(), '{"data": ')


class WritePredictionsTest(absltest.TestCase):

  def test_round_trip_without_images(self):
    arrays = {
        'image': np.zeros((3, 4, 4, 1), np.uint8),
        'label': np.array([1, 2, 3], np.int32),
        'race': np.array([0, 4, -1], np.int32),
        'file_name': np.array(['a.jpg', 'b.jpg', 'c.jpg']),
    }
    predictions = {'pred': np.array([1, 1, 3], np.int32), 'expected': np.array([1.5, 2.0, 2.5])}
    with tempfile.TemporaryDirectory() as tmp:
      path = pathlib.Path(tmp) / 'run' / 'predictions_test.npz'
      run_logging.write_predictions(path, arrays, predictions)
      with np.load(path) as saved:
        self.assertCountEqual(saved.files, ['label', 'race', 'file_name', 'pred', 'expected'])
        for key, value in {**arrays, **predictions}.items():
          if key != 'image':
            np.testing.assert_array_equal(saved[key], value)
      self.assertEqual([p.name for p in path.parent.iterdir()], [path.name])

  def test_wrong_length_raises_and_writes_nothing(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = pathlib.Path(tmp) / 'predictions_test.npz'
      with self.assertRaisesRegex(ValueError, r'predictions_test\.npz.*pred'):
        run_logging.write_predictions(
            path, {'label': np.zeros(3, np.int32)}, {'pred': np.zeros(2, np.int32)}
        )
      self.assertFalse(path.exists())


class JsonLinesTest(absltest.TestCase):

  def test_appends_and_skips_a_line_cut_short(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = pathlib.Path(tmp) / 'run' / 'environment.jsonl'
      self.assertEqual(run_logging.read_json_lines(path), [])
      run_logging.append_json_line(path, {'a': 1})
      with open(path, 'a') as f:
        f.write('{"b": ')  # a process killed mid-line
      with open(path, 'a') as f:
        f.write('\n')
      run_logging.append_json_line(path, {'c': np.int32(3)})
      self.assertEqual(run_logging.read_json_lines(path), [{'a': 1}, {'c': 3}])


class EnvironmentTest(absltest.TestCase):

  def test_names_devices_precision_and_versions(self):
    mesh = parallel.data_mesh()
    env = run_logging.environment(mesh)
    self.assertEqual(env['backend'], jax.default_backend())
    self.assertEqual(env['devices'], jax.device_count())
    self.assertEqual(env['versions']['jax'], jax.__version__)
    self.assertEqual(env['matmul_precision'], 'default')
    with jax.default_matmul_precision('float32'):
      self.assertEqual(run_logging.environment(mesh)['matmul_precision'], 'float32')
    json.dumps(env)


if __name__ == '__main__':
  absltest.main()
