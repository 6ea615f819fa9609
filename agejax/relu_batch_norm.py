"""ReLU then BatchNorm as one layer, with its backward pass written out.

Why: the study's network puts every convolution and hidden dense layer
through ReLU and then BatchNorm. Differentiated by JAX, that pair keeps the
ReLU output, the centred activations and the normalised output as residuals
and runs the backward pass as several passes over them; on the 2-core CPU
those passes over the first block's 44x44x64 activations are among the
largest elementwise costs of the training step. `relu_batch_norm` keeps
only its input (and the per-channel statistics), recomputes the rest inside
the two loops of its backward pass (the per-channel sums, then the input
gradient), and speeds the study's CPU training step up by ~2 %
(docs/PERFORMANCE.md).

The forward pass is flax's, operation for operation (the same outputs and
running statistics, bit for bit); the gradients equal JAX's differentiation
of ``nn.BatchNorm()(nn.relu(x))`` up to float32 rounding.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def relu_batch_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """BatchNorm with batch statistics of ``relu(x)``, over all but the last axis.

  Args:
    x: [..., C] float32 input.
    scale: [C] float32 scale.
    bias: [C] float32 bias.
    epsilon: Added to the variance.

  Returns:
    (y, mean, var): the normalised output, and the batch mean and variance
    (``E[r**2] - E[r]**2`` clipped at 0, flax's fast variance) of
    ``r = relu(x)``. All three are differentiable.
  """
  return _forward(x, scale, bias, epsilon)


def _statistics(r: jax.Array) -> tuple[jax.Array, jax.Array]:
  # As flax.linen.normalization._compute_stats with use_fast_variance.
  axes = tuple(range(r.ndim - 1))
  mean, mean2 = r.mean(axes), (r * r).mean(axes)
  return mean, jnp.maximum(0.0, mean2 - mean * mean)


def _normalize(
    r: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array, bias: jax.Array,
    epsilon: float,
) -> jax.Array:
  # As flax.linen.normalization._normalize, operation for operation.
  y = r - mean
  mul = lax.rsqrt(var + epsilon)
  mul *= scale
  y *= mul
  y += bias
  return y


def _forward(x, scale, bias, epsilon):
  r = nn.relu(x)
  mean, var = _statistics(r)
  return _normalize(r, mean, var, scale, bias, epsilon), mean, var


def _relu_batch_norm_fwd(x, scale, bias, epsilon):
  y, mean, var = _forward(x, scale, bias, epsilon)
  return (y, mean, var), (x, scale, mean, var)


def _relu_batch_norm_bwd(epsilon, res, cotangents):
  x, scale, mean, var = res
  g, g_mean, g_var = cotangents
  axes = tuple(range(x.ndim - 1))
  count = math.prod(x.shape[:-1])
  inv_std = lax.rsqrt(var + epsilon)
  r = nn.relu(x)
  x_hat = (r - mean) * inv_std
  g_bias = g.sum(axes)
  g_scale = (g * x_hat).sum(axes)
  # Through the normalisation (with its batch statistics), then through the
  # statistics as outputs; the clip at 0 passes the gradient where var > 0.
  g_var = jnp.where(var > 0, g_var, 0.0)
  g_r = (scale * inv_std / count) * (count * g - g_bias - x_hat * g_scale)
  g_r += g_mean / count + g_var * (2.0 / count) * (r - mean)
  g_x = jnp.where(x > 0, g_r, jnp.zeros_like(g_r))
  return g_x, g_scale, g_bias


relu_batch_norm.defvjp(_relu_batch_norm_fwd, _relu_batch_norm_bwd)


class ReluBatchNorm(nn.BatchNorm):
  """``nn.BatchNorm()(nn.relu(x))`` as one layer: flax's BatchNorm attributes,
  parameters (``scale``, ``bias``) and statistics (``mean``, ``var``).

  With batch statistics it runs `relu_batch_norm`; with running averages
  (inference, frozen layers) flax's own formula, which JAX differentiates.
  Supports what the study's network uses: features on the last axis, scale
  and bias, fast variance, no mask and no named-axis reduction (sharded
  batches need none: under ``jax.jit`` the sums span the global batch).
  """

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      use_running_average: bool | None = None,
      *,
      mask: jax.Array | None = None,
  ) -> jax.Array:
    unsupported = {
        'axis': self.axis not in (-1, x.ndim - 1),
        'axis_name': self.axis_name is not None,
        'use_bias': not self.use_bias,
        'use_scale': not self.use_scale,
        'use_fast_variance': not self.use_fast_variance,
        'force_float32_reductions': not self.force_float32_reductions,
        'mask': mask is not None,
    }
    if any(unsupported.values()):
      raise ValueError(
          'ReluBatchNorm supports only flax BatchNorm defaults for'
          f' {sorted(k for k, v in unsupported.items() if v)}; use'
          ' nn.BatchNorm()(nn.relu(x)) instead.'
      )
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average
    )
    features = (x.shape[-1],)
    ra_mean = self.variable(
        'batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), features
    )
    ra_var = self.variable(
        'batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), features
    )
    scale = self.param('scale', self.scale_init, features, self.param_dtype)
    bias = self.param('bias', self.bias_init, features, self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, scale, bias)
    r32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if use_running_average:
      y = _normalize(
          nn.relu(r32), ra_mean.value, ra_var.value, scale, bias, self.epsilon
      )
      return y.astype(dtype)
    y, mean, var = relu_batch_norm(r32, scale, bias, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(dtype)


def relu_batch_norm_for(
    impl: str, **bn_kwargs: Any
) -> Callable[[jax.Array], jax.Array]:
  """ReLU then BatchNorm for a resolved implementation (`agejax.conv`).

  ``'lax'`` is ``nn.relu`` then ``nn.BatchNorm(**bn_kwargs)``; ``'matmul'``
  (the CPU paths) is `ReluBatchNorm(**bn_kwargs)`. Both give the same
  outputs, statistics and parameter paths.

  Raises:
    ValueError: ``impl`` is neither (resolve ``'auto'`` first).
  """
  if impl == 'matmul':
    return ReluBatchNorm(**bn_kwargs)
  if impl == 'lax':
    bn = nn.BatchNorm(**bn_kwargs)
    return lambda x: bn(nn.relu(x))
  raise ValueError(f"relu_batch_norm_for takes 'lax' or 'matmul', got {impl!r}.")
