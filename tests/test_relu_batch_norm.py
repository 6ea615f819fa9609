"""Tests for agejax.relu_batch_norm: flax's ReLU + BatchNorm, backward written out."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from agejax import relu_batch_norm as rbn

# The study's activations (batch 4), a dense layer's, and an odd small one.
_SHAPES = ((4, 44, 44, 64), (4, 9, 9, 128), (8, 512), (3, 5, 7))
_EPS = 1e-3


def _inputs(shape, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  c = shape[-1]
  x = jax.random.normal(keys[0], shape) * 2.0 + 0.3
  # A dead channel (ReLU output all zero), as real networks have.
  x = x.at[..., 0].set(-1.0)
  scale = 1.0 + 0.3 * jax.random.normal(keys[1], (c,))
  bias = 0.1 * jax.random.normal(keys[2], (c,))
  return x, scale, bias, keys[3]


def _reference(x, scale, bias):
  """JAX's differentiation of flax's own statistics and normalisation."""
  r = nn.relu(x)
  axes = tuple(range(x.ndim - 1))
  mean, mean2 = r.mean(axes), (r * r).mean(axes)
  var = jnp.maximum(0.0, mean2 - mean * mean)
  y = (r - mean) * (jax.lax.rsqrt(var + _EPS) * scale) + bias
  return y, mean, var


def _assert_close(got, want, rtol):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = max(float(jnp.max(jnp.abs(w))), 1e-30)
    np.testing.assert_array_less(float(jnp.max(jnp.abs(g - w))) / scale, rtol)


class ReluBatchNormFunctionTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*((s,) for s in _SHAPES))
  def test_gradients_equal_autodiff(self, shape):
    x, scale, bias, key = _inputs(shape)
    outs = self.variant(lambda *a: rbn.relu_batch_norm(*a, _EPS))(x, scale, bias)
    want = _reference(x, scale, bias)
    _assert_close(outs, want, 1e-6)
    # Cotangents on all three outputs, the statistics' included.
    cts = tuple(jax.random.normal(k, o.shape) for k, o in zip(jax.random.split(key, 3), want))
    pullback = lambda f: jax.vjp(f, x, scale, bias)[1](cts)
    got = self.variant(lambda: pullback(lambda *a: rbn.relu_batch_norm(*a, _EPS)))()
    _assert_close(got, pullback(_reference), 1e-5)

  def test_dead_channel_gets_no_input_gradient(self):
    x, scale, bias, _ = _inputs((4, 6, 6, 8))
    g = jax.grad(lambda x: rbn.relu_batch_norm(x, scale, bias, _EPS)[0].sum() ** 2)(x)
    np.testing.assert_array_equal(g[..., 0], 0.0)
    self.assertTrue(bool(jnp.isfinite(g).all()))


class _Pair(nn.Module):
  """The model's pattern: a dense layer, then ReLU and BatchNorm."""

  impl: str
  dtype: jnp.dtype = jnp.float32
  frozen: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16, dtype=self.dtype)(x)
    return rbn.relu_batch_norm_for(
        self.impl,
        use_running_average=not train or self.frozen,
        momentum=0.9,
        epsilon=_EPS,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name='bn',
    )(x)


class ReluBatchNormLayerTest(parameterized.TestCase):

  @parameterized.product(
      train=(True, False), frozen=(False, True), dtype=(jnp.float32, jnp.bfloat16)
  )
  def test_equals_flax(self, train, frozen, dtype):
    x = jax.random.normal(jax.random.PRNGKey(0), (32, 24))
    nets = {impl: _Pair(impl, dtype, frozen) for impl in ('lax', 'matmul')}
    variables = nets['lax'].init(jax.random.PRNGKey(1), x, train=False)
    chex.assert_trees_all_equal_structs(
        variables, nets['matmul'].init(jax.random.PRNGKey(1), x, train=False)
    )
    # Running statistics away from their initial values.
    variables = jax.tree.map(lambda v: v + 0.1, variables)

    def loss(params, impl):
      y, updates = nets[impl].apply(
          {**variables, 'params': params}, x, train=train, mutable=['batch_stats']
      )
      return jnp.sum(jnp.sin(y.astype(jnp.float32))), (y, updates)

    outs = {
        impl: jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(
            variables['params'], impl
        )
        for impl in nets
    }
    (g_lax, (y_lax, stats_lax)), (g_fast, (y_fast, stats_fast)) = outs['lax'], outs['matmul']
    if dtype == jnp.float32:
      # The forward pass is flax's operation for operation.
      chex.assert_trees_all_equal((y_fast, stats_fast), (y_lax, stats_lax))
    else:
      # Under jit XLA may skip bfloat16 roundings (excess precision), in
      # different places for the two graphs.
      _assert_close((y_fast, stats_fast), (y_lax, stats_lax), 2e-2)
    _assert_close(g_fast, g_lax, 1e-5 if dtype == jnp.float32 else 2e-2)

  @parameterized.named_parameters(
      ('axis_name', {'axis_name': 'batch'}, {}, 'axis_name'),
      ('no_scale', {'use_scale': False}, {}, 'use_scale'),
      ('slow_variance', {'use_fast_variance': False}, {}, 'use_fast_variance'),
      ('feature_axis', {'axis': 0}, {}, 'axis'),
      ('mask', {}, {'mask': jnp.ones((4, 3), bool)}, 'mask'),
  )
  def test_unsupported_options_raise(self, attrs, call_kwargs, message):
    layer = rbn.ReluBatchNorm(use_running_average=False, **attrs)
    with self.assertRaisesRegex(ValueError, message):
      layer.init(jax.random.PRNGKey(0), jnp.ones((4, 3)), **call_kwargs)

  @parameterized.parameters('lax', 'matmul')
  def test_relu_batch_norm_for(self, impl):
    layer = rbn.relu_batch_norm_for(impl, use_running_average=True)
    self.assertEqual(isinstance(layer, rbn.ReluBatchNorm), impl == 'matmul')

  def test_relu_batch_norm_for_unresolved_raises(self):
    with self.assertRaisesRegex(ValueError, 'auto'):
      rbn.relu_batch_norm_for('auto')


if __name__ == '__main__':
  absltest.main()
