"""Tests for agejax.ages: age -> class and age -> study-range mappings."""

import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from agejax import ages


class AgeToClassTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("int_ages", [0, 1, 25, 98, 99], 100, [0, 1, 25, 98, 99]),
      ("clips_old_and_negative", [-3, 100, 116], 100, [0, 99, 99]),
      ("floats_truncate", [0.4, 25.9, 98.99, -0.5], 100, [0, 25, 98, 0]),
      ("fewer_classes", [3, 9, 10, 42], 10, [3, 9, 9, 9]),
      # The clip bound (299, 199) does not fit the ages' own dtype.
      ("uint8_many_classes", np.array([0, 5, 50, 200], np.uint8), 300, [0, 5, 50, 200]),
      ("int8_many_classes", np.array([-3, 5, 120], np.int8), 200, [0, 5, 120]),
  )
  def test_values(self, ages_in, num_classes, expected):
    fn = self.variant(lambda a: ages.age_to_class(a, num_classes=num_classes))
    out = fn(jnp.asarray(ages_in))
    chex.assert_shape(out, (len(ages_in),))
    self.assertEqual(out.dtype, jnp.int32)
    chex.assert_trees_all_close(out, np.asarray(expected, np.int32))

  @parameterized.named_parameters(("zero", 0), ("negative", -5), ("float", 10.0))
  def test_bad_num_classes_raises(self, num_classes):
    with self.assertRaisesRegex(ValueError, "num_classes"):
      ages.age_to_class(jnp.arange(3), num_classes=num_classes)


class StudyRangesTest(chex.TestCase):

  def test_ranges_are_the_study_ranges(self):
    self.assertEqual(ages.NUM_RANGES, 11)
    self.assertEqual(
        ages.RANGE_NAMES,
        ("0-2", "3-5", "6-9", "10-12", "13-17", "18-24", "25-34", "35-44",
         "45-54", "55-64", "65+"),
    )
    # Contiguous integer ranges starting at 0, last one open-ended.
    self.assertEqual(ages.STUDY_RANGES[0][0], 0)
    self.assertIsNone(ages.STUDY_RANGES[-1][1])
    for (_, hi), (lo, _) in zip(ages.STUDY_RANGES[:-1], ages.STUDY_RANGES[1:]):
      self.assertEqual(lo, hi + 1)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("bounds", [0, 2, 3, 5, 6, 9, 10, 12, 13, 17, 18, 24, 25, 34, 35, 44,
                  45, 54, 55, 64, 65, 116],
       [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10]),
      ("floats", [2.9, 3.0, 64.5, 65.0], [0, 1, 9, 10]),
      ("out_of_domain", [-1, 500], [0, 10]),
  )
  def test_age_to_range(self, ages_in, expected):
    out = self.variant(ages.age_to_range)(jnp.asarray(ages_in))
    chex.assert_shape(out, (len(ages_in),))
    self.assertEqual(out.dtype, jnp.int32)
    chex.assert_trees_all_close(out, np.asarray(expected, np.int32))

  @chex.variants(with_jit=True, without_jit=True)
  def test_age_to_range_matches_range_table(self):
    all_ages = np.arange(0, 120)
    expected = [
        next(i for i, (lo, hi) in enumerate(ages.STUDY_RANGES)
             if lo <= a and (hi is None or a <= hi))
        for a in all_ages
    ]
    out = self.variant(ages.age_to_range)(jnp.asarray(all_ages))
    chex.assert_trees_all_close(out, np.asarray(expected, np.int32))

  @parameterized.named_parameters(
      ("default", {}, 82.0),
      ("closed_at_115", {"max_age": 115}, 90.0),
  )
  def test_range_midpoints(self, kwargs, last):
    mids = ages.range_midpoints(**kwargs)
    chex.assert_shape(mids, (ages.NUM_RANGES,))
    expected = [1.0, 4.0, 7.5, 11.0, 15.0, 21.0, 29.5, 39.5, 49.5, 59.5, last]
    chex.assert_trees_all_close(mids, np.asarray(expected, np.float32))

  @parameterized.named_parameters(("below_last_range", 50), ("float", 99.0))
  def test_range_midpoints_bad_max_age_raises(self, max_age):
    with self.assertRaisesRegex(ValueError, "max_age"):
      ages.range_midpoints(max_age)


if __name__ == "__main__":
  absltest.main()
