"""ReLU, then training-mode BatchNorm, then optionally max-pooling, as one op.

The study's network follows each convolution with ReLU and BatchNorm, and
each block's last BatchNorm with 2x2 max-pooling. Written as separate ops,
XLA:CPU writes out every intermediate of the first block (32 MB each at
batch 64) between its reductions: the ReLU's output, the centred input,
each pooling tap's gradient, their interleaving and the normalized
gradient. Here the gradient is written out instead:

- Forward: the batch statistics of ``relu(z)``, then one loop from ``z`` to
  the normalized output, or to the pooled output, the index of each
  window's first maximum and the normalized value there.
- Backward: ``d bias`` and ``d scale`` are sums over the pooled positions
  only (each window's cotangent reaches one input); one loop from ``z`` and
  the pooled cotangent gives ``dz``.

Values and gradients are those of ``flax.linen.BatchNorm(nn.relu(z))``
followed by ``nn.max_pool`` up to float32 rounding, ties included: each
window's gradient goes to its first (row-major) maximum, as
``select_and_scatter``'s does. `ReluBatchNorm` holds the same variables as
``flax.linen.BatchNorm``, so checkpoints and parameter paths do not change.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from agejax import conv

Window = Optional[tuple[int, int]]


def _relu32(z: jax.Array, rectified: bool) -> jax.Array:
  """``relu(z)`` in float32; ``z`` itself where it is already rectified."""
  r = z if rectified else jnp.maximum(z, 0)
  return r.astype(jnp.float32)


def _stats(z: jax.Array, rectified: bool) -> tuple[jax.Array, jax.Array]:
  """Mean and (biased) variance of ``relu(z)`` per channel, as flax computes."""
  r = _relu32(z, rectified)
  axes = tuple(range(z.ndim - 1))
  mean = jnp.mean(r, axes)
  var = jnp.maximum(0.0, jnp.mean(jnp.square(r), axes) - jnp.square(mean))
  return mean, var


def _normalized(z, mean, inv, rectified):
  return (_relu32(z, rectified) - mean) * inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def relu_batch_norm(
    z: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    epsilon: float,
    window: Window = None,
    rectified: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``BatchNorm(relu(z))`` with batch statistics, max-pooled if ``window``.

  With ``rectified``, ``z`` is already ReLU's output (`agejax.conv.conv_bias_relu`
  writes it so): the op is then BatchNorm alone, and its statistics read
  ``z`` as it is, with no rectified copy for XLA:CPU to write out.

  Args:
    z: [B, H, W, C] or [B, C] pre-activations, float32 or bfloat16.
    scale: [C] float32 BatchNorm scale.
    bias: [C] float32 BatchNorm bias.
    epsilon: Added to the variance.
    window: (kh, kw) of a non-overlapping VALID max-pooling, or None.
    rectified: Whether ``z`` is non-negative already (skips the ReLU and
      its derivative).

  Returns:
    The output in ``z``'s dtype ([B, H // kh, W // kw, C] when pooled), and
    the batch mean and variance of ``relu(z)`` (float32), which update the
    running statistics.

  Raises:
    ValueError: ``window`` has more than 127 elements.
  """
  (y, mean, var), _ = _forward(z, scale, bias, epsilon, window, rectified)
  return y, mean, var


def _forward(z, scale, bias, epsilon, window, rectified):
  if window is not None and window[0] * window[1] > 127:
    raise ValueError(f'Pooling windows of at most 127 elements, got {window}.')
  mean, var = _stats(z, rectified)
  inv = lax.rsqrt(var + epsilon)
  mul = scale * inv
  # flax's order of operations, so that the values (and ties) are the same.
  y = ((_relu32(z, rectified) - mean) * mul + bias).astype(z.dtype)
  if window is None:
    return (y, mean, var), (z, scale, mean, inv, None, None)
  taps = conv.pool_taps(y, window)
  pooled = functools.reduce(jnp.maximum, taps)
  # Index of each window's first maximum; len(taps) where none equals the
  # maximum (a NaN in the window), which routes no gradient, as
  # select_and_scatter does.
  first = jnp.full(pooled.shape, len(taps), jnp.int8)
  for t in reversed(range(len(taps))):
    first = jnp.where(taps[t] == pooled, jnp.int8(t), first)
  xhat_taps = conv.pool_taps(_normalized(z, mean, inv, rectified), window)
  xhat_first = functools.reduce(
      lambda acc, t: jnp.where(first == t, xhat_taps[t], acc),
      range(len(taps)),
      jnp.zeros(pooled.shape, jnp.float32),
  )
  return (pooled, mean, var), (z, scale, mean, inv, first, xhat_first)


def _backward(epsilon, window, rectified, res, cotangents):
  del epsilon
  z, scale, mean, inv, first, xhat_first = res
  g, d_mean, d_var = cotangents
  g = g.astype(jnp.float32)
  axes = tuple(range(z.ndim - 1))
  n = z.size // z.shape[-1]
  xhat = _normalized(z, mean, inv, rectified)
  if window is None:
    dy = g
    d_bias = jnp.sum(g, axes)
    d_scale = jnp.sum(g * xhat, axes)
  else:
    kh, kw = window
    d_bias = jnp.sum(jnp.where(first < kh * kw, g, 0.0), axes)
    d_scale = jnp.sum(g * xhat_first, axes)
    tap = (
        jnp.arange(kh, dtype=jnp.int8)[:, None] * kw
        + jnp.arange(kw, dtype=jnp.int8)[None, :]
    ).reshape(1, 1, kh, 1, kw, 1)
    # Each window's cotangent to its first maximum, in z's layout.
    dy = jnp.where(
        first[:, :, None, :, None] == tap, g[:, :, None, :, None], 0.0
    )
    b, ho, _, wo, _, c = dy.shape
    dy = dy.reshape(b, ho * kh, wo * kw, c)
    rest_h, rest_w = z.shape[1] - ho * kh, z.shape[2] - wo * kw
    dy = jnp.pad(dy, ((0, 0), (0, rest_h), (0, rest_w), (0, 0)))
  # The statistics' own cotangents are zero when they only update the
  # running statistics. var = E[r^2] - mean^2: d var / d r = 2 (r - mean) / n.
  dr = (scale * inv) * (dy - d_bias / n - xhat * (d_scale / n)) + (
      d_mean + 2.0 * d_var * xhat / inv
  ) / n
  dz = dr if rectified else jnp.where(z > 0, dr, 0.0)
  return dz.astype(z.dtype), d_scale, d_bias


relu_batch_norm.defvjp(_forward, _backward)


class ReluBatchNorm(nn.Module):
  """``nn.BatchNorm`` of ``nn.relu(z)`` in training mode, pooled if asked.

  Holds ``nn.BatchNorm``'s variables (``params``: ``scale``, ``bias``;
  ``batch_stats``: ``mean``, ``var``), initialized and updated the same way,
  so it can stand in for one under the same name. Only for training with
  batch statistics: frozen layers and inference use ``nn.BatchNorm``.

  Attributes:
    momentum: Decay of the running statistics.
    epsilon: Added to the variance.
    pool_window: (kh, kw) of the non-overlapping max-pooling that follows,
      or None.
    rectified: Whether its input is ReLU's output already
      (`agejax.conv.conv_bias_relu`): then it is ``nn.BatchNorm`` alone.
  """

  momentum: float = 0.99
  epsilon: float = 1e-5
  pool_window: Window = None
  rectified: bool = False

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """Maps pre-activations [B, ..., C] to the normalized (pooled) output."""
    features = z.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable(
        'batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32)
    )
    ra_var = self.variable(
        'batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32)
    )
    y, mean, var = relu_batch_norm(
        z, scale, bias, self.epsilon, self.pool_window, self.rectified
    )
    if not self.is_initializing():
      mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y
