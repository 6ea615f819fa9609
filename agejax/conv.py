"""Convolution and max-pooling implementations for the CNN, chosen per backend.

Why: XLA:CPU (jaxlib 0.10.2) hands a 2-D convolution to its YNNPACK fusion
whenever YNNPACK accepts it, and on the study's layers YNNPACK runs the
forward and kernel-gradient convolutions 2-3x below what Eigen (XLA:CPU's
other convolution kernel) reaches; and it expands the ``select_and_scatter``
that differentiates max-pooling into iotas, reduce-windows and a scatter, ~10x
slower than elementwise code. See docs/PERFORMANCE.md for the
summary, docs/performance_log.md for each measurement.

`matmul_conv_general_dilated` is a drop-in replacement for
``lax.conv_general_dilated`` (same signature, same values to float32
rounding) with a custom VJP:

* forward of float32 and bfloat16 3x3 layers with at least 64 input
  channels and 6 output rows: `winograd_conv_valid` (Winograd F(2x2, 3x3):
  16 multiplications per 2x2 output tile instead of 36; bfloat16 tiles,
  float32 transforms and accumulation), except in bfloat16 where
  `agejax.onednn` is enabled for it;
* other forwards in a dtype `agejax.onednn` is enabled for (float32; and
  bfloat16 on CPUs with bfloat16 instructions): oneDNN's convolution;
* other forwards: a ``lax`` convolution whose input is padded by ``kh`` rows
  at the bottom, then sliced back to the VALID rows. YNNPACK rejects
  convolutions whose output is taller than their input, so this one runs on
  Eigen. Used from 8 input channels and 6 output rows up; otherwise the plain
  VALID ``lax`` convolution;
* both gradients of float32 and bfloat16 3x3 layers with at least 64 input
  channels: `winograd_conv_valid_vjp`, Winograd's backward pass written out
  (again not in bfloat16 where oneDNN is enabled for it);
* other input gradients: the transposed convolution, a VALID convolution of
  the cotangent padded by ``kernel - 1`` with the flipped kernel, its input
  and output channels swapped (what ``lax`` does). oneDNN's convolution
  where it is enabled for the dtype; otherwise a ``lax`` convolution, which
  runs on Eigen since its output is taller than its input;
* other kernel gradients: ``patches^T @ cotangent``, the patches being the
  ``kh * kw`` shifted slices of the input concatenated along channels. Layers
  with at least 8 input channels and 3,000 output positions (batch x height
  x width) sum it over 4 images at a time in a ``lax.scan``, so that each
  chunk's patches stay in cache; in float32 those with 3-tall kernels
  (the study's 46x46x32 layer) by Winograd F(4, 3) along the height and
  im2col along the width, half the FLOPs and half the patches' memory.

Every matmul of these paths (im2col and Winograd products) is oneDNN's
where `agejax.onednn` is enabled for its dtype, XLA's dot otherwise.

bfloat16 convolutions take these paths in bfloat16 only on CPUs with
bfloat16 instructions (`onednn.native_bfloat16`). Elsewhere they compute in
float32 and round the output (and the gradients) to bfloat16, as XLA:CPU's
own bfloat16 convolutions do. On a Zen 3 (AVX2) the bfloat16 Winograd tiles
put up to 31x the error of ``lax``'s bfloat16 step on some of the study
network's gradients (computed in float32: at most 1.2x), and its bfloat16
training step ran at 0.77-0.81x the float32 step's speed (computed in
float32: 0.87-1.03x; docs/performance_log.md, session 27).

On the study's network oneDNN's kernels make the float32 training step
1.16-1.19x faster than XLA's, and the bfloat16 one 1.51-1.56x
(docs/performance_log.md, session 14), and the
Winograd paths 1.2-1.6x faster, with or without the freed-memory reuse that
`agejax.host_malloc` arranges (docs/performance_log.md); its 46x46x32 layer,
too thin for Winograd, takes the Eigen and chunked im2col paths. Winograd's
16 transformed tiles are stacked four by four, a shape XLA:CPU fuses into
one loop.

It covers what the study's network uses: 2-D NHWC inputs, HWIO kernels,
stride 1, no dilation, one feature and batch group, no
``preferred_element_type``, and 'VALID', 'SAME' ('SAME_LOWER') or explicit
non-negative padding. Any other call is passed to ``lax.conv_general_dilated``
unchanged, so the function is safe to use everywhere.

`conv_bias_relu` is ``relu(conv + bias)`` as one op with the same
gradients: the CPU training path computes the study's convolutions with
it, so that the rectified output is what the convolution's own pass
writes (oneDNN's post-ops, or Winograd's last loop) and BatchNorm reads.

`max_pool_fast` is ``flax.linen.max_pool`` for non-overlapping windows
(stride = window, VALID) with a custom VJP that gives exactly the same
gradient, ties included, from elementwise operations. `max_pool_for` picks
the pooling with the same ``impl`` names as the convolution.

Inference is different: with no backward pass, XLA:CPU gives the whole
forward network (convolutions, bias, ReLU, BatchNorm on running statistics,
pooling, the first dense layer) to YNNPACK as one fused graph, which on
x86-64 CPUs with AVX-512 runs it near the machine's matmul peak from batch
128 up (on the one AVX2 CPU measured, it was slower than the custom
forward, or as fast). Only the first
convolution, whose input has one channel, stays outside that graph. The
``'ynnpack'`` implementation (`ynnpack_conv_general_dilated` and `relu_for`)
computes it as a sum of shifted products instead, which XLA fuses with its
bias add and ReLU into one loop ahead of the graph. `resolve_impl` maps
``'auto'`` to ``'ynnpack'`` for inference batches of 128 and more on
x86-64 CPUs with AVX-512.
"""

from __future__ import annotations

import functools
import platform
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from agejax import onednn

ConvFn = Callable[..., jax.Array]

IMPLS = ('lax', 'matmul', 'ynnpack', 'auto')

# What `max_pool_for` returns: images [B, H, W, C] -> pooled images.
PoolFn = Callable[[jax.Array], jax.Array]

# NHWC input, HWIO kernel, NHWC output: the layout flax.linen.Conv passes.
_NHWC_HWIO = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)


# The products of the custom-VJP path (im2col kernel gradients, Winograd's
# 16 batched matmuls): oneDNN's matmul where `onednn.enabled_for` their
# dtype, else XLA's dot.
_dot_general = onednn.dot_general

# From this batch size up, on x86-64 CPUs with AVX-512
# (`_ynnpack_inference_cpu`), XLA:CPU's fused YNNPACK inference graph
# (``lax`` convolutions and ``reduce_window`` pooling) beats the custom
# forward: 890-1131 vs 812-860 images/s at batch 128-512, but 676 vs 898 at
# batch 64 (2-core Zen 4). On an AVX2 Zen 3 the custom forward ran
# at 1.4-1.6x YNNPACK's speed at batch 128 and 0.98-1.14x at 256-1024
# (docs/performance_log.md, sessions 11 and 30).
_YNN_INFERENCE_MIN_BATCH = 128


def resolve_impl(impl: str, *, train: bool, batch_size: int) -> str:
  """The implementation ``'auto'`` stands for in one forward pass.

  Off the CPU, ``'lax'``. On the CPU, ``'matmul'`` for training (its custom
  VJP is the fast backward pass) and for inference, except ``'ynnpack'``
  for inference batches of at least 128 on x86-64 CPUs with AVX-512 (see
  the module docstring). Other implementations are returned as they are.
  All choices give the same values up to float32 rounding.

  Args:
    impl: One of `IMPLS`.
    train: Whether the pass will be differentiated (training mode).
    batch_size: Leading dimension of the input, as traced.

  Raises:
    ValueError: ``impl`` is not one of `IMPLS`.
  """
  if impl not in IMPLS:
    raise ValueError(f'Unknown conv impl {impl!r}; expected one of {IMPLS}.')
  if impl != 'auto':
    return impl
  if jax.default_backend() != 'cpu':
    return 'lax'
  if not train and batch_size >= _YNN_INFERENCE_MIN_BATCH and _ynnpack_inference_cpu():
    return 'ynnpack'
  return 'matmul'


@functools.cache
def _ynnpack_inference_cpu() -> bool:
  """Whether YNNPACK's fused inference graph was measured faster on this kind of CPU.

  x86-64 with AVX-512 (the Zen 4 and the Xeon). On the AVX2 Zen 3 the
  custom forward was faster; other CPUs (Arm among them) were not measured
  and keep the custom forward, which is exact there too.
  """
  return (
      platform.machine().lower() in ('x86_64', 'amd64')
      and 'avx512f' in onednn.cpu_flags()
  )


def conv_general_dilated_for(impl: str) -> ConvFn:
  """Returns the ``conv_general_dilated`` to give `flax.linen.Conv`.

  Args:
    impl: ``'lax'`` for ``jax.lax.conv_general_dilated``; ``'matmul'`` for
      `matmul_conv_general_dilated`; ``'ynnpack'`` for
      `ynnpack_conv_general_dilated`; ``'auto'`` for
      `auto_conv_general_dilated` (matmul on the CPU backend, lax on GPU and
      TPU).

  Raises:
    ValueError: ``impl`` is none of these.
  """
  if impl == 'lax':
    return lax.conv_general_dilated
  if impl == 'matmul':
    return matmul_conv_general_dilated
  if impl == 'ynnpack':
    return ynnpack_conv_general_dilated
  if impl == 'auto':
    return auto_conv_general_dilated
  raise ValueError(f'Unknown conv impl {impl!r}; expected one of {IMPLS}.')


def max_pool_for(impl: str, window: tuple[int, int]) -> PoolFn:
  """The non-overlapping NHWC max-pooling (stride = window, VALID) for ``impl``.

  ``'lax'`` and ``'ynnpack'`` are ``flax.linen.max_pool``
  (``lax.reduce_window``, which YNNPACK's inference graph takes in; its
  gradient is a ``select_and_scatter``); ``'matmul'`` is `max_pool_fast`;
  ``'auto'`` is `max_pool_fast` on CPU and ``flax.linen.max_pool`` elsewhere.
  All give the same values and the same gradients (ties included).

  Raises:
    ValueError: ``impl`` is not one of `IMPLS`.
  """
  window = tuple(int(k) for k in window)
  if impl in ('lax', 'ynnpack'):
    return functools.partial(_flax_max_pool, window=window)
  if impl == 'matmul':
    return functools.partial(max_pool_fast, window=window)
  if impl == 'auto':
    return functools.partial(_auto_max_pool, window=window)
  raise ValueError(f'Unknown conv impl {impl!r}; expected one of {IMPLS}.')


def relu_for(impl: str, in_channels: int) -> Callable[[jax.Array], jax.Array]:
  """The ReLU to apply after a convolution of ``in_channels`` input channels.

  ``flax.linen.relu`` (``max(x, 0)``), except for ``'ynnpack'`` with as few
  input channels as `ynnpack_conv_general_dilated` computes as shifted
  products: there it is written as a select. XLA:CPU gives ``max`` to
  YNNPACK, which reads its zero operand as a tensor XLA writes out in full
  (69 MB for the study's first layer at batch 256); a select YNNPACK does
  not take, so XLA fuses it into the convolution's loop. Both give the same
  values and gradients: NaN stays NaN, and the gradient at 0 is 0.

  Raises:
    ValueError: ``impl`` is not one of `IMPLS`.
  """
  if impl not in IMPLS:
    raise ValueError(f'Unknown conv impl {impl!r}; expected one of {IMPLS}.')
  if impl == 'ynnpack' and in_channels <= _SHIFTED_PRODUCTS_MAX_IN_CHANNELS:
    return _relu_as_select
  return nn.relu


@jax.custom_jvp
def _relu_as_select(x: jax.Array) -> jax.Array:
  return jnp.where(x <= 0, jnp.zeros((), x.dtype), x)


# jax.nn.relu's derivative: 0 at 0 and at NaN.
_relu_as_select.defjvps(
    lambda g, ans, x: lax.select(x > 0, g, lax.full_like(g, 0))
)


def _flax_max_pool(x: jax.Array, window: tuple[int, int]) -> jax.Array:
  return nn.max_pool(x, window, strides=window, padding='VALID')


def _auto_max_pool(x: jax.Array, window: tuple[int, int]) -> jax.Array:
  if jax.default_backend() == 'cpu':
    return max_pool_fast(x, window)
  return _flax_max_pool(x, window)


def max_pool_fast(x: jax.Array, window: tuple[int, int]) -> jax.Array:
  """``nn.max_pool(x, window, strides=window)`` with a gather-free gradient.

  Why: XLA:CPU expands the ``select_and_scatter`` that differentiates
  ``reduce_window`` max into iotas, a variadic reduce-window and a scatter;
  for the study's first block that backward pass is ~10x slower than
  elementwise code. Here the forward is a max over the ``kh * kw`` strided
  views of the input, and the custom VJP routes each output cotangent to the
  *first* (row-major) maximal element of its window, which is exactly what
  ``select_and_scatter`` with ``>=`` does, ties included. Rows and columns that
  do not fill a window are dropped (VALID) and get a zero gradient.

  Args:
    x: [B, H, W, C] (or any rank >= 3 with the two spatial dims before the
      last one).
    window: (kh, kw), also the strides.
  """
  return _max_pool_fast(x, tuple(int(k) for k in window))


def pool_taps(x: jax.Array, window: tuple[int, int]) -> list[jax.Array]:
  """The kh * kw strided views of ``x`` [..., H, W, C], one per window element.

  Tap ``i * kw + j`` holds element (i, j) of every non-overlapping window;
  rows and columns past the last whole window are dropped.
  """
  kh, kw = window
  *lead, h, w, c = x.shape
  ho, wo = h // kh, w // kw
  x = x[..., : ho * kh, : wo * kw, :].reshape(*lead, ho, kh, wo, kw, c)
  return [x[..., :, i, :, j, :] for i in range(kh) for j in range(kw)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_fast(x: jax.Array, window: tuple[int, int]) -> jax.Array:
  return functools.reduce(jnp.maximum, pool_taps(x, window))


def _max_pool_fast_fwd(
    x: jax.Array, window: tuple[int, int]
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  y = _max_pool_fast(x, window)
  return y, (x, y)


def _max_pool_fast_bwd(
    window: tuple[int, int], res: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array]:
  x, y = res
  kh, kw = window
  zeros = jnp.zeros_like(g)
  taken = None
  grads = []
  for tap in pool_taps(x, window):
    hit = tap == y
    if taken is not None:
      hit = hit & ~taken
    taken = hit if taken is None else taken | hit
    grads.append(jnp.where(hit, g, zeros))
  *lead, ho, wo, c = g.shape
  # [..., ho, kh, wo, kw, c] -> [..., ho * kh, wo * kw, c]
  dx = jnp.stack(grads, axis=-2).reshape(*lead, ho, wo, kh, kw, c)
  dx = jnp.moveaxis(dx, -3, -4).reshape(*lead, ho * kh, wo * kw, c)
  h, w = x.shape[-3], x.shape[-2]
  if (ho * kh, wo * kw) != (h, w):
    pad = [(0, 0)] * len(lead) + [(0, h - ho * kh), (0, w - wo * kw), (0, 0)]
    dx = jnp.pad(dx, pad)
  return (dx,)


_max_pool_fast.defvjp(_max_pool_fast_fwd, _max_pool_fast_bwd)


def auto_conv_general_dilated(*args: Any, **kwargs: Any) -> jax.Array:
  """`matmul_conv_general_dilated` on CPU, ``lax`` elsewhere.

  The choice is made from ``jax.default_backend()`` when the call is traced:
  GPU and TPU convolution gradients are fast in XLA already, and there the
  extra im2col copy would only cost memory.
  """
  if jax.default_backend() == 'cpu':
    return matmul_conv_general_dilated(*args, **kwargs)
  return lax.conv_general_dilated(*args, **kwargs)


def matmul_conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
  """``lax.conv_general_dilated`` with a matmul kernel gradient on CPU.

  Same signature and values as ``lax.conv_general_dilated``. Calls outside
  the supported case (see the module docstring) are delegated to it.
  """
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
          dimension_numbers, feature_group_count, batch_group_count, precision,
          preferred_element_type)
  x = _valid_input(*args)
  if x is None:
    return lax.conv_general_dilated(*args)
  if _float32_compute(x, rhs):
    return _conv_valid(
        x.astype(jnp.float32), rhs.astype(jnp.float32), precision
    ).astype(jnp.bfloat16)
  return _conv_valid(x, rhs, precision)


def _float32_compute(*operands: jax.Array) -> bool:
  """Whether bfloat16 operands are convolved in float32 (module docstring)."""
  return (
      jnp.result_type(*operands) == jnp.bfloat16 and not onednn.native_bfloat16()
  )


def _valid_input(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None,
    rhs_dilation: Sequence[int] | None,
    dimension_numbers: Any,
    feature_group_count: int,
    batch_group_count: int,
    precision: Any,
    preferred_element_type: Any,
) -> jax.Array | None:
  """``lhs`` padded for a VALID convolution, or None outside the supported case.

  Takes ``lax.conv_general_dilated``'s arguments in its order; the supported
  case is the module docstring's (``precision`` does not matter).
  """
  del precision
  if lhs.ndim != 4 or rhs.ndim != 4 or lhs.dtype != rhs.dtype:
    return None
  if (
      lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != _NHWC_HWIO
  ):
    return None
  ones = (1, 1)
  if (
      tuple(window_strides) != ones
      or tuple(lhs_dilation or ones) != ones
      or tuple(rhs_dilation or ones) != ones
      or feature_group_count != 1
      or batch_group_count != 1
      or preferred_element_type is not None
      or lhs.shape[3] != rhs.shape[2]
  ):
    return None
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], ones, padding)
  else:
    pads = [tuple(p) for p in padding]
  if len(pads) != 2 or any(len(p) != 2 or min(p) < 0 for p in pads):
    return None
  out_hw = [
      n + lo + hi - k + 1
      for n, (lo, hi), k in zip(lhs.shape[1:3], pads, rhs.shape[:2])
  ]
  if min(out_hw) < 1:
    return None
  if any(p for pair in pads for p in pair):
    lhs = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
  return lhs


# Wider inputs stay on ``lax`` (inside YNNPACK's graph) under 'ynnpack'.
_SHIFTED_PRODUCTS_MAX_IN_CHANNELS = 1


def ynnpack_conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
  """``lax.conv_general_dilated``, single-channel inputs as shifted products.

  Same signature and values as ``lax.conv_general_dilated``. Why: in
  inference XLA:CPU runs the study's network as one YNNPACK graph, all but
  its first convolution, whose input has one channel. That one ran alone in
  YNNPACK (11 ms at batch 256), its bias add in a loop of its own (5 ms),
  and its ReLU read a zero tensor written out in full (9 ms;
  docs/performance_log.md, sessions 10 and 11). Written as the sum over the
  kernel's taps of the shifted input times the tap's output-channel
  weights, XLA fuses it with the bias add and `relu_for`'s ReLU into one
  loop. The products and their sum are in float32 or wider (``precision``
  does not apply to them). Calls with more input channels, or outside the
  supported case (see the module docstring), are delegated to ``lax``.
  """
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
          dimension_numbers, feature_group_count, batch_group_count, precision,
          preferred_element_type)
  thin = rhs.ndim == 4 and rhs.shape[2] <= _SHIFTED_PRODUCTS_MAX_IN_CHANNELS
  x = _valid_input(*args) if thin else None
  if x is None:
    return lax.conv_general_dilated(*args)
  return _shifted_products(x, rhs)


def _shifted_products(x: jax.Array, w: jax.Array) -> jax.Array:
  """The VALID convolution as a sum of ``kh * kw * cin`` broadcast products."""
  kh, kw, cin, _ = w.shape
  ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  acc = jnp.promote_types(x.dtype, jnp.float32)
  xa, wa = x.astype(acc), w.astype(acc)
  terms = (
      xa[:, i : i + ho, j : j + wo, c : c + 1] * wa[i, j, c]
      for i in range(kh)
      for j in range(kw)
      for c in range(cin)
  )
  return functools.reduce(jnp.add, terms).astype(x.dtype)


# Below these sizes the Eigen forward loses to the plain one (measured on a
# 2-core Zen 4, see docs/performance_log.md): Eigen is slow with very few input
# channels, and the padded forward wastes ``kh`` of ``ho + kh`` output rows.
_EIGEN_MIN_IN_CHANNELS = 8
_EIGEN_FORWARD_MIN_OUT_ROWS = 6
# Kernel gradients of layers this large run as im2col matmuls over
# `_KERNEL_GRAD_CHUNK` images at a time (a ``lax.scan``), so that each chunk's
# patches stay in cache; smaller ones as one im2col matmul.
_CHUNKED_KERNEL_GRAD_MIN_IN_CHANNELS = 8
_CHUNKED_KERNEL_GRAD_MIN_ROWS = 3000  # batch * out_h * out_w
_KERNEL_GRAD_CHUNK = 4


def _eigen_forward(x_shape: Sequence[int], w_shape: Sequence[int]) -> bool:
  kh, _, cin, _ = w_shape
  out_h = x_shape[1] - kh + 1
  return cin >= _EIGEN_MIN_IN_CHANNELS and out_h >= _EIGEN_FORWARD_MIN_OUT_ROWS


def _chunked_kernel_grad(x_shape: Sequence[int], g_shape: Sequence[int]) -> bool:
  rows = g_shape[0] * g_shape[1] * g_shape[2]
  return (
      x_shape[3] >= _CHUNKED_KERNEL_GRAD_MIN_IN_CHANNELS
      and rows >= _CHUNKED_KERNEL_GRAD_MIN_ROWS
      and g_shape[0] >= 2 * _KERNEL_GRAD_CHUNK
  )


def _forward(x: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
  """The VALID convolution, on the fastest XLA:CPU kernel for its shape.

  Float32 and bfloat16 3x3 layers with at least 64 input channels and 6
  output rows run `winograd_conv_valid` (`_winograd_forward`; oneDNN's
  forward was no faster over the whole step in float32). Other layers run
  oneDNN's convolution where `onednn.enabled_for` their dtype. Otherwise:
  XLA:CPU (jaxlib 0.10.2) gives a 2-D convolution to YNNPACK unless its
  output is taller than its input; YNNPACK runs these layers 2-3x slower
  than Eigen.
  Padding the input's bottom by ``kh`` rows makes the output ``kh`` rows
  taller than the VALID one (one row taller than the input), which routes it
  to Eigen; the extra rows are sliced off. The kept rows only read real input
  rows, so the values are those of the VALID convolution.
  """
  if _winograd_forward(x.shape, w):
    return winograd_conv_valid(x, w, precision)
  if _onednn_forward(x, w):
    return onednn.conv(x, w)
  if not _eigen_forward(x.shape, w.shape):
    return lax.conv_general_dilated(
        x, w, (1, 1), 'VALID', dimension_numbers=_NHWC_HWIO, precision=precision
    )
  kh = w.shape[0]
  out_h = x.shape[1] - kh + 1
  y = lax.conv_general_dilated(
      x,
      w,
      (1, 1),
      ((0, kh), (0, 0)),
      dimension_numbers=_NHWC_HWIO,
      precision=precision,
  )
  return y[:, :out_h]


def _onednn_forward(x: jax.Array, w: jax.Array) -> bool:
  """Whether `_forward` convolves on oneDNN: no Winograd, oneDNN's dtype."""
  return (
      not _winograd_forward(x.shape, w)
      and x.dtype == w.dtype
      and onednn.enabled_for(x.dtype)
  )


def _input_grad(w: jax.Array, g: jax.Array, precision: Any) -> jax.Array:
  """dX of the VALID convolution for cotangent ``g`` (transposed convolution).

  A VALID convolution of ``g`` padded by ``kernel - 1`` with the flipped
  kernel, its input and output channels swapped: oneDNN's convolution where
  `onednn.enabled_for` holds; otherwise a ``lax`` convolution, whose output
  is taller than its input, so XLA:CPU runs it on Eigen (see `_forward`).
  The swap is done on the kernel here: read as HWOI through the dimension
  numbers instead, as ``lax`` does, the Eigen convolution ran ~5x slower
  inside the while loop of a scanned epoch (docs/performance_log.md, session
  10).
  """
  kh, kw = w.shape[:2]
  flipped = jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3)
  padding = ((kh - 1, kh - 1), (kw - 1, kw - 1))
  if g.dtype == w.dtype and onednn.enabled_for(g.dtype):
    return onednn.conv(g, flipped, padding)
  return lax.conv_general_dilated(
      g, flipped, (1, 1), padding, dimension_numbers=_NHWC_HWIO, precision=precision
  )


# float32 patches are built channel-major (`_channel_major_kernel_grad`);
# bfloat16 ones from the NHWC input, since XLA:CPU computes the
# channel-major stack of bfloat16 slices in float32 and converts the whole
# input and cotangent before the chunks' loop: the 46x46x32 layer's kernel
# gradient took 82 ms that way at batch 64, against 42 (docs/performance_log.md,
# session 13).
_CHANNEL_MAJOR_PATCH_DTYPES = (jnp.float32,)
# Chunked float32 kernel gradients of 3-tall kernels by Winograd F(4, 3)
# along the height (`_height_winograd_kernel_grad`, from the NHWC input).
_WINOGRAD_KERNEL_GRAD_DTYPES = (jnp.float32,)


def _im2col_kernel_grad(
    x: jax.Array, g: jax.Array, kh: int, kw: int, precision: Any
) -> jax.Array:
  """``patches^T @ g``: dW as [kh * kw * C_in, C_out], accumulated in float32.

  The patches are the ``kh * kw`` shifted slices of NHWC ``x`` concatenated
  along channels.
  """
  n, ho, wo, cout = g.shape
  patches = jnp.concatenate(
      [x[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)],
      axis=-1,
  )
  return _dot_general(
      patches.reshape(n * ho * wo, -1),
      g.reshape(n * ho * wo, cout),
      (((0,), (0,)), ((), ())),
      precision=precision,
      preferred_element_type=jnp.float32,
  )


def _channel_major_kernel_grad(
    xt: jax.Array, g: jax.Array, kh: int, kw: int, precision: Any
) -> jax.Array:
  """`_im2col_kernel_grad` of the input given channel-major, [C_in, B, H, W].

  The patches are its shifted slices stacked, [kh * kw * C_in, B * out_h *
  out_w], the layout the product reads. From NHWC, XLA:CPU writes them in
  three passes (nine slices, the concatenate, a transpose for the product);
  a stack of stacks of at most 8 operands each (see `_stack_4x4`) is one
  loop.
  """
  cin, n = xt.shape[:2]
  _, ho, wo, cout = g.shape
  patches = jnp.stack([
      jnp.stack([xt[:, :, i : i + ho, j : j + wo] for j in range(kw)])
      for i in range(kh)
  ])
  return _dot_general(
      patches.reshape(kh * kw * cin, n * ho * wo),
      g.reshape(n * ho * wo, cout),
      (((1,), (0,)), ((), ())),
      precision=precision,
      preferred_element_type=jnp.float32,
  )


def _height_winograd_kernel_grad(
    x: jax.Array, g: jax.Array, kh: int, kw: int, precision: Any
) -> jax.Array:
  """`_im2col_kernel_grad` of a 3-tall kernel, Winograd F(4, 3) down.

  Along the height, the NHWC input's 6-row tiles at stride 4 are
  transformed (``B^T d``), and the cotangent's groups of 4 rows (``A g``);
  along the width the tiles are shifted by the kernel's columns, as im2col
  does. The 6 products [positions / 4, kw * C_in]^T @ [positions / 4, C_out]
  take half the im2col product's FLOPs, their patches half its memory;
  ``G^T`` of the products gives the kernel's 3 rows. The height is
  zero-padded to whole tiles. oneDNN reads the patches transposed, so the
  input needs no channel-major copy: on the study's 46x46x32 layer, 18 ms
  at batch 64 against 24 with that copy and channel-major patches
  (docs/performance_log.md, session 19). Against float64, it errs by ~2e-6 of
  the largest value on that layer, where ``lax``'s own kernel gradient
  errs by ~1.3e-5.
  """
  n, h, _, cin = x.shape
  _, ho, wo, cout = g.shape
  th = -(-ho // 4)
  x = jnp.pad(x, ((0, 0), (0, 4 * th + 2 - h), (0, 0), (0, 0)))
  g = jnp.pad(g, ((0, 0), (0, 4 * th - ho), (0, 0), (0, 0)))
  taps = [x[:, k : k + 4 * th - 3 : 4] for k in range(6)]
  tiles = _winograd43_1d(*taps)
  patches = jnp.stack(
      [jnp.stack([t[:, :, j : j + wo] for j in range(kw)], axis=3) for t in tiles]
  )
  rows = g.reshape(n, th, 4, wo, cout)
  u = jnp.stack(_winograd43_output_1d_t(*(rows[:, :, r] for r in range(4))))
  m = _dot_general(
      patches.reshape(6, n * th * wo, kw * cin),
      u.reshape(6, n * th * wo, cout),
      (((1,), (1,)), ((0,), (0,))),
      precision=precision,
      preferred_element_type=jnp.float32,
  ).reshape(6, kw, cin, cout)
  dw = jnp.stack(_winograd43_kernel_1d_t(*(m[t] for t in range(6))))
  return dw.reshape(kh * kw * cin, cout)


def _tile_products(a: jax.Array, b: jax.Array, precision: Any = None) -> jax.Array:
  """``a[t] @ b[t]`` for every t, accumulated in float32: [T, M, N].

  The batched product of the Winograd paths (one matmul per transformed
  tile position), on oneDNN where `agejax.onednn` is enabled for the dtype.
  """
  return _dot_general(
      a,
      b,
      (((2,), (1,)), ((0,), (0,))),
      precision=precision,
      preferred_element_type=jnp.float32,
  )


def _channels_first(x: jax.Array) -> jax.Array:
  """[..., B, H, W, C] as [..., C, B, H, W]."""
  return jnp.moveaxis(x, -1, -4)


_KernelGradProduct = Callable[[jax.Array, jax.Array, int, int, Any], jax.Array]


def _kernel_grad_formulation(
    x_shape: Sequence[int], g_shape: Sequence[int], kh: int, dtype: Any
) -> tuple[_KernelGradProduct, Callable[[jax.Array], jax.Array]]:
  """The product `_kernel_grad` sums, and the layout it takes the input in.

  Large float32 layers with 3-tall kernels take Winograd F(4, 3) along the
  height (`_height_winograd_kernel_grad`): on the study's 46x46x32 layer,
  19-21 ms at batch 64 against 27-28 for Winograd F(2, 3) along the width
  and 33-36 for im2col (docs/performance_log.md, session 16). Others take
  im2col, with channel-major patches in the `_CHANNEL_MAJOR_PATCH_DTYPES`.
  """
  if (
      _chunked_kernel_grad(x_shape, g_shape)
      and kh == 3
      and dtype in _WINOGRAD_KERNEL_GRAD_DTYPES
  ):
    return _height_winograd_kernel_grad, _as_nhwc
  if dtype in _CHANNEL_MAJOR_PATCH_DTYPES:
    return _channel_major_kernel_grad, _channels_first
  return _im2col_kernel_grad, _as_nhwc


def _as_nhwc(x: jax.Array) -> jax.Array:
  """``x`` as it is: the layout of the NHWC formulations."""
  return x


def _kernel_grad(
    x: jax.Array, g: jax.Array, kh: int, kw: int, precision: Any
) -> jax.Array:
  """dW [kh, kw, C_in, C_out] of the VALID convolution for cotangent ``g``.

  The product is `_kernel_grad_formulation`'s. Large layers
  (`_chunked_kernel_grad`) sum it over `_KERNEL_GRAD_CHUNK` images at a
  time; a batch that is not a multiple of the chunk adds the remaining
  images' product at the end. Channel-major patches transpose the input
  once, for all chunks. The alternatives measured before, Eigen's 3-D
  filter-gradient convolution and one im2col product of the whole batch,
  took twice as long as im2col (docs/performance_log.md, session 10).
  """
  cin, cout = x.shape[3], g.shape[3]
  dtype = jnp.result_type(x, g)
  chunked = _chunked_kernel_grad(x.shape, g.shape)
  product, to_layout = _kernel_grad_formulation(x.shape, g.shape, kh, dtype)
  if not chunked:
    dw = product(to_layout(x), g, kh, kw, precision)
    return dw.reshape(kh, kw, cin, cout).astype(dtype)
  n = x.shape[0]
  whole = n - n % _KERNEL_GRAD_CHUNK

  def add_chunk(
      dw: jax.Array, chunk: tuple[jax.Array, jax.Array]
  ) -> tuple[jax.Array, None]:
    return dw + product(*chunk, kh, kw, precision), None

  x_chunks, g_chunks = (
      a[:whole].reshape(-1, _KERNEL_GRAD_CHUNK, *a.shape[1:]) for a in (x, g)
  )
  dw0 = jnp.zeros((kh * kw * cin, cout), jnp.float32)
  dw, _ = lax.scan(add_chunk, dw0, (to_layout(x_chunks), g_chunks))
  if whole < n:
    dw = dw + product(to_layout(x[whole:]), g[whole:], kh, kw, precision)
  return dw.reshape(kh, kw, cin, cout).astype(dtype)


# Winograd F(2x2, 3x3) wins from 64 input channels, both ways; its transforms
# write ~4x the input, so it gains most when freed host memory is reused
# (`agejax.host_malloc`). Below that the 16 products are too thin: on the
# study's 46x46x32 layer the Eigen forward, the transposed convolution and
# the chunked im2col kernel gradient make the whole training step 8-12 %
# faster in float32, 10-11 % in bfloat16 (2-core Intel Xeon,
# docs/performance_log.md, session 10; a Zen 4 had favoured Winograd there
# against Eigen's 3-D kernel gradient). Below 6 output rows the padding to
# whole 2x2 tiles wastes too much of the forward.
_WINOGRAD_FORWARD_MIN_IN_CHANNELS = 64
_WINOGRAD_FORWARD_MIN_OUT_ROWS = 6
_WINOGRAD_BACKWARD_MIN_IN_CHANNELS = 64
# bfloat16 runs it with bfloat16 tiles (half the memory traffic), float32
# transforms and float32 accumulation: 1.3-1.9x the bfloat16 training step on
# ``lax`` convolutions (docs/performance_log.md).
_WINOGRAD_DTYPES = (jnp.float32, jnp.bfloat16)
# In bfloat16, oneDNN's direct convolutions (AMX or AVX-512 BF16) beat
# Winograd 5-10x per layer (docs/performance_log.md, session 14).
_ONEDNN_OVER_WINOGRAD_DTYPES = (jnp.bfloat16,)


def _winograd_forward(x_shape: Sequence[int], w: jax.Array) -> bool:
  kh, kw, cin, _ = w.shape
  return (
      (kh, kw) == (3, 3)
      and cin >= _WINOGRAD_FORWARD_MIN_IN_CHANNELS
      and x_shape[1] - kh + 1 >= _WINOGRAD_FORWARD_MIN_OUT_ROWS
      and _winograd_dtype(w.dtype)
  )


def _winograd_backward(w: jax.Array) -> bool:
  kh, kw, cin, _ = w.shape
  return (
      (kh, kw) == (3, 3)
      and cin >= _WINOGRAD_BACKWARD_MIN_IN_CHANNELS
      and _winograd_dtype(w.dtype)
  )


def _winograd_dtype(dtype: Any) -> bool:
  """Winograd's dtypes, less those oneDNN convolves faster directly."""
  return dtype in _WINOGRAD_DTYPES and not (
      dtype in _ONEDNN_OVER_WINOGRAD_DTYPES and onednn.enabled_for(dtype)
  )


def _winograd_1d(t0, t1, t2, t3):
  """``B^T`` of F(2, 3) along one axis: four input taps -> four values."""
  return t0 - t2, t1 + t2, t2 - t1, t1 - t3


def _winograd_1d_t(d0, d1, d2, d3):
  """The transpose of `_winograd_1d`: four values -> four input taps."""
  return d0, d1 - d2 + d3, d1 + d2 - d0, -d3


def _winograd_kernel_1d(g0, g1, g2):
  """``G`` of F(2, 3) along one axis: three kernel taps -> four values."""
  return g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2


def _winograd_kernel_1d_t(d0, d1, d2, d3):
  """The transpose of `_winograd_kernel_1d`: four values -> three taps."""
  return d0 + 0.5 * (d1 + d2), 0.5 * (d1 - d2), 0.5 * (d1 + d2) + d3


def _winograd_output_1d_t(g0, g1):
  """The transpose of ``A^T`` along one axis: two outputs -> four values."""
  return g0, g0 + g1, g0 - g1, -g1


# Winograd F(4, 3) along one axis (interpolation points 0, 1, -1, 2, -2 and
# infinity), for `_height_winograd_kernel_grad`: 6 products per 4 outputs.
def _winograd43_1d(d0, d1, d2, d3, d4, d5):
  """``B^T`` of F(4, 3): six input taps -> six values."""
  return (
      4 * d0 - 5 * d2 + d4,
      d3 + d4 - 4 * (d1 + d2),
      4 * (d1 - d2) - d3 + d4,
      2 * (d3 - d1) - d2 + d4,
      2 * (d1 - d3) - d2 + d4,
      4 * d1 - 5 * d3 + d5,
  )


def _winograd43_output_1d_t(g0, g1, g2, g3):
  """The transpose of F(4, 3)'s ``A^T``: four outputs -> six values."""
  return (
      g0,
      g0 + g1 + g2 + g3,
      g0 - g1 + g2 - g3,
      g0 + 2 * g1 + 4 * g2 + 8 * g3,
      g0 - 2 * g1 + 4 * g2 - 8 * g3,
      g3,
  )


def _winograd43_kernel_1d_t(d0, d1, d2, d3, d4, d5):
  """The transpose of F(4, 3)'s ``G``: six values -> three kernel taps."""
  return (
      d0 / 4 - (d1 + d2) / 6 + (d3 + d4) / 24,
      (d2 - d1) / 6 + (d3 - d4) / 12,
      (d3 + d4 - d1 - d2) / 6 + d5,
  )


def _winograd_pad(x: jax.Array) -> tuple[jax.Array, int, int]:
  """``x`` zero-padded to whole tiles, and the tile rows and columns.

  The 2x2 output tiles cover the VALID output; their 4x4 input tiles, at
  stride 2, need ``2 * tiles + 2`` input rows and columns.
  """
  _, h, wd, _ = x.shape
  th, tw = -(-(h - 2) // 2), -(-(wd - 2) // 2)
  x = jnp.pad(x, ((0, 0), (0, 2 * th + 2 - h), (0, 2 * tw + 2 - wd), (0, 0)))
  return x, th, tw


def _winograd_input_transform(x: jax.Array) -> jax.Array:
  """``B^T d B`` of every 4x4 tile of ``x`` at stride 2: [16, tiles, C].

  ``x`` is already padded to ``2 * tiles + 2`` rows and columns. Its rows
  and columns are split in pairs by a reshape XLA makes a bitcast, so that
  each of a tile's 16 inputs is a plain slice: slices taken before such a
  reshape make XLA:CPU's loop compute every element's index by division.
  The forward transforms of the study's second block took 44 ms this way in
  a profile of the training step at batch 256, 75 ms that way
  (docs/performance_log.md, session 19).
  """
  n, h, wd, c = x.shape
  th, tw = (h - 2) // 2, (wd - 2) // 2
  pairs = x.reshape(n, th + 1, 2, tw + 1, 2, c)

  def tap(row: int, col: int) -> jax.Array:
    """Input ``(row, col)`` of every tile: [N, tile rows, tile columns, C]."""
    return pairs[:, row // 2 : row // 2 + th, row % 2, col // 2 : col // 2 + tw, col % 2]

  columns = [_winograd_1d(*(tap(row, col) for row in range(4))) for col in range(4)]
  tiles = [_winograd_1d(*(columns[col][a] for col in range(4))) for a in range(4)]
  return _stack_4x4(tiles).reshape(16, n * th * tw, c)


def _stack_4x4(groups: Sequence[Sequence[jax.Array]]) -> jax.Array:
  """Four groups of four equal-shaped arrays as one [4, 4, ...] array.

  XLA:CPU fuses a concatenate of at most 8 operands with the computations
  that produce them; a flat stack of 16 is emitted as a separate copy of
  every piece, the step's largest elementwise operation
  (docs/performance_log.md).
  """
  return jnp.stack([jnp.stack(group) for group in groups])


def _winograd_kernel_transform(w: jax.Array) -> jax.Array:
  """``G g G^T`` of a 3x3 HWIO kernel: [16, C_in, C_out]."""
  return _stack_4x4([
      _winograd_kernel_1d(r[0], r[1], r[2]) for r in _winograd_kernel_1d(w[0], w[1], w[2])
  ]).reshape(16, *w.shape[2:])


def winograd_conv_valid(
    x: jax.Array, w: jax.Array, precision: Any = None
) -> jax.Array:
  """VALID, stride-1 NHWC x HWIO 3x3 convolution by Winograd F(2x2, 3x3).

  The input is cut into 4x4 tiles at stride 2 (zero-padded to whole tiles),
  tiles and kernel are transformed (``B^T d B``, ``G g G^T``), multiplied as
  16 batched ``[tiles, C_in] x [C_in, C_out]`` matmuls and transformed back to
  2x2 output tiles (``A^T m A``); the result is cropped to the VALID size.
  Equal to ``lax.conv_general_dilated`` to ~1e-6 relative. Its gradients, as
  `matmul_conv_general_dilated` computes them, are `winograd_conv_valid_vjp`.

  The transforms and the matmuls' accumulation are float32 whatever the
  inputs' dtype; the tiles the matmuls read, and the result, have the
  dtype of ``x`` (bfloat16 halves the tiles' memory traffic).
  """
  n, h, wd, _ = x.shape
  if w.shape[:2] != (3, 3):
    raise ValueError(f'Winograd F(2x2, 3x3) needs a 3x3 kernel, got {w.shape}.')
  co = w.shape[3]
  dtype = x.dtype
  x, th, tw = _winograd_pad(x.astype(jnp.float32))
  m = _tile_products(
      _winograd_input_transform(x).astype(dtype),
      _winograd_kernel_transform(w.astype(jnp.float32)).astype(dtype),
      precision,
  ).reshape(4, 4, n, th, tw, co)
  out_rows = (m[0] + m[1] + m[2], m[1] - m[2] - m[3])
  y = jnp.stack(
      [jnp.stack((r[0] + r[1] + r[2], r[1] - r[2] - r[3]), axis=-2) for r in out_rows],
      axis=2,
  )
  return y.reshape(n, 2 * th, 2 * tw, co)[:, : h - 2, : wd - 2].astype(dtype)


def _overlap_add(first: jax.Array, second: jax.Array, axis: int) -> jax.Array:
  """Adds ``second`` two places further along ``axis`` than ``first``."""
  pad_first = [(0, 0)] * first.ndim
  pad_second = [(0, 0)] * first.ndim
  pad_first[axis] = (0, 2)
  pad_second[axis] = (2, 0)
  return jnp.pad(first, pad_first) + jnp.pad(second, pad_second)


def winograd_conv_valid_vjp(
    x: jax.Array, w: jax.Array, g: jax.Array, precision: Any = None
) -> tuple[jax.Array, jax.Array]:
  """(dx, dw) of `winograd_conv_valid` for the output cotangent ``g``.

  The transpose of each of its linear steps, written out: the cotangent's
  tiles are transformed (``A dY A^T``), multiplied by the transformed kernel
  for dx and by the transformed input for dw (16 batched matmuls each), then
  transformed back (``B dV B^T`` with overlapping tiles added, ``G^T dU G``).
  Equal to ``jax.vjp`` of `winograd_conv_valid`, whose transpose of the
  tiling XLA:CPU compiles into pads and adds of whole tensors: the study's
  whole training step is up to 1.3x faster with this one
  (docs/performance_log.md). Dtypes as in `winograd_conv_valid`: float32
  transforms and accumulation, tiles and results in the dtype of ``x``.
  """
  n, h, wd, c = x.shape
  co = w.shape[3]
  dtype = x.dtype
  x, th, tw = _winograd_pad(x.astype(jnp.float32))
  v = _winograd_input_transform(x).astype(dtype)
  u = _winograd_kernel_transform(w.astype(jnp.float32)).astype(dtype)
  g = g.astype(jnp.float32)
  g = jnp.pad(g, ((0, 0), (0, 2 * th + 2 - h), (0, 2 * tw + 2 - wd), (0, 0)))
  g = g.reshape(n, th, 2, tw, 2, co)
  dm = _stack_4x4([
      _winograd_output_1d_t(r[..., 0, :], r[..., 1, :])
      for r in _winograd_output_1d_t(g[:, :, 0], g[:, :, 1])
  ]).reshape(16, n * th * tw, co).astype(dtype)
  du = _dot_general(
      v,
      dm,
      (((1,), (1,)), ((0,), (0,))),
      precision=precision,
      preferred_element_type=jnp.float32,
  ).reshape(4, 4, c, co)
  dv = _dot_general(
      dm,
      u,
      (((2,), (2,)), ((0,), (0,))),
      precision=precision,
      preferred_element_type=jnp.float32,
  ).reshape(4, 4, n, th, tw, c)
  rows = [_winograd_kernel_1d_t(*du[a]) for a in range(4)]
  dw = jnp.stack([
      jnp.stack(_winograd_kernel_1d_t(*(rows[a][j] for a in range(4))))
      for j in range(3)
  ], axis=1)
  cols = []
  for a in range(4):
    taps = _winograd_1d_t(*dv[a])  # the four columns of each tile row
    left = jnp.stack(taps[:2], axis=3).reshape(n, th, 2 * tw, c)
    right = jnp.stack(taps[2:], axis=3).reshape(n, th, 2 * tw, c)
    cols.append(_overlap_add(left, right, axis=2))
  taps = _winograd_1d_t(*cols)  # the four rows of each tile
  top = jnp.stack(taps[:2], axis=2).reshape(n, 2 * th, 2 * tw + 2, c)
  bottom = jnp.stack(taps[2:], axis=2).reshape(n, 2 * th, 2 * tw + 2, c)
  dx = _overlap_add(top, bottom, axis=1)
  return dx[:, :h, :wd].astype(dtype), dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_valid(x: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
  """VALID, stride-1 NHWC x HWIO convolution."""
  return _forward(x, w, precision)


def _conv_valid_fwd(
    x: jax.Array, w: jax.Array, precision: Any
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  # Calling the custom-VJP function (not `_forward`) keeps forward-mode
  # differentiation of the gradient an error, as documented.
  return _conv_valid(x, w, precision), (x, w)


def _conv_valid_bwd(
    precision: Any, res: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array]:
  x, w = res
  if _winograd_backward(w):
    return winograd_conv_valid_vjp(x, w, g, precision)
  kh, kw, _, _ = w.shape
  return _input_grad(w, g, precision), _kernel_grad(x, g, kh, kw, precision)


_conv_valid.defvjp(_conv_valid_fwd, _conv_valid_bwd)


def conv_bias_relu(
    x: jax.Array, w: jax.Array, b: jax.Array, precision: Any = None
) -> jax.Array:
  """``relu(conv(x, w) + b)``: VALID, stride 1, NHWC x HWIO, as one op.

  Why: the study's network rectifies every convolution's output before its
  BatchNorm, whose statistics XLA:CPU reduces in YNNPACK from a separately
  written ``relu(z + b)``. Here the rectified output is what the
  convolution writes: oneDNN adds the bias and rectifies in its own pass
  (its post-ops) where `onednn.enabled_for` the dtype and the layer takes
  no Winograd forward; elsewhere XLA fuses both into the forward's last
  loop. BatchNorm then reads it as written (`agejax.relu_batch_norm` with
  ``rectified=True``). Values and gradients are those of
  ``nn.relu(lax.conv_general_dilated(x, w) + b)`` to float32 rounding
  (the gradients `matmul_conv_general_dilated`'s, the ReLU's 0 at 0).
  """
  if x.ndim != 4 or w.ndim != 4 or x.shape[3] != w.shape[2] or b.shape != w.shape[3:]:
    raise ValueError(
        f'conv_bias_relu takes NHWC x HWIO and [C_out], got {list(x.shape)},'
        f' {list(w.shape)} and {list(b.shape)}.'
    )
  if _float32_compute(x, w, b):
    f32 = jnp.float32
    return _conv_bias_relu(
        x.astype(f32), w.astype(f32), b.astype(f32), precision
    ).astype(jnp.bfloat16)
  return _conv_bias_relu(x, w, b, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv_bias_relu(
    x: jax.Array, w: jax.Array, b: jax.Array, precision: Any
) -> jax.Array:
  if b.dtype == x.dtype and _onednn_forward(x, w):
    return onednn.conv(x, w, bias=b, relu=True)
  return nn.relu(_forward(x, w, precision) + b)


def _conv_bias_relu_fwd(
    x: jax.Array, w: jax.Array, b: jax.Array, precision: Any
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
  r = _conv_bias_relu(x, w, b, precision)
  return r, (x, w, r)


def _conv_bias_relu_bwd(
    precision: Any, res: tuple[jax.Array, jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  x, w, r = res
  dz = jnp.where(r > 0, g, jnp.zeros((), g.dtype))
  dx, dw = _conv_valid_bwd(precision, (x, w), dz)
  return dx, dw, jnp.sum(dz, (0, 1, 2))


_conv_bias_relu.defvjp(_conv_bias_relu_fwd, _conv_bias_relu_bwd)
