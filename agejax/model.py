"""The study's CNN as one configurable Flax (linen) module.

The same module serves both tasks: with the FER head it is the Kaggle emotion
network the study started from, with the age head it is the study's final
"+1 FC" age model. Layer names are stable (``block1/conv1``, ``block2/bn1``,
``head/dense1``, ``logits``) because freezing and transfer select layers by
parameter path.

Layer order follows the study's Keras model: each convolution and each hidden
dense layer is followed by ReLU and *then* BatchNorm.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from agejax import conv as conv_lib
from agejax import dropout as dropout_lib
from agejax import relu_batch_norm

FER_DENSE_UNITS = (512, 256)
AGE_DENSE_UNITS = (512, 512, 256)
STUDY_CONV_FILTERS = ((32, 64), (128, 128), (128, 256))

# Keras' BatchNorm epsilon, which the study's network used.
_BN_EPSILON = 1e-3
# Every convolution's kernel (VALID padding).
_KERNEL = (3, 3)
# Each convolution block ends in 2x2 max-pooling, stride 2.
_POOL_WINDOW = (2, 2)
# Implementations whose training pass runs ReLU, BatchNorm and a block's
# max-pooling as one op with a written-out gradient
# (`agejax.relu_batch_norm`), each convolution's bias and ReLU in its own
# pass (`agejax.conv.conv_bias_relu`): the CPU training path, where XLA:CPU
# otherwise writes out each intermediate. On GPU and TPU XLA fuses flax's
# layers well.
_FUSED_NORM_IMPLS = ('matmul',)


class CNN(nn.Module):
  """Blocks of 3x3 VALID convolutions, then a dense head, then logits.

  Attributes:
    num_classes: Number of output logits (7 emotions, 100 ages, 11 ranges).
    conv_filters: Filters of each convolution, one tuple per block. Each block
      ends in 2x2 max-pooling and dropout.
    dense_units: Width of each hidden dense layer of the head.
    conv_dropout: Dropout rate at the end of each convolutional block.
    dense_dropout: Dropout rate after each hidden dense layer.
    frozen_bn: Paths (``'block1/bn1'``) of BatchNorm layers that run in
      inference mode even when training, as frozen BatchNorm layers do in
      Keras: they use, and never update, their running statistics.
    bn_momentum: Decay of the BatchNorm running statistics. Keras' 0.99 needs
      a few hundred steps to settle; short runs want about 0.9.
    conv_impl: Convolution, ReLU, max-pooling and dropout implementation
      (one of `agejax.conv.IMPLS`), resolved per pass by
      `agejax.conv.resolve_impl`.
    dtype: Computation dtype (``jnp.bfloat16`` for mixed precision). Parameters
      and BatchNorm statistics are always float32.
  """

  num_classes: int
  conv_filters: Sequence[Sequence[int]] = STUDY_CONV_FILTERS
  dense_units: Sequence[int] = FER_DENSE_UNITS
  conv_dropout: float = 0.25
  dense_dropout: float = 0.5
  frozen_bn: tuple[str, ...] = ()
  bn_momentum: float = 0.99
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Maps images [B, H, W, C] (float, in [0, 1]) to logits [B, num_classes]."""
    if x.ndim != 4:
      raise ValueError(
          f'CNN expects images of shape [batch, height, width, channels], got'
          f' shape {x.shape}.'
      )
    x = x.astype(self.dtype)
    impl = conv_lib.resolve_impl(
        self.conv_impl, train=train, batch_size=x.shape[0]
    )
    conv_fn = conv_lib.conv_general_dilated_for(impl)
    # Same values and gradients as nn.max_pool(x, (2, 2), strides=(2, 2));
    # on CPU its backward pass avoids select_and_scatter (see agejax.conv).
    max_pool = conv_lib.max_pool_for(impl, _POOL_WINDOW)
    # flax's masks either way; on CPU drawn by a hash XLA fuses (agejax.dropout).
    dropout = dropout_lib.dropout_for(impl)
    fuse_norm = train and impl in _FUSED_NORM_IMPLS
    for b, filters in enumerate(self.conv_filters, start=1):
      for c, features in enumerate(filters, start=1):
        name = f'block{b}/conv{c}'
        if fuse_norm:
          # The ReLU in the convolution's pass (its output is rectified).
          x = _ConvBiasRelu(features, dtype=self.dtype, name=name)(x)
          relu = None
        else:
          relu = conv_lib.relu_for(impl, x.shape[-1])
          x = nn.Conv(
              features,
              _KERNEL,
              padding='VALID',
              dtype=self.dtype,
              conv_general_dilated=conv_fn,
              name=name,
          )(x)
        pool = max_pool if c == len(filters) else None
        x = self._relu_batch_norm(
            x, f'block{b}/bn{c}', train, fuse_norm, relu, pool
        )
      x = dropout(self.conv_dropout, deterministic=not train)(x)
    x = x.reshape((x.shape[0], -1))
    for d, units in enumerate(self.dense_units, start=1):
      x = nn.Dense(units, dtype=self.dtype, name=f'head/dense{d}')(x)
      x = self._relu_batch_norm(x, f'head/bn{d}', train, fuse_norm, nn.relu)
      x = dropout(self.dense_dropout, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='logits')(x)
    return x.astype(jnp.float32)

  def _relu_batch_norm(
      self,
      x: jax.Array,
      name: str,
      train: bool,
      fuse: bool,
      relu: Optional[Callable[[jax.Array], jax.Array]],
      pool: Optional[conv_lib.PoolFn] = None,
  ) -> jax.Array:
    """``relu``, then BatchNorm ``name``, then ``pool`` if given.

    ``relu`` is None where ``x`` is ReLU's output already.
    """
    frozen = name in self.frozen_bn
    if fuse and not frozen:
      window = _POOL_WINDOW if pool is not None else None
      return relu_batch_norm.ReluBatchNorm(
          momentum=self.bn_momentum,
          epsilon=_BN_EPSILON,
          pool_window=window,
          rectified=relu is None,
          name=name,
      )(x)
    x = nn.BatchNorm(
        use_running_average=not train or frozen,
        momentum=self.bn_momentum,
        epsilon=_BN_EPSILON,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name=name,
    )(x if relu is None else relu(x))
    return x if pool is None else pool(x)


class _ConvBiasRelu(nn.Module):
  """``nn.relu(nn.Conv(features, (3, 3), padding='VALID')(x))`` as one op.

  The same parameters (``kernel``, ``bias``: float32, nn.Conv's
  initializers) and dtype handling as ``nn.Conv``, so it stands in for one
  under the same name; computed by `agejax.conv.conv_bias_relu`, which
  writes the rectified output in the convolution's own pass.
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
        'kernel',
        nn.initializers.lecun_normal(),
        (*_KERNEL, x.shape[-1], self.features),
        jnp.float32,
    )
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return conv_lib.conv_bias_relu(x, kernel, bias)


def fer_model(**overrides: Any) -> CNN:
  """The study's FER2013 network: head (512, 256) -> 7 emotions."""
  return CNN(**{'num_classes': 7, 'dense_units': FER_DENSE_UNITS, **overrides})


def age_model(num_classes: int = 100, **overrides: Any) -> CNN:
  """The study's final age network ("+1 FC"): head (512, 512, 256) -> ages."""
  return CNN(
      **{'num_classes': num_classes, 'dense_units': AGE_DENSE_UNITS, **overrides}
  )
