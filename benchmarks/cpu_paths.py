"""Microbenchmarks behind agejax.conv's CPU choices (docs/performance_log.md).

Why: `agejax.conv` picks, per pass, between plain ``lax`` convolutions and its
custom-VJP ``'matmul'`` path. These measurements are the evidence for those
choices and for the training-speed ceiling, so they live here, runnable:

  python -m benchmarks.cpu_paths --what=peak
      The machine's two ceilings: XLA:CPU's fp32 matmul throughput (GFLOP/s)
      and its memory throughput (GB/s of an elementwise loop, 4-256 MiB).
  python -m benchmarks.cpu_paths --what=layers --batch_size=64
      Each study convolution layer, forward and forward + both gradients, as
      ``lax``, agejax's ``'matmul'`` path (Winograd's both ways from 64 input
      channels up) and `agejax.conv.winograd_conv_valid` in both
      directions, with the Winograd error against ``lax``.
  python -m benchmarks.cpu_paths --what=gradients --batch_size=64
      Each gradient of each 3x3 layer with at least 32 input channels,
      alone and together, by Winograd and by agejax's other paths (the
      transposed convolution; the im2col kernel gradient, in chunks of
      images on large layers).
  python -m benchmarks.cpu_paths --what=kernel_grads --batch_size=64
      The 46x46x32 layer's kernel gradient, the largest data movement left
      in the float32 training step: as shipped (Winograd F(4, 3) along the
      height) and by the formulations measured against it (Winograd F(2, 3)
      along the width, as shipped until session 16; im2col with three patch
      layouts; Winograd F(4, 3) along the height from a channel-major
      copy, as shipped until session 18; Winograd F(2x2, 3x3); oneDNN
      convolutions) and by ``lax``,
      with each one's error against a float64 reference.
  python -m benchmarks.cpu_paths --what=dropout --batch_size=64
      The study network's dropout inputs, flax's layer against `agejax.dropout`'s
      (the same masks; the hash written out instead of JAX's rolled loop).
  python -m benchmarks.cpu_paths --what=eval --batch_sizes=64,128,256,512
      `agejax.steps.eval_step` of the study's age network with
      ``conv_impl='matmul'``, ``'lax'`` and ``'ynnpack'``, interleaved in one
      process: where `agejax.conv.resolve_impl` switches inference from
      ``matmul`` to ``ynnpack``, and what ``ynnpack``'s first layer gains
      over plain ``lax``.
  python -m benchmarks.cpu_paths --what=train --batch_sizes=64,256 [--variants=...] [--scan_batches=8]
      `agejax.steps.train_step` (or, with ``--scan_batches``, the scanned
      `agejax.steps.train_epoch`), interleaved in one process, as shipped and
      with one choice undone: the 46x46x32 layer by Winograd both ways
      (Winograd from 32 input channels instead of 64), Winograd's backward
      by ``jax.vjp`` of its forward instead of written out, without
      Winograd's forward, backward or both, with the forward on YNNPACK (no
      Winograd, no Eigen padding), with YNNPACK off for the step, with
      Winograd's 16 tiles stacked at once instead of as four stacks of four,
      with Winograd's input tiles sliced before they are reshaped into pairs,
      with Winograd for float32 only (add ``--dtype=bfloat16`` to train in
      bfloat16), with flax's own dropout layer (the same masks, JAX's
      threefry), with agejax's masks hashed again by every loop that reads
      them, with flax's ReLU and BatchNorm layers, with the float32 im2col
      kernel gradient's patches concatenated from the NHWC input, with the
      46x46x32 layer's kernel gradient by im2col, by Winograd F(2, 3)
      along the width instead of F(4, 3) along the height, or from a
      channel-major copy of its input (as until session 18), with that
      and Winograd's input tiles both as until session 18, with each
      convolution's bias and ReLU as ops of their own
      instead of in its pass, with XLA:CPU's own convolutions and dots instead of oneDNN's
      (`agejax.onednn`). Also ideas
      measured and not adopted: that layer's Winograd backward in a
      `lax.scan` over 4 images at a time, or its kernel gradient alone by
      Winograd F(2x2, 3x3); Winograd's forward from 5 output rows; the
      Winograd forwards in batch chunks of 8 or 16 images; the 46x46x32
      layer's forward by Winograd, whole or with every Winograd forward
      in chunks of 8; the kernel gradient's chunks of 2, 8 or 16 images,
      or unrolled into static slices instead of a ``lax.scan``; two
      other settings of XLA:CPU's YNNPACK fusion; and XLA:CPU's experimental oneDNN fusion of
      every dot (where that fusion fails to compile it aborts the process:
      leave the column out with ``--variants``). And one measurement, not
      a choice: the step without that layer's kernel gradient (zeros; for
      timing only), which gives what computing it costs.
  python -m benchmarks.cpu_paths --what=host --batch_sizes=64,256 --host_malloc=system
      `agejax.steps.train_step` alone: ms per step, cores busy, the share of
      CPU time spent in the kernel, minor page faults and voluntary context
      switches (threads blocking) per step, and the process's peak RSS.
  python -m benchmarks.cpu_paths --what=alternate --batch_sizes=64,256 --host_malloc=retain
      Training steps at each batch size and an evaluation step at the
      largest, in turn in one process, as an epoch alternates them: images/s
      of each, and per round the voluntary context switches, minor page
      faults and the kernel's share of the CPU time. Under glibc's one arena
      (``retain``) evaluation after training runs slower than under mimalloc.
  python -m benchmarks.cpu_paths --what=profile --batch_size=64 --repeats=8 [--step=eval_step]
      Where one `agejax.steps.train_step` (or ``eval_step``) spends its time:
      a `jax.profiler` trace of ``--repeats`` steps, each XLA:CPU operation's
      time per step (median over the steps), summed by layer and listed one
      by one.
  python -m benchmarks.cpu_paths --what=flops
      XLA's cost analysis of `train_step` and `eval_step`, FLOPs per image,
      with direct (``lax``) convolutions and as agejax runs them (``auto``).

Times are the minimum (layers) or median (eval, train) of ``--repeats`` runs
after warm-up; run it on an otherwise idle machine. Every measurement runs
under ``--host_malloc`` (`agejax.host_malloc`; by default the allocator the
experiments train under).
"""

from __future__ import annotations

import collections
import contextlib
import glob
import json
import os
import re
import resource
import statistics
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence
from unittest import mock

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from agejax import config as config_lib
from agejax import conv
from agejax import dropout
from agejax import host_malloc
from agejax import model
from agejax import onednn
from agejax import steps

_WHAT = flags.DEFINE_enum(
    'what',
    'layers',
    [
        'peak', 'layers', 'gradients', 'kernel_grads', 'dropout', 'eval', 'train', 'host',
        'alternate', 'flops', 'profile',
    ],
    'Which measurement.',
)
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', 64, 'Batch size for --what=layers, gradients, kernel_grads, dropout and profile.'
)
_TOP = flags.DEFINE_integer('top', 30, 'Rows of each --what=profile table.')
_STEP = flags.DEFINE_enum(
    'step', 'train_step', ['train_step', 'eval_step'], 'The step --what=profile traces.'
)
_DTYPE = flags.DEFINE_enum(
    'dtype', 'float32', ['float32', 'bfloat16'], 'Computation dtype for --what=train.'
)
_BATCH_SIZES = flags.DEFINE_list(
    'batch_sizes', ['64', '128', '256', '512'], 'Batch sizes for --what=eval and --what=train.'
)
_HOST_MALLOC = flags.DEFINE_enum(
    'host_malloc',
    None,
    host_malloc.MODES,
    'Host allocator (agejax.host_malloc) for the measurements: mimalloc or'
    ' glibc retaining freed memory, as the experiments run, or the system'
    ' default. Default: what the experiments use (host_malloc.default_mode()).',
)
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Timed repeats.')
_SCAN_BATCHES = flags.DEFINE_integer(
    'scan_batches',
    0,
    '--what=train: 0 times steps.train_step; N > 0 times steps.train_epoch, one'
    ' lax.scan over N device-resident batches per call.',
)
_VARIANTS = flags.DEFINE_list(
    'variants',
    [],
    "Columns of --what=train (default: all), comma-separated and quoted, e.g."
    " --variants='shipped,flax Dropout'.",
)

# The study network's convolutions: (input height = width, C_in, C_out).
LAYERS = ((48, 1, 32), (46, 32, 64), (22, 64, 128), (20, 128, 128), (9, 128, 128), (7, 128, 256))
_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _time(fn: Callable[..., Any], *args: Any, repeats: int) -> list[float]:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def lax_conv(x: jax.Array, w: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x, w, (1, 1), 'VALID', dimension_numbers=_NHWC)


def agejax_conv(x: jax.Array, w: jax.Array) -> jax.Array:
  return conv.matmul_conv_general_dilated(x, w, (1, 1), 'VALID', dimension_numbers=_NHWC)


# The study network's dropout inputs per image, and their rates.
DROPOUTS = (((22, 22, 64), 0.25), ((9, 9, 128), 0.25), ((2, 2, 256), 0.25), ((512,), 0.5), ((256,), 0.5))


def _dropout(batch_size: int, repeats: int) -> None:
  print(f'ms, dropout layer forward (batch {batch_size}), min of {repeats}')
  print('| input | flax Dropout | agejax Dropout | same output |\n|---|---|---|---|')
  key = jax.random.PRNGKey(2)
  for shape, rate in DROPOUTS:
    x = jax.random.normal(jax.random.PRNGKey(0), (batch_size, *shape))
    outs, ms = [], []
    for layer in (nn.Dropout, dropout.Dropout):
      fn = jax.jit(lambda x, key, layer=layer: layer(rate, deterministic=False).apply({}, x, rngs={'dropout': key}))
      ms.append(min(_time(fn, x, key, repeats=repeats)) * 1e3)
      outs.append(fn(x, key))
    same = bool(jnp.array_equal(*outs))
    print(f'| {"x".join(map(str, shape))}, rate {rate} | {ms[0]:.1f} | {ms[1]:.1f} | {same} |')


def _peak(repeats: int) -> None:
  print('| matmul (fp32) | ms | GFLOP/s |\n|---|---|---|')
  for m, k, n in ((2048, 2048, 2048), (30976, 288, 64), (288, 30976, 64), (30976, 64, 288)):
    a, b = jnp.ones((m, k)), jnp.ones((k, n))
    t = min(_time(jax.jit(jnp.dot), a, b, repeats=repeats))
    print(f'| {m}x{k} @ {k}x{n} | {t * 1e3:.1f} | {2 * m * k * n / t / 1e9:.0f} |')
  # Winograd's 16 batched products on the 46x46x32 layer at batch 64: the
  # forward's, and the kernel gradient's (contracting the long axis).
  tiles = jnp.ones((16, 30976, 32))
  for name, b, dims in (
      ('16 x 30976x32 @ 32x64 (Winograd forward)', jnp.ones((16, 32, 64)), (((2,), (1,)), ((0,), (0,)))),
      ('16 x 32x30976 @ 30976x64 (Winograd kernel gradient)', jnp.ones((16, 30976, 64)), (((1,), (1,)), ((0,), (0,)))),
  ):
    t = min(_time(jax.jit(lambda a, b, dims=dims: lax.dot_general(a, b, dims)), tiles, b, repeats=repeats))
    print(f'| {name} | {t * 1e3:.1f} | {2 * 16 * 30976 * 32 * 64 / t / 1e9:.0f} |')
  # The other ceiling: an elementwise loop reads and writes each byte once, so
  # above the caches it runs at the memory's speed.
  print('\n| elementwise 2x+1 (fp32) | ms | GB/s read + written |\n|---|---|---|')
  scale = jax.jit(lambda x: 2 * x + 1)
  for mib in (4, 32, 256):
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    t = min(_time(scale, x, repeats=repeats))
    print(f'| {mib} MiB | {t * 1e3:.2f} | {2 * mib * 2**20 / t / 1e9:.1f} |')


def _layers(batch_size: int, repeats: int) -> None:
  rng = np.random.default_rng(0)
  impls = (('lax', lax_conv), ('agejax', agejax_conv), ('winograd', conv.winograd_conv_valid))
  print(
      f'batch {batch_size}, ms (min of {repeats}); winograd error = max |diff| / max |lax|'
      ' (output, input grad, kernel grad)'
  )
  print(
      '| layer | ' + ' | '.join(f'{name} fwd | {name} fwd+grads' for name, _ in impls)
      + ' | winograd error |'
  )
  print('|---' * (2 * len(impls) + 2) + '|')
  for hw, cin, cout in LAYERS:
    x = jnp.asarray(rng.standard_normal((batch_size, hw, hw, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin), jnp.float32)
    r = jnp.asarray(rng.standard_normal((batch_size, hw - 2, hw - 2, cout)), jnp.float32)
    cells = []
    outs = {}
    for name, fn in impls:
      grads = jax.jit(jax.value_and_grad(lambda x, w, fn=fn: jnp.sum(fn(x, w) * r), argnums=(0, 1)))
      outs[name] = (jax.jit(fn)(x, w), *grads(x, w)[1])
      cells.append(min(_time(jax.jit(fn), x, w, repeats=repeats)))
      cells.append(min(_time(grads, x, w, repeats=repeats)))
    err = [
        float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
        for a, b in zip(outs['lax'], outs['winograd'])
    ]
    print(
        f'| {hw}x{hw}x{cin} -> {cout} | ' + ' | '.join(f'{t * 1e3:.1f}' for t in cells)
        + ' | ' + ', '.join(f'{e:.0e}' for e in err) + ' |',
        flush=True,
    )


def _gradients(batch_size: int, repeats: int) -> None:
  rng = np.random.default_rng(0)
  print(
      f'batch {batch_size}, ms (min of {repeats}): each gradient of each 3x3 layer'
      ' with >= 32 input channels, alone and together, by Winograd'
      " (`conv.winograd_conv_valid_vjp`) and by `agejax.conv`'s other paths"
      ' (dx: transposed convolution; dw: `conv._kernel_grad`)'
  )
  dx_winograd = lambda x, w, g: conv.winograd_conv_valid_vjp(x, w, g)[0]
  dx_transposed = lambda x, w, g: conv._input_grad(w, g, None)
  dw_winograd = lambda x, w, g: conv.winograd_conv_valid_vjp(x, w, g)[1]
  dw_other = lambda x, w, g: conv._kernel_grad(x, g, 3, 3, None)
  both = lambda dx, dw: lambda x, w, g: (dx(x, w, g), dw(x, w, g))
  columns = (
      ('dx Winograd', dx_winograd),
      ('dx transposed conv', dx_transposed),
      ('dw Winograd', dw_winograd),
      ('dw non-Winograd', dw_other),
      ('both Winograd', conv.winograd_conv_valid_vjp),
      ('both non-Winograd', both(dx_transposed, dw_other)),
      ('dx transposed conv + dw Winograd', both(dx_transposed, dw_winograd)),
  )
  print('| layer | ' + ' | '.join(name for name, _ in columns) + ' |')
  print('|---' * (len(columns) + 1) + '|')
  for hw, cin, cout in LAYERS:
    if cin < 32:
      continue
    x = jnp.asarray(rng.standard_normal((batch_size, hw, hw, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin), jnp.float32)
    g = jnp.asarray(rng.standard_normal((batch_size, hw - 2, hw - 2, cout)), jnp.float32)
    cells = [min(_time(jax.jit(fn), x, w, g, repeats=repeats)) * 1e3 for _, fn in columns]
    print(
        f'| {hw}x{hw}x{cin} -> {cout} | ' + ' | '.join(f'{ms:.1f}' for ms in cells) + ' |',
        flush=True,
    )


# --what=kernel_grads: the 46x46x32 layer's kernel gradient (x [B, 46, 46,
# 32], cotangent [B, 44, 44, 64]) by formulations measured against the
# shipped one. Each returns dW [3, 3, 32, 64].
_KG_CHUNK = conv._KERNEL_GRAD_CHUNK


def _chunked_products(
    patches_of: Callable[[jax.Array], jax.Array],
    xs: jax.Array,
    gs: jax.Array,
    contract: int,
) -> jax.Array:
  """Sum over chunks of ``patches_of(x chunk)`` contracted with the g chunk.

  ``contract`` is the patches' axis over positions (0 NHWC, 1 channel-major).
  """

  def add(dw: jax.Array, chunk: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
    p = patches_of(chunk[0])
    product = onednn.dot_general(
        p, chunk[1], (((contract,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return dw + product, None

  rows = jax.eval_shape(patches_of, xs[0]).shape[1 - contract]
  dw, _ = lax.scan(add, jnp.zeros((rows, gs.shape[-1]), jnp.float32), (xs, gs))
  return dw


def _kg_shipped(x: jax.Array, g: jax.Array) -> jax.Array:
  return conv._kernel_grad(x, g, 3, 3, None)


def _kg_lax(x: jax.Array, g: jax.Array) -> jax.Array:
  w = jnp.zeros((3, 3, x.shape[3], g.shape[3]), x.dtype)  # only its shape matters
  _, pullback = jax.vjp(lambda w: lax_conv(x, w), w)
  return pullback(g)[0]


def _width_winograd_kernel_grad(
    xt: jax.Array, g: jax.Array, kh: int, kw: int, precision: Any
) -> jax.Array:
  """F(2, 3) along the width, im2col along the height (shipped until session 16).

  Channel-major input [C_in, B, H, W], 3-wide kernels: the input's 4-column
  tiles at stride 2 and the cotangent's column pairs transformed, 4
  products [kh * C_in, positions / 2] @ [positions / 2, C_out] (2/3 of
  im2col's FLOPs), ``G^T`` of them for the kernel's 3 columns.
  """
  cin, n, h, w = xt.shape
  _, ho, wo, cout = g.shape
  tw = -(-wo // 2)
  xt = jnp.pad(xt, ((0, 0), (0, 0), (0, 0), (0, 2 * tw + 2 - w)))
  g = jnp.pad(g, ((0, 0), (0, 0), (0, 2 * tw - wo), (0, 0)))
  left = xt[..., : 2 * tw].reshape(cin, n, h, tw, 2)
  right = xt[..., 2:].reshape(cin, n, h, tw, 2)
  tiles = conv._winograd_1d(left[..., 0], left[..., 1], right[..., 0], right[..., 1])
  patches = jnp.stack([jnp.stack([t[:, :, i : i + ho] for i in range(kh)]) for t in tiles])
  pairs = g.reshape(n, ho, tw, 2, cout)
  u = jnp.stack(conv._winograd_output_1d_t(pairs[..., 0, :], pairs[..., 1, :]))
  m = conv._tile_products(
      patches.reshape(4, kh * cin, n * ho * tw), u.reshape(4, n * ho * tw, cout), precision
  ).reshape(4, kh, cin, cout)
  dw = jnp.stack(conv._winograd_kernel_1d_t(m[0], m[1], m[2], m[3]), axis=1)
  return dw.reshape(kh * kw * cin, cout)


def _channel_major_height_winograd_kernel_grad(
    xt: jax.Array, g: jax.Array, kh: int, kw: int, precision: Any
) -> jax.Array:
  """Winograd F(4, 3) along the height from channel-major input (sessions 16-18).

  `conv._height_winograd_kernel_grad` as shipped until session 18: the
  input [C_in, B, H, W], the patches [6, kw * C_in, positions / 4].
  """
  cin, n, h, w = xt.shape
  _, ho, wo, cout = g.shape
  th = -(-ho // 4)
  xt = jnp.pad(xt, ((0, 0), (0, 0), (0, 4 * th + 2 - h), (0, 0)))
  g = jnp.pad(g, ((0, 0), (0, 4 * th - ho), (0, 0), (0, 0)))
  taps = [xt[:, :, k : k + 4 * th - 3 : 4] for k in range(6)]
  tiles = conv._winograd43_1d(*taps)
  patches = jnp.stack([jnp.stack([t[..., j : j + wo] for j in range(kw)]) for t in tiles])
  rows = g.reshape(n, th, 4, wo, cout)
  u = jnp.stack(conv._winograd43_output_1d_t(*(rows[:, :, r] for r in range(4))))
  m = conv._tile_products(
      patches.reshape(6, kw * cin, n * th * wo), u.reshape(6, n * th * wo, cout), precision
  ).reshape(6, kw, cin, cout)
  dw = jnp.stack(conv._winograd43_kernel_1d_t(*(m[t] for t in range(6))))
  return dw.reshape(kh * kw * cin, cout)


def _channel_major_formulation(product: Callable[..., jax.Array]) -> Callable[..., Any]:
  """A `conv._kernel_grad_formulation` giving ``product`` channel-major input.

  Where agejax takes Winograd F(4, 3) along the height (chunked float32 3x3
  layers): ``product`` of the input transposed to channel-major once, for
  all chunks, as shipped until session 18. Other layers as shipped.
  """

  def formulation(x_shape: Any, g_shape: Any, kh: int, dtype: Any) -> Any:
    shipped, to_layout = _KERNEL_GRAD_FORMULATION(x_shape, g_shape, kh, dtype)
    if shipped is conv._height_winograd_kernel_grad:
      return product, conv._channels_first
    return shipped, to_layout

  return formulation


# The shipped formulations, which the ones below fall back to for other layers.
_KERNEL_GRAD_FORMULATION = conv._kernel_grad_formulation
_WIDTH_WINOGRAD = {'_kernel_grad_formulation': _channel_major_formulation(_width_winograd_kernel_grad)}
_CHANNEL_MAJOR_HEIGHT_WINOGRAD = {
    '_kernel_grad_formulation': _channel_major_formulation(
        _channel_major_height_winograd_kernel_grad
    )
}


def _kg_width_winograd(x: jax.Array, g: jax.Array) -> jax.Array:
  with mock.patch.multiple(conv, **_WIDTH_WINOGRAD):
    return conv._kernel_grad(x, g, 3, 3, None)


def _kg_channel_major_height_winograd(x: jax.Array, g: jax.Array) -> jax.Array:
  with mock.patch.multiple(conv, **_CHANNEL_MAJOR_HEIGHT_WINOGRAD):
    return conv._kernel_grad(x, g, 3, 3, None)


def _kg_im2col(x: jax.Array, g: jax.Array) -> jax.Array:
  with mock.patch.object(conv, '_WINOGRAD_KERNEL_GRAD_DTYPES', ()):
    return conv._kernel_grad(x, g, 3, 3, None)


def _kg_nhwc_patches(x: jax.Array, g: jax.Array) -> jax.Array:
  """NHWC patches [4 * 44 * 44, 9 * 32] (nested stacks), read transposed."""
  n, h, w, c = x.shape
  _, ho, wo, co = g.shape
  xs = x.reshape(n // _KG_CHUNK, _KG_CHUNK, h, w, c)
  gs = g.reshape(n // _KG_CHUNK, _KG_CHUNK * ho * wo, co)
  patches = lambda xc: jnp.stack([
      jnp.stack([xc[:, i : i + ho, j : j + wo] for j in range(3)], axis=-2) for i in range(3)
  ], axis=-3).reshape(-1, 9 * c)
  return _chunked_products(patches, xs, gs, 0).reshape(3, 3, c, co)


def _kg_whole_rows(x: jax.Array, g: jax.Array) -> jax.Array:
  """Channel-major patches whose rows are contiguous runs of whole input rows.

  Tap (i, j) of image n is the run of 44 * 46 values from offset i * 46 + j
  of its flattened input; the cotangent is padded to 46 columns with zeros,
  so the wrapped-around columns add nothing.
  """
  n, h, w, c = x.shape
  _, ho, wo, co = g.shape
  run = ho * w
  xt = jnp.pad(jnp.moveaxis(x, -1, 0).reshape(c, n, h * w), ((0, 0), (0, 0), (0, 2)))
  xs = jnp.moveaxis(xt.reshape(c, n // _KG_CHUNK, _KG_CHUNK, -1), 1, 0)
  gs = jnp.pad(g, ((0, 0), (0, 0), (0, w - wo), (0, 0)))
  gs = gs.reshape(n // _KG_CHUNK, _KG_CHUNK * run, co)
  patches = lambda xc: jnp.stack([
      jnp.stack([xc[:, :, i * w + j : i * w + j + run] for j in range(3)]) for i in range(3)
  ]).reshape(9 * c, -1)
  return _chunked_products(patches, xs, gs, 1).reshape(3, 3, c, co)


def _kg_winograd(x: jax.Array, g: jax.Array) -> jax.Array:
  """`conv.winograd_conv_valid_vjp`'s kernel gradient (its dx is not computed)."""
  w = jnp.zeros((3, 3, x.shape[3], g.shape[3]), x.dtype)  # only its shape matters
  return conv.winograd_conv_valid_vjp(x, w, g)[1]


def _onednn_grouped_conv(
    x: jax.Array, w: jax.Array, groups: int, out_shape: tuple[int, ...]
) -> jax.Array:
  """``__onednn$convolution`` of NHWC ``x`` and HWIO ``w`` in feature groups."""
  config = json.loads(onednn._conv_config(((0, 0), (0, 0))))
  config['onednn_conv_config']['feature_groups'] = groups
  out = jax.ShapeDtypeStruct(out_shape, x.dtype)
  return onednn._call('__onednn$convolution', out, json.dumps(config), x, w)


def _kg_onednn_blocks(block: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """dW as one oneDNN convolution, the cotangent cut into block x block tiles.

  The input's channels become the batch, each tile's images and positions
  become input channels, the offsets within a tile the kernel's taps:
  x'[c, p, q, (n, a, b)] = x[n, block * a + p, block * b + q, c] for p, q <
  block + 2 (about (block + 2)^2 / block^2 copies of the input), convolved
  with the cotangent as a block x block kernel, gives dW as a 3x3 output.
  """

  def kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
    n, _, _, c = x.shape
    _, ho, _, co = g.shape
    tiles = ho // block
    span = block * (tiles - 1) + 1
    rows = jnp.stack([x[:, p : p + span : block] for p in range(block + 2)])
    taps = jnp.stack([rows[:, :, :, q : q + span : block] for q in range(block + 2)], axis=1)
    xt = jnp.transpose(taps, (5, 0, 1, 2, 3, 4)).reshape(c, block + 2, block + 2, -1)
    gt = g.reshape(n, tiles, block, tiles, block, co).transpose(2, 4, 0, 1, 3, 5)
    out = onednn.conv(xt, gt.reshape(block, block, -1, co))
    return jnp.transpose(out, (1, 2, 0, 3))

  return kernel_grad


def _kg_onednn_depthwise(x: jax.Array, g: jax.Array) -> jax.Array:
  """NHWC patches by a oneDNN depthwise convolution with 0/1 kernels, one product."""
  n, h, w, c = x.shape
  _, ho, wo, co = g.shape
  taps = np.zeros((3, 3, 1, c, 9), np.float32)
  for t in range(9):
    taps[t // 3, t % 3, 0, :, t] = 1
  patches = _onednn_grouped_conv(
      x, jnp.asarray(taps.reshape(3, 3, 1, 9 * c), x.dtype), c, (n, ho, wo, 9 * c)
  )
  dw = onednn.dot_general(
      patches.reshape(-1, 9 * c), g.reshape(-1, co), (((0,), (0,)), ((), ())),
      preferred_element_type=jnp.float32,
  )  # rows (c, tap)
  return jnp.moveaxis(dw.reshape(c, 3, 3, co), 0, 2)


def _kernel_grads(batch_size: int, repeats: int) -> None:
  if batch_size % _KG_CHUNK:
    raise app.UsageError(f'--batch_size must be a multiple of {_KG_CHUNK} for --what=kernel_grads.')
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch_size, 46, 46, 32)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((batch_size, 44, 44, 64)), jnp.float32)
  xd, gd = np.asarray(x, np.float64), np.asarray(g, np.float64)
  exact = np.stack([
      np.stack([
          np.tensordot(xd[:, i : i + 44, j : j + 44], gd, axes=([0, 1, 2], [0, 1, 2]))
          for j in range(3)
      ])
      for i in range(3)
  ])
  formulations = {
      'shipped: Winograd F(4, 3) along the height (`conv._kernel_grad`)': _kg_shipped,
      "lax.conv_general_dilated's gradient": _kg_lax,
      'Winograd F(4, 3) along the height, channel-major (shipped until session 18)': (
          _kg_channel_major_height_winograd
      ),
      'Winograd F(2, 3) along the width (shipped until session 16)': _kg_width_winograd,
      'im2col, channel-major patches (shipped until session 15)': _kg_im2col,
      'im2col, NHWC patches read transposed': _kg_nhwc_patches,
      'im2col, channel-major patches of whole-width rows': _kg_whole_rows,
      'Winograd F(2x2, 3x3)': _kg_winograd,
  }
  if onednn.available():
    formulations |= {
        'oneDNN convolution, 4x4 tiles': _kg_onednn_blocks(4),
        'oneDNN convolution, 11x11 tiles': _kg_onednn_blocks(11),
        'oneDNN depthwise patches, one product': _kg_onednn_depthwise,
    }
  print(
      f'46x46x32 -> 64 kernel gradient, batch {batch_size}, ms (min of {repeats});'
      ' error = max |diff| / max |exact| against float64'
  )
  print('| formulation | ms | error |\n|---|---|---|')
  for name, fn in formulations.items():
    compiled = jax.jit(fn)
    got = np.asarray(compiled(x, g), np.float64)
    err = np.max(np.abs(got - exact)) / np.max(np.abs(exact))
    ms = min(_time(compiled, x, g, repeats=repeats)) * 1e3
    print(f'| {name} | {ms:.1f} | {err:.1e} |', flush=True)


def _batch(batch_size: int, rng: np.random.Generator) -> dict[str, jax.Array]:
  return jax.device_put({
      'image': rng.integers(0, 256, (batch_size, 48, 48, 1), dtype=np.uint8),
      'label': rng.integers(0, 100, (batch_size,), dtype=np.int32),
      'mask': np.ones((batch_size,), bool),
  })


def _state(conv_impl: str = 'auto', dtype: str = 'float32') -> steps.TrainState:
  """A fresh train state of the study's age network."""
  model_config = config_lib.ModelConfig(conv_impl=conv_impl, dtype=dtype)
  stage = config_lib.StageConfig(name='bench', epochs=1, learning_rate=1e-3)
  variables = steps.init_variables(jax.random.PRNGKey(0), model_config.build(), (48, 48, 1))
  return steps.create_train_state(model_config, stage, variables)


def _interleaved(runs: Mapping[str, Callable[[], None]], repeats: int) -> dict[str, float]:
  """Median seconds per call of each run, the runs timed in turn."""
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def _eval(batch_sizes: Sequence[int], repeats: int) -> None:
  impls = ('matmul', 'lax', 'ynnpack')
  print(
      f'images/s, steps.eval_step, median of {repeats} interleaved\n| batch | '
      + ' | '.join(impls) + ' |\n' + '|---' * (len(impls) + 1) + '|'
  )
  rng = np.random.default_rng(0)
  for batch_size in batch_sizes:
    batch = _batch(batch_size, rng)
    runs = {}
    for impl in impls:
      state = _state(impl)
      runs[impl] = lambda state=state: jax.block_until_ready(steps.eval_step(state, batch))
      runs[impl]()
    seconds = _interleaved(runs, repeats)
    print(f'| {batch_size} | ' + ' | '.join(f'{batch_size / seconds[i]:.0f}' for i in runs) + ' |', flush=True)


def _winograd_autodiff_vjp(
    x: jax.Array, w: jax.Array, g: jax.Array, precision: Any = None
) -> tuple[jax.Array, jax.Array]:
  """JAX's own transpose of `conv.winograd_conv_valid`, for comparison."""
  _, pullback = jax.vjp(lambda a, b: conv.winograd_conv_valid(a, b, precision), x, w)
  return pullback(g)


# The shipped backward, which `_winograd_vjp_in_chunks` calls per chunk while
# it is patched in as `conv.winograd_conv_valid_vjp`.
_WINOGRAD_VJP = conv.winograd_conv_valid_vjp


def _winograd_vjp_in_chunks(
    x: jax.Array, w: jax.Array, g: jax.Array, precision: Any = None
) -> tuple[jax.Array, jax.Array]:
  """`conv.winograd_conv_valid_vjp` by a `lax.scan` over 4 images at a time.

  Only on layers at least 40 pixels tall (the 46x46x32 one), so that each
  chunk's tiles stay in cache; the others as shipped.
  """
  n = x.shape[0]
  if x.shape[1] < 40 or n % 4 or n == 4:
    return _WINOGRAD_VJP(x, w, g, precision)

  def chunk(dw, xg):
    dx, dw_chunk = _WINOGRAD_VJP(xg[0], w, xg[1], precision)
    return dw + dw_chunk.astype(jnp.float32), dx

  chunks = (x.reshape(n // 4, 4, *x.shape[1:]), g.reshape(n // 4, 4, *g.shape[1:]))
  dw, dx = lax.scan(chunk, jnp.zeros(w.shape, jnp.float32), chunks)
  return dx.reshape(x.shape), dw.astype(w.dtype)


def _flat_stack_16(groups: Sequence[Sequence[jax.Array]]) -> jax.Array:
  """`conv._stack_4x4` as one flat stack of 16, which XLA:CPU cannot fuse."""
  pieces = [piece for group in groups for piece in group]
  return jnp.stack(pieces).reshape(4, 4, *pieces[0].shape)


def _sliced_then_reshaped_input_transform(x: jax.Array) -> jax.Array:
  """`conv._winograd_input_transform` as shipped until session 18.

  The tile rows and columns taken as slices of ``x``, then reshaped into
  pairs: XLA:CPU's loop computes each element's index by division.
  """
  n, h, wd, c = x.shape
  th, tw = (h - 2) // 2, (wd - 2) // 2
  top = x[:, : 2 * th].reshape(n, th, 2, 2 * tw + 2, c)
  bottom = x[:, 2:].reshape(n, th, 2, 2 * tw + 2, c)
  rows = conv._winograd_1d(top[:, :, 0], top[:, :, 1], bottom[:, :, 0], bottom[:, :, 1])
  tiles = []
  for r in rows:
    left = r[:, :, : 2 * tw].reshape(n, th, tw, 2, c)
    right = r[:, :, 2:].reshape(n, th, tw, 2, c)
    tiles.append(
        conv._winograd_1d(left[..., 0, :], left[..., 1, :], right[..., 0, :], right[..., 1, :])
    )
  return conv._stack_4x4(tiles).reshape(16, n * th * tw, c)


# The shipped kernel gradient, which the variants below call for the other
# layers while they are patched in as `conv._kernel_grad`.
_KERNEL_GRAD = conv._kernel_grad


def _kernel_grad_winograd_from_32(
    x: jax.Array, g: jax.Array, kh: int, kw: int, precision: Any
) -> jax.Array:
  """The 46x46x32 layer's kernel gradient by Winograd; others as shipped."""
  if (kh, kw) != (3, 3) or not 32 <= x.shape[3] < 64:
    return _KERNEL_GRAD(x, g, kh, kw, precision)
  w = jnp.zeros((kh, kw, x.shape[3], g.shape[3]), x.dtype)  # only its shape matters
  return conv.winograd_conv_valid_vjp(x, w, g, precision)[1]


def _kernel_grad_skipped_from_32(
    x: jax.Array, g: jax.Array, kh: int, kw: int, precision: Any
) -> jax.Array:
  """Zeros for the 46x46x32 layer's kernel gradient (timing only)."""
  if (kh, kw) != (3, 3) or not 32 <= x.shape[3] < 64:
    return _KERNEL_GRAD(x, g, kh, kw, precision)
  return jnp.zeros((kh, kw, x.shape[3], g.shape[3]), x.dtype)


def _conv_then_bias_relu(
    x: jax.Array, w: jax.Array, b: jax.Array, precision: Any = None
) -> jax.Array:
  """`conv.conv_bias_relu` as three ops: the convolution, then bias and ReLU."""
  y = conv.matmul_conv_general_dilated(
      x, w, (1, 1), 'VALID', dimension_numbers=_NHWC, precision=precision
  )
  return nn.relu(y + b)


# The shipped op, which `_forward_in_batch_chunks` calls for other layers
# while it is patched in as `conv._conv_bias_relu`.
_CONV_BIAS_RELU = conv._conv_bias_relu


def _forward_in_batch_chunks(chunk: int, min_in_channels: int = 64) -> Any:
  """`conv._conv_bias_relu` whose Winograd forwards run ``chunk`` images at a time.

  A `lax.map` over the batch's chunks, each chunk's forward with its bias
  and ReLU, so that its tiles stay in cache between the transforms and the
  products; only layers with at least ``min_in_channels`` input channels
  (and batches of several chunks). The backward pass is the shipped one.
  """

  def primal(x: jax.Array, w: jax.Array, b: jax.Array, precision: Any) -> jax.Array:
    n = x.shape[0]
    chunked = n % chunk == 0 and n > chunk and w.shape[2] >= min_in_channels
    if chunked and conv._winograd_forward(x.shape, w):
      y = lax.map(
          lambda xc: nn.relu(conv.winograd_conv_valid(xc, w, precision) + b),
          x.reshape(n // chunk, chunk, *x.shape[1:]),
      )
      return y.reshape(n, *y.shape[2:])
    return _CONV_BIAS_RELU(x, w, b, precision)

  op = jax.custom_vjp(primal, nondiff_argnums=(3,))

  def fwd(x: jax.Array, w: jax.Array, b: jax.Array, precision: Any) -> tuple[jax.Array, Any]:
    r = op(x, w, b, precision)
    return r, (x, w, r)

  op.defvjp(fwd, conv._conv_bias_relu_bwd)
  return op


def _kernel_grad_unrolled(
    x: jax.Array, g: jax.Array, kh: int, kw: int, precision: Any
) -> jax.Array:
  """`conv._kernel_grad` with its chunks as static slices, not a `lax.scan`.

  So that XLA:CPU can fuse each chunk's slices into the loops that read
  them instead of copying the chunk out. Layers taken whole, or with
  channel-major patches, as shipped.
  """
  cin, cout = x.shape[3], g.shape[3]
  dtype = jnp.result_type(x, g)
  product, to_layout = conv._kernel_grad_formulation(x.shape, g.shape, kh, dtype)
  if not conv._chunked_kernel_grad(x.shape, g.shape) or to_layout is not conv._as_nhwc:
    return _KERNEL_GRAD(x, g, kh, kw, precision)
  chunk = conv._KERNEL_GRAD_CHUNK
  dw = jnp.zeros((kh * kw * cin, cout), jnp.float32)
  for i in range(0, x.shape[0], chunk):
    dw = dw + product(x[i : i + chunk], g[i : i + chunk], kh, kw, precision)
  return dw.reshape(kh, kw, cin, cout).astype(dtype)


# Winograd both ways from 32 input channels, as shipped until session 10.
_WINOGRAD_FROM_32 = {
    '_WINOGRAD_FORWARD_MIN_IN_CHANNELS': 32,
    '_WINOGRAD_BACKWARD_MIN_IN_CHANNELS': 32,
}

# --what=train: each variant undoes one of agejax's CPU choices, by patching
# module attributes ({module: {name: value}}) and/or XLA compiler options.
_TRAIN_VARIANTS = {
    'shipped': ({}, None),
    'Winograd tiles as one stack of 16': ({conv: {'_stack_4x4': _flat_stack_16}}, None),
    # Winograd's input tiles sliced before their pairs are reshaped out (as
    # shipped until session 18).
    'Winograd input tiles sliced before reshaping': (
        {conv: {'_winograd_input_transform': _sliced_then_reshaped_input_transform}},
        None,
    ),
    'Winograd backward by jax.vjp': (
        {conv: {'winograd_conv_valid_vjp': _winograd_autodiff_vjp}},
        None,
    ),
    '46x46x32 layer by Winograd': ({conv: _WINOGRAD_FROM_32}, None),
    # Not a choice undone: the 46x46x32 layer's Winograd backward (as
    # shipped before session 10) in chunks, measured and not adopted.
    'Winograd backward in batch chunks': (
        {conv: {**_WINOGRAD_FROM_32, 'winograd_conv_valid_vjp': _winograd_vjp_in_chunks}},
        None,
    ),
    'kernel gradient patches from NHWC': (
        {conv: {'_CHANNEL_MAJOR_PATCH_DTYPES': (), '_WINOGRAD_KERNEL_GRAD_DTYPES': ()}},
        None,
    ),
    # Each convolution's bias and ReLU after it, not in its pass (as shipped
    # until session 15).
    'convolution bias and ReLU as ops of their own': (
        {conv: {'conv_bias_relu': _conv_then_bias_relu}},
        None,
    ),
    # The chunked im2col kernel gradient also for 3x3 kernels (as shipped
    # until session 15).
    'kernel gradient by im2col': ({conv: {'_WINOGRAD_KERNEL_GRAD_DTYPES': ()}}, None),
    # The 46x46x32 layer's kernel gradient as shipped until session 16.
    'kernel gradient by Winograd along the width': ({conv: _WIDTH_WINOGRAD}, None),
    # ... and until session 18: from a channel-major copy of the input.
    'kernel gradient from a channel-major input': ({conv: _CHANNEL_MAJOR_HEIGHT_WINOGRAD}, None),
    # Both of session 19's changes undone: the step as shipped until session 18.
    'Winograd input tiles and kernel gradient as in session 18': (
        {
            conv: {
                '_winograd_input_transform': _sliced_then_reshaped_input_transform,
                **_CHANNEL_MAJOR_HEIGHT_WINOGRAD,
            }
        },
        None,
    ),
    # Not choices undone: measured and not adopted (session 15).
    '46x46x32 kernel gradient by Winograd': (
        {conv: {'_kernel_grad': _kernel_grad_winograd_from_32}},
        None,
    ),
    'Winograd forward from 5 output rows': ({conv: {'_WINOGRAD_FORWARD_MIN_OUT_ROWS': 5}}, None),
    # Measured and not adopted (session 20, on a Zen 4): the Winograd
    # layers' forwards in batch chunks, re-measured after the fix to this
    # tool (see `_compile_patched`); the 46x46x32 layer's forward by
    # Winograd, whole or in chunks; other kernel-gradient chunk sizes.
    'Winograd forward in batch chunks of 8': (
        {conv: {'_conv_bias_relu': _forward_in_batch_chunks(8)}},
        None,
    ),
    'Winograd forward in batch chunks of 16': (
        {conv: {'_conv_bias_relu': _forward_in_batch_chunks(16)}},
        None,
    ),
    '46x46x32 forward by Winograd': ({conv: {'_WINOGRAD_FORWARD_MIN_IN_CHANNELS': 32}}, None),
    '46x46x32 forward by Winograd and all Winograd forwards in chunks of 8': (
        {
            conv: {
                '_WINOGRAD_FORWARD_MIN_IN_CHANNELS': 32,
                '_conv_bias_relu': _forward_in_batch_chunks(8, min_in_channels=32),
            }
        },
        None,
    ),
    'kernel gradient chunks unrolled': ({conv: {'_kernel_grad': _kernel_grad_unrolled}}, None),
    'kernel gradient chunks of 2 images': ({conv: {'_KERNEL_GRAD_CHUNK': 2}}, None),
    'kernel gradient chunks of 8 images': ({conv: {'_KERNEL_GRAD_CHUNK': 8}}, None),
    'kernel gradient chunks of 16 images': ({conv: {'_KERNEL_GRAD_CHUNK': 16}}, None),
    # Not a choice: what the 46x46x32 layer's kernel gradient costs the step.
    'no 46x46x32 kernel gradient (timing only)': (
        {conv: {'_kernel_grad': _kernel_grad_skipped_from_32}},
        None,
    ),
    # XLA:CPU's own convolutions and dots (as shipped until session 14).
    'XLA kernels instead of oneDNN': ({onednn: {'_DTYPES': ()}}, None),
    'no Winograd forward': ({conv: {'_WINOGRAD_FORWARD_MIN_IN_CHANNELS': 10**9}}, None),
    'no Winograd backward': ({conv: {'_WINOGRAD_BACKWARD_MIN_IN_CHANNELS': 10**9}}, None),
    'no Winograd': (
        {conv: {'_WINOGRAD_FORWARD_MIN_IN_CHANNELS': 10**9, '_WINOGRAD_BACKWARD_MIN_IN_CHANNELS': 10**9}},
        None,
    ),
    'YNNPACK forward': (
        {conv: {'_WINOGRAD_FORWARD_MIN_IN_CHANNELS': 10**9, '_EIGEN_FORWARD_MIN_OUT_ROWS': 10**9}},
        None,
    ),
    'YNNPACK off': ({}, {'xla_cpu_experimental_ynn_fusion_type': ''}),
    # Not choices undone: other YNNPACK fusion settings, measured and not adopted.
    'YNNPACK dots and convolutions only': (
        {},
        {
            'xla_cpu_experimental_ynn_fusion_type': (
                'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'
            )
        },
    ),
    'YNNPACK graphs of dots + elementwise + reductions': (
        {},
        {
            'xla_cpu_experimental_ynn_fusion_type': (
                'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE'
            )
        },
    ),
    # Only differs from 'shipped' under --dtype=bfloat16.
    'Winograd float32 only': ({conv: {'_WINOGRAD_DTYPES': (jnp.float32,)}}, None),
    # The same masks, drawn by JAX's threefry (a rolled loop on the CPU).
    'flax Dropout': ({dropout: {'Dropout': nn.Dropout}}, None),
    # agejax's masks, hashed again in every loop that reads them (as
    # shipped until session 13).
    'dropout mask hashed by its readers': ({dropout: {'_computed_once': lambda m: m}}, None),
    # nn.relu, nn.BatchNorm and max_pool_fast as separate layers, not
    # agejax.relu_batch_norm (as shipped until session 12).
    'flax ReLU and BatchNorm': ({model: {'_FUSED_NORM_IMPLS': ()}}, None),
    # Not a choice undone: XLA:CPU's experimental oneDNN fusion of every dot,
    # measured and not adopted (eval_step aborts under it;
    # docs/performance_log.md).
    'oneDNN dots': (
        {},
        {
            'xla_cpu_use_onednn': True,
            'xla_cpu_experimental_onednn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT',
        },
    ),
}


def _compile_patched(
    step: Any,
    patches: Mapping[Any, Mapping[str, Any]],
    compiler_options: Mapping[str, Any] | None,
    *args: Any,
    **static: Any,
) -> Any:
  """``step`` (a jitted function) compiled while ``patches`` are applied.

  JAX caches a jitted function's trace by the function and its arguments'
  types, not by the module attributes the trace reads; the cache is cleared
  so that the patched attributes are read at all. (Sessions 18 and 19 until
  this fix: the train state's optimizer became one cached object, so every
  variant after the first hit the first's trace and ran its program.)
  """
  with contextlib.ExitStack() as stack:
    for module, attributes in patches.items():
      stack.enter_context(mock.patch.multiple(module, **attributes))
    jax.clear_caches()
    return step.lower(*args, **static).compile(compiler_options)


def _train(
    batch_sizes: Sequence[int], repeats: int, names: Sequence[str], scan_batches: int
) -> None:
  names = list(dict.fromkeys(names))
  unknown = set(names) - set(_TRAIN_VARIANTS)
  if unknown:
    raise app.UsageError(f'Unknown --variants {sorted(unknown)}; choose from {list(_TRAIN_VARIANTS)}.')
  step_name = f'steps.train_epoch of {scan_batches} batches' if scan_batches else 'steps.train_step'
  print(f'images/s, {step_name} ({_DTYPE.value}), median of {repeats} interleaved')
  print('| batch | ' + ' | '.join(names) + ' |\n' + '|---' * (len(names) + 1) + '|')
  rng = np.random.default_rng(0)
  key = jax.random.PRNGKey(1)
  for batch_size in batch_sizes:
    if scan_batches:
      data = _batch(scan_batches * batch_size, rng)
      step, args, static = steps.train_epoch, (data['image'], data['label'], key), {'batch_size': batch_size}
      images_per_call = scan_batches * batch_size
    else:
      step, args, static = steps.train_step, (_batch(batch_size, rng), key), {}
      images_per_call = batch_size
    runs, programs = {}, {}
    for name in names:
      patches, compiler_options = _TRAIN_VARIANTS[name]
      state = [_state(dtype=_DTYPE.value)]
      compiled = _compile_patched(step, patches, compiler_options, state[0], *args, **static)
      program = compiled.as_text()
      if program in programs:
        print(f'Note: {name!r} compiles to the same program as {programs[program]!r}.')
      programs.setdefault(program, name)

      def run(compiled=compiled, state=state) -> None:
        state[0], out = compiled(state[0], *args)
        jax.block_until_ready(out)

      run()
      runs[name] = run
    seconds = _interleaved(runs, repeats)
    print(
        f'| {batch_size} | '
        + ' | '.join(f'{images_per_call / seconds[n]:.0f}' for n in names)
        + ' |',
        flush=True,
    )


def _host(batch_sizes: Sequence[int], repeats: int) -> None:
  """Where a training step's CPU time goes: user code or the kernel."""
  print(
      f'steps.train_step, {repeats} steps, host malloc'
      f' {_HOST_MALLOC.value or host_malloc.default_mode()}\n'
      '| batch | ms per step | cores busy | kernel share of CPU time | minor page faults per step'
      ' | waits per step | peak RSS of the process |\n|---|---|---|---|---|---|---|'
  )
  key = jax.random.PRNGKey(1)
  for batch_size in batch_sizes:
    batch = _batch(batch_size, np.random.default_rng(0))
    state = _state()
    for _ in range(2):
      state, out = steps.train_step(state, batch, key)
      jax.block_until_ready(out)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, start = os.times(), time.perf_counter()
    for _ in range(repeats):
      state, out = steps.train_step(state, batch, key)
      jax.block_until_ready(out)
    wall, cpu1 = time.perf_counter() - start, os.times()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    faults = usage.ru_minflt - usage0.ru_minflt
    # Voluntary context switches: a thread blocking, e.g. on a lock.
    waits = usage.ru_nvcsw - usage0.ru_nvcsw
    user, system = cpu1.user - cpu0.user, cpu1.system - cpu0.system
    print(
        f'| {batch_size} | {wall / repeats * 1e3:.0f} | {(user + system) / wall:.2f}'
        f' | {system / (user + system):.0%} | {faults / repeats:,.0f}'
        f' | {waits / repeats:,.0f} | {usage.ru_maxrss / 2**20:.1f} GiB |',
        flush=True,
    )


def _alternate(batch_sizes: Sequence[int], repeats: int) -> None:
  """Training and evaluation in turn in one process, as an epoch alternates them."""
  mode = _HOST_MALLOC.value or host_malloc.default_mode()
  eval_batch_size = max(batch_sizes)
  names = [f'train b{b}' for b in batch_sizes] + [f'eval b{eval_batch_size} after training']
  print(
      f'images/s, median of {repeats} rounds, host malloc {mode}\n| '
      + ' | '.join(names)
      + ' | waits per round | minor page faults per round | kernel share of CPU time |\n'
      + '|---' * (len(names) + 3)
      + '|'
  )
  rng = np.random.default_rng(0)
  key = jax.random.PRNGKey(1)
  runs = {}
  for batch_size in batch_sizes:
    batch, state = _batch(batch_size, rng), [_state()]

    def train(batch=batch, state=state) -> None:
      state[0], out = steps.train_step(state[0], batch, key)
      jax.block_until_ready(out)

    runs[f'train b{batch_size}'] = (train, batch_size)
  batch, state = _batch(eval_batch_size, rng), _state()
  runs[names[-1]] = (
      lambda: jax.block_until_ready(steps.eval_step(state, batch)),
      eval_batch_size,
  )
  for run, _ in runs.values():
    run()
    run()
  usage0, cpu0 = resource.getrusage(resource.RUSAGE_SELF), os.times()
  seconds = _interleaved({name: run for name, (run, _) in runs.items()}, repeats)
  usage, cpu1 = resource.getrusage(resource.RUSAGE_SELF), os.times()
  user, system = cpu1.user - cpu0.user, cpu1.system - cpu0.system
  print(
      '| '
      + ' | '.join(f'{size / seconds[name]:.0f}' for name, (_, size) in runs.items())
      + f' | {(usage.ru_nvcsw - usage0.ru_nvcsw) / repeats:,.0f}'
      f' | {(usage.ru_minflt - usage0.ru_minflt) / repeats:,.0f}'
      f' | {system / (user + system):.0%} |',
      flush=True,
  )


def _flops() -> None:
  """Per image; ``lax`` counts direct convolutions, ``auto`` what agejax runs."""
  batch_size = 64
  batch = _batch(batch_size, np.random.default_rng(0))
  for impl in ('lax', 'auto'):
    state = _state(impl)
    programs = {
        'train_step': steps.train_step.lower(state, batch, jax.random.PRNGKey(1)),
        'eval_step': steps.eval_step.lower(state, batch),
    }
    for name, lowered in programs.items():
      cost = lowered.compile().cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      print(f'{name}, conv_impl={impl}: {cost["flops"] / batch_size / 1e6:.0f} MFLOP per image (batch {batch_size})')


def _op_names(hlo_text: str, step: str) -> dict[str, str]:
  """HLO instruction name -> the JAX op name in its metadata, less the jit prefix."""
  names = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.-]+) = .*?op_name="([^"]*)"', hlo_text, re.M):
    names[m.group(1)] = m.group(2).removeprefix(f'jit({step})/')
  return names


def _profile(step_name: str, batch_size: int, repeats: int, top: int) -> None:
  """Per-operation time of `train_step` or `eval_step` from a `jax.profiler` trace."""
  batch = _batch(batch_size, np.random.default_rng(0))
  state = _state()
  if step_name == 'train_step':
    key = jax.random.PRNGKey(1)
    compiled = steps.train_step.lower(state, batch, key).compile()

    def run() -> None:
      nonlocal state
      state, out = compiled(state, batch, key)
      jax.block_until_ready(out)

  else:
    compiled = steps.eval_step.lower(state, batch).compile()

    def run() -> None:
      jax.block_until_ready(compiled(state, batch))

  op_names = _op_names(compiled.as_text(), step_name)
  for _ in range(3):
    run()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(repeats):
        run()
    (path,) = glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True)
    profile = jax.profiler.ProfileData.from_file(path)
  # A custom call's event is named after its instruction and its target
  # (``ffi_call.19__onednn$convolution``), the instruction alone in the HLO.
  events = [
      (event.start_ns, event.start_ns + event.duration_ns, event.name.split('__', 1)[0])
      for plane in profile.planes
      for line in plane.lines
      for event in line.events
  ]
  # One executable run per step: the caller thread waits on each.
  runs = sorted((s, e) for s, e, name in events if name.startswith('ThunkExecutor::Execute (wait'))
  per_step = []
  for start, end in runs:
    times = collections.Counter()
    for s, e, name in events:
      if start <= s and e <= end and name in op_names:
        times[op_names[name]] += (e - s) / 1e6
    per_step.append(times)
  ops = {op: statistics.median(t.get(op, 0.0) for t in per_step) for op in set().union(*per_step)}
  layers = collections.Counter()
  for op, ms in ops.items():
    direction = 'backward' if op.startswith('transpose(') else 'forward'
    layer = re.search(r'(block\d/(?:conv|bn)\d|head/\w+|logits|Dropout_\d)', op)
    layers[(direction, layer.group(1) if layer else 'other')] += ms
  print(
      f'steps.{step_name}, batch {batch_size}: {statistics.median((e - s) / 1e6 for s, e in runs):.0f} ms'
      f' per traced step (median of {len(runs)}), operations sum to {sum(ops.values()):.0f} ms'
  )
  print('\n| pass | layer | ms per step |\n|---|---|---|')
  for (direction, layer), ms in layers.most_common(top):
    print(f'| {direction} | {layer} | {ms:.1f} |')
  print('\n| ms per step | operation (JAX op name) |\n|---|---|')
  for op, ms in sorted(ops.items(), key=lambda item: -item[1])[:top]:
    print(f'| {ms:.1f} | `{op}` |')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host_malloc.reexec(_HOST_MALLOC.value)
  if _WHAT.value == 'peak':
    _peak(_REPEATS.value)
  elif _WHAT.value == 'layers':
    _layers(_BATCH_SIZE.value, _REPEATS.value)
  elif _WHAT.value == 'gradients':
    _gradients(_BATCH_SIZE.value, _REPEATS.value)
  elif _WHAT.value == 'kernel_grads':
    _kernel_grads(_BATCH_SIZE.value, _REPEATS.value)
  elif _WHAT.value == 'dropout':
    _dropout(_BATCH_SIZE.value, _REPEATS.value)
  elif _WHAT.value == 'eval':
    _eval([int(b) for b in _BATCH_SIZES.value], _REPEATS.value)
  elif _WHAT.value == 'train':
    _train(
        [int(b) for b in _BATCH_SIZES.value],
        _REPEATS.value,
        _VARIANTS.value or list(_TRAIN_VARIANTS),
        _SCAN_BATCHES.value,
    )
  elif _WHAT.value == 'host':
    _host([int(b) for b in _BATCH_SIZES.value], _REPEATS.value)
  elif _WHAT.value == 'alternate':
    _alternate([int(b) for b in _BATCH_SIZES.value], _REPEATS.value)
  elif _WHAT.value == 'profile':
    _profile(_STEP.value, _BATCH_SIZE.value, _REPEATS.value, _TOP.value)
  else:
    _flops()


if __name__ == '__main__':
  app.run(main)
