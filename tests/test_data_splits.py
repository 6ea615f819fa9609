"""Dedup, age filter, split protocols and class balance on small synthetic arrays."""

import io

import chex
import numpy as np
from PIL import Image
from absl.testing import absltest
from absl.testing import parameterized

from agejax.data import balance
from agejax.data import cleaning
from agejax.data import splits


def _arrays(ages, hashes):
  n = len(ages)
  return {
      'image': np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2, 1),
      'age': np.asarray(ages, dtype=np.int32),
      'hash': np.asarray(hashes),
      'file_name': np.array([f'f{i}' for i in range(n)]),
  }


def _synthetic(n=600, seed=0):
  """Ages 0..119 with 30 duplicate pairs (10 of them conflicting)."""
  rng = np.random.default_rng(seed)
  ages = rng.integers(0, 120, n).astype(np.int32)
  hashes = np.array([f'h{i}' for i in range(n)])
  hashes[n - 30:] = hashes[:30]
  ages[n - 30:] = ages[:30]
  ages[n - 10:] = (ages[20:30] + 1) % 100
  return _arrays(ages, hashes)


def _face(seed: int) -> np.ndarray:
  """A smooth random 48x48 gray image, a stand-in for a face."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (7, 7)).astype(np.float32)
  image = Image.fromarray(coarse.astype(np.uint8)).resize((48, 48), Image.Resampling.BICUBIC)
  noise = rng.normal(0, 4, (48, 48))
  return np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)


def _reencoded(image: np.ndarray, quality: int = 40) -> np.ndarray:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, 'JPEG', quality=quality)
  return np.asarray(Image.open(buf))


_VARIANTS = {
    'reencoded': _reencoded,
    'resized': lambda x: np.asarray(Image.fromarray(x).resize((40, 40)).resize((48, 48))),
    'brighter_and_more_contrast': lambda x: np.clip(x * 1.2 + 15, 0, 255).astype(np.uint8),
    'other_face': lambda x: _face(999),
    'mirrored': lambda x: x[:, ::-1],
    'mirrored_and_reencoded': lambda x: _reencoded(x[:, ::-1].copy()),
}


class NearDuplicateTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('reencoded', 'reencoded', True),
      ('resized', 'resized', True),
      ('brighter_and_more_contrast', 'brighter_and_more_contrast', True),
      ('other_face', 'other_face', False),
      ('mirrored', 'mirrored', True),
      ('mirrored_and_reencoded', 'mirrored_and_reencoded', True),
  )
  def test_pairs(self, variant, found):
    faces = [_face(i) for i in range(5)]
    images = np.stack(faces + [_VARIANTS[variant](faces[2])])[..., None]
    pairs = cleaning.near_duplicate_pairs(images)
    expected = [[2, 5]] if found else []
    self.assertEqual(pairs.tolist(), expected)

  def test_empty_and_too_small_inputs(self):
    empty = np.zeros((0, 48, 48, 1), np.uint8)
    self.assertEqual(cleaning.near_duplicate_pairs(empty).shape, (0, 2))
    faces = np.stack([_face(0), _face(1)])[..., None]
    self.assertEqual(cleaning.near_duplicate_leaks(faces, {'test': empty}), {'test': 0})
    with self.assertRaisesRegex(ValueError, r'at least 12x12 pixels, got shape \(2, 8, 8, 1\)'):
      cleaning.near_duplicate_pairs(np.zeros((2, 8, 8, 1), np.uint8))

  def test_symmetric_image_is_not_its_own_pair(self):
    half = _face(0)[:, :24]
    symmetric = np.concatenate([half, half[:, ::-1]], axis=1)
    images = np.stack([symmetric, _face(1), _reencoded(symmetric)])[..., None]
    self.assertEqual(cleaning.near_duplicate_pairs(images).tolist(), [[0, 2]])

  def test_flat_images_match_nothing(self):
    images = np.stack([np.full((48, 48), 7), np.full((48, 48), 200), _face(0)]).astype(np.uint8)
    self.assertEqual(cleaning.near_duplicate_pairs(images[..., None]).tolist(), [])

  def test_rgb64_images(self):
    face = np.asarray(Image.fromarray(_face(3)).resize((64, 64)))
    rgb = np.stack([face] * 3, axis=-1)
    images = np.stack([rgb, np.clip(rgb.astype(int) + 10, 0, 255).astype(np.uint8),
                       np.stack([np.asarray(Image.fromarray(_face(4)).resize((64, 64)))] * 3, -1)])
    self.assertEqual(cleaning.near_duplicate_pairs(images).tolist(), [[0, 1]])

  @parameterized.named_parameters(
      ('hashes_only', ['a', 'b', 'a', 'c', 'd'], None, [[0, 2]]),
      ('pair_joins_singles', ['a', 'b', 'a', 'c', 'd'], [[1, 3]], [[0, 2], [1, 3]]),
      ('pair_joins_a_copy', ['a', 'b', 'a', 'c', 'd'], [[2, 4]], [[0, 2, 4]]),
      ('transitive', ['a', 'b', 'c', 'd', 'e'], [[3, 4], [0, 3]], [[0, 3, 4]]),
  )
  def test_groups(self, hashes, pairs, expected):
    pairs = None if pairs is None else np.array(pairs)
    groups = cleaning.duplicate_groups(np.array(hashes), pairs)
    self.assertEqual([g.tolist() for g in groups], expected)

  def test_leaks(self):
    faces = np.stack([_face(i) for i in range(7)])[..., None]
    train = faces[:4]
    test = np.stack([_reencoded(faces[1, ..., 0])[..., None], faces[4], faces[5]])
    mirrored = np.stack([faces[2, :, ::-1], faces[6]])
    self.assertEqual(cleaning.near_duplicate_leaks(train, {'test': test, 'validation': mirrored}),
                     {'test': 1, 'validation': 1})


class DeduplicateTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('drop', 'drop', [0, 1, 4], 2, 1, 3),
      ('keep_first', 'keep_first', [0, 1, 3, 4], 2, 1, 0),
  )
  def test_groups(self, conflicts, kept_rows, groups, conflicting, dropped):
    # Rows 0,2: same hash, same age. Rows 3,5,6: same hash, different ages.
    data = _arrays([5, 7, 5, 9, 11, 10, 9], ['a', 'b', 'a', 'c', 'd', 'c', 'c'])
    kept, report = cleaning.deduplicate(data, conflicts=conflicts)
    chex.assert_trees_all_equal(kept['file_name'], data['file_name'][kept_rows])
    self.assertEqual(report['duplicate_groups'], groups)
    self.assertEqual(report['conflicting_groups'], conflicting)
    self.assertEqual(report['conflicting_rows_dropped'], dropped)
    self.assertEqual(report['unique_hashes'], 4)

  def test_bad_policy_raises(self):
    with self.assertRaisesRegex(ValueError, 'conflicts must be one of'):
      cleaning.deduplicate(_arrays([1], ['a']), conflicts='vote')

  def test_filter_max_age(self):
    kept, excluded = cleaning.filter_max_age(_arrays([1, 99, 100, 116], list('abcd')), max_age=99)
    chex.assert_trees_all_equal(kept['age'], np.array([1, 99], dtype=np.int32))
    self.assertEqual(excluded, 2)


class MakeSplitsTest(parameterized.TestCase):

  @parameterized.named_parameters(('dedup', 'dedup'), ('paper', 'paper'), ('leaky', 'leaky'))
  def test_labels_counts_and_determinism(self, protocol):
    data = _synthetic()
    out, report = splits.make_splits(data, protocol=protocol, seed=3)
    again, _ = splits.make_splits(data, protocol=protocol, seed=3)
    chex.assert_trees_all_equal(out, again)
    total = sum(report['split_counts'].values())
    self.assertEqual(report['above_max_age_read'], int((data['age'] > 99).sum()))
    for name, part in out.items():
      chex.assert_trees_all_equal(part['label'], part['age'])
      self.assertEqual(part['label'].dtype, np.int32)
      self.assertTrue(np.all((part['label'] >= 0) & (part['label'] <= 99)))
      self.assertLessEqual(abs(len(part['label']) / total - {'train': .7}.get(name, .15)), 0.03)
    other, _ = splits.make_splits(data, protocol=protocol, seed=4)
    self.assertFalse(np.array_equal(other['test']['file_name'], out['test']['file_name']))

  def test_dedup_no_hash_in_two_splits(self):
    out, report = splits.make_splits(_synthetic(), protocol='dedup')
    sets = [set(out[name]['hash'].tolist()) for name in splits.SPLITS]
    self.assertEqual(sets[0] & sets[1] | sets[0] & sets[2] | sets[1] & sets[2], set())
    self.assertEqual(report['hash_leaks_from_train'], {'validation': 0, 'test': 0})
    self.assertEqual(report['duplicate_groups'], 30)
    self.assertEqual(report['conflicting_groups'], 10)

  def test_dedup_is_stratified(self):
    data = _arrays(np.repeat(np.arange(10), 20), [f'h{i}' for i in range(200)])
    out, _ = splits.make_splits(data, protocol='dedup')
    for name, expected in (('train', 14), ('validation', 3), ('test', 3)):
      chex.assert_trees_all_equal(np.bincount(out[name]['label'], minlength=10),
                                  np.full(10, expected))

  def test_leaky_doubles_and_leaks(self):
    data = _synthetic()
    out, report = splits.make_splits(data, protocol='leaky')
    self.assertEqual(sum(report['split_counts'].values()),
                     2 * (len(data['age']) - report['above_max_age_excluded']))
    self.assertGreater(report['hash_leaks_from_train']['test'], 0)

  @parameterized.named_parameters(('keep', 'keep'), ('group', 'group'))
  def test_near_duplicates(self, policy):
    faces = [_face(i) for i in range(200)]
    ages = list(np.arange(200) % 50)
    # 40 faces saved again: 20 with the same age, 20 with another one.
    for i in range(40):
      faces.append(_reencoded(faces[i]))
      ages.append(ages[i] if i < 20 else ages[i] + 1)
    data = _arrays(ages, [f'h{i}' for i in range(240)]) | {'image': np.stack(faces)[..., None]}
    out, report = splits.make_splits(data, protocol='dedup', seed=1, near_duplicates=policy)
    leaks = splits.near_duplicate_leaks(out)
    if policy == 'keep':
      self.assertNotIn('near_duplicates', report)
      self.assertEqual(sum(report['split_counts'].values()), 240)
      self.assertGreater(sum(leaks.values()), 0)
    else:
      self.assertEqual(report['near_duplicates'], 'group')
      self.assertEqual(report['near_duplicate_pairs'], 40)
      self.assertEqual(report['conflicting_groups'], 20)
      self.assertEqual(sum(report['split_counts'].values()), 200 - 20)
      self.assertEqual(leaks, {'validation': 0, 'test': 0})

  @parameterized.named_parameters(
      ('protocol', {'protocol': 'kaggle'}, 'protocol must be one of'),
      ('fractions', {'fractions': (0.5, 0.5)}, 'fractions must be'),
      ('near_policy', {'near_duplicates': 'merge'}, 'near_duplicates must be one of'),
      ('near_without_dedup', {'protocol': 'paper', 'near_duplicates': 'group'},
       "only protocol 'dedup' does"),
  )
  def test_bad_arguments_raise(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      splits.make_splits(_synthetic(), **kwargs)


class BalanceTest(parameterized.TestCase):

  def _labelled(self):
    labels = np.array([0] * 10 + [1] * 5 + [3] * 1, dtype=np.int32)
    return {'label': labels, 'id': np.arange(len(labels))}

  def test_undersample(self):
    out = balance.undersample(self._labelled(), label=0, n_remove=4, seed=1)
    chex.assert_trees_all_equal(np.bincount(out['label'], minlength=4), np.array([6, 5, 0, 1]))
    self.assertTrue(np.all(np.diff(out['id']) > 0))
    again = balance.undersample(self._labelled(), label=0, n_remove=4, seed=1)
    chex.assert_trees_all_equal(out, again)

  def test_undersample_too_many_raises(self):
    with self.assertRaisesRegex(ValueError, 'cannot remove 6 rows of label 1'):
      balance.undersample(self._labelled(), label=1, n_remove=6, seed=0)

  @parameterized.named_parameters(('cap3', 3, [3, 3, 0, 1]), ('cap0', 0, [0, 0, 0, 0]))
  def test_cap_per_class(self, cap, expected):
    out = balance.cap_per_class(self._labelled(), cap=cap, seed=0)
    chex.assert_trees_all_equal(np.bincount(out['label'], minlength=4), np.array(expected))

  def test_balanced_weights_match_sklearn_and_absent_are_zero(self):
    from sklearn.utils.class_weight import compute_class_weight
    labels = self._labelled()['label']
    weights = balance.class_weights(labels, 5)
    present = np.unique(labels)
    expected = compute_class_weight('balanced', classes=present, y=labels)
    chex.assert_trees_all_close(weights[present], expected.astype(np.float32), rtol=1e-6)
    chex.assert_trees_all_equal(weights[[2, 4]], np.zeros(2, np.float32))
    self.assertEqual(weights.dtype, np.float32)

  @parameterized.named_parameters(
      ('scheme', {'scheme': 'inverse'}, 'scheme must be one of'),
      ('label_range', {'num_classes': 2}, 'labels must lie in 0..1'),
  )
  def test_class_weights_raise(self, kwargs, message):
    args = {'num_classes': 5} | kwargs
    with self.assertRaisesRegex(ValueError, message):
      balance.class_weights(self._labelled()['label'], **args)

  def test_random_subset_is_seeded_ordered_and_spread(self):
    ages = np.repeat(np.arange(10), 100)  # sorted, as file names sort real splits
    data = {'label': ages, 'id': np.arange(len(ages))}
    out = balance.random_subset(data, n=100, seed=3)
    self.assertLen(out['id'], 100)
    self.assertTrue(np.all(np.diff(out['id']) > 0))
    np.testing.assert_array_equal(out['label'], ages[out['id']])
    self.assertLen(set(out['label'].tolist()), 10)  # every age, not the first rows' one
    chex.assert_trees_all_equal(out, balance.random_subset(data, n=100, seed=3))
    self.assertFalse(np.array_equal(out['id'], balance.random_subset(data, n=100, seed=4)['id']))

  @parameterized.named_parameters(('all', 16), ('more_than_all', 100))
  def test_random_subset_of_everything(self, n):
    data = self._labelled()
    self.assertIs(balance.random_subset(data, n=n, seed=0), data)

  def test_random_subset_negative_raises(self):
    with self.assertRaisesRegex(ValueError, 'n must be >= 0'):
      balance.random_subset(self._labelled(), n=-1, seed=0)

  def test_uniform_weights(self):
    chex.assert_trees_all_equal(balance.class_weights(np.array([0, 1]), 3, scheme='uniform'),
                                np.ones(3, np.float32))


if __name__ == '__main__':
  absltest.main()
