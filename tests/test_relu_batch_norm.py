"""`agejax.relu_batch_norm` equals flax's ReLU, BatchNorm and max-pooling."""

from __future__ import annotations

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from agejax import relu_batch_norm
from tests import fakes

_EPS = 1e-3
_TOL = 1e-5


def _inputs(shape, seed=0):
  """Pre-activations on a coarse grid: ReLU zeros and ties in most windows."""
  z = np.round(fakes.normal(seed, shape) * 2) / 2
  c = shape[-1]
  # Negative and zero scales too: there the pooled maximum is a minimum of
  # relu(z), or every element of a window ties.
  scale = fakes.normal(seed + 1, (c,))
  scale[0], scale[-1] = -0.7, 0.0
  bias = fakes.normal(seed + 2, (c,)) * 0.1
  return jnp.asarray(z), jnp.asarray(scale), jnp.asarray(bias)


def _reference(z, scale, bias, window, rectified=False):
  """nn.BatchNorm(nn.relu(z)) with batch statistics, then nn.max_pool.

  With ``rectified``, nn.BatchNorm(z): no ReLU, nor its derivative.
  """
  bn = nn.BatchNorm(use_running_average=False, epsilon=_EPS, dtype=z.dtype)
  variables = {
      'params': {'scale': scale, 'bias': bias},
      'batch_stats': {
          'mean': jnp.zeros_like(scale),
          'var': jnp.ones_like(scale),
      },
  }
  y, updates = bn.apply(
      variables, z if rectified else nn.relu(z), mutable=['batch_stats']
  )
  if window is not None:
    y = nn.max_pool(y, window, strides=window)
  # momentum 0.99: new = 0.99 * old + 0.01 * batch, so recover the batch's.
  stats = updates['batch_stats']
  mean = stats['mean'] / 0.01
  var = (stats['var'] - 0.99) / 0.01
  return y, mean, var


def _fused(z, scale, bias, window, rectified=False):
  return relu_batch_norm.relu_batch_norm(z, scale, bias, _EPS, window, rectified)


def _value_and_pullback(fn, z, scale, bias, window, cotangents):
  out, pullback = jax.vjp(lambda *a: fn(*a, window), z, scale, bias)
  return out, pullback(cotangents)


class ReluBatchNormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ('first_block_pooled', (4, 44, 44, 8), (2, 2)),
      ('odd_pooled', (3, 5, 5, 6), (2, 2)),  # last row and column dropped
      ('rectangular_window', (2, 9, 8, 3), (3, 2)),
      ('not_pooled', (4, 10, 10, 5), None),
      ('dense', (16, 12), None),
  )
  def test_values_and_gradients_equal_flax(self, shape, window):
    self._assert_equals_flax(*_inputs(shape), window)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ('pooled', (4, 12, 12, 8), (2, 2)),
      ('not_pooled', (4, 10, 10, 5), None),
  )
  def test_rectified_input_is_batch_norm_alone(self, shape, window):
    # relu(z) on a coarse grid: many exact zeros, where BatchNorm alone has
    # a gradient and BatchNorm(relu(.)) none.
    z, scale, bias = _inputs(shape)
    r = nn.relu(z)
    got, cotangents = self._assert_equals_flax(r, scale, bias, window, rectified=True)
    masked = _value_and_pullback(_fused, r, scale, bias, window, cotangents)[1][0]
    self.assertGreater(float(jnp.max(jnp.abs(got[1][0] - masked))), 1e-3)

  def _assert_equals_flax(self, z, scale, bias, window, rectified=False):
    """The op's values and pullback equal flax's; returns them and the cotangents."""
    reference = functools.partial(_reference, rectified=rectified)
    fused = functools.partial(_fused, rectified=rectified)
    want_out = reference(z, scale, bias, window)
    # Cotangents for the output and for the batch statistics as well.
    cotangents = tuple(
        jnp.asarray(fakes.normal(seed, o.shape)) for seed, o in enumerate(want_out, start=1)
    )
    want = _value_and_pullback(reference, z, scale, bias, window, cotangents)
    got = self.variant(
        lambda a, b, c, d: _value_and_pullback(fused, a, b, c, window, d)
    )(z, scale, bias, cotangents)
    chex.assert_trees_all_close(got, want, rtol=_TOL, atol=_TOL)
    return got, cotangents

  def test_window_too_large_for_int8_index_raises(self):
    z, scale, bias = _inputs((1, 16, 16, 1))
    with self.assertRaisesRegex(ValueError, 'at most 127 elements'):
      _fused(z, scale, bias, (16, 8))

  def test_bfloat16_output_and_gradient_dtypes(self):
    z, scale, bias = _inputs((2, 6, 6, 4))
    z = z.astype(jnp.bfloat16)
    (y, mean, var), (dz, d_scale, d_bias) = _value_and_pullback(
        _fused,
        z,
        scale,
        bias,
        (2, 2),
        (jnp.ones((2, 3, 3, 4), jnp.bfloat16), jnp.zeros(4), jnp.zeros(4)),
    )
    self.assertEqual((y.dtype, dz.dtype), (jnp.bfloat16, jnp.bfloat16))
    self.assertEqual((mean.dtype, var.dtype), (jnp.float32, jnp.float32))
    self.assertEqual((d_scale.dtype, d_bias.dtype), (jnp.float32, jnp.float32))
    want_y, _, _ = _reference(z, scale, bias, (2, 2))
    chex.assert_trees_all_close(y, want_y, atol=0.02, rtol=0.02)


class ReluBatchNormModuleTest(parameterized.TestCase):

  @parameterized.parameters((None,), ((2, 2),))
  def test_variables_and_updates_equal_flax_batch_norm(self, window):
    z, _, _ = _inputs((4, 8, 8, 3))
    fused = relu_batch_norm.ReluBatchNorm(
        momentum=0.9, epsilon=_EPS, pool_window=window
    )
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=_EPS)
    variables = fused.init(jax.random.PRNGKey(0), z)
    chex.assert_trees_all_equal(
        variables, flax_bn.init(jax.random.PRNGKey(0), z)
    )
    got, got_updates = fused.apply(variables, z, mutable=['batch_stats'])
    want, want_updates = flax_bn.apply(
        variables, nn.relu(z), mutable=['batch_stats']
    )
    if window is not None:
      want = nn.max_pool(want, window, strides=window)
    chex.assert_trees_all_close(
        (got, got_updates), (want, want_updates), rtol=_TOL, atol=_TOL
    )

  def test_running_statistics_get_no_gradient(self):
    z, _, _ = _inputs((4, 8, 8, 3))
    fused = relu_batch_norm.ReluBatchNorm(epsilon=_EPS, pool_window=(2, 2))
    variables = fused.init(jax.random.PRNGKey(0), z)

    def new_mean_sum(params):
      _, updates = fused.apply(
          {'params': params, 'batch_stats': variables['batch_stats']},
          z,
          mutable=['batch_stats'],
      )
      return jnp.sum(updates['batch_stats']['mean'])

    grads = jax.grad(new_mean_sum)(variables['params'])
    chex.assert_trees_all_equal(grads, jax.tree.map(jnp.zeros_like, grads))
    self.assertTrue(np.all(np.isfinite(jax.tree.leaves(grads))))


if __name__ == '__main__':
  absltest.main()
