"""Tests for agejax.metrics against scikit-learn and NumPy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from sklearn import metrics as skm

from agejax import ages, metrics

_TOL = {"rtol": 1e-6, "atol": 1e-6}
_NAN = float("nan")


def _random_pair(seed: int, num_classes: int, size: int):
  """Labels from about half the classes, predictions mostly near the labels.

  Some classes are then absent from both (``labels='present'`` differs from
  ``'all'``), some only predicted (recall undefined) and some never predicted
  (precision undefined), exercising ``zero_division``.
  """
  rng = np.random.default_rng(seed)
  seen = rng.choice(num_classes, size=max(2, num_classes // 2), replace=False)
  labels = rng.choice(seen, size)
  preds = np.clip(labels + rng.integers(-2, 3, size), 0, num_classes - 1)
  jump = rng.random(size) < 0.1
  preds = np.where(jump, rng.integers(0, num_classes, size), preds)
  return labels.astype(np.int32), preds.astype(np.int32)


def _random_mask(seed: int, size: int) -> np.ndarray:
  return np.random.default_rng(seed + 1000).random(size) < 0.7


def _sk_prf(labels, preds, num_classes, average, label_set, zero_division):
  sk_labels = list(range(num_classes)) if label_set == "all" else None
  return skm.precision_recall_fscore_support(
      labels, preds, labels=sk_labels, average=average, zero_division=zero_division
  )


class ConfusionMatrixTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("small", 0, 12, 60, False),
      ("small_masked", 1, 12, 60, True),
      ("ages", 2, 100, 300, False),
      ("ages_masked", 3, 100, 300, True),
  )
  def test_matches_sklearn(self, seed, num_classes, size, masked):
    labels, preds = _random_pair(seed, num_classes, size)
    mask = _random_mask(seed, size) if masked else None
    fn = self.variant(lambda l, p, m: metrics.confusion_matrix(l, p, num_classes, m))
    cm = fn(labels, preds, mask)
    chex.assert_shape(cm, (num_classes, num_classes))
    self.assertEqual(cm.dtype, jnp.int32)
    keep = np.ones(size, bool) if mask is None else mask
    expected = skm.confusion_matrix(
        labels[keep], preds[keep], labels=list(range(num_classes))
    )
    chex.assert_trees_all_close(cm, expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_out_of_range_ignored_like_sklearn(self):
    labels = np.array([0, 1, -1, 2, 5, 3], np.int32)
    preds = np.array([0, 4, 1, -2, 2, 3], np.int32)
    cm = self.variant(lambda l, p: metrics.confusion_matrix(l, p, 4))(labels, preds)
    expected = skm.confusion_matrix(labels, preds, labels=[0, 1, 2, 3])
    chex.assert_trees_all_close(cm, expected)
    self.assertEqual(int(cm.sum()), 2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_padded_batches_accumulate_to_full_matrix(self):
    num_classes, size, batch = 12, 70, 32
    labels, preds = _random_pair(4, num_classes, size)
    pad = (-size) % batch
    # Padding repeats real examples, so an unmasked pad would be counted.
    padded_labels = np.concatenate([labels, labels[:pad]])
    padded_preds = np.concatenate([preds, preds[:pad]])
    mask = np.arange(size + pad) < size
    fn = self.variant(lambda l, p, m: metrics.confusion_matrix(l, p, num_classes, m))
    total = sum(
        fn(padded_labels[s:s + batch], padded_preds[s:s + batch], mask[s:s + batch])
        for s in range(0, size + pad, batch)
    )
    expected = skm.confusion_matrix(labels, preds, labels=list(range(num_classes)))
    chex.assert_trees_all_close(total, expected)

  @parameterized.named_parameters(
      ("preds_shape", np.zeros(5, np.int32), np.zeros(4, np.int32), None, 3, "preds"),
      ("labels_2d", np.zeros((5, 1), np.int32), np.zeros((5, 1), np.int32), None, 3, "labels"),
      ("mask_shape", np.zeros(5, np.int32), np.zeros(5, np.int32), np.ones(4), 3, "mask"),
      ("float_preds", np.zeros(5, np.int32), np.zeros(5, np.float32), None, 3, "integer"),
      ("zero_classes", np.zeros(5, np.int32), np.zeros(5, np.int32), None, 0, "num_classes"),
  )
  def test_bad_inputs_raise(self, labels, preds, mask, num_classes, match):
    with self.assertRaisesRegex(ValueError, match):
      metrics.confusion_matrix(labels, preds, num_classes, mask)


class ToleranceAdjustTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("k0", 0), ("k1", 1), ("k3", 3))
  def test_adjust_and_confusion_equivalence(self, k):
    num_classes = 100
    labels, preds = _random_pair(5, num_classes, 300)
    adjusted = self.variant(lambda l, p: metrics.tolerance_adjust(l, p, k))(labels, preds)
    expected = np.where(np.abs(preds - labels) <= k, labels, preds)
    chex.assert_trees_all_close(adjusted, expected)

    cm_fn = self.variant(
        lambda l, p: metrics.tolerance_adjust_confusion(
            metrics.confusion_matrix(l, p, num_classes), k
        )
    )
    expected_cm = skm.confusion_matrix(labels, expected, labels=list(range(num_classes)))
    chex.assert_trees_all_close(cm_fn(labels, preds), expected_cm)

  @chex.variants(with_jit=True, without_jit=True)
  def test_unsigned_inputs_do_not_wrap(self):
    labels = np.array([5, 3, 0, 9], np.uint8)
    preds = np.array([3, 5, 4, 9], np.uint8)
    fn = self.variant(
        lambda l, p: (metrics.tolerance_adjust(l, p, 2), metrics.cs_counts(l, p, (0, 2, 3)))
    )
    adjusted, counts = fn(labels, preds)
    self.assertEqual(adjusted.dtype, jnp.uint8)
    chex.assert_trees_all_equal(adjusted, np.array([5, 3, 4, 9], np.uint8))
    chex.assert_trees_all_equal(counts, np.array([1, 3, 3], np.int32))

  @parameterized.named_parameters(("negative", -1), ("float", 1.5), ("bool", True))
  def test_bad_k_raises(self, k):
    labels = np.zeros(3, np.int32)
    with self.assertRaisesRegex(ValueError, "k must be"):
      metrics.tolerance_adjust(labels, labels, k)
    with self.assertRaisesRegex(ValueError, "k must be"):
      metrics.tolerance_adjust_confusion(np.zeros((3, 3), np.int32), k)


class DecodeTest(chex.TestCase):

  def _probs(self, seed, batch=20, num_classes=100):
    return np.random.default_rng(seed).dirichlet(np.ones(num_classes), batch).astype(np.float32)

  @chex.variants(with_jit=True, without_jit=True)
  def test_argmax(self):
    probs = self._probs(6)
    out = self.variant(metrics.decode_argmax)(probs)
    chex.assert_shape(out, (20,))
    self.assertEqual(out.dtype, jnp.int32)
    chex.assert_trees_all_close(out, probs.argmax(-1).astype(np.int32))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("age_classes", False), ("range_midpoints", True))
  def test_expected(self, ranges):
    num_classes = ages.NUM_RANGES if ranges else 100
    probs = self._probs(7, num_classes=num_classes)
    values = ages.range_midpoints() if ranges else None
    out = self.variant(lambda p: metrics.decode_expected(p, values))(probs)
    chex.assert_shape(out, (20,))
    v = np.asarray(values) if ranges else np.arange(num_classes)
    chex.assert_trees_all_close(out, probs.astype(np.float64) @ v, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_median_random(self):
    probs = self._probs(8)
    out = self.variant(metrics.decode_median)(probs)
    chex.assert_shape(out, (20,))
    self.assertEqual(out.dtype, jnp.int32)
    expected = np.argmax(np.cumsum(probs.astype(np.float64), -1) >= 0.5, -1)
    chex.assert_trees_all_close(out, expected.astype(np.int32))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("cdf_hits_half", [0.25, 0.25, 0.5], 1),
      ("cdf_jumps_over_half", [0.25, 0.125, 0.625], 2),
      ("first_class", [0.75, 0.25, 0.0], 0),
      ("never_reaches_half", [0.1, 0.1, 0.1], 2),
  )
  def test_median_cases(self, probs, expected):
    out = self.variant(metrics.decode_median)(jnp.asarray([probs]))
    chex.assert_trees_all_close(out, jnp.asarray([expected], jnp.int32))

  @parameterized.named_parameters(
      ("argmax", metrics.decode_argmax),
      ("expected", metrics.decode_expected),
      ("median", metrics.decode_median),
  )
  def test_scalar_input_raises(self, fn):
    with self.assertRaisesRegex(ValueError, "class axis"):
      fn(jnp.float32(0.5))

  def test_expected_is_not_a_matmul(self):
    # A dot_general runs at the backend's default precision (bfloat16 passes on
    # TPU, TF32 on GPU), which CPU tests cannot see: its absence is the check.
    jaxpr = jax.make_jaxpr(metrics.decode_expected)(self._probs(9))
    self.assertNotIn("dot_general", str(jaxpr))

  def test_expected_bad_class_values_raises(self):
    with self.assertRaisesRegex(ValueError, "class_values"):
      metrics.decode_expected(jnp.ones((2, 5)) / 5, jnp.arange(4.0))


class CountsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("int_preds", 9, False, False),
      ("int_preds_masked", 10, True, False),
      ("float_preds_masked", 11, True, True),
  )
  def test_cs_mae_and_count_match_reference(self, seed, masked, real_valued):
    ks = (0, 1, 2, 3, 5)
    labels, preds = _random_pair(seed, 100, 200)
    if real_valued:
      preds = preds + np.random.default_rng(seed).uniform(-0.5, 0.5, 200).astype(np.float32)
    mask = _random_mask(seed, 200) if masked else None
    fn = self.variant(
        lambda l, p, m: (
            metrics.cs_counts(l, p, ks, m),
            metrics.abs_error_sum(l, p, m),
            metrics.valid_count(l, m),
        )
    )
    counts, err_sum, count = fn(labels, preds, mask)
    chex.assert_shape(counts, (len(ks),))
    self.assertEqual(counts.dtype, jnp.int32)
    keep = np.ones(200, bool) if mask is None else mask
    err = np.abs(preds[keep].astype(np.float64) - labels[keep])
    chex.assert_trees_all_close(counts, np.array([(err <= k).sum() for k in ks]))
    self.assertEqual(int(count), keep.sum())
    chex.assert_trees_all_close(
        err_sum / count, skm.mean_absolute_error(labels[keep], preds[keep]), **_TOL
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_batch_sums_accumulate(self):
    labels, preds = _random_pair(12, 100, 90)
    mask = _random_mask(12, 90)
    fn = self.variant(
        lambda l, p, m: (metrics.cs_counts(l, p, (1, 3), m), metrics.abs_error_sum(l, p, m))
    )
    parts = [fn(labels[s:s + 30], preds[s:s + 30], mask[s:s + 30]) for s in (0, 30, 60)]
    summed = (sum(c for c, _ in parts), sum(e for _, e in parts))
    chex.assert_trees_all_close(summed, fn(labels, preds, mask), **_TOL)

  @parameterized.named_parameters(
      ("empty", ()),
      ("negative", (1, -1)),
      ("float", (1.0,)),
      ("not_a_sequence", 3),
  )
  def test_bad_ks_raise(self, ks):
    labels = np.zeros(3, np.int32)
    with self.assertRaisesRegex(ValueError, "k"):
      metrics.cs_counts(labels, labels, ks)
    with self.assertRaisesRegex(ValueError, "k"):
      metrics.cs_from_cm(np.eye(3, dtype=np.int32), ks)

  @parameterized.named_parameters(
      ("cs_shape", lambda: metrics.cs_counts(np.zeros(3), np.zeros(4), (1,))),
      ("mae_shape", lambda: metrics.abs_error_sum(np.zeros(3), np.zeros(4))),
      ("mask_shape", lambda: metrics.abs_error_sum(np.zeros(3), np.zeros(3), np.ones(2))),
      ("count_2d", lambda: metrics.valid_count(np.zeros((3, 1)))),
  )
  def test_bad_shapes_raise(self, call):
    with self.assertRaisesRegex(ValueError, "shape"):
      call()


class PrecisionRecallF1Test(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(
      zero_division=(0.0, 1.0, _NAN),
      data=((13, 12, 60, False), (14, 100, 300, True)),
  )
  def test_per_class_matches_sklearn(self, zero_division, data):
    seed, num_classes, size, masked = data
    labels, preds = _random_pair(seed, num_classes, size)
    mask = _random_mask(seed, size) if masked else None
    fn = self.variant(
        lambda l, p, m: metrics.precision_recall_f1_support(
            metrics.confusion_matrix(l, p, num_classes, m), zero_division=zero_division
        )
    )
    out = fn(labels, preds, mask)
    for x in out:
      chex.assert_shape(x, (num_classes,))
    keep = np.ones(size, bool) if mask is None else mask
    expected = _sk_prf(labels[keep], preds[keep], num_classes, None, "all", zero_division)
    chex.assert_trees_all_close(out, expected, **_TOL)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(
      average=("macro", "weighted", "micro"),
      label_set=("all", "present"),
      zero_division=(0.0, 1.0, _NAN),
  )
  def test_averaged_matches_sklearn(self, average, label_set, zero_division):
    num_classes, size = 30, 120
    labels, preds = _random_pair(15, num_classes, size)
    mask = _random_mask(15, size)
    labels, preds = labels[mask], preds[mask]
    # The data must exercise absent classes and undefined ratios.
    self.assertLess(len(np.union1d(labels, preds)), num_classes)
    self.assertLess(len(np.unique(preds)), len(np.union1d(labels, preds)))
    fn = self.variant(
        lambda l, p: metrics.averaged_prf(
            metrics.confusion_matrix(l, p, num_classes),
            average=average,
            labels=label_set,
            zero_division=zero_division,
        )
    )
    out = fn(labels, preds)
    chex.assert_shape(out, ((), (), ()))
    expected = _sk_prf(labels, preds, num_classes, average, label_set, zero_division)[:3]
    chex.assert_trees_all_close(out, expected, **_TOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_nan_zero_division_edge_cases(self):
    # Only class 1 predicted as 2: the defined per-class values are all 0, and
    # for precision the remaining weight is 0, so the plain mean is used.
    cm = jnp.zeros((4, 4), jnp.int32).at[1, 2].set(3)
    fn = self.variant(
        lambda c: metrics.averaged_prf(c, average="weighted", zero_division=_NAN)
    )
    expected = _sk_prf([1, 1, 1], [2, 2, 2], 4, "weighted", "present", _NAN)[:3]
    chex.assert_trees_all_close(fn(cm), expected)
    chex.assert_trees_all_close(fn(cm), (0.0, 0.0, 0.0))
    # No examples: every per-class value is undefined, so averages are NaN.
    fn_all = self.variant(
        lambda c: metrics.averaged_prf(c, labels="all", zero_division=_NAN)
    )
    empty = fn_all(jnp.zeros((4, 4), jnp.int32))
    self.assertTrue(all(np.isnan(x) for x in empty))

  @parameterized.named_parameters(
      ("bad_average", {"average": "binary"}, "average"),
      ("bad_labels", {"labels": "some"}, "labels"),
      ("bad_zero_division", {"zero_division": 0.5}, "zero_division"),
      ("warn_zero_division", {"zero_division": "warn"}, "zero_division"),
  )
  def test_bad_options_raise(self, kwargs, match):
    with self.assertRaisesRegex(ValueError, match):
      metrics.averaged_prf(jnp.eye(3, dtype=jnp.int32), **kwargs)

  @parameterized.named_parameters(
      ("not_square", np.zeros((3, 4), np.int32)),
      ("one_d", np.zeros(3, np.int32)),
  )
  def test_bad_confusion_shape_raises(self, cm):
    for fn in (metrics.precision_recall_f1_support, metrics.accuracy_from_cm,
               metrics.mae_from_cm, metrics.summary_from_confusion):
      with self.assertRaisesRegex(ValueError, "confusion matrix"):
        fn(cm)


class FromConfusionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("unmasked", 16, False), ("masked", 17, True))
  def test_accuracy_cs_mae_match_reference(self, seed, masked):
    ks = (0, 1, 2, 3, 10)
    labels, preds = _random_pair(seed, 100, 250)
    mask = _random_mask(seed, 250) if masked else None
    fn = self.variant(
        lambda l, p, m: (
            lambda cm: (
                metrics.accuracy_from_cm(cm),
                metrics.cs_from_cm(cm, ks),
                metrics.mae_from_cm(cm),
            )
        )(metrics.confusion_matrix(l, p, 100, m))
    )
    acc, cs, mae = fn(labels, preds, mask)
    chex.assert_shape(cs, (len(ks),))
    keep = np.ones(250, bool) if mask is None else mask
    y, p = labels[keep], preds[keep]
    chex.assert_trees_all_close(acc, skm.accuracy_score(y, p), **_TOL)
    chex.assert_trees_all_close(cs, np.array([np.mean(np.abs(p - y) <= k) for k in ks]), **_TOL)
    chex.assert_trees_all_close(mae, skm.mean_absolute_error(y, p), **_TOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_range_mae_uses_class_values(self):
    true_ages, pred_ages = _random_pair(18, 100, 200)
    y, p = ages.age_to_range(true_ages), ages.age_to_range(pred_ages)
    mids = ages.range_midpoints()
    fn = self.variant(
        lambda a, b: metrics.mae_from_cm(
            metrics.confusion_matrix(a, b, ages.NUM_RANGES), mids
        )
    )
    mids_np = np.asarray(mids, np.float64)
    expected = skm.mean_absolute_error(mids_np[np.asarray(y)], mids_np[np.asarray(p)])
    chex.assert_trees_all_close(fn(y, p), expected, **_TOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_empty_confusion_is_nan(self):
    fn = self.variant(
        lambda c: (metrics.accuracy_from_cm(c), metrics.cs_from_cm(c, (1,)),
                   metrics.mae_from_cm(c))
    )
    out = fn(jnp.zeros((5, 5), jnp.int32))
    self.assertTrue(all(np.isnan(np.asarray(x)).all() for x in out))

  def test_bad_class_values_raises(self):
    with self.assertRaisesRegex(ValueError, "class_values"):
      metrics.mae_from_cm(np.eye(3, dtype=np.int32), np.arange(4.0))


class SummaryTest(chex.TestCase):

  @staticmethod
  def _sklearn_core(y, p, label_set, zero_division):
    scores = {
        "accuracy": skm.accuracy_score(y, p),
        "mae": skm.mean_absolute_error(y, p),
    }
    for average in ("macro", "weighted"):
      prf = _sk_prf(y, p, 100, average, label_set, zero_division)
      for name, value in zip(("precision", "recall", "f1"), prf):
        scores[f"{average}_{name}"] = value
    return scores

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("present_zero", "present", 0.0, 3),
      ("all_one", "all", 1.0, (1, 3)),
  )
  def test_matches_sklearn_on_raw_and_adjusted(self, label_set, zero_division, tolerance_k):
    ks = (1, 2, 3)
    labels, preds = _random_pair(19, 100, 400)
    mask = _random_mask(19, 400)
    fn = self.variant(
        lambda l, p, m: metrics.summary_from_confusion(
            metrics.confusion_matrix(l, p, 100, m),
            ks=ks,
            tolerance_k=tolerance_k,
            labels=label_set,
            zero_division=zero_division,
        )
    )
    summary = fn(labels, preds, mask)
    y, p = labels[mask], preds[mask]
    expected = {"count": float(mask.sum())}
    expected.update(self._sklearn_core(y, p, label_set, zero_division))
    for k in ks:
      expected[f"cs@{k}"] = np.mean(np.abs(p - y) <= k)
    for k in np.atleast_1d(tolerance_k):
      adjusted = np.where(np.abs(p - y) <= k, y, p)
      for name, value in self._sklearn_core(y, adjusted, label_set, zero_division).items():
        expected[f"tol{k}_{name}"] = value
    self.assertEqual(set(summary), set(expected))
    chex.assert_trees_all_close(summary, expected, **_TOL)
    # Tolerance-adjusted accuracy is CS(k) by definition.
    chex.assert_trees_all_close(summary["tol3_accuracy"], summary["cs@3"])

  @chex.variants(with_jit=True, without_jit=True)
  def test_accumulated_batches_equal_one_batch(self):
    labels, preds = _random_pair(20, 100, 200)
    mask = _random_mask(20, 200)
    cm_fn = self.variant(lambda l, p, m: metrics.confusion_matrix(l, p, 100, m))
    total = sum(cm_fn(labels[s:s + 64], preds[s:s + 64], mask[s:s + 64])
                for s in range(0, 200, 64))
    summary = self.variant(metrics.summary_from_confusion)(total)
    expected = metrics.summary_from_confusion(
        skm.confusion_matrix(labels[mask], preds[mask], labels=list(range(100)))
    )
    chex.assert_trees_all_close(summary, expected, **_TOL)

  def test_report_is_python_floats_of_summary(self):
    labels, preds = _random_pair(21, 100, 100)
    cm = metrics.confusion_matrix(labels, preds, 100)
    report = metrics.report_from_confusion(cm, ks=(0, 5), tolerance_k=())
    summary = metrics.summary_from_confusion(cm, ks=(0, 5), tolerance_k=())
    self.assertEqual(set(report), set(summary))
    self.assertNotIn("tol3_accuracy", report)
    for name, value in report.items():
      self.assertIsInstance(value, float)
      self.assertAlmostEqual(value, float(summary[name]), places=6)

  @parameterized.named_parameters(
      ("bad_tolerance", {"tolerance_k": -1}, "k must be"),
      ("float_tolerance", {"tolerance_k": 2.0}, "tolerance_k"),
      ("bad_ks", {"ks": ()}, "ks"),
      ("bad_labels", {"labels": "none"}, "labels"),
  )
  def test_bad_options_raise(self, kwargs, match):
    with self.assertRaisesRegex(ValueError, match):
      metrics.report_from_confusion(np.eye(4, dtype=np.int32), **kwargs)


if __name__ == "__main__":
  absltest.main()
