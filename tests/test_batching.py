"""Tests for agejax.batching: fixed-shape train and eval batches."""

import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from agejax import batching


def _arrays(n: int, with_age: bool = True, extra: bool = False):
  rng = np.random.default_rng(n)
  arrays = {
      'image': rng.integers(1, 256, (n, 6, 6, 1)).astype(np.uint8),
      'label': rng.integers(1, 9, n).astype(np.int32),
  }
  if with_age:
    arrays['age'] = rng.integers(1, 90, n).astype(np.int32)
  if extra:
    # Not a batch key: ignored, even with another length.
    arrays['filename'] = np.array(['x'] * (n + 3))
  return arrays


class EvalBatchesTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('padded_last', 10, 4, True, [4, 4, 2]),
      ('exact', 12, 4, True, [4, 4, 4]),
      ('one_padded_batch', 3, 8, True, [3]),
      ('batch_equals_n', 5, 5, False, [5]),
      ('batch_of_one', 3, 1, False, [1, 1, 1]),
  )
  def test_shapes_mask_and_content(self, n, batch_size, with_age, real_sizes):
    arrays = _arrays(n, with_age)
    batches = list(batching.eval_batches(arrays, batch_size))
    self.assertLen(batches, len(real_sizes))
    keys = {'image', 'label', 'mask'} | ({'age'} if with_age else set())
    start = 0
    for batch, real in zip(batches, real_sizes):
      self.assertEqual(set(batch), keys)
      chex.assert_shape(batch['image'], (batch_size, 6, 6, 1))
      chex.assert_shape([batch['label'], batch['mask']], (batch_size,))
      self.assertEqual(batch['image'].dtype, np.uint8)
      self.assertEqual(batch['label'].dtype, np.int32)
      self.assertEqual(batch['mask'].dtype, np.bool_)
      np.testing.assert_array_equal(
          batch['mask'], np.arange(batch_size) < real
      )
      for k in keys - {'mask'}:
        np.testing.assert_array_equal(
            batch[k][:real], arrays[k][start : start + real]
        )
        # Padding is zeros (the data itself has no zeros in it).
        self.assertTrue(np.all(batch[k][real:] == 0), k)
      start += real
    self.assertEqual(start, n)

  def test_masked_rows_reassemble_dataset(self):
    arrays = _arrays(11)
    batches = list(batching.eval_batches(arrays, 4))
    for k in ('image', 'label', 'age'):
      got = np.concatenate([b[k][b['mask']] for b in batches])
      np.testing.assert_array_equal(got, arrays[k])

  def test_extra_keys_are_ignored(self):
    (batch,) = list(batching.eval_batches(_arrays(4, extra=True), 4))
    self.assertNotIn('filename', batch)

  def test_empty_dataset_yields_nothing(self):
    arrays = {
        'image': np.zeros((0, 6, 6, 1), np.uint8),
        'label': np.zeros((0,), np.int32),
    }
    self.assertEqual(list(batching.eval_batches(arrays, 4)), [])


class TrainBatchesTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('with_age', True),
      ('without_age', False),
  )
  def test_batches_follow_indices(self, with_age):
    arrays = _arrays(7, with_age, extra=True)
    indices = np.array([[3, 1, 6], [0, 2, 5]])
    batches = list(batching.train_batches(arrays, indices))
    self.assertLen(batches, 2)
    keys = {'image', 'label', 'mask'} | ({'age'} if with_age else set())
    for batch, idx in zip(batches, indices):
      self.assertEqual(set(batch), keys)
      for k in keys - {'mask'}:
        np.testing.assert_array_equal(batch[k], arrays[k][idx])
      np.testing.assert_array_equal(batch['mask'], np.ones(3, bool))
      self.assertEqual(batch['mask'].dtype, np.bool_)

  def test_accepts_device_indices(self):
    arrays = _arrays(5)
    (batch,) = list(batching.train_batches(arrays, jnp.array([[4, 0]])))
    np.testing.assert_array_equal(batch['label'], arrays['label'][[4, 0]])


def _drop(key):
  def make(n):
    arrays = _arrays(n)
    del arrays[key]
    return arrays

  return make


def _shorten(key):
  def make(n):
    arrays = _arrays(n)
    arrays[key] = arrays[key][:-1]
    return arrays

  return make


class BadArraysTest(parameterized.TestCase):

  @parameterized.product(
      (
          dict(make=_drop('image'), error=KeyError, regex='image'),
          dict(make=_drop('label'), error=KeyError, regex='label'),
          dict(make=_shorten('label'), error=ValueError, regex='label'),
          dict(make=_shorten('age'), error=ValueError, regex='age'),
          dict(make=_shorten('image'), error=ValueError, regex='differ'),
      ),
      mode=('eval', 'train'),
  )
  def test_raises(self, make, error, regex, mode):
    arrays = make(6)
    if mode == 'eval':
      batches = batching.eval_batches(arrays, 4)
    else:
      batches = batching.train_batches(arrays, np.array([[0, 1]]))
    with self.assertRaisesRegex(error, regex):
      list(batches)


def _with(key, value):
  def make(n):
    arrays = _arrays(n)
    return {**arrays, key: value(arrays[key])}

  return make


class CheckArraysTest(parameterized.TestCase):

  def test_fitting_arrays_pass(self):
    batching.check_arrays(_arrays(6), image_shape=(6, 6, 1), num_classes=9, name='train')

  @parameterized.named_parameters(
      ('float_images', _with('image', lambda x: x / 255.0), r"'test'.*uint8 \[N, 6, 6, 1\].*float64"),
      ('other_size', _with('image', lambda x: x[:, :5]), r'got uint8 \[6, 5, 6, 1\]'),
      ('no_channel_axis', _with('image', lambda x: x[..., 0]), r'got uint8 \[6, 6, 6\]'),
      ('float_labels', _with('label', lambda x: x.astype(np.float32)), 'integer class indices'),
      ('label_matrix', _with('label', lambda x: x[:, None]), r'integer class indices \[N\]'),
      ('label_too_large', _with('label', lambda x: np.where(x == x[0], 9, x)), r'outside 0\.\.8 \(e\.g\. \[9\]'),
      ('negative_label', _with('label', lambda x: np.where(x == x[0], -1, x)), r'e\.g\. \[-1\]'),
      ('no_label', _drop('label'), r"'test'.*need keys \['label'\]"),
      ('other_length', _shorten('age'), r"'test'.*differ in length"),
  )
  def test_raises(self, make, regex):
    with self.assertRaisesRegex(ValueError, regex):
      batching.check_arrays(make(6), image_shape=(6, 6, 1), num_classes=9, name='test')


if __name__ == '__main__':
  absltest.main()
