"""XLA:CPU's own oneDNN convolution and matmul kernels, called directly.

Why: on the 2-core Intel Xeon of docs/PERFORMANCE.md ("Machine"), oneDNN's
convolution runs the study's 46x46x32 layer forward in 12 ms and its input
gradient in 13 ms, where XLA:CPU's Eigen convolution takes 20 and 21; its
matmul reaches 310-370 GFLOP/s on the products whose operand is read
transposed (kernel gradients, Winograd's), where XLA:CPU's dot reaches
150-200. jaxlib's x86-64 build ships both kernels, but no XLA:CPU pass
hands work to them in that build. XLA:CPU runs them when the compiled
program calls them by their custom-call targets, ``__onednn$convolution``
and ``__onednn$matmul``, with a configuration in the custom call's
backend config. `conv` and `dot_general` emit those calls with
``jax.ffi.ffi_call``.

The configuration is XLA's internal format (``xla.cpu.OneDnnConvolutionConfig``
and ``OneDnnMatMulConfig``), and a configuration oneDNN rejects aborts the
process instead of raising. So `available` allows them only where agejax's
tests cover that format: jaxlib `_TESTED_JAXLIB` on x86-64 with the CPU as
JAX's default backend, and a CPU whose instructions oneDNN may use include
AVX-512 (`_AVX512_CORE_CPU_FLAGS`; ``ONEDNN_MAX_CPU_ISA`` or
``DNNL_MAX_CPU_ISA`` may lower that). Even there it first runs each kind of
call on a small input and compares it with ``lax``. Everywhere else
`dot_general` is ``lax.dot_general``, and `agejax.conv` keeps its other CPU
paths.

Why AVX-512: on AVX2 oneDNN runs a float32 matmul on another kernel
(``gemm_f32_matmul_t``), and with jaxlib 0.10.2 that one deadlocks: with
``ONEDNN_MAX_CPU_ISA=AVX2`` a jitted ``[16, 1024, 128] x [16, 128, 128]``
matmul hung within 1-7 calls in each of 3 processes (its thread waiting on
oneDNN's ``parallel``, XLA's pool threads idle), and of three runs of the
study's training step with this check bypassed, one hung and one died of a
segmentation fault (docs/performance_log.md, session 21). A small probe cannot
catch that: it would hang too, or pass.

bfloat16 operands go to oneDNN too where the CPU has bfloat16 instructions
(AVX-512 BF16 or AMX, `_BFLOAT16_CPU_FLAGS`): there oneDNN's bfloat16
convolutions run the study's layers 5-10x faster than its float32 ones.

One cost: XLA:CPU cannot write a program that calls these kernels to JAX's
persistent compilation cache (it warns "Error writing persistent
compilation cache entry ... std::bad_alloc"), so such programs are compiled
again in every process.
"""

from __future__ import annotations

import functools
import json
import os
import platform
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

# The jaxlib versions whose custom-call configuration format the tests check
# (tests/test_onednn.py).
_TESTED_JAXLIB = ('0.10.2',)
# Operand dtypes sent to oneDNN. bfloat16 products may return float32.
_DTYPES = (jnp.float32, jnp.bfloat16)
# bfloat16 only where the CPU multiplies it natively (any one of these
# /proc/cpuinfo flags); elsewhere oneDNN's bfloat16 kernels were not measured.
_BFLOAT16_CPU_FLAGS = ('avx512_bf16', 'amx_bf16')
# oneDNN's ``avx512_core``: the least the CPU must have (all of these flags).
_AVX512_CORE_CPU_FLAGS = ('avx512f', 'avx512cd', 'avx512bw', 'avx512dq', 'avx512vl')
# Variables that cap the instructions oneDNN uses, and the caps (prefixes of
# oneDNN's names, case-insensitive) that still allow ``avx512_core``.
_MAX_ISA_VARIABLES = ('ONEDNN_MAX_CPU_ISA', 'DNNL_MAX_CPU_ISA')
_AVX512_MAX_ISAS = ('ALL', 'DEFAULT', 'AVX512_CORE', 'AVX10')
_CPUINFO = '/proc/cpuinfo'
_PROBE_TOLERANCE = 1e-5


def _conv_config(
    padding: Sequence[tuple[int, int]], post_ops: Sequence[str] = ()
) -> str:
  """Backend config of an NHWC x HWIO, stride-1 ``__onednn$convolution``.

  ``post_ops`` are XLA's names of oneDNN's post-ops, applied in order
  (``'BIAS'`` reads the call's third operand).
  """
  config = {
      'onednn_conv_config': {
          'dims': 4,
          'feature_groups': 1,
          'input': {'data': {'batch_dim': 0, 'feature_dim': 3, 'spatial_dims': [1, 2]}},
          'kernel': {
              'filter': {'input_feature_dim': 2, 'output_feature_dim': 3, 'spatial_dims': [0, 1]}
          },
          'output': {'data': {'batch_dim': 0, 'feature_dim': 3, 'spatial_dims': [1, 2]}},
          'window': {
              'pad_left': [lo for lo, _ in padding],
              'pad_right': [hi for _, hi in padding],
              'strides': [1, 1],
              # XLA's convention (1: none); oneDNN is given 1 less.
              'window_dilations': [1, 1],
          },
      }
  }
  if post_ops:
    config['onednn_conv_config']['fusions'] = {'ops': list(post_ops)}
  return json.dumps(config)


def conv(
    x: jax.Array,
    w: jax.Array,
    padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
    *,
    bias: jax.Array | None = None,
    relu: bool = False,
) -> jax.Array:
  """Stride-1 NHWC x HWIO convolution of ``x`` zero-padded by ``padding``.

  ``padding`` is ``((top, bottom), (left, right))``, non-negative. With
  ``bias`` ([C_out]) it is added, and with ``relu`` the result rectified,
  in the convolution's own pass (oneDNN's post-ops). Only call it where
  `enabled_for` holds; it has no gradient of its own (`agejax.conv`
  differentiates it).
  """
  n, h, wd, cin = x.shape
  kh, kw, kcin, cout = w.shape
  if kcin != cin or x.dtype != w.dtype:
    raise ValueError(
        f'oneDNN convolution of {x.dtype}{list(x.shape)} (NHWC) with '
        f'{w.dtype}{list(w.shape)} (HWIO): channels and dtypes must match.'
    )
  if bias is not None and (bias.shape != (cout,) or bias.dtype != x.dtype):
    raise ValueError(
        f'oneDNN convolution bias must be {x.dtype}[{cout}], got'
        f' {bias.dtype}{list(bias.shape)}.'
    )
  if min(min(pair) for pair in padding) < 0:
    # oneDNN would reject it by aborting the process.
    raise ValueError(f'oneDNN convolution padding must be non-negative, got {padding}.')
  (top, bottom), (left, right) = padding
  out = jax.ShapeDtypeStruct(
      (n, h + top + bottom - kh + 1, wd + left + right - kw + 1, cout), x.dtype
  )
  post_ops = ('BIAS',) * (bias is not None) + ('RELU',) * relu
  operands = (x, w) if bias is None else (x, w, bias)
  return _call('__onednn$convolution', out, _conv_config(padding, post_ops), *operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul(
    a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool, out_dtype: Any
) -> jax.Array:
  """``a @ b`` over leading batch dimensions, either operand read transposed.

  The result has ``out_dtype`` (oneDNN accumulates in float32 either way).
  Differentiable (its gradients are matmuls too, in ``out_dtype``),
  so that `dot_general` can stand in for ``lax.dot_general`` in code JAX
  differentiates, such as `agejax.conv.winograd_conv_valid`.
  """
  m = a.shape[-1] if transpose_a else a.shape[-2]
  n = b.shape[-2] if transpose_b else b.shape[-1]
  out = jax.ShapeDtypeStruct((*a.shape[:-2], m, n), out_dtype)
  config = json.dumps(
      {'onednn_matmul_config': {'transpose_a': transpose_a, 'transpose_b': transpose_b}}
  )
  return _call('__onednn$matmul', out, config, a, b)


def _matmul_fwd(
    a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool, out_dtype: Any
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  return _matmul(a, b, transpose_a, transpose_b, out_dtype), (a, b)


def _matmul_bwd(
    transpose_a: bool,
    transpose_b: bool,
    out_dtype: Any,
    res: tuple[jax.Array, jax.Array],
    g: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  # With op(X) the operand as multiplied: d op(A) = g op(B)^T and
  # d op(B) = op(A)^T g, each written as one matmul of the stored operands,
  # in the cotangent's dtype (as lax: float32 for a float32 result).
  a_dtype, b_dtype = res[0].dtype, res[1].dtype
  a, b = (x.astype(out_dtype) for x in res)
  if transpose_a:
    da = _matmul(b, g, transpose_b, True, out_dtype)
  else:
    da = _matmul(g, b, False, not transpose_b, out_dtype)
  if transpose_b:
    db = _matmul(g, a, True, transpose_a, out_dtype)
  else:
    db = _matmul(a, g, not transpose_a, False, out_dtype)
  return da.astype(a_dtype), db.astype(b_dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _call(target: str, out: jax.ShapeDtypeStruct, config: str, *operands: jax.Array) -> jax.Array:
  return jax.ffi.ffi_call(
      target,
      out,
      vmap_method='sequential',
      custom_call_api_version=1,
      legacy_backend_config=config,
  )(*operands)


def _as_matmul(
    a_shape: Sequence[int], b_shape: Sequence[int], dimension_numbers: Any
) -> tuple[bool, bool] | None:
  """(transpose_a, transpose_b) if the dot is a oneDNN matmul, else None.

  That is: the same leading batch dimensions on both sides, then two
  dimensions each, one of them contracted.
  """
  (a_contract, b_contract), (a_batch, b_batch) = dimension_numbers
  nb = len(a_batch)
  leading = tuple(range(nb))
  if (
      tuple(a_batch) != leading
      or tuple(b_batch) != leading
      or len(a_shape) != nb + 2
      or len(b_shape) != nb + 2
      or tuple(a_shape[:nb]) != tuple(b_shape[:nb])
      or len(a_contract) != 1
      or len(b_contract) != 1
  ):
    return None
  return a_contract[0] == nb, b_contract[0] == nb + 1


def dot_general(
    a: jax.Array,
    b: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
  """``lax.dot_general``, on oneDNN's matmul where it applies.

  That is where `enabled_for` the operands' (common) dtype holds, the
  result is in that dtype or float32, and the dot is one matmul per batch
  element (see `_as_matmul`). Everything else goes to ``lax.dot_general``
  as given. Reverse-mode differentiable either way.
  """
  transposes = _as_matmul(a.shape, b.shape, dimension_numbers)
  dtype = jnp.result_type(a, b)
  out_dtype = dtype if preferred_element_type is None else jnp.dtype(preferred_element_type)
  if (
      transposes is not None
      and a.dtype == b.dtype == dtype
      and out_dtype in (dtype, jnp.dtype(jnp.float32))
      and enabled_for(dtype)
  ):
    return _matmul(a, b, *transposes, out_dtype)
  return lax.dot_general(
      a,
      b,
      dimension_numbers,
      precision=precision,
      preferred_element_type=preferred_element_type,
  )


def enabled_for(dtype: Any) -> bool:
  """Whether `conv` and `dot_general` send ``dtype`` operands to oneDNN."""
  dtype = jnp.dtype(dtype)
  if dtype not in _DTYPES or not available():
    return False
  return dtype != jnp.bfloat16 or native_bfloat16()


@functools.cache
def native_bfloat16() -> bool:
  """Whether the CPU has bfloat16 instructions (`_BFLOAT16_CPU_FLAGS`).

  Also where `agejax.conv` computes bfloat16 convolutions in bfloat16; on
  other CPUs it computes them in float32.
  """
  flags = cpu_flags()
  return any(flag in flags for flag in _BFLOAT16_CPU_FLAGS)


def cpu_flags() -> frozenset[str]:
  """The words of `_CPUINFO` (its ``flags`` lines among them); empty if unreadable.

  Also what `agejax.conv` reads to choose its CPU kernels.
  """
  try:
    with open(_CPUINFO, encoding='utf-8') as f:
      return frozenset(f.read().split())
  except OSError:
    return frozenset()


def _avx512_core() -> bool:
  """Whether oneDNN may run AVX-512 kernels here (module docstring: why).

  The CPU has every one of `_AVX512_CORE_CPU_FLAGS`, and no
  `_MAX_ISA_VARIABLES` caps oneDNN below them.
  """
  if not set(_AVX512_CORE_CPU_FLAGS) <= cpu_flags():
    return False
  for variable in _MAX_ISA_VARIABLES:
    cap = os.environ.get(variable, '').strip().upper()
    if cap and not cap.startswith(_AVX512_MAX_ISAS):
      return False
  return True


@functools.cache
def available() -> bool:
  """Whether this process can use XLA:CPU's oneDNN kernels (module docstring).

  Checked once per process, when first asked: an x86-64 CPU with AVX-512
  (`_avx512_core`), then a small convolution (unpadded, padded, and with its
  bias and ReLU post-ops) and matmul (plain and each operand transposed,
  with a batch dimension) run through them.
  """
  if (
      platform.machine().lower() not in ('x86_64', 'amd64')
      or jax.default_backend() != 'cpu'
      or jax.lib.__version__ not in _TESTED_JAXLIB
      or not _avx512_core()
  ):
    return False
  try:
    # Compiled and run on its own, also when asked while tracing a program.
    return bool(jax.jit(_probe).lower().compile()())
  except Exception:  # pylint: disable=broad-except
    # A build without the targets fails to compile them: use XLA's kernels.
    return False


def _probe() -> jax.Array:
  """True where oneDNN's results match ``lax``'s on small inputs."""
  x = jnp.sin(jnp.arange(2 * 7 * 6 * 3, dtype=jnp.float32)).reshape(2, 7, 6, 3)
  w = jnp.cos(jnp.arange(3 * 2 * 3 * 4, dtype=jnp.float32)).reshape(3, 2, 3, 4)
  a = jnp.sin(jnp.arange(2 * 5 * 3, dtype=jnp.float32)).reshape(2, 5, 3)
  b = jnp.cos(jnp.arange(2 * 3 * 4, dtype=jnp.float32)).reshape(2, 3, 4)
  bias = jnp.linspace(-1.0, 1.0, 4, dtype=jnp.float32)
  pairs = []
  for padding in (((0, 0), (0, 0)), ((2, 1), (0, 1))):
    want = lax.conv_general_dilated(
        x, w, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    pairs.append((conv(x, w, padding), want))
    pairs.append(
        (conv(x, w, padding, bias=bias, relu=True), jnp.maximum(want + bias, 0))
    )
  for ta, tb in ((False, False), (True, False), (False, True)):
    lhs = jnp.swapaxes(a, 1, 2) if ta else a
    rhs = jnp.swapaxes(b, 1, 2) if tb else b
    pairs.append((_matmul(lhs, rhs, ta, tb, jnp.float32), a @ b))
  return jnp.all(
      jnp.stack([
          jnp.max(jnp.abs(got - want)) <= _PROBE_TOLERANCE * jnp.max(jnp.abs(want))
          for got, want in pairs
      ])
  )
