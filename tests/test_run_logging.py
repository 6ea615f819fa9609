"""Tests of agejax.run_logging's per-example prediction files."""

import pathlib
import tempfile

from absl.testing import absltest
import numpy as np

from agejax import run_logging


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


if __name__ == '__main__':
  absltest.main()
