"""Builds UTKFace and FER2013 from the real downloads and checks the exact published counts.

The data lives outside the repo: `$AGEJAX_DATA_DIR`, default `<repo>/../shared/data`. Skipped
when the files are absent. Each dataset is prepared once per class into a temporary data_dir.
"""

import os
import shutil
import tempfile

import chex
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from agejax.data import fer2013
from agejax.data import splits as splits_lib
from agejax.data import utk_face

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.environ.get('AGEJAX_DATA_DIR', os.path.join(_REPO, '..', 'shared', 'data'))
_HAS_UTK = os.path.exists(os.path.join(DATA_DIR, utk_face.ARCHIVE))
_HAS_FER = os.path.exists(os.path.join(DATA_DIR, fer2013.ZIP_FILE))

_MALFORMED = {
    '39_1_20170116174525125.jpg.chip.jpg': (39, 1, -1),
    '61_1_20170109142408075.jpg.chip.jpg': (61, 1, -1),
    '61_1_20170109150557335.jpg.chip.jpg': (61, 1, -1),
    '24_0_1_20170116220224657 .jpg.chip.jpg': (24, 0, 1),
    '55_0_0_20170116232725357jpg.chip.jpg': (55, 0, 0),
}
_ABOVE_99 = {100: 11, 101: 2, 103: 1, 105: 5, 110: 5, 111: 1, 115: 3, 116: 4}
_DECADES = ((0, 2, 1605), (3, 9, 1457), (10, 19, 1531), (20, 29, 7344), (30, 39, 4537),
            (40, 49, 2245), (50, 59, 2299), (60, 69, 1318), (70, 79, 699), (80, 89, 504),
            (90, 99, 137))
# README: train and test (PublicTest + PrivateTest) per emotion, in original code order.
_FER_TRAIN = {'angry': 3995, 'disgust': 436, 'fear': 4097, 'happy': 7215, 'sad': 4830,
              'surprise': 3171, 'neutral': 4965}
_FER_TEST = {'angry': 958, 'disgust': 111, 'fear': 1024, 'happy': 1774, 'sad': 1247,
             'surprise': 831, 'neutral': 1233}


@absltest.skipUnless(_HAS_UTK, f'UTKFace not found in {DATA_DIR}')
class RealUtkFaceTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tfds_dir = tempfile.mkdtemp()
    cls.arrays, cls.report = utk_face.load(DATA_DIR, data_dir=cls.tfds_dir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tfds_dir)
    super().tearDownClass()

  def test_read_counts(self):
    a = self.arrays
    self.assertEqual(self.report['read'], 23708)
    self.assertEqual(self.report['corrupt'], [])
    self.assertEqual(a['image'].shape, (23708, 48, 48, 1))
    for key in ('age', 'gender', 'race'):
      self.assertEqual(a[key].dtype, np.int32)
    ages, counts = np.unique(a['age'][a['age'] > 99], return_counts=True)
    self.assertEqual(dict(zip(ages.tolist(), counts.tolist())), _ABOVE_99)
    for low, high, expected in _DECADES:
      self.assertEqual(int(((a['age'] >= low) & (a['age'] <= high)).sum()), expected)
    self.assertEqual(int((a['age'] == 26).sum()), 2197)
    self.assertEqual(int((a['age'] == 1).sum()), 1123)

  def test_malformed_names_parsed(self):
    found = {m['file']: (m['age'], m['gender'], m['race'])
             for m in self.report['malformed_names']}
    self.assertEqual(found, _MALFORMED)

  def test_gender_and_race_counts_of_well_formed_names(self):
    well_formed = ~np.isin(self.arrays['file_name'], list(_MALFORMED))
    chex.assert_trees_all_equal(np.bincount(self.arrays['gender'][well_formed]),
                                np.array([12389, 11314]))
    chex.assert_trees_all_equal(np.bincount(self.arrays['race'][well_formed]),
                                np.array([10077, 4525, 3434, 3975, 1692]))

  def test_dedup_split_counts_and_no_hash_across_splits(self):
    splits, report = splits_lib.make_splits(self.arrays, protocol='dedup', seed=0)
    expected = {'read': 23708, 'above_max_age_read': 32, 'duplicate_groups': 375,
                'duplicate_extra_copies': 390, 'unique_hashes': 23318,
                'conflicting_groups': 205, 'conflicting_rows_dropped': 419, 'kept': 23113,
                'above_max_age_excluded': 31}
    self.assertEqual({k: report[k] for k in expected}, expected)
    self.assertEqual(sum(report['split_counts'].values()), 23113 - 31)
    hashes = [set(splits[name]['hash'].tolist()) for name in splits_lib.SPLITS]
    self.assertEqual(hashes[0] & hashes[1], set())
    self.assertEqual(hashes[0] & hashes[2], set())
    self.assertEqual(hashes[1] & hashes[2], set())

  @parameterized.named_parameters(
      ('keep', 'keep', {'validation': 130, 'test': 142}, 23113 - 31),
      ('group', 'group', {'validation': 0, 'test': 0}, 22037 - 28),
  )
  def test_near_duplicates_across_splits(self, policy, leaks, total):
    splits, report = splits_lib.make_splits(
        self.arrays, protocol='dedup', seed=0, near_duplicates=policy)
    self.assertEqual(splits_lib.near_duplicate_leaks(splits), leaks)
    self.assertEqual(sum(report['split_counts'].values()), total)
    if policy == 'group':
      self.assertEqual(report['near_duplicate_pairs'], 1132)  # 406 byte-identical, 39 mirrored
      self.assertEqual(report['conflicting_groups'], 645)

  @parameterized.named_parameters(('paper', 'paper', 23676), ('leaky', 'leaky', 2 * 23676))
  def test_undeduplicated_protocols_leak(self, protocol, total):
    _, report = splits_lib.make_splits(self.arrays, protocol=protocol, seed=0)
    self.assertEqual(sum(report['split_counts'].values()), total)
    self.assertGreater(report['hash_leaks_from_train']['test'], 0)


@absltest.skipUnless(_HAS_FER, f'FER2013 not found in {DATA_DIR}')
class RealFer2013Test(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tfds_dir = tempfile.mkdtemp()
    cls.splits = fer2013.load(DATA_DIR, data_dir=cls.tfds_dir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tfds_dir)
    super().tearDownClass()

  def test_split_sizes(self):
    self.assertEqual({k: v['image'].shape for k, v in self.splits.items()},
                     {'train': (28709, 48, 48, 1), 'validation': (3589, 48, 48, 1),
                      'test': (3589, 48, 48, 1)})

  def test_near_blank_faces_are_kept(self):
    blank = {k: int(np.sum(v['image'].reshape(len(v['image']), -1).std(axis=1) < 1))
             for k, v in self.splits.items()}
    self.assertEqual(blank, {'train': 12, 'validation': 1, 'test': 0})

  def test_pixel_copies_across_splits_are_counted(self):
    self.assertEqual(fer2013.copies_in_train(self.splits),
                     {'validation': {'rows': 280, 'other_label': 13},
                      'test': {'rows': 288, 'other_label': 15}})

  def test_per_emotion_counts_in_original_codes(self):
    counts = {k: np.bincount(v['label'], minlength=7) for k, v in self.splits.items()}
    chex.assert_trees_all_equal(counts['train'],
                                np.array([_FER_TRAIN[e] for e in fer2013.EMOTIONS]))
    chex.assert_trees_all_equal(counts['validation'] + counts['test'],
                                np.array([_FER_TEST[e] for e in fer2013.EMOTIONS]))

  def test_split_follows_file_name_usage(self):
    for split, usage in (('train', 'Training'), ('validation', 'PublicTest'),
                         ('test', 'PrivateTest')):
      names = np.char.rpartition(self.splits[split]['file_name'], '/')[:, 2]
      self.assertTrue(np.all(np.char.startswith(names, usage + '_')))


if __name__ == '__main__':
  absltest.main()
