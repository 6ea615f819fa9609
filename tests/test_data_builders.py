"""UTKFace and FER2013 TFDS builders on small generated inputs: layouts, bad input, reuse."""

import csv
import glob
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import zipfile

import chex
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from PIL import Image

from agejax.data import fer2013
from agejax.data import utk_face
from agejax.data.errors import DataError

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_UTK_NAMES = (
    '26_1_2_20170116174525125.jpg.chip.jpg',
    '3_0_0_20170110215927291.jpg.chip.jpg',
    '39_1_20170116174525125.jpg.chip.jpg',  # no race
    '101_1_0_20170120134921760.jpg.chip.jpg',
    '40_0_4_20170117135200001.jpg.chip.jpg',
)


def _jpeg(seed: int, size: int = 200, mode: str = 'RGB') -> bytes:
  rng = np.random.default_rng(seed)
  shape = (size, size, 3) if mode == 'RGB' else (size, size)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, 'JPEG')
  return buf.getvalue()


def _utk_files(corrupt: bool = False, duplicate: bool = False) -> dict[str, bytes]:
  files = {name: _jpeg(i) for i, name in enumerate(_UTK_NAMES)}
  if duplicate:
    files['27_1_2_20170116174525999.jpg.chip.jpg'] = files[_UTK_NAMES[0]]
  if corrupt:
    files['50_0_1_20170116174525000.jpg.chip.jpg'] = _jpeg(99)[:300]
  return files


def _write_tar(path: str, files: dict[str, bytes], extra: dict[str, bytes] | None = None):
  with tarfile.open(path, 'w:gz') as archive:
    for name, data in (files | (extra or {})).items():
      info = tarfile.TarInfo(f'UTKFace/{name}')
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))


class _TmpDirTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.manual = self._tmp()
    self.data_dir = self._tmp()

  def _tmp(self) -> str:
    return self.enterContext(tempfile.TemporaryDirectory())

  def _nothing_prepared(self, name: str):
    self.assertEqual(glob.glob(os.path.join(self.data_dir, name, '**', '1.0.0'),
                               recursive=True), [])
    self.assertEqual(glob.glob(os.path.join(self.data_dir, name, '**', 'incomplete*'),
                               recursive=True), [])


class UtkFaceBuilderTest(_TmpDirTest):

  def test_archive_and_folder_give_the_same_arrays(self):
    files = _utk_files(duplicate=True)
    _write_tar(os.path.join(self.manual, utk_face.ARCHIVE), files)
    from_tar, report = utk_face.load(self.manual, data_dir=self.data_dir, num_workers=2)
    folder_manual = self._tmp()
    os.mkdir(os.path.join(folder_manual, utk_face.FOLDER))
    for name, data in files.items():
      with open(os.path.join(folder_manual, utk_face.FOLDER, name), 'wb') as f:
        f.write(data)
    other_dir = self._tmp()
    from_folder, _ = utk_face.load(folder_manual, data_dir=other_dir, num_workers=1)
    chex.assert_trees_all_equal(from_tar, from_folder)
    order = sorted(files)
    chex.assert_trees_all_equal(from_tar['file_name'], np.array(order))
    self.assertNotIn('tensorflow', sys.modules)
    self.assertEqual(from_tar['image'].shape, (6, 48, 48, 1))
    self.assertEqual(from_tar['image'].dtype, np.uint8)
    chex.assert_trees_all_equal(
        from_tar['age'], np.array([int(n.split('_')[0]) for n in order], np.int32))
    chex.assert_trees_all_equal(from_tar['race'][order.index(_UTK_NAMES[2])], np.int32(-1))
    self.assertEqual(from_tar['hash'][order.index(_UTK_NAMES[0])],
                     from_tar['hash'][order.index('27_1_2_20170116174525999.jpg.chip.jpg')])
    self.assertEqual(report['read'], 6)
    self.assertEqual([m['file'] for m in report['malformed_names']], [_UTK_NAMES[2]])

  def test_rgb64_config(self):
    _write_tar(os.path.join(self.manual, utk_face.ARCHIVE), _utk_files())
    arrays, _ = utk_face.load(self.manual, data_dir=self.data_dir, config='rgb64')
    self.assertEqual(arrays['image'].shape, (5, 64, 64, 3))

  def test_corrupt_image_is_skipped_and_reported_and_reused(self):
    _write_tar(os.path.join(self.manual, utk_face.ARCHIVE), _utk_files(corrupt=True),
               extra={'notes.txt': b'hello'})
    arrays, report = utk_face.load(self.manual, data_dir=self.data_dir)
    self.assertEqual(len(arrays['age']), 5)
    self.assertEqual([c['file'] for c in report['corrupt']],
                     ['50_0_1_20170116174525000.jpg.chip.jpg'])
    self.assertNotIn(' at 0x', report['corrupt'][0]['error'])  # the same text every prepare
    self.assertEqual(report['ignored_files'], ['notes.txt'])
    os.remove(os.path.join(self.manual, utk_face.ARCHIVE))  # The reuse must not need it.
    again, report_again = utk_face.load(self.manual, data_dir=self.data_dir)
    chex.assert_trees_all_equal(arrays, again)
    self.assertEqual(report_again['corrupt'], report['corrupt'])

  def test_corrupt_image_with_a_bad_name_is_reported_corrupt(self):
    # Renaming cannot fix it, so it must not be reported as a naming problem.
    _write_tar(os.path.join(self.manual, utk_face.ARCHIVE), _utk_files(),
               extra={'thirty_0_0_1.jpg.chip.jpg': b'not a jpeg'})
    _, report = utk_face.load(self.manual, data_dir=self.data_dir)
    self.assertEqual([c['file'] for c in report['corrupt']], ['thirty_0_0_1.jpg.chip.jpg'])
    self.assertEqual(report['unparseable_names'], [])

  def test_truncated_archive_raises_and_leaves_nothing(self):
    path = os.path.join(self.manual, utk_face.ARCHIVE)
    _write_tar(path, _utk_files())
    with open(path, 'rb') as f:
      data = f.read()
    with open(path, 'wb') as f:
      f.write(data[: len(data) // 2])
    with self.assertRaisesRegex(DataError, r'UTKFace\.tar\.gz is truncated'):
      utk_face.load(self.manual, data_dir=self.data_dir)
    self._nothing_prepared('utk_face')
    _write_tar(path, _utk_files())
    arrays, _ = utk_face.load(self.manual, data_dir=self.data_dir)
    self.assertEqual(len(arrays['age']), 5)

  def test_killed_prepare_is_not_trusted(self):
    _write_tar(os.path.join(self.manual, utk_face.ARCHIVE), _utk_files())
    script = textwrap.dedent(f"""
        import os
        from agejax.data import image_decode, utk_face
        real = image_decode._decode_one
        def dying(name, *args):
          if name.startswith('39_'):
            os._exit(3)
          return real(name, *args)
        image_decode._decode_one = dying
        utk_face.load({self.manual!r}, data_dir={self.data_dir!r}, num_workers=1)
    """)
    result = subprocess.run([sys.executable, '-c', script], cwd=_REPO, capture_output=True,
                            env=os.environ | {'PYTHONPATH': _REPO}, check=False)
    self.assertEqual(result.returncode, 3, result.stderr[-2000:])
    self.assertEqual(glob.glob(os.path.join(self.data_dir, 'utk_face', '*', '1.0.0')), [])
    self.assertLen(glob.glob(os.path.join(self.data_dir, 'utk_face', '*', 'incomplete*')), 1)
    arrays, report = utk_face.load(self.manual, data_dir=self.data_dir)
    self.assertEqual(len(arrays['age']), 5)
    self.assertEqual(report['read'], 5)

  @parameterized.named_parameters(
      ('missing', None, r"expected 'UTKFace.tar.gz' .* or the extracted 'UTKFace'/ folder"),
      ('empty_folder', 'folder', r'No UTKFace images .* found in .*UTKFace'),
      ('not_gzip', 'garbage', r'UTKFace\.tar\.gz is truncated or not a valid'),
      ('nothing_usable', 'unusable',
       r"None of the 2 UTKFace images .*\(1 unreadable, 1 with names .*'x_0_0_1\.jpg\.chip\.jpg'"),
      ('broken_link_in_folder', 'broken_link',
       r'UTKFace/31_0_0_1\.jpg\.chip\.jpg cannot be read \(FileNotFoundError.*broken link'),
  )
  def test_bad_input_raises(self, layout, message):
    if layout == 'broken_link':
      folder = os.path.join(self.manual, utk_face.FOLDER)
      os.mkdir(folder)
      with open(os.path.join(folder, _UTK_NAMES[0]), 'wb') as f:
        f.write(_jpeg(0))
      os.symlink(os.path.join(self.manual, 'gone.jpg'),
                 os.path.join(folder, '31_0_0_1.jpg.chip.jpg'))
    elif layout == 'unusable':
      _write_tar(os.path.join(self.manual, utk_face.ARCHIVE),
                 {'30_1_2_1.jpg.chip.jpg': b'xx', 'x_0_0_1.jpg.chip.jpg': _jpeg(0)})
    elif layout == 'folder':
      os.mkdir(os.path.join(self.manual, utk_face.FOLDER))
    elif layout == 'garbage':
      with open(os.path.join(self.manual, utk_face.ARCHIVE), 'wb') as f:
        f.write(b'not an archive')
    with self.assertRaisesRegex(DataError, message):
      utk_face.load(self.manual, data_dir=self.data_dir)
    self._nothing_prepared('utk_face')


def _fer_rows(seed: int = 0):
  rng = np.random.default_rng(seed)
  usages = ['Training'] * 6 + ['PublicTest'] * 2 + ['PrivateTest'] * 3
  rows = []
  for i, usage in enumerate(usages):
    pixels = rng.integers(0, 256, 48 * 48, dtype=np.uint8)
    rows.append({'emotion': i % 7, 'pixels': ' '.join(map(str, pixels)), 'Usage': usage})
  return rows


def _write_csv(path: str, rows, columns=('emotion', 'pixels', 'Usage'), encoding='utf-8'):
  with open(path, 'w', newline='', encoding=encoding) as f:
    writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)


class Fer2013CopiesInTrainTest(absltest.TestCase):

  def test_counts_copies_and_other_labels(self):
    faces = np.random.default_rng(0).integers(0, 256, (5, 48, 48, 1), dtype=np.uint8)
    splits = {
        # Face 0 is in train twice, under emotions 3 and 4.
        'train': {'image': faces[[0, 0, 1, 2]], 'label': np.array([3, 4, 1, 2], np.int32)},
        'validation': {'image': faces[[0, 3]], 'label': np.array([3, 0], np.int32)},
        'test': {'image': faces[[1, 2, 4]], 'label': np.array([1, 5, 6], np.int32)},
    }
    self.assertEqual(fer2013.copies_in_train(splits),
                     {'validation': {'rows': 1, 'other_label': 1},
                      'test': {'rows': 2, 'other_label': 1}})


class Fer2013BuilderTest(_TmpDirTest):

  @parameterized.named_parameters(
      ('utf8', 'utf-8'),
      ('byte_order_mark', 'utf-8-sig'),  # as a spreadsheet may save it
  )
  def test_csv(self, encoding):
    rows = _fer_rows()
    rows.append({'emotion': 9, 'pixels': rows[0]['pixels'], 'Usage': 'Training'})
    rows.append({'emotion': 1, 'pixels': '1 2 3', 'Usage': 'Training'})
    rows.append({'emotion': 1, 'pixels': '9' * 30, 'Usage': 'Training'})  # overflows int64
    _write_csv(os.path.join(self.manual, fer2013.CSV_FILE), rows, encoding=encoding)
    splits = fer2013.load(self.manual, data_dir=self.data_dir)
    for name, usage, first in (('train', 'Training', 0), ('validation', 'PublicTest', 6),
                               ('test', 'PrivateTest', 8)):
      expected = [r for r in rows[:11] if r['Usage'] == usage]
      chex.assert_trees_all_equal(
          splits[name]['label'], np.array([r['emotion'] for r in expected], np.int32))
      pixels = np.array(expected[0]['pixels'].split(), np.uint8).reshape(48, 48, 1)
      chex.assert_trees_all_equal(splits[name]['image'][0], pixels)
      self.assertEqual(splits[name]['file_name'][0], f'fer2013.csv:{first + 2}')
    report = fer2013.prepare_report(self.data_dir)
    self.assertEqual(report['read'], {'train': 6, 'validation': 2, 'test': 3})
    self.assertEqual([c['file'] for c in report['corrupt']],
                     ['fer2013.csv:13', 'fer2013.csv:14', 'fer2013.csv:15'])

  def test_zip_layout_maps_folders_to_original_codes(self):
    entries = {'train/happy/Training_1.jpg': 3, 'train/neutral/Training_2.jpg': 6,
               'test/sad/PublicTest_3.jpg': 4, 'test/angry/PrivateTest_4.jpg': 0,
               'test/surprise/PrivateTest_5.jpg': 5}
    with zipfile.ZipFile(os.path.join(self.manual, fer2013.ZIP_FILE), 'w') as archive:
      for i, name in enumerate(entries):
        archive.writestr(name, _jpeg(i, size=48, mode='L'))
      archive.writestr('test/fear/PrivateTest_6.jpg', b'\xff\xd8 truncated')
      archive.writestr('__MACOSX/train/._x.jpg', b'junk')
    splits = fer2013.load(self.manual, data_dir=self.data_dir)
    chex.assert_trees_all_equal(splits['train']['label'], np.array([3, 6], np.int32))
    chex.assert_trees_all_equal(splits['validation']['label'], np.array([4], np.int32))
    chex.assert_trees_all_equal(splits['test']['label'], np.array([0, 5], np.int32))
    decoded = np.asarray(Image.open(io.BytesIO(_jpeg(0, size=48, mode='L'))))
    chex.assert_trees_all_equal(splits['train']['image'][0, ..., 0], decoded)
    report = fer2013.prepare_report(self.data_dir)
    self.assertEqual([c['file'] for c in report['corrupt']], ['test/fear/PrivateTest_6.jpg'])

  def test_zip_is_read_beside_a_partial_folder(self):
    with zipfile.ZipFile(os.path.join(self.manual, fer2013.ZIP_FILE), 'w') as archive:
      for i, name in enumerate(('train/happy/Training_1.jpg', 'test/sad/PublicTest_2.jpg',
                                'test/angry/PrivateTest_3.jpg')):
        archive.writestr(name, _jpeg(i, size=48, mode='L'))
    os.makedirs(os.path.join(self.manual, 'test', 'sad'))  # a half-finished extraction
    splits = fer2013.load(self.manual, data_dir=self.data_dir)
    self.assertEqual({k: len(v['label']) for k, v in splits.items()},
                     {'train': 1, 'validation': 1, 'test': 1})

  @parameterized.named_parameters(
      ('missing', None, r"expected 'fer2013.csv', the train/ and test/ image folders"),
      ('wrong_columns', 'columns', r"fer2013\.csv has columns \('emotion', 'image'"),
      ('empty_folder', 'folder', r'No FER2013 images found in'),
      ('truncated_zip', 'zip', r'fer2013\.zip is truncated or not a valid zip'),
      ('unknown_emotion', 'emotion', r"Unexpected file 'train/joy/Training_1.jpg'"),
      ('train_only', 'train_only',
       r'no usable faces for split\(s\) validation \(PublicTest_\*\), test \(PrivateTest_\*\)'),
      ('csv_without_private_test', 'csv_no_test', r'fer2013\.csv has no usable faces for split\(s\) test'),
      ('csv_not_utf8', 'latin1', r'fer2013\.csv is not a readable UTF-8 CSV \(UnicodeDecodeError'),
      ('broken_link_in_folder', 'broken_link',
       r'train/happy/Training_2\.jpg cannot be read \(FileNotFoundError'),
  )
  def test_bad_input_raises(self, layout, message):
    if layout == 'broken_link':
      os.makedirs(os.path.join(self.manual, 'train', 'happy'))
      with open(os.path.join(self.manual, 'train', 'happy', 'Training_1.jpg'), 'wb') as f:
        f.write(_jpeg(0, size=48, mode='L'))
      os.symlink(os.path.join(self.manual, 'gone.jpg'),
                 os.path.join(self.manual, 'train', 'happy', 'Training_2.jpg'))
    elif layout == 'columns':
      _write_csv(os.path.join(self.manual, fer2013.CSV_FILE),
                 [{'emotion': 0, 'image': '1', 'Usage': 'Training'}],
                 columns=('emotion', 'image', 'Usage'))
    elif layout == 'folder':
      os.makedirs(os.path.join(self.manual, 'train', 'angry'))
    elif layout == 'zip':
      buf = io.BytesIO()
      with zipfile.ZipFile(buf, 'w') as archive:
        archive.writestr('train/happy/Training_1.jpg', _jpeg(0, size=48, mode='L'))
      with open(os.path.join(self.manual, fer2013.ZIP_FILE), 'wb') as f:
        f.write(buf.getvalue()[:-30])
    elif layout == 'train_only':
      os.makedirs(os.path.join(self.manual, 'train', 'happy'))
      for i in range(3):
        with open(os.path.join(self.manual, 'train', 'happy', f'Training_{i}.jpg'), 'wb') as f:
          f.write(_jpeg(i, size=48, mode='L'))
    elif layout == 'csv_no_test':
      _write_csv(os.path.join(self.manual, fer2013.CSV_FILE),
                 [r for r in _fer_rows() if r['Usage'] != 'PrivateTest'])
    elif layout == 'latin1':
      with open(os.path.join(self.manual, fer2013.CSV_FILE), 'wb') as f:
        f.write(b'emotion,pixels,Usage\n0,1 2 3,Training \xe9\n')
    elif layout == 'emotion':
      os.makedirs(os.path.join(self.manual, 'train', 'joy'))
      with open(os.path.join(self.manual, 'train', 'joy', 'Training_1.jpg'), 'wb') as f:
        f.write(_jpeg(0, size=48, mode='L'))
    with self.assertRaisesRegex(DataError, message):
      fer2013.load(self.manual, data_dir=self.data_dir)
    self._nothing_prepared('fer2013')


class DataDirDefaultTest(absltest.TestCase):

  def test_default_is_home_tensorflow_datasets(self):
    from agejax.data import tfds_io
    self.assertEqual(tfds_io.resolve_data_dir(None),
                     os.path.expanduser(os.path.join('~', 'tensorflow_datasets')))
    self.assertEqual(tfds_io.resolve_data_dir('/x'), '/x')


if __name__ == '__main__':
  absltest.main()
