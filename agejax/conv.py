"""Convolution implementations for `flax.linen.Conv`, chosen per backend.

Why: on XLA:CPU the gradient of ``lax.conv_general_dilated`` with respect to
the kernel is lowered to a "filter-gradient" convolution (batch treated as
features, an 18x18-or-larger window) that runs far below the machine's matmul
throughput and dominates a training step of the study's CNN. The same
quantity is a single matrix product of im2col patches with the output
cotangent, which XLA:CPU runs at matmul speed.

`matmul_conv_general_dilated` is a drop-in replacement for
``lax.conv_general_dilated`` (same signature, same values) with a custom VJP:

* forward: ``lax.conv_general_dilated`` itself (already fast on CPU);
* input gradient: the transposed convolution, written as a VALID convolution
  of the cotangent padded by ``kernel - 1`` with the flipped kernel (what
  ``lax`` does, and fast on CPU);
* kernel gradient: ``patches^T @ cotangent``, the patches being the
  ``kh * kw`` shifted slices of the input concatenated along channels.

It covers what the study's network uses: 2-D NHWC inputs, HWIO kernels,
stride 1, no dilation, one feature and batch group, no
``preferred_element_type``, and 'VALID', 'SAME' ('SAME_LOWER') or explicit
non-negative padding. Any other call is passed to ``lax.conv_general_dilated``
unchanged, so the function is safe to use everywhere.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

ConvFn = Callable[..., jax.Array]

IMPLS = ('lax', 'matmul', 'auto')

# NHWC input, HWIO kernel, NHWC output: the layout flax.linen.Conv passes.
_NHWC_HWIO = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)
# The flipped kernel, read with I and O swapped, for the input gradient.
_NHWC_HWOI = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(2, 3, 0, 1), out_spec=(0, 3, 1, 2)
)


def conv_general_dilated_for(impl: str) -> ConvFn:
  """Returns the ``conv_general_dilated`` to give `flax.linen.Conv`.

  Args:
    impl: ``'lax'`` for ``jax.lax.conv_general_dilated``; ``'matmul'`` for
      `matmul_conv_general_dilated`; ``'auto'`` for `auto_conv_general_dilated`
      (matmul on the CPU backend, lax on GPU and TPU).

  Raises:
    ValueError: ``impl`` is none of these.
  """
  if impl == 'lax':
    return lax.conv_general_dilated
  if impl == 'matmul':
    return matmul_conv_general_dilated
  if impl == 'auto':
    return auto_conv_general_dilated
  raise ValueError(f'Unknown conv impl {impl!r}; expected one of {IMPLS}.')


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
  pads = _supported_pads(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation,
      rhs_dilation,
      dimension_numbers,
      feature_group_count,
      batch_group_count,
      preferred_element_type,
  )
  if pads is None:
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
  if any(p for pair in pads for p in pair):
    lhs = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
  return _conv_valid(lhs, rhs, precision)


def _supported_pads(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None,
    rhs_dilation: Sequence[int] | None,
    dimension_numbers: Any,
    feature_group_count: int,
    batch_group_count: int,
    preferred_element_type: Any,
) -> tuple[tuple[int, int], tuple[int, int]] | None:
  """The spatial padding if the matmul path supports the call, else None."""
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
  return tuple((int(lo), int(hi)) for lo, hi in pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_valid(x: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
  """VALID, stride-1 NHWC x HWIO convolution."""
  return lax.conv_general_dilated(
      x, w, (1, 1), 'VALID', dimension_numbers=_NHWC_HWIO, precision=precision
  )


def _conv_valid_fwd(
    x: jax.Array, w: jax.Array, precision: Any
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  return _conv_valid(x, w, precision), (x, w)


def _conv_valid_bwd(
    precision: Any, res: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array]:
  x, w = res
  kh, kw, cin, cout = w.shape
  _, ho, wo, _ = g.shape
  dx = lax.conv_general_dilated(
      g,
      jnp.flip(w, (0, 1)),
      (1, 1),
      ((kh - 1, kh - 1), (kw - 1, kw - 1)),
      dimension_numbers=_NHWC_HWOI,
      precision=precision,
  )
  patches = jnp.concatenate(
      [x[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)],
      axis=-1,
  )
  dw = lax.dot_general(
      patches,
      g,
      (((0, 1, 2), (0, 1, 2)), ((), ())),
      precision=precision,
  )
  return dx, dw.reshape(kh, kw, cin, cout)


_conv_valid.defvjp(_conv_valid_fwd, _conv_valid_bwd)
