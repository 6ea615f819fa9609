"""Tests of agejax.bootstrap against the binomial's known spread and its own invariants."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import numpy as np

from agejax import bootstrap
from agejax import metrics


def _cm(n_classes: int = 20, n: int = 2000, seed: int = 0) -> np.ndarray:
  """A confusion matrix of n examples, mostly near the diagonal."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, n_classes, n)
  preds = np.clip(labels + rng.integers(-3, 4, n), 0, n_classes - 1)
  cm = np.zeros((n_classes, n_classes), np.int32)
  np.add.at(cm, (labels, preds), 1)
  return cm


class ResampleTest(absltest.TestCase):

  def test_samples_keep_size_and_support(self):
    cm = _cm()
    samples = np.asarray(bootstrap.resample_confusion(jax.random.key(0), cm, 300))
    chex.assert_shape(samples, (300, *cm.shape))
    np.testing.assert_array_equal(samples.sum(axis=(1, 2)), cm.sum())
    self.assertTrue(np.all(samples[:, cm == 0] == 0))
    # The mean of the resampled counts is the observed matrix.
    np.testing.assert_allclose(samples.mean(axis=0), cm, atol=4 * math.sqrt(cm.max() / 300) + 0.5)

  def test_key_decides(self):
    cm = _cm()
    a, b, c = (
        np.asarray(bootstrap.resample_confusion(jax.random.key(k), cm, 5)) for k in (1, 1, 2)
    )
    np.testing.assert_array_equal(a, b)
    self.assertFalse(np.array_equal(a, c))


class IntervalTest(absltest.TestCase):

  def test_accuracy_interval_matches_binomial(self):
    cm = _cm(n=4000)
    n, acc = cm.sum(), np.trace(cm) / cm.sum()
    low, high = bootstrap.interval(jax.random.key(0), cm, metrics.accuracy_from_cm, num_samples=2000)
    self.assertLess(low, acc)
    self.assertGreater(high, acc)
    expected = 2 * 1.96 * math.sqrt(acc * (1 - acc) / n)
    self.assertAlmostEqual((high - low) / expected, 1.0, delta=0.12)

  def test_mae_and_cs_intervals_contain_the_estimate(self):
    cm = _cm()
    for score in (metrics.mae_from_cm, lambda m: metrics.cs_from_cm(m, (1,))[0]):
      low, high = bootstrap.interval(jax.random.key(1), cm, score)
      self.assertLess(low, float(score(cm)))
      self.assertGreater(high, float(score(cm)))

  def test_difference_of_equal_runs_straddles_zero_and_is_wider(self):
    cm = _cm(n=4000)
    key = jax.random.key(2)
    low, high = bootstrap.difference_interval(key, cm, cm, metrics.accuracy_from_cm, num_samples=2000)
    self.assertLess(low, 0.0)
    self.assertGreater(high, 0.0)
    single_low, single_high = bootstrap.interval(key, cm, metrics.accuracy_from_cm, num_samples=2000)
    self.assertAlmostEqual((high - low) / (single_high - single_low), math.sqrt(2), delta=0.2)

  def test_clearly_different_runs_exclude_zero(self):
    good = np.diag(np.full(10, 100)).astype(np.int32)
    bad = good.copy()
    bad[np.arange(10), (np.arange(10) + 5) % 10] = 60
    low, high = bootstrap.difference_interval(jax.random.key(3), good, bad, metrics.accuracy_from_cm)
    self.assertGreater(low, 0.0)
    self.assertLess(high, 0.5)


class MeanIntervalTest(absltest.TestCase):

  def test_matches_normal_theory(self):
    values = np.random.default_rng(0).normal(1.0, 2.0, 5000)
    low, high = bootstrap.mean_interval(jax.random.key(0), values, num_samples=2000)
    half = 1.96 * values.std() / math.sqrt(values.size)
    self.assertAlmostEqual(low, values.mean() - half, delta=0.15 * half)
    self.assertAlmostEqual(high, values.mean() + half, delta=0.15 * half)

  def test_pairing_tightens_the_difference(self):
    # Two models that agree on most faces: the paired interval is far narrower.
    rng = np.random.default_rng(1)
    correct_a = rng.random(3000) < 0.3
    correct_b = correct_a.copy()
    flip = rng.random(3000) < 0.05
    correct_b[flip] = ~correct_b[flip]
    key = jax.random.key(2)
    paired = bootstrap.mean_interval(key, correct_a.astype(float) - correct_b)
    def cm(correct):
      return np.array([[correct.sum(), 0], [(~correct).sum(), 0]], np.int32)
    unpaired = bootstrap.difference_interval(key, cm(correct_a), cm(correct_b), metrics.accuracy_from_cm)
    self.assertLess(paired[1] - paired[0], 0.5 * (unpaired[1] - unpaired[0]))

  def test_raises_on_empty_values(self):
    with self.assertRaisesRegex(ValueError, 'shape'):
      bootstrap.mean_interval(jax.random.key(0), np.zeros(0))


class ValidationTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('not_square', np.zeros((3, 4), np.int32), {}, 'shape'),
      ('negative', np.array([[1, -1], [0, 2]], np.int32), {}, 'non-negative integer'),
      ('floats', np.eye(3, dtype=np.float32), {}, 'non-negative integer'),
      ('empty', np.zeros((3, 3), np.int32), {}, 'empty'),
      ('no_samples', np.eye(3, dtype=np.int32), {'num_samples': 0}, 'num_samples'),
      ('fractional_samples', np.eye(3, dtype=np.int32), {'num_samples': 2.5}, 'num_samples'),
      ('level_one', np.eye(3, dtype=np.int32), {'level': 1.0}, 'level'),
  )
  def test_raises(self, cm, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      bootstrap.interval(jax.random.key(0), cm, metrics.accuracy_from_cm, **kwargs)


if __name__ == '__main__':
  absltest.main()
