"""Dropout with flax's masks, bit for bit, from a threefry XLA:CPU fuses.

Why: ``flax.linen.Dropout`` draws its mask with ``jax.random.bernoulli``,
whose threefry2x32 hash JAX lowers on the CPU as a rolled ``while`` loop of
five iterations. XLA:CPU runs each iteration as separate passes over the
whole array and fuses none of it with the comparison or the select: on the
study's first block (batch 64, 22x22x64) flax's layer takes ~28 ms, ~5.5 ms
with the hash written out, and the whole training step 1-3 % less time
(2-core CPU, docs/performance_log.md). Here the hash is written in ``jnp``, so
XLA fuses the counters, the twenty rounds, the comparison and the select
into one loop.

The bits are those of ``jax.random.bits`` for threefry keys with
``jax_threefry_partitionable`` (JAX's default since 0.5): the counter of
each element is its row-major index, and the two output words are XORed.
The keep test is ``jax.random.uniform(key, shape) < keep_prob`` for float32
uniforms (``jax_enable_x64`` off, JAX's default), done on integers.
`Dropout` is named as flax's, so Flax derives the same key for every layer,
and a model gives the same outputs and gradients with either. Keys of
another PRNG implementation, the legacy counter layout and x64 mode fall
back to ``jax.random.bernoulli``.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = np.uint32(0x1BD11BDA)
# float32 uniforms are the top 23 bits over 2**23 (`jax.random.uniform`).
_MANTISSA_BITS = 23


def _rotate_left(v: jax.Array, r: int) -> jax.Array:
  return (v << np.uint32(r)) | (v >> np.uint32(32 - r))


def threefry2x32(
    k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The Threefry-2x32 hash (20 rounds) of counters ``(x1, x2)``, unrolled.

  The same function as JAX's ``threefry2x32`` primitive; all arguments are
  ``uint32`` and broadcast together.
  """
  ks = (k1, k2, k1 ^ k2 ^ _KEY_PARITY)
  x = [x1 + ks[0], x2 + ks[1]]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x[0] = x[0] + x[1]
      x[1] = x[0] ^ _rotate_left(x[1], r)
    x[0] = x[0] + ks[(i + 1) % 3]
    x[1] = x[1] + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x[0], x[1]


def _threefry_key_data(key: jax.Array) -> jax.Array | None:
  """The two words of ``key``, if ``jax.random.bits`` hashes them as here.

  That is: one threefry2x32 key, typed (``jax.random.key``) or raw uint32
  (``jax.random.PRNGKey``, where JAX allows raw keys), and partitionable
  counters. Anything else gives None.
  """
  if not jax.config.jax_threefry_partitionable:
    return None
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    if str(jax.random.key_impl(key)) != 'threefry2x32':
      return None
    data = jax.random.key_data(key)
  elif (
      key.dtype == jnp.uint32
      and jax.config.jax_default_prng_impl == 'threefry2x32'
      and jax.config.jax_legacy_prng_key == 'allow'
  ):
    data = key
  else:
    return None
  return data if data.shape == (2,) else None


def random_bits(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """``jax.random.bits(key, shape, jnp.uint32)`` for a threefry key.

  Raises:
    ValueError: ``key`` is not one threefry2x32 key hashed with partitionable
      counters, or ``shape`` has 2**32 elements or more.
  """
  data = _threefry_key_data(key)
  if data is None:
    raise ValueError(
        'random_bits needs a single threefry2x32 key (jax.random.PRNGKey or'
        ' jax.random.key) and jax_threefry_partitionable=True; use'
        ' jax.random.bits for other keys.'
    )
  shape = tuple(int(d) for d in shape)
  if math.prod(shape) >= 2**32:
    raise ValueError(f'random_bits supports fewer than 2**32 values, got {shape}.')
  return _hashed_counters(data, shape)


def _hashed_counters(data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Each element's row-major index hashed with the key words ``data``."""
  counts = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  bits1, bits2 = threefry2x32(data[0], data[1], jnp.zeros_like(counts), counts)
  return bits1 ^ bits2


def _is_probability(p: object) -> bool:
  return (
      isinstance(p, (int, float, np.integer, np.floating))
      and not isinstance(p, bool)
      and 0.0 <= float(p) <= 1.0
  )


def bernoulli(key: jax.Array, p: float, shape: Sequence[int]) -> jax.Array:
  """``jax.random.bernoulli(key, p, shape)``: the same booleans.

  A threefry key (see `random_bits`), a Python or NumPy scalar ``p`` in
  [0, 1] and float32 uniforms (``jax_enable_x64`` off, JAX's default) take
  `random_bits`; any other call is ``jax.random.bernoulli`` itself.
  """
  shape = tuple(int(d) for d in shape)
  data = _threefry_key_data(key)
  if (
      data is None
      or not _is_probability(p)
      or jax.config.jax_enable_x64
      or math.prod(shape) >= 2**32
  ):
    return jax.random.bernoulli(key, p, shape)
  # uniform = (bits >> 9) * 2**-23 exactly, so `uniform < p` compares integers.
  threshold = math.ceil(float(np.float32(p)) * 2**_MANTISSA_BITS)
  mantissas = _hashed_counters(data, shape) >> np.uint32(32 - _MANTISSA_BITS)
  return mantissas < np.uint32(threshold)


class Dropout(nn.Dropout):
  """``flax.linen.Dropout`` with its mask drawn by `bernoulli`.

  Same attributes, same keys (the class name, hence the auto-named layers
  ``Dropout_0``, ``Dropout_1``..., is flax's), same outputs.
  """

  @nn.compact
  def __call__(
      self,
      inputs: jax.Array,
      deterministic: bool | None = None,
      rng: jax.Array | None = None,
  ) -> jax.Array:
    deterministic = nn.merge_param(
        'deterministic', self.deterministic, deterministic
    )
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    shape = list(inputs.shape)
    for dim in self.broadcast_dims:
      shape[dim] = 1
    mask = _computed_once(bernoulli(rng, keep_prob, shape))
    mask = jnp.broadcast_to(mask, inputs.shape)
    return lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


def _computed_once(mask: jax.Array) -> jax.Array:
  """``mask`` itself, written out once instead of rehashed by its readers.

  XLA:CPU fuses the hash into every loop that reads the mask: the forward
  select, the backward one, and through that the loops of the layers before
  it. After the first block's pooling (`agejax.relu_batch_norm`) the input
  gradient's loop hashed every pooled element once per window input, four
  times over. XLA does not duplicate a floating-point remainder into its
  consumers, so the hash and this remainder (of 0 or 1 by 2: the same
  values) run once and the mask is read from memory. On the study's network
  the first block's input-gradient loop takes 6.7 ms instead of 12.0 at
  batch 64 (2-core Intel Xeon, docs/performance_log.md, session 13).
  """
  return lax.rem(mask.astype(jnp.float32), jnp.float32(2)) != 0


def dropout_for(impl: str) -> type[nn.Dropout]:
  """The dropout layer for a resolved implementation (`agejax.conv`).

  ``'lax'`` and ``'ynnpack'`` are ``flax.linen.Dropout``; ``'matmul'`` (the
  CPU training paths) is `Dropout`. Both give the same masks.

  Raises:
    ValueError: ``impl`` is none of these (resolve ``'auto'`` first).
  """
  if impl in ('lax', 'ynnpack'):
    return nn.Dropout
  if impl == 'matmul':
    return Dropout
  raise ValueError(
      f"dropout_for takes 'lax', 'matmul' or 'ynnpack', got {impl!r}."
  )
