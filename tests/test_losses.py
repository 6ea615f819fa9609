"""Tests for agejax.losses against NumPy / optax references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from agejax import losses

_B, _C = 16, 10


def _data(seed: int):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0.0, 3.0, (_B, _C)).astype(np.float32)
  labels = rng.integers(0, _C, _B).astype(np.int32)
  weights = rng.uniform(0.1, 3.0, _C).astype(np.float32)
  return logits, labels, weights


def _np_log_softmax(logits: np.ndarray) -> np.ndarray:
  x = logits.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


class SoftmaxCrossEntropyTest(chex.TestCase):

  def test_soft_label_weights_are_not_a_matmul(self):
    # As metrics.decode_expected: a dot_general would round on TPU and GPU.
    logits, _, weights = _data(2)
    soft = np.full((_B, _C), 1.0 / _C, np.float32)
    jaxpr = jax.make_jaxpr(
        lambda lg, lb: losses.softmax_cross_entropy(lg, lb, class_weights=weights)
    )(logits, soft)
    self.assertNotIn("dot_general", str(jaxpr))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("plain", 0.0, False),
      ("smoothing", 0.1, False),
      ("weights", 0.0, True),
      ("smoothing_and_weights", 0.2, True),
  )
  def test_integer_labels_match_reference(self, smoothing, weighted):
    logits, labels, weights = _data(0)
    class_weights = weights if weighted else None
    fn = self.variant(
        lambda lg, lb: losses.softmax_cross_entropy(
            lg, lb, label_smoothing=smoothing, class_weights=class_weights
        )
    )
    out = fn(logits, labels)
    chex.assert_shape(out, (_B,))
    chex.assert_tree_all_finite(out)
    targets = (1 - smoothing) * np.eye(_C)[labels] + smoothing / _C
    expected = -(targets * _np_log_softmax(logits)).sum(-1)
    if weighted:
      expected = expected * weights[labels]
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)
    # Independent check of the smoothing convention against optax.
    ref = optax.softmax_cross_entropy(
        logits, optax.smooth_labels(jnp.eye(_C)[labels], smoothing)
    )
    if weighted:
      ref = ref * weights[labels]
    chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("plain", 0.0, False),
      ("smoothing_and_weights", 0.1, True),
  )
  def test_one_hot_labels_equal_integer_labels(self, smoothing, weighted):
    logits, labels, weights = _data(1)
    kwargs = {"label_smoothing": smoothing, "class_weights": weights if weighted else None}
    fn = self.variant(lambda lg, lb: losses.softmax_cross_entropy(lg, lb, **kwargs))
    one_hot = jax.nn.one_hot(labels, _C)
    chex.assert_trees_all_close(fn(logits, one_hot), fn(logits, labels), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_soft_labels_weight_is_expected_class_weight(self):
    logits, _, weights = _data(2)
    soft = np.random.default_rng(3).dirichlet(np.ones(_C), _B).astype(np.float32)
    fn = self.variant(
        lambda lg, lb: losses.softmax_cross_entropy(lg, lb, class_weights=weights)
    )
    expected = -(soft * _np_log_softmax(logits)).sum(-1) * (soft @ weights)
    chex.assert_trees_all_close(fn(logits, soft), expected, rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("plain", 0.0, False),
      ("smoothing", 0.1, False),
      ("smoothing_and_weights", 0.1, True),
  )
  def test_out_of_range_labels_give_zero_loss(self, smoothing, weighted):
    logits, labels, weights = _data(5)
    labels[:3] = (-1, _C, _C + 7)
    fn = self.variant(
        lambda lg, lb: losses.softmax_cross_entropy(
            lg, lb, label_smoothing=smoothing, class_weights=weights if weighted else None
        )
    )
    out = fn(logits, labels)
    chex.assert_trees_all_equal(out[:3], np.zeros(3, np.float32))
    self.assertTrue(np.all(np.asarray(out[3:]) > 0))

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradient_is_softmax_minus_target(self):
    logits, labels, _ = _data(4)
    grad_fn = self.variant(
        jax.grad(lambda lg: jnp.sum(losses.softmax_cross_entropy(lg, labels)))
    )
    grads = grad_fn(logits)
    chex.assert_tree_all_finite(grads)
    expected = np.exp(_np_log_softmax(logits)) - np.eye(_C)[labels]
    chex.assert_trees_all_close(grads, expected, atol=1e-5)

  @parameterized.named_parameters(
      ("logits_1d", (_C,), (1,), {}, "logits"),
      ("labels_wrong_batch", (_B, _C), (_B + 1,), {}, "labels"),
      ("labels_3d", (_B, _C), (_B, _C, 1), {}, "labels"),
      ("soft_labels_wrong_classes", (_B, _C), (_B, _C + 1), {}, "labels"),
      ("float_1d_labels", (_B, _C), "float", {}, "integer"),
      ("smoothing_one", (_B, _C), (_B,), {"label_smoothing": 1.0}, "label_smoothing"),
      ("smoothing_negative", (_B, _C), (_B,), {"label_smoothing": -0.1}, "label_smoothing"),
      ("weights_wrong_shape", (_B, _C), (_B,),
       {"class_weights": np.ones(_C + 1)}, "class_weights"),
  )
  def test_bad_inputs_raise(self, logits_shape, labels_shape, kwargs, match):
    logits = jnp.zeros(logits_shape)
    if labels_shape == "float":
      labels = jnp.zeros((_B,), jnp.float32)
    elif len(labels_shape) == 1:
      labels = jnp.zeros(labels_shape, jnp.int32)
    else:
      labels = jnp.zeros(labels_shape, jnp.float32)
    with self.assertRaisesRegex(ValueError, match):
      losses.softmax_cross_entropy(logits, labels, **kwargs)


class MaskedMeanTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("no_mask", None),
      ("bool_mask", np.array([1, 0, 1, 1, 0, 1], bool)),
      ("float_weights", np.array([0.5, 0.0, 2.0, 1.0, 0.0, 1.0], np.float32)),
  )
  def test_matches_reference(self, mask):
    values = np.array([1.0, 100.0, 3.0, -2.0, 50.0, 4.0], np.float32)
    out = self.variant(losses.masked_mean)(values, mask)
    chex.assert_shape(out, ())
    weights = np.ones_like(values) if mask is None else mask.astype(np.float32)
    expected = (values * weights).sum() / weights.sum()
    chex.assert_trees_all_close(out, expected, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_padding_excluded_even_if_not_finite(self):
    values = jnp.array([2.0, jnp.nan, 4.0, jnp.inf])
    mask = jnp.array([True, False, True, False])
    fn = self.variant(losses.masked_mean)
    chex.assert_trees_all_close(fn(values, mask), 3.0)
    grads = self.variant(jax.grad(losses.masked_mean))(values, mask)
    chex.assert_tree_all_finite(grads)
    chex.assert_trees_all_close(grads, jnp.array([0.5, 0.0, 0.5, 0.0]))

  @chex.variants(with_jit=True, without_jit=True)
  def test_empty_mask_gives_zero(self):
    out = self.variant(losses.masked_mean)(jnp.ones(4), jnp.zeros(4, bool))
    chex.assert_trees_all_close(out, 0.0)

  @parameterized.named_parameters(
      ("values_2d", (4, 2), (4,)),
      ("mask_wrong_shape", (4,), (5,)),
  )
  def test_bad_shapes_raise(self, values_shape, mask_shape):
    with self.assertRaisesRegex(ValueError, "shape"):
      losses.masked_mean(jnp.zeros(values_shape), jnp.ones(mask_shape, bool))


if __name__ == "__main__":
  absltest.main()
