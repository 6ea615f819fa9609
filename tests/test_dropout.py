"""Tests for agejax.dropout: flax's dropout masks, bit for bit."""

from __future__ import annotations

import contextlib
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from agejax import dropout

# The study's dropout inputs (batch 8), then odd sizes and empty ones.
_SHAPES = ((8, 22, 22, 64), (8, 9, 9, 128), (8, 512), (1,), (3, 5, 7), (2, 0))
_PROBS = (0.75, 0.5, 0.9, 1e-6, 1.0 - 1e-6, 1 / 3, 0.0, 1.0)
_KEYS = ('raw', 'typed')


def _key(kind: str, seed: int = 7) -> jax.Array:
  return jax.random.PRNGKey(seed) if kind == 'raw' else jax.random.key(seed)


def _uses_jax_prng(fn, *args) -> bool:
  """Whether ``fn`` draws through JAX's own PRNG primitives."""
  jaxpr = str(jax.make_jaxpr(fn)(*args))
  return 'random_bits' in jaxpr or 'threefry2x32' in jaxpr


class ThreefryTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_hash_equals_jax(self):
    counts = jax.random.randint(
        jax.random.PRNGKey(0), (2, 1000), 0, 2**31 - 1
    ).astype(jnp.uint32) * np.uint32(3)
    keypair = (np.uint32(0x9E3779B9), np.uint32(42))
    want = jax.extend.random.threefry_2x32(keypair, counts.reshape(-1))
    got = self.variant(dropout.threefry2x32)(*keypair, counts[0], counts[1])
    np.testing.assert_array_equal(jnp.concatenate(got), want)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(kind=_KEYS, shape=_SHAPES)
  def test_bits_equal_jax(self, kind, shape):
    key = _key(kind)
    got = self.variant(dropout.random_bits, static_argnums=1)(key, shape)
    np.testing.assert_array_equal(got, jax.random.bits(key, shape, jnp.uint32))

  @parameterized.named_parameters(
      ('rbg_key', lambda: jax.random.key(0, impl='rbg'), (4,), 'threefry2x32 key'),
      ('batch_of_keys', lambda: jax.random.split(jax.random.PRNGKey(0)), (4,), 'single'),
      ('int32_key', lambda: jnp.zeros((2,), jnp.int32), (4,), 'single'),
      ('too_many_values', lambda: jax.random.PRNGKey(0), (2**16, 2**16), '2\\*\\*32'),
  )
  def test_bits_raise(self, make_key, shape, message):
    with self.assertRaisesRegex(ValueError, message):
      dropout.random_bits(make_key(), shape)

  def test_bits_raise_for_legacy_counters(self):
    with jax.threefry_partitionable(False):
      with self.assertRaisesRegex(ValueError, 'partitionable'):
        dropout.random_bits(jax.random.PRNGKey(0), (4,))


class BernoulliTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(kind=_KEYS, shape=_SHAPES[:3] + _SHAPES[4:], p=_PROBS)
  def test_equals_jax(self, kind, shape, p):
    key = _key(kind)
    got = self.variant(dropout.bernoulli, static_argnums=(1, 2))(key, p, shape)
    want = jax.random.bernoulli(key, p, shape)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    np.testing.assert_array_equal(got, want)

  @parameterized.parameters(*_KEYS)
  def test_threefry_keys_take_the_fused_hash(self, kind):
    self.assertFalse(
        _uses_jax_prng(lambda k: dropout.bernoulli(k, 0.75, (4, 9)), _key(kind))
    )

  @parameterized.named_parameters(
      ('rbg', lambda: jax.random.key(3, impl='rbg'), 0.75, contextlib.nullcontext),
      ('unsafe_rbg', lambda: jax.random.key(3, impl='unsafe_rbg'), 0.75, contextlib.nullcontext),
      ('legacy_counters', lambda: jax.random.PRNGKey(3), 0.75, lambda: jax.threefry_partitionable(False)),
      ('x64', lambda: jax.random.PRNGKey(3), 0.75, lambda: jax.enable_x64(True)),
      ('p_above_one', lambda: jax.random.PRNGKey(3), 1.5, contextlib.nullcontext),
      ('p_nan', lambda: jax.random.PRNGKey(3), float('nan'), contextlib.nullcontext),
      ('p_array', lambda: jax.random.PRNGKey(3), np.full((4, 9), 0.75, np.float32), contextlib.nullcontext),
  )
  def test_other_calls_are_jax_bernoulli(self, make_key, p, config):
    with config():
      key = make_key()
      fn = lambda k: dropout.bernoulli(k, p, (4, 9))
      self.assertTrue(_uses_jax_prng(fn, key))
      np.testing.assert_array_equal(fn(key), jax.random.bernoulli(key, p, (4, 9)))


class _Net(nn.Module):
  """Two dropouts around a dense layer, the second broadcast over axis 1."""

  layer: type[nn.Dropout]
  rate: float

  @nn.compact
  def __call__(self, x, train):
    x = self.layer(self.rate, deterministic=not train)(x)
    x = nn.Dense(6, dtype=x.dtype)(x)
    return self.layer(self.rate, broadcast_dims=(1,), deterministic=not train)(
        x
    )


def _out_and_grads(net, params, x, train, key):
  def loss(p, x):
    y = net.apply(p, x, train, rngs={'dropout': key})
    return jnp.sum(y.astype(jnp.float32) ** 2), y

  return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)


class DropoutTest(parameterized.TestCase):

  @parameterized.product(
      rate=(0.25, 0.5), kind=_KEYS, dtype=(jnp.float32, jnp.bfloat16)
  )
  def test_layers_equal_flax(self, rate, kind, dtype):
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 5), dtype)
    nets = [_Net(layer, rate) for layer in (nn.Dropout, dropout.Dropout)]
    params = nets[0].init(jax.random.PRNGKey(0), x, train=False)
    want, got = (
        _out_and_grads(net, params, x, True, _key(kind, 2)) for net in nets
    )
    chex.assert_trees_all_equal(got, want)
    # Not vacuous: the layers dropped some entries and kept others.
    y = got[1]
    self.assertGreater(int(jnp.sum(y == 0)), 0)
    self.assertGreater(int(jnp.sum(y != 0)), 0)

  @parameterized.product(rate=(0.0, 1.0, 0.5), train=(True, False))
  def test_edge_cases_equal_flax(self, rate, train):
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 5))
    nets = [_Net(layer, rate) for layer in (nn.Dropout, dropout.Dropout)]
    params = nets[0].init(jax.random.PRNGKey(0), x, train=False)
    want, got = (
        _out_and_grads(net, params, x, train, jax.random.PRNGKey(2))
        for net in nets
    )
    chex.assert_trees_all_equal(got, want)

  @parameterized.parameters(*_KEYS)
  def test_explicit_rng_equals_flax(self, kind):
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 9, 9, 8))
    outs = [
        layer(0.25).apply({}, x, deterministic=False, rng=_key(kind, 5))
        for layer in (nn.Dropout, dropout.Dropout)
    ]
    chex.assert_trees_all_equal(*outs)

  @parameterized.named_parameters(
      ('written_once', lambda: dropout._computed_once, 1),
      ('hashed_by_readers', lambda: lambda mask: mask, 2),
  )
  def test_training_step_hashes_the_mask_once(self, computed_once, want):
    # The forward select and the gradient's both read the mask; XLA:CPU fuses
    # the hash into each reader unless it is written out once. The second
    # case, without that, shows the count can fail.
    def loss(x):
      y = dropout.Dropout(0.25).apply(
          {}, x, deterministic=False, rng=jax.random.PRNGKey(0)
      )
      return jnp.sum(y**2)

    x = jnp.ones((8, 22, 22, 64))
    with mock.patch.object(dropout, '_computed_once', computed_once()):
      hlo = jax.jit(jax.value_and_grad(loss)).lower(x).compile().as_text()
    hashing = [c for c in hlo.split('\n\n') if ' xor(' in c]
    self.assertLen(hashing, want)

  @parameterized.parameters(
      ('lax', nn.Dropout), ('ynnpack', nn.Dropout), ('matmul', dropout.Dropout)
  )
  def test_dropout_for(self, impl, want):
    self.assertIs(dropout.dropout_for(impl), want)

  def test_dropout_for_unresolved_raises(self):
    with self.assertRaisesRegex(ValueError, "got 'auto'"):
      dropout.dropout_for('auto')


if __name__ == '__main__':
  absltest.main()
