"""Tests for agejax.conv: the matmul-gradient convolution equals lax's."""

from __future__ import annotations

from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from agejax import conv
from agejax import onednn
from tests import fakes

_NHWC = ('NHWC', 'HWIO', 'NHWC')
_TOL = 1e-5

# (batch, height, width, in channels, out channels, kernel): the study's six
# convolutions, then odd sizes, non-square inputs and kernels.
_SHAPES = (
    (2, 48, 48, 1, 32, (3, 3)),
    (2, 46, 46, 32, 64, (3, 3)),
    (2, 22, 22, 64, 128, (3, 3)),
    (2, 20, 20, 128, 128, (3, 3)),
    (2, 9, 9, 128, 128, (3, 3)),
    (2, 7, 7, 128, 256, (3, 3)),
    (3, 11, 7, 5, 6, (3, 2)),
    (1, 6, 9, 4, 3, (1, 1)),
    (2, 5, 5, 3, 2, (5, 4)),
    # Odd kernels on the Eigen forward (>= 8 input channels, >= 6 output
    # rows) and, with >= 3000 output positions, the chunked kernel gradient
    # (batch 5: two chunks of 2 and one image left over under _CHUNKS_OF_2).
    (3, 13, 9, 8, 6, (3, 2)),
    (2, 12, 10, 9, 5, (5, 4)),
    (40, 12, 11, 8, 4, (2, 3)),
    (5, 30, 26, 8, 3, (4, 1)),
    # 3x3 with 9 output rows, not a multiple of Winograd's 4: under
    # _CHUNKS_OF_2 the kernel gradient by Winograd along the height, two
    # chunks and one image left over.
    (5, 11, 9, 3, 4, (3, 3)),
)
# Also run op by op (chex's without_jit). A formulation is chosen from the
# static shapes, so eagerly it runs as under jit: one shape per path is
# enough (oneDNN from 1 and 32 input channels, the latter's kernel gradient
# in chunks by Winograd F(4, 3); Winograd both ways; an odd kernel on lax;
# the Eigen forward; chunks of a 4-tall kernel's gradient by im2col).
_EAGER_SHAPES = (
    (2, 48, 48, 1, 32, (3, 3)),
    (2, 46, 46, 32, 64, (3, 3)),
    (2, 9, 9, 128, 128, (3, 3)),
    (3, 11, 7, 5, 6, (3, 2)),
    (3, 13, 9, 8, 6, (3, 2)),
    (5, 30, 26, 8, 3, (4, 1)),
)
_JIT_ONLY_SHAPES = tuple(s for s in _SHAPES if s not in _EAGER_SHAPES)

# The thresholds that pick each formulation; patching them forces one path.
# The Eigen forward and the kernel gradient in chunks of 1 or 2 images:
_EIGEN_AND_CHUNKS = dict(
    _EIGEN_MIN_IN_CHANNELS=1,
    _EIGEN_FORWARD_MIN_OUT_ROWS=1,
    _CHUNKED_KERNEL_GRAD_MIN_IN_CHANNELS=1,
    _CHUNKED_KERNEL_GRAD_MIN_ROWS=1,
    _WINOGRAD_FORWARD_MIN_IN_CHANNELS=10**9,
    _WINOGRAD_BACKWARD_MIN_IN_CHANNELS=10**9,
)
_CHUNKS_OF_1 = dict(_EIGEN_AND_CHUNKS, _KERNEL_GRAD_CHUNK=1)
_CHUNKS_OF_2 = dict(_EIGEN_AND_CHUNKS, _KERNEL_GRAD_CHUNK=2)
# lax's forward and one im2col kernel gradient for the whole batch:
_NO_EIGEN = dict(
    _EIGEN_MIN_IN_CHANNELS=10**9,
    _EIGEN_FORWARD_MIN_OUT_ROWS=10**9,
    _CHUNKED_KERNEL_GRAD_MIN_ROWS=10**9,
    _WINOGRAD_FORWARD_MIN_IN_CHANNELS=10**9,
    _WINOGRAD_BACKWARD_MIN_IN_CHANNELS=10**9,
)
# Winograd both ways on every 3x3 layer (other kernels keep the Eigen paths).
_ALL_WINOGRAD = dict(
    _WINOGRAD_FORWARD_MIN_IN_CHANNELS=1,
    _WINOGRAD_FORWARD_MIN_OUT_ROWS=1,
    _WINOGRAD_BACKWARD_MIN_IN_CHANNELS=1,
)
# Chunks of 2 with float32 patches concatenated from the NHWC input, the
# layout bfloat16 takes (float32 ones are built channel-major, for 3-tall
# kernels by Winograd along the height).
_NHWC_PATCHES = dict(
    _CHUNKS_OF_2, _CHANNEL_MAJOR_PATCH_DTYPES=(), _WINOGRAD_KERNEL_GRAD_DTYPES=()
)
# Chunks of 2 with channel-major im2col patches for 3-tall kernels too.
_IM2COL_CHUNKS = dict(_CHUNKS_OF_2, _WINOGRAD_KERNEL_GRAD_DTYPES=())


def _inputs(b, h, w, cin, cout, kernel, seed=0):
  """Unit-scale input and fan-in-scaled kernel."""
  x = fakes.normal(seed, (b, h, w, cin))
  k = fakes.normal(seed + 1, (*kernel, cin, cout)) * (kernel[0] * kernel[1] * cin) ** -0.5
  return jnp.asarray(x), jnp.asarray(k)


def _cotangent(shape):
  """A fixed output cotangent, scaled so that gradients are unit-scale."""
  return jnp.asarray(fakes.normal(7, shape) * (shape[0] * shape[1] * shape[2]) ** -0.5)


def _vjp(fn, x, k, **kwargs):
  """Output and (dx, dk) for the `_cotangent` of the output's shape."""
  y, pullback = jax.vjp(lambda a, b: fn(a, b, (1, 1), **kwargs), x, k)
  return y, pullback(_cotangent(y.shape))


def _uses_custom_vjp(fn, x, k, *args, **kwargs) -> bool:
  """Whether ``fn(x, k, ...)`` traces to the custom-VJP (matmul) path."""
  jaxpr = jax.make_jaxpr(lambda a, b: fn(a, b, *args, **kwargs))(x, k)
  return 'custom_vjp_call' in str(jaxpr)


# Calls outside the fast paths' supported case (see agejax.conv).
_UNSUPPORTED_CONFIGS = (
      ('stride', dict(window_strides=(2, 1))),
      ('rhs_dilation', dict(rhs_dilation=(2, 2))),
      ('lhs_dilation', dict(lhs_dilation=(1, 2), padding=((0, 0), (0, 0)))),
      ('nhwc_ohwi', dict(dimension_numbers=('NHWC', 'OHWI', 'NHWC'))),
      ('nchw_output', dict(dimension_numbers=('NHWC', 'HWIO', 'NCHW'))),
      ('negative_padding', dict(padding=((-1, 0), (0, 0)))),
      ('preferred_element_type', dict(preferred_element_type=jnp.float32)),
)


def _assert_falls_back_to_lax(fn, x, k, **overrides):
  """``fn`` computes lax's values by tracing to one plain lax convolution."""
  kwargs = dict(
      window_strides=(1, 1), padding='VALID', dimension_numbers=_NHWC
  )
  kwargs.update(overrides)
  if kwargs['dimension_numbers'][1] == 'OHWI':
    k = jnp.transpose(k, (3, 0, 1, 2))
  want = lax.conv_general_dilated(x, k, **kwargs)
  chex.assert_trees_all_close(fn(x, k, **kwargs), want, rtol=_TOL, atol=_TOL)
  jaxpr = str(jax.make_jaxpr(lambda a, b: fn(a, b, **kwargs))(x, k))
  assert 'custom_vjp_call' not in jaxpr, jaxpr
  assert jaxpr.count('conv_general_dilated') == 1, jaxpr


class ConvBiasReluTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*_EAGER_SHAPES)
  def test_values_and_gradients_match_lax_with_and_without_jit(self, *shape):
    self._check_values_and_gradients(self.variant, *shape)

  @parameterized.parameters(*_JIT_ONLY_SHAPES)
  def test_values_and_gradients_match_lax(self, *shape):
    self._check_values_and_gradients(jax.jit, *shape)

  def _check_values_and_gradients(self, variant, b, h, w, cin, cout, kernel):
    x, k = _inputs(b, h, w, cin, cout, kernel)
    bias = jnp.asarray(fakes.normal(3, (cout,)) * 0.3)

    def reference(x, k, bias):
      y = lax.conv_general_dilated(x, k, (1, 1), 'VALID', dimension_numbers=_NHWC)
      return nn.relu(y + bias)

    def value_and_grads(fn, x, k, bias):
      y, pullback = jax.vjp(fn, x, k, bias)
      return y, pullback(_cotangent(y.shape))

    want = value_and_grads(reference, x, k, bias)
    got = variant(lambda *a: value_and_grads(conv.conv_bias_relu, *a))(x, k, bias)
    chex.assert_trees_all_close(got, want, rtol=_TOL, atol=_TOL)
    # The ReLU zeroed some outputs and gradients.
    self.assertGreater(float(jnp.mean(got[0] == 0)), 0.1)

  @parameterized.parameters(
      # (input shape, kernel shape, dtype, bias and ReLU in oneDNN's pass)
      ((2, 46, 46, 32), (3, 3, 32, 64), jnp.float32, True),
      ((2, 7, 7, 128), (3, 3, 128, 256), jnp.float32, True),
      ((2, 22, 22, 64), (3, 3, 64, 128), jnp.float32, False),  # Winograd's
      ((2, 22, 22, 64), (3, 3, 64, 128), jnp.bfloat16, True),
  )
  def test_onednn_adds_bias_and_relu_where_it_convolves(self, x_shape, w_shape, dtype, want):
    if not onednn.enabled_for(dtype):
      want = False
    args = (jnp.zeros(x_shape, dtype), jnp.zeros(w_shape, dtype), jnp.zeros(w_shape[3:], dtype))
    text = jax.jit(conv.conv_bias_relu).lower(*args).as_text()
    self.assertEqual('RELU' in text, want)

  @parameterized.parameters(
      ((2, 8, 8), (3, 3, 3, 5), (5,)),
      ((2, 8, 8, 3), (3, 3, 4, 5), (5,)),
      ((2, 8, 8, 3), (3, 3, 3, 5), (4,)),
  )
  def test_wrong_shapes_raise(self, x_shape, w_shape, b_shape):
    with self.assertRaisesRegex(ValueError, 'conv_bias_relu takes NHWC x HWIO'):
      conv.conv_bias_relu(jnp.zeros(x_shape), jnp.zeros(w_shape), jnp.zeros(b_shape))


class MatmulConvTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(shape=_EAGER_SHAPES, padding=('VALID', 'SAME'))
  def test_forward_and_gradients_match_lax_with_and_without_jit(self, shape, padding):
    self._check_forward_and_gradients(self.variant, shape, padding)

  @parameterized.product(shape=_JIT_ONLY_SHAPES, padding=('VALID', 'SAME'))
  def test_forward_and_gradients_match_lax(self, shape, padding):
    self._check_forward_and_gradients(jax.jit, shape, padding)

  def _check_forward_and_gradients(self, variant, shape, padding):
    x, k = _inputs(*shape)
    kwargs = dict(padding=padding, dimension_numbers=_NHWC)
    want_y, want_grads = _vjp(lax.conv_general_dilated, x, k, **kwargs)
    got_y, got_grads = variant(
        lambda a, b: _vjp(conv.matmul_conv_general_dilated, a, b, **kwargs)
    )(x, k)
    chex.assert_shape(got_y, want_y.shape)
    chex.assert_trees_all_close(got_y, want_y, rtol=_TOL, atol=_TOL)
    chex.assert_trees_all_close(got_grads, want_grads, rtol=_TOL, atol=_TOL)

  @parameterized.product(
      shape=_SHAPES,
      thresholds=(
          _CHUNKS_OF_1,
          _CHUNKS_OF_2,
          _IM2COL_CHUNKS,
          _NHWC_PATCHES,
          _NO_EIGEN,
          _ALL_WINOGRAD,
      ),
  )
  def test_each_formulation_matches_lax(self, shape, thresholds):
    # Every shape through the Eigen forward + the chunked kernel gradient
    # (where the batch has at least two chunks), through lax's forward + one
    # im2col kernel gradient, and (3x3 kernels) through Winograd's forward
    # and backward passes. Padding is applied before any formulation is
    # chosen (`_valid_input`), so VALID shapes suffice: their 3x3 outputs
    # take every height modulo Winograd's tiles of 2 and 4, and padding is
    # tested above and below.
    x, k = _inputs(*shape)
    kwargs = dict(padding='VALID', dimension_numbers=_NHWC)
    want = _vjp(lax.conv_general_dilated, x, k, **kwargs)
    with mock.patch.multiple(conv, **thresholds):
      got = jax.jit(
          lambda a, b: _vjp(conv.matmul_conv_general_dilated, a, b, **kwargs)
      )(x, k)
    chex.assert_trees_all_close(got, want, rtol=_TOL, atol=_TOL)

  @parameterized.product(shape=_SHAPES, thresholds=(_CHUNKS_OF_2, _ALL_WINOGRAD))
  def test_each_formulation_matches_lax_without_onednn(self, shape, thresholds):
    # CPUs without AVX-512 get no oneDNN (`onednn.available`): every
    # formulation then runs on XLA's own convolutions and dots.
    x, k = _inputs(*shape)
    kwargs = dict(padding='VALID', dimension_numbers=_NHWC)
    want = _vjp(lax.conv_general_dilated, x, k, **kwargs)
    fn = jax.jit(lambda a, b: _vjp(conv.matmul_conv_general_dilated, a, b, **kwargs))
    with (
        mock.patch.multiple(conv, **thresholds),
        mock.patch.object(onednn, 'available', return_value=False),
    ):
      self.assertNotIn('__onednn$', fn.lower(x, k).compile().as_text())
      got = fn(x, k)
    chex.assert_trees_all_close(got, want, rtol=_TOL, atol=_TOL)

  @parameterized.parameters(
      # (input shape, kernel shape, Winograd forward, Eigen forward,
      #  chunked kernel gradient)
      ((64, 48, 48, 1), (3, 3, 1, 32), False, False, False),
      ((64, 46, 46, 32), (3, 3, 32, 64), False, True, True),
      ((7, 46, 46, 32), (3, 3, 32, 64), False, True, False),  # < 2 chunks
      ((64, 22, 22, 64), (3, 3, 64, 128), True, True, True),
      ((64, 20, 20, 128), (3, 3, 128, 128), True, True, True),
      ((64, 9, 9, 128), (3, 3, 128, 128), True, True, True),
      ((64, 7, 7, 128), (3, 3, 128, 256), False, False, False),
      ((256, 7, 7, 128), (3, 3, 128, 256), False, False, True),
      ((64, 20, 20, 16), (3, 3, 16, 32), False, True, True),
  )
  def test_study_layers_pick_the_measured_formulation(
      self, x_shape, w_shape, winograd_forward, eigen_forward, chunked_kernel_grad
  ):
    out = (x_shape[0], x_shape[1] - 2, x_shape[2] - 2, w_shape[3])
    w = jnp.zeros(w_shape)
    self.assertEqual(conv._winograd_forward(x_shape, w), winograd_forward)
    # bfloat16 convolves on oneDNN instead where it has native bfloat16.
    self.assertEqual(
        conv._winograd_forward(x_shape, w.astype(jnp.bfloat16)),
        winograd_forward and not onednn.enabled_for(jnp.bfloat16),
    )
    with mock.patch.object(onednn, '_DTYPES', ()):
      self.assertEqual(
          conv._winograd_forward(x_shape, w.astype(jnp.bfloat16)),
          winograd_forward,
      )
    self.assertFalse(conv._winograd_forward(x_shape, w.astype(jnp.float16)))
    self.assertEqual(conv._eigen_forward(x_shape, w_shape), eigen_forward)
    self.assertEqual(conv._chunked_kernel_grad(x_shape, out), chunked_kernel_grad)

  @parameterized.parameters(
      # (input shape, kernel shape, dtype, Winograd along the height)
      ((8, 46, 46, 32), (3, 3, 32, 64), jnp.float32, True),
      ((7, 46, 46, 32), (3, 3, 32, 64), jnp.float32, False),  # < 2 chunks
      ((8, 46, 46, 32), (3, 3, 32, 64), jnp.bfloat16, False),
      ((8, 46, 46, 32), (3, 2, 32, 64), jnp.float32, True),
      ((8, 46, 46, 32), (2, 3, 32, 64), jnp.float32, False),
      ((8, 48, 48, 1), (3, 3, 1, 32), jnp.float32, False),
  )
  def test_kernel_gradient_by_winograd_along_the_height_where_measured(
      self, x_shape, w_shape, dtype, want
  ):
    def loss(x, w):
      y = conv.matmul_conv_general_dilated(
          x, w, (1, 1), 'VALID', dimension_numbers=_NHWC
      )
      return jnp.sum(y.astype(jnp.float32))

    spy = mock.Mock(wraps=conv._height_winograd_kernel_grad)
    # bfloat16 as convolved where the CPU has bfloat16 instructions (elsewhere
    # it is computed in float32).
    with (
        mock.patch.object(conv, '_height_winograd_kernel_grad', spy),
        mock.patch.object(onednn, 'native_bfloat16', return_value=True),
    ):
      jax.make_jaxpr(jax.grad(loss, argnums=1))(
          jnp.zeros(x_shape, dtype), jnp.zeros(w_shape, dtype)
      )
    self.assertEqual(spy.called, want)

  @parameterized.parameters(
      # (kernel shape, dtype, Winograd backward)
      ((3, 3, 1, 32), jnp.float32, False),
      ((3, 3, 16, 32), jnp.float32, False),
      ((3, 3, 32, 64), jnp.float32, False),
      ((3, 3, 64, 128), jnp.float32, True),
      ((3, 3, 128, 256), jnp.float32, True),
      ((3, 3, 128, 256), jnp.bfloat16, True),
      ((3, 3, 128, 256), jnp.float16, False),
      ((3, 2, 128, 128), jnp.float32, False),
  )
  def test_winograd_backward_only_where_measured_faster(
      self, w_shape, dtype, want
  ):
    w = jnp.zeros(w_shape, dtype)
    with mock.patch.object(onednn, '_DTYPES', ()):
      self.assertEqual(conv._winograd_backward(w), want)
    self.assertEqual(
        conv._winograd_backward(w),
        want and not (dtype == jnp.bfloat16 and onednn.enabled_for(dtype)),
    )

  def _check_winograd_conv_valid_and_vjp(self, apply, b, h, w, cin, cout):
    # The forward and JAX's transpose of it against lax, and the written-out
    # backward pass against both; ``apply`` jits or not.
    x, k = _inputs(b, h, w, cin, cout, (3, 3))
    fast = lambda a, b, strides: conv.winograd_conv_valid(a, b)
    want = _vjp(
        lax.conv_general_dilated, x, k, padding='VALID', dimension_numbers=_NHWC
    )
    got = apply(lambda a, b: _vjp(fast, a, b))(x, k)
    chex.assert_trees_all_close(got, want, rtol=_TOL, atol=_TOL)
    written_out = apply(conv.winograd_conv_valid_vjp)(
        x, k, _cotangent(want[0].shape)
    )
    chex.assert_trees_all_close(written_out, got[1], rtol=_TOL, atol=_TOL)
    chex.assert_trees_all_close(written_out, want[1], rtol=_TOL, atol=_TOL)

  @parameterized.parameters(
      (2, 22, 22, 64, 128),
      (2, 7, 7, 128, 256),
      (2, 9, 9, 32, 16),
      (3, 3, 3, 4, 5),  # a single output position
      (2, 8, 5, 3, 2),  # odd output width, non-square
      (1, 10, 13, 2, 3),  # odd output height
      (1, 4, 6, 1, 1),  # even output, one channel
  )
  def test_winograd_conv_valid_and_vjp_match_lax(self, b, h, w, cin, cout):
    self._check_winograd_conv_valid_and_vjp(jax.jit, b, h, w, cin, cout)

  @chex.variants(with_jit=True, without_jit=True)
  def test_winograd_conv_valid_and_vjp_match_lax_with_and_without_jit(self):
    # Op by op the tiles' shapes are the same as under jit, so one odd,
    # non-square shape runs eagerly too (about 8 s: every op compiles alone).
    self._check_winograd_conv_valid_and_vjp(self.variant, 2, 8, 5, 3, 2)

  @parameterized.product(
      native=(True, False), op=('matmul_conv_general_dilated', 'conv_bias_relu')
  )
  def test_bfloat16_computes_in_float32_without_bfloat16_instructions(self, native, op):
    # On a CPU without bfloat16 instructions the custom paths see float32
    # operands; the output and the gradients stay bfloat16 either way.
    x, k = (a.astype(jnp.bfloat16) for a in _inputs(2, 12, 12, 64, 8, (3, 3)))
    bias = jnp.zeros((8,), jnp.bfloat16)
    fn = {
        'matmul_conv_general_dilated': lambda x, k: conv.matmul_conv_general_dilated(
            x, k, (1, 1), 'VALID', dimension_numbers=_NHWC
        ),
        'conv_bias_relu': lambda x, k: conv.conv_bias_relu(x, k, bias),
    }[op]
    inner = {'matmul_conv_general_dilated': '_conv_valid', 'conv_bias_relu': '_conv_bias_relu'}[op]
    spy = mock.Mock(wraps=getattr(conv, inner))
    with (
        mock.patch.object(onednn, 'native_bfloat16', return_value=native),
        mock.patch.object(conv, inner, spy),
    ):
      y, pullback = jax.vjp(fn, x, k)
      grads = pullback(jnp.ones_like(y))
    want = jnp.bfloat16 if native else jnp.float32
    self.assertEqual([a.dtype for a in spy.call_args.args[:2]], [want, want])
    self.assertEqual([a.dtype for a in (y, *grads)], [jnp.bfloat16] * 3)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((2, 46, 46, 32, 64), (2, 9, 9, 128, 128))
  def test_bfloat16_winograd_errs_like_bfloat16_lax(self, b, h, w, cin, cout):
    # bfloat16 tiles, float32 transforms and accumulation: against float32
    # lax, its output and both gradients err by less than twice what lax's
    # own bfloat16 convolution does (measured 1.2-1.6x), and below 1e-2 of
    # the largest value.
    x, k = _inputs(b, h, w, cin, cout, (3, 3))
    g = _cotangent((b, h - 2, w - 2, cout))
    bf = lambda a: a.astype(jnp.bfloat16)
    lax_conv = lambda a, c: lax.conv_general_dilated(
        a, c, (1, 1), 'VALID', dimension_numbers=_NHWC
    )
    y, pullback = jax.vjp(lax_conv, x, k)
    want = (y, *pullback(g))
    y, pullback = jax.vjp(lax_conv, bf(x), bf(k))
    lax_bf16 = (y, *pullback(bf(g)))
    got = (
        self.variant(conv.winograd_conv_valid)(bf(x), bf(k)),
        *self.variant(conv.winograd_conv_valid_vjp)(bf(x), bf(k), bf(g)),
    )
    error = lambda a, ref: float(
        jnp.max(jnp.abs(a.astype(jnp.float32) - ref))
    )
    for name, a, baseline, ref in zip(('y', 'dx', 'dk'), got, lax_bf16, want):
      with self.subTest(name):
        self.assertEqual(a.dtype, jnp.bfloat16)
        self.assertLess(error(a, ref), 2 * error(baseline, ref))
        self.assertLess(error(a, ref), 1e-2 * float(jnp.max(jnp.abs(ref))))

  @parameterized.named_parameters(
      # (input taps B^T, cotangent A, kernel gradient G^T, outputs per tile)
      ('F23', conv._winograd_1d, conv._winograd_output_1d_t,
       conv._winograd_kernel_1d_t, 2),
      ('F43', conv._winograd43_1d, conv._winograd43_output_1d_t,
       conv._winograd43_kernel_1d_t, 4),
  )
  def test_winograd_1d_kernel_gradient_is_the_correlation(
      self, input_transform, output_transform_t, kernel_transform_t, m
  ):
    # What the Winograd kernel gradients rely on, along one axis: G^T [(A g)
    # * (B^T d)] over a tile of m + 2 input taps d and m output cotangents g
    # is their correlation, sum_i g_i d_{i+k} for the 3 kernel taps k.
    d = np.random.default_rng(0).normal(size=m + 2)
    g = np.random.default_rng(1).normal(size=m)
    products = np.array(output_transform_t(*g)) * np.array(input_transform(*d))
    want = [g @ d[k : k + m] for k in range(3)]
    np.testing.assert_allclose(
        kernel_transform_t(*products), want, rtol=1e-12, atol=1e-12
    )

  @parameterized.named_parameters(
      ('input', conv._winograd_1d, conv._winograd_1d_t, 4),
      ('kernel', conv._winograd_kernel_1d, conv._winograd_kernel_1d_t, 3),
  )
  def test_winograd_1d_transposes(self, transform, transform_t, size):
    # The backward pass's transforms are the forward's, transposed.
    def matrix(fn, n):
      return np.array([fn(*row) for row in np.eye(n)]).T

    out_size = len(transform(*np.zeros(size)))
    np.testing.assert_allclose(
        matrix(transform_t, out_size), matrix(transform, size).T, atol=1e-12
    )

  def test_winograd_conv_valid_needs_3x3(self):
    x, k = _inputs(1, 6, 6, 2, 3, (3, 2))
    with self.assertRaisesRegex(ValueError, '3x3 kernel'):
      conv.winograd_conv_valid(x, k)

  @parameterized.parameters(
      (((0, 0), (0, 0)),), (((1, 2), (0, 1)),), (((2, 2), (3, 0)),)
  )
  def test_explicit_padding_matches_lax_on_padded_input(self, padding):
    # Reference: lax on the zero-padded input. lax's own input gradient is
    # wrong for padding wider than kernel - 1 (((2, 2), (3, 0)) here).
    x, k = _inputs(2, 9, 8, 3, 4, (3, 2))
    padded = lambda a: jnp.pad(a, ((0, 0), *padding, (0, 0)))
    want = _vjp(
        lambda a, b, s, **kw: lax.conv_general_dilated(padded(a), b, s, **kw),
        x,
        k,
        padding='VALID',
        dimension_numbers=_NHWC,
    )
    got = _vjp(
        conv.matmul_conv_general_dilated,
        x,
        k,
        padding=padding,
        dimension_numbers=_NHWC,
    )
    chex.assert_trees_all_close(got, want, rtol=_TOL, atol=_TOL)
    self.assertTrue(
        _uses_custom_vjp(
            conv.matmul_conv_general_dilated,
            x,
            k,
            (1, 1),
            padding,
            dimension_numbers=_NHWC,
        )
    )

  def test_same_lower_padding_matches_lax(self):
    x, k = _inputs(2, 9, 8, 3, 4, (2, 2))
    kwargs = dict(padding='SAME_LOWER', dimension_numbers=_NHWC)
    want = _vjp(lax.conv_general_dilated, x, k, **kwargs)
    got = _vjp(conv.matmul_conv_general_dilated, x, k, **kwargs)
    chex.assert_trees_all_close(got, want, rtol=_TOL, atol=_TOL)

  def test_grad_of_jit_and_jit_of_grad_match_lax(self):
    x, k = _inputs(2, 20, 20, 16, 8, (3, 3))

    def loss(fn):
      # Divided by sqrt(outputs) so that gradients are of order one.
      return lambda a, b: jnp.sum(
          jnp.tanh(fn(a, b, (1, 1), 'VALID', dimension_numbers=_NHWC))
      ) / 72.0

    want = jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, k)
    fast = loss(conv.matmul_conv_general_dilated)
    chex.assert_trees_all_close(
        jax.grad(jax.jit(fast), (0, 1))(x, k), want, rtol=_TOL, atol=_TOL
    )
    chex.assert_trees_all_close(
        jax.jit(jax.grad(fast, (0, 1)))(x, k), want, rtol=_TOL, atol=_TOL
    )

  def test_second_order_gradient_raises(self):
    # custom_vjp functions are differentiable once in reverse mode only.
    x, k = _inputs(1, 6, 6, 2, 3, (3, 3))

    def f(a):
      return jnp.sum(
          conv.matmul_conv_general_dilated(
              a, k, (1, 1), 'VALID', dimension_numbers=_NHWC
          )
      )

    with self.assertRaises(TypeError):
      jax.jvp(jax.grad(f), (x,), (x,))

  def test_flax_conv_matches_lax(self):
    x, _ = _inputs(2, 12, 12, 3, 5, (3, 3))

    def apply(impl):
      layer = nn.Conv(
          5,
          (3, 3),
          padding='VALID',
          conv_general_dilated=conv.conv_general_dilated_for(impl),
      )
      params = layer.init(jax.random.PRNGKey(0), x)
      loss = lambda p, a: jnp.sum(jnp.sin(layer.apply(p, a)))
      return jax.jit(jax.value_and_grad(loss, (0, 1)))(params, x)

    chex.assert_trees_all_close(
        apply('matmul'), apply('lax'), rtol=_TOL, atol=_TOL
    )

  @parameterized.named_parameters(*_UNSUPPORTED_CONFIGS)
  def test_unsupported_config_falls_back_to_lax(self, overrides):
    _assert_falls_back_to_lax(
        conv.matmul_conv_general_dilated, *_inputs(2, 8, 8, 4, 4, (3, 3)),
        **overrides,
    )

  def test_feature_groups_fall_back_to_lax(self):
    x, k = _inputs(2, 8, 8, 4, 6, (3, 3))
    _assert_falls_back_to_lax(
        conv.matmul_conv_general_dilated, x, k[:, :, :2, :], padding='SAME',
        feature_group_count=2,
    )

  def test_mismatched_channels_raise_like_lax(self):
    x, k = _inputs(1, 6, 6, 2, 3, (3, 3))
    with self.assertRaisesRegex(ValueError, 'feature dimension'):
      conv.matmul_conv_general_dilated(
          x, k[:, :, :1], (1, 1), 'VALID', dimension_numbers=_NHWC
      )


# (batch, height, width, in channels, out channels, kernel): the study's first
# layer, odd sizes, and (more than one input channel) shapes left to lax.
_YNNPACK_SHAPES = (
    (2, 48, 48, 1, 32, (3, 3)),
    (3, 11, 7, 1, 6, (3, 2)),
    (2, 5, 5, 1, 2, (5, 4)),
    (1, 6, 9, 1, 3, (1, 1)),
    (2, 9, 9, 3, 4, (3, 3)),
    (2, 12, 12, 8, 5, (3, 3)),
)


def _conv_primitives(fn, x, k, *args, **kwargs) -> int:
  """How many convolutions ``fn(x, k, ...)`` traces to."""
  jaxpr = jax.make_jaxpr(lambda a, b: fn(a, b, *args, **kwargs))(x, k)
  return str(jaxpr).count('conv_general_dilated')


class YnnpackConvTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(
      shape=_YNNPACK_SHAPES, padding=('VALID', 'SAME', ((1, 2), (0, 1)))
  )
  def test_forward_and_gradients_match_lax(self, shape, padding):
    x, k = _inputs(*shape)
    kwargs = dict(padding=padding, dimension_numbers=_NHWC)
    want_y, want_grads = _vjp(lax.conv_general_dilated, x, k, **kwargs)
    got_y, got_grads = self.variant(
        lambda a, b: _vjp(conv.ynnpack_conv_general_dilated, a, b, **kwargs)
    )(x, k)
    chex.assert_shape(got_y, want_y.shape)
    chex.assert_trees_all_close(got_y, want_y, rtol=_TOL, atol=_TOL)
    chex.assert_trees_all_close(got_grads, want_grads, rtol=_TOL, atol=_TOL)

  @parameterized.parameters((1, 0), (2, 1), (3, 1), (32, 1))
  def test_only_single_channel_inputs_leave_lax(self, cin, want_convs):
    x, k = _inputs(2, 8, 8, cin, 4, (3, 3))
    got = _conv_primitives(
        conv.ynnpack_conv_general_dilated, x, k, (1, 1), 'VALID',
        dimension_numbers=_NHWC,
    )
    self.assertEqual(got, want_convs)

  @parameterized.named_parameters(*_UNSUPPORTED_CONFIGS)
  def test_unsupported_config_falls_back_to_lax(self, overrides):
    _assert_falls_back_to_lax(
        conv.ynnpack_conv_general_dilated, *_inputs(2, 8, 8, 1, 4, (3, 3)),
        **overrides,
    )

  def test_depthwise_single_channel_groups_fall_back_to_lax(self):
    # Kernels with one input channel per group: the image has two.
    x, k = _inputs(2, 8, 8, 2, 4, (3, 3))
    _assert_falls_back_to_lax(
        conv.ynnpack_conv_general_dilated, x, k[:, :, :1, :],
        feature_group_count=2,
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_errs_no_more_than_bfloat16_lax(self):
    # Float32 products and sums, rounded once to bfloat16 at the end.
    x, k = _inputs(2, 48, 48, 1, 32, (3, 3))
    bf = lambda a: a.astype(jnp.bfloat16)
    run = lambda fn, a, b: fn(a, b, (1, 1), 'VALID', dimension_numbers=_NHWC)
    want = run(lax.conv_general_dilated, x, k)
    baseline = run(lax.conv_general_dilated, bf(x), bf(k))
    got = self.variant(
        lambda a, b: run(conv.ynnpack_conv_general_dilated, a, b)
    )(bf(x), bf(k))
    self.assertEqual(got.dtype, jnp.bfloat16)
    error = lambda a: float(jnp.max(jnp.abs(a.astype(jnp.float32) - want)))
    self.assertLessEqual(error(got), 1.25 * error(baseline))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      # impl, input channels of the convolution before it, written as select
      ('ynnpack', 1, True),
      ('ynnpack', 3, False),
      ('lax', 1, False),
      ('matmul', 1, False),
      ('auto', 1, False),
  )
  def test_relu_for(self, impl, in_channels, select):
    relu = conv.relu_for(impl, in_channels)
    x = jnp.array(
        [-jnp.inf, -2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0, jnp.inf, jnp.nan]
    )
    jaxpr = str(jax.make_jaxpr(relu)(x))
    self.assertEqual('select_n' in jaxpr, select)
    self.assertEqual('max' in jaxpr, not select)
    got = self.variant(jax.vmap(jax.value_and_grad(relu)))(x)
    want = jax.vmap(jax.value_and_grad(nn.relu))(x)
    chex.assert_trees_all_equal(got, want)
    # assert_trees_all_equal takes -0.0 for 0.0; the bits tell them apart.
    chex.assert_trees_all_equal(
        jax.tree.map(lambda a: np.asarray(a).view(np.uint32), got),
        jax.tree.map(lambda a: np.asarray(a).view(np.uint32), want),
    )

  def test_relu_for_unknown_impl_raises(self):
    with self.assertRaisesRegex(ValueError, 'Unknown conv impl'):
      conv.relu_for('im2col', 1)


def _pool_inputs(shape, seed=0):
  """Values on a coarse grid (many ties) and ReLU zeros (4-way ties)."""
  x = np.round(fakes.normal(seed, shape) * 2) / 2
  return jnp.asarray(np.where(x < 0, 0.0, x))


class MaxPoolFastTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      ((2, 44, 44, 3), (2, 2)),  # the study's first pool, even
      ((2, 18, 18, 4), (2, 2)),
      ((2, 5, 5, 4), (2, 2)),  # odd: last row and column are dropped
      ((3, 9, 7, 2), (2, 2)),
      ((2, 9, 8, 3), (3, 2)),
      ((2, 6, 6, 1), (1, 1)),
      ((2, 7, 9), (2, 3)),  # unbatched HWC
  )
  def test_values_and_gradients_equal_flax_max_pool(self, shape, window):
    # Exact equality, ties included: the gradient goes to the first
    # (row-major) maximum of each window, as select_and_scatter's does.
    x = _pool_inputs(shape)
    want_y, want_pullback = jax.vjp(
        lambda a: nn.max_pool(a, window, strides=window), x
    )
    g = jnp.asarray(fakes.normal(1, want_y.shape))
    got_y, got_dx = self.variant(
        lambda a, b: (
            lambda y_vjp: (y_vjp[0], y_vjp[1](b)[0])
        )(jax.vjp(lambda c: conv.max_pool_fast(c, window), a))
    )(x, g)
    chex.assert_trees_all_equal(got_y, want_y)
    chex.assert_trees_all_equal(got_dx, want_pullback(g)[0])

  def test_negative_and_infinite_values(self):
    x = jnp.array([[[[-3.0], [-jnp.inf]], [[-jnp.inf], [-3.0]]]])
    want_y, want_pullback = jax.vjp(
        lambda a: nn.max_pool(a, (2, 2), strides=(2, 2)), x
    )
    got_y, got_pullback = jax.vjp(lambda a: conv.max_pool_fast(a, (2, 2)), x)
    g = jnp.ones_like(want_y)
    chex.assert_trees_all_equal(got_y, want_y)
    chex.assert_trees_all_equal(got_pullback(g), want_pullback(g))

  @parameterized.parameters(
      ('lax', 'cpu', False),
      ('ynnpack', 'cpu', False),
      ('matmul', 'cpu', True),
      ('matmul', 'gpu', True),
      ('auto', 'cpu', True),
      ('auto', 'gpu', False),
      ('auto', 'tpu', False),
  )
  def test_max_pool_for_picks_by_impl_and_backend(self, impl, backend, fast):
    x = _pool_inputs((2, 6, 6, 3))
    pool = conv.max_pool_for(impl, (2, 2))
    with mock.patch.object(jax, 'default_backend', return_value=backend):
      jaxpr = str(jax.make_jaxpr(pool)(x))
    self.assertEqual('custom_vjp_call' in jaxpr, fast)
    self.assertEqual('reduce_window_max' in jaxpr, not fast)
    chex.assert_trees_all_equal(
        pool(x), nn.max_pool(x, (2, 2), strides=(2, 2))
    )

  def test_max_pool_for_unknown_impl_raises(self):
    with self.assertRaisesRegex(ValueError, 'Unknown conv impl'):
      conv.max_pool_for('im2col', (2, 2))


class ConvGeneralDilatedForTest(parameterized.TestCase):

  def test_lax_matmul_and_ynnpack(self):
    for_ = conv.conv_general_dilated_for
    self.assertIs(for_('lax'), lax.conv_general_dilated)
    self.assertIs(for_('matmul'), conv.matmul_conv_general_dilated)
    self.assertIs(for_('ynnpack'), conv.ynnpack_conv_general_dilated)

  @parameterized.parameters(('cpu', True), ('gpu', False), ('tpu', False))
  def test_auto_picks_by_backend(self, backend, want_matmul):
    auto = conv.conv_general_dilated_for('auto')
    with mock.patch.object(jax, 'default_backend', return_value=backend):
      got = _uses_custom_vjp(
          auto, *_inputs(1, 6, 6, 2, 3, (3, 3)), (1, 1), 'VALID',
          dimension_numbers=_NHWC,
      )
    self.assertEqual(got, want_matmul)

  @parameterized.parameters(
      # impl, backend, train, batch_size, CPU has AVX-512, resolved
      ('lax', 'cpu', True, 64, True, 'lax'),
      ('lax', 'cpu', False, 512, True, 'lax'),
      ('matmul', 'cpu', False, 512, True, 'matmul'),
      ('matmul', 'gpu', True, 64, True, 'matmul'),
      ('ynnpack', 'cpu', True, 64, False, 'ynnpack'),
      ('ynnpack', 'gpu', False, 512, True, 'ynnpack'),
      ('auto', 'cpu', True, 64, True, 'matmul'),
      ('auto', 'cpu', True, 512, True, 'matmul'),
      ('auto', 'cpu', False, 127, True, 'matmul'),
      ('auto', 'cpu', False, 128, True, 'ynnpack'),
      ('auto', 'cpu', False, 128, False, 'matmul'),
      ('auto', 'cpu', False, 1024, False, 'matmul'),
      ('auto', 'gpu', True, 64, True, 'lax'),
      ('auto', 'tpu', False, 8, True, 'lax'),
      ('auto', 'tpu', False, 512, False, 'lax'),
  )
  def test_resolve_impl(self, impl, backend, train, batch_size, avx512, want):
    with (
        mock.patch.object(jax, 'default_backend', return_value=backend),
        mock.patch.object(conv, '_ynnpack_inference_cpu', return_value=avx512),
    ):
      got = conv.resolve_impl(impl, train=train, batch_size=batch_size)
    self.assertEqual(got, want)

  @parameterized.named_parameters(
      ('zen4', 'x86_64', 'fpu avx2 avx512f avx512bw', True),
      ('zen3', 'x86_64', 'fpu avx2 fma', False),
      ('arm', 'aarch64', 'fp asimd avx512f', False),
      ('no_cpuinfo', 'x86_64', None, False),
  )
  def test_ynnpack_inference_cpu(self, machine, flags, want):
    words = frozenset(flags.split()) if flags else frozenset()
    conv._ynnpack_inference_cpu.cache_clear()
    try:
      with (
          mock.patch.object(conv.platform, 'machine', return_value=machine),
          mock.patch.object(onednn, 'cpu_flags', return_value=words),
      ):
        self.assertEqual(conv._ynnpack_inference_cpu(), want)
    finally:
      conv._ynnpack_inference_cpu.cache_clear()

  def test_resolve_impl_unknown_raises(self):
    with self.assertRaisesRegex(ValueError, 'Unknown conv impl'):
      conv.resolve_impl('im2col', train=False, batch_size=256)

  @parameterized.parameters('', 'Lax', 'im2col', 'cuda')
  def test_unknown_impl_raises(self, impl):
    with self.assertRaisesRegex(ValueError, 'Unknown conv impl'):
      conv.conv_general_dilated_for(impl)


if __name__ == '__main__':
  absltest.main()
