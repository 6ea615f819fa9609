"""Tests for agejax.onednn: XLA:CPU's oneDNN kernels equal lax's results."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from agejax import config as config_lib
from agejax import onednn
from agejax import steps
from tests import fakes

_TOL = 1e-5
_NHWC = ('NHWC', 'HWIO', 'NHWC')
# Where agejax uses oneDNN (`onednn.available`): CI runs here, so there the
# tests below must find it available, or they would test nothing.
_TESTED_HERE = (
    platform.machine().lower() in ('x86_64', 'amd64')
    and jax.lib.__version__ in onednn._TESTED_JAXLIB
    and onednn._avx512_core()
)
_SKIP_REASON = 'oneDNN is used on x86-64 CPUs with AVX-512 and the tested jaxlib only'
# bfloat16 goes to oneDNN where the CPU has bfloat16 instructions.
_NATIVE_BFLOAT16 = _TESTED_HERE and onednn.native_bfloat16()
# /proc/cpuinfo's flags line of a CPU with oneDNN's avx512_core.
_AVX512_CORE = 'fpu avx avx2 avx512f avx512cd avx512bw avx512dq avx512vl'


def _cpuinfo(test: absltest.TestCase, flags: str | None) -> str:
  """A cpuinfo file with ``flags`` (none at all for None), removed after ``test``."""
  tmp = tempfile.TemporaryDirectory()
  test.addCleanup(tmp.cleanup)
  path = os.path.join(tmp.name, 'cpuinfo')
  if flags is not None:
    with open(path, 'w', encoding='utf-8') as f:
      f.write(f'processor\t: 0\nflags\t\t: {flags}\n')
  return path


@contextlib.contextmanager
def _fresh_availability():
  """`onednn.available` asked anew inside the block, and again after it.

  JAX's caches are cleared too, so that the probe is traced again under any
  patch the block applies.
  """
  onednn.available.cache_clear()
  jax.clear_caches()
  try:
    yield
  finally:
    onednn.available.cache_clear()
    jax.clear_caches()


def _normal(seed, shape, dtype=jnp.float32):
  return jnp.asarray(fakes.normal(seed, shape), dtype)


def _onednn_calls(fn, *args, compiled: bool = True) -> tuple[int, int]:
  """(convolution, matmul) custom calls in ``fn``'s compiled or lowered program."""
  lowered = jax.jit(fn).lower(*args)
  if compiled:  # HLO: custom_call_target="__onednn$..."
    text, call = lowered.compile().as_text(), '"__onednn${}"'
  else:  # StableHLO: stablehlo.custom_call @__onednn$...(
    text, call = lowered.as_text(), '@__onednn${}('
  return text.count(call.format('convolution')), text.count(call.format('matmul'))


@absltest.skipUnless(_TESTED_HERE, _SKIP_REASON)
class AvailabilityTest(parameterized.TestCase):

  def test_available_where_tested(self):
    with _fresh_availability():
      self.assertTrue(onednn.available())

  def test_available_when_first_asked_while_tracing(self):
    # The probe runs on its own even when `agejax.conv` asks inside a jit
    # trace (it once returned the trace's abstract value there, i.e. False).
    seen = []
    with _fresh_availability():
      jax.jit(lambda x: seen.append(onednn.available()) or x)(1.0)
    self.assertEqual(seen, [True])

  @parameterized.named_parameters(
      ('arm', mock.patch.object(platform, 'machine', return_value='aarch64')),
      ('untested_jaxlib', mock.patch.object(jax.lib, '__version__', '0.0.1')),
      ('gpu_default', mock.patch.object(jax, 'default_backend', return_value='gpu')),
  )
  def test_unavailable_outside_the_tested_setting(self, patch):
    with _fresh_availability(), patch:
      self.assertFalse(onednn.available())
      self.assertFalse(onednn.enabled_for(jnp.float32))

  @parameterized.named_parameters(
      ('avx2', 'fpu avx avx2 fma', False),
      ('avx512f_alone', 'fpu avx avx2 avx512f', False),
      ('avx512_core', _AVX512_CORE, True),
      ('unreadable', None, False),
  )
  def test_needs_avx512(self, flags, want):
    # On AVX2 oneDNN's float32 matmul deadlocks under XLA (module docstring).
    with _fresh_availability(), mock.patch.object(onednn, '_CPUINFO', _cpuinfo(self, flags)):
      self.assertEqual(onednn.available(), want)
      self.assertEqual(onednn.enabled_for(jnp.float32), want)

  @parameterized.named_parameters(
      ('onednn_avx2', 'ONEDNN_MAX_CPU_ISA', 'AVX2', False),
      ('onednn_avx2_vnni', 'ONEDNN_MAX_CPU_ISA', 'avx2_vnni', False),
      ('dnnl_sse41', 'DNNL_MAX_CPU_ISA', 'SSE41', False),
      ('onednn_avx512_core', 'ONEDNN_MAX_CPU_ISA', 'AVX512_CORE', True),
      ('onednn_avx512_core_bf16', 'ONEDNN_MAX_CPU_ISA', 'avx512_core_bf16', True),
      ('dnnl_all', 'DNNL_MAX_CPU_ISA', 'ALL', True),
      ('empty', 'ONEDNN_MAX_CPU_ISA', '', True),
  )
  def test_max_isa_below_avx512_means_unavailable(self, variable, cap, want):
    with (
        _fresh_availability(),
        mock.patch.object(onednn, '_CPUINFO', _cpuinfo(self, _AVX512_CORE)),
        mock.patch.dict(os.environ, {variable: cap}),
    ):
      self.assertEqual(onednn.available(), want)

  def test_probe_rejects_wrong_results(self):
    # Padding given bottom-for-top: a valid oneDNN problem with other values.
    def swapped(padding):
      config = json.loads(real_config(padding))
      window = config['onednn_conv_config']['window']
      window['pad_left'], window['pad_right'] = window['pad_right'], window['pad_left']
      return json.dumps(config)

    real_config = onednn._conv_config
    with _fresh_availability(), mock.patch.object(onednn, '_conv_config', swapped):
      self.assertFalse(onednn.available())

  def test_probe_that_fails_to_compile_means_unavailable(self):
    def unknown_target(target, *args):
      return real_call('__agejax_no_such_target', *args)

    real_call = onednn._call
    with _fresh_availability(), mock.patch.object(onednn, '_call', unknown_target):
      self.assertFalse(onednn.available())

  @parameterized.parameters(
      (jnp.float32, True),
      (jnp.bfloat16, _NATIVE_BFLOAT16),
      (jnp.float16, False),
      (jnp.int32, False),
  )
  def test_enabled_for(self, dtype, want):
    self.assertEqual(onednn.enabled_for(dtype), want)

  @parameterized.named_parameters(
      ('amx', f'{_AVX512_CORE} amx_bf16 amx_tile', True),
      ('avx512_bf16', f'{_AVX512_CORE} avx512_bf16', True),
      ('avx512_only', _AVX512_CORE, False),
  )
  def test_bfloat16_needs_native_instructions(self, flags, want):
    onednn.native_bfloat16.cache_clear()
    try:
      with (
          _fresh_availability(),
          mock.patch.object(onednn, '_CPUINFO', _cpuinfo(self, flags)),
      ):
        self.assertEqual(onednn.native_bfloat16(), want)
        self.assertEqual(onednn.enabled_for(jnp.bfloat16), want)
        self.assertTrue(onednn.enabled_for(jnp.float32))
    finally:
      onednn.native_bfloat16.cache_clear()


@absltest.skipUnless(_TESTED_HERE, _SKIP_REASON)
class ConvTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      # (x shape, kernel shape, padding)
      ((2, 48, 48, 1), (3, 3, 1, 32), ((0, 0), (0, 0))),
      ((2, 46, 46, 32), (3, 3, 32, 64), ((0, 0), (0, 0))),
      ((2, 44, 44, 64), (3, 3, 64, 32), ((2, 2), (2, 2))),  # an input gradient
      ((2, 7, 7, 128), (3, 3, 128, 256), ((0, 0), (0, 0))),
      ((3, 11, 7, 5, ), (3, 2, 5, 6), ((2, 1), (0, 3))),
      ((1, 6, 9, 4), (1, 1, 4, 3), ((0, 0), (1, 0))),
      ((2, 5, 5, 3), (5, 4, 3, 2), ((4, 4), (3, 3))),
  )
  def test_matches_lax(self, x_shape, w_shape, padding):
    x, w = _normal(0, x_shape), _normal(1, w_shape) / np.sqrt(np.prod(w_shape[:3]))
    want = lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC)
    got = self.variant(onednn.conv, static_argnums=2)(x, w, padding)
    chex.assert_shape(got, want.shape)
    chex.assert_trees_all_close(got, want, rtol=_TOL, atol=_TOL)
    self.assertEqual(_onednn_calls(lambda a, b: onednn.conv(a, b, padding), x, w), (1, 0))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      # (x shape, kernel shape, padding, relu)
      ((2, 46, 46, 32), (3, 3, 32, 64), ((0, 0), (0, 0)), True),
      ((2, 7, 7, 128), (3, 3, 128, 256), ((0, 0), (0, 0)), False),
      ((3, 11, 7, 5), (3, 2, 5, 6), ((2, 1), (0, 3)), True),
  )
  def test_bias_and_relu_post_ops_match_lax(self, x_shape, w_shape, padding, relu):
    x, w = _normal(0, x_shape), _normal(1, w_shape) / np.sqrt(np.prod(w_shape[:3]))
    bias = _normal(2, w_shape[3:])
    want = lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC) + bias
    if relu:
      want = jnp.maximum(want, 0)
    fused = lambda a, b, c: onednn.conv(a, b, padding, bias=c, relu=relu)
    got = self.variant(fused)(x, w, bias)
    chex.assert_trees_all_close(got, want, rtol=_TOL, atol=_TOL)
    self.assertEqual(_onednn_calls(fused, x, w, bias), (1, 0))

  @parameterized.parameters(((4,), jnp.float32), ((5,), jnp.bfloat16), ((1, 5), jnp.float32))
  def test_mismatched_bias_raises(self, shape, dtype):
    with self.assertRaisesRegex(ValueError, r'bias must be float32\[5\]'):
      onednn.conv(jnp.zeros((2, 8, 8, 3)), jnp.zeros((3, 3, 3, 5)), bias=jnp.zeros(shape, dtype))

  @parameterized.parameters(
      ((2, 8, 8, 3), (3, 3, 4, 5), jnp.float32),
      ((2, 8, 8, 3), (3, 3, 3, 5), jnp.bfloat16),
  )
  def test_mismatched_operands_raise(self, x_shape, w_shape, w_dtype):
    with self.assertRaisesRegex(ValueError, 'channels and dtypes must match'):
      onednn.conv(jnp.zeros(x_shape), jnp.zeros(w_shape, w_dtype))

  def test_negative_padding_raises(self):
    with self.assertRaisesRegex(ValueError, 'must be non-negative'):
      onednn.conv(jnp.zeros((2, 8, 8, 3)), jnp.zeros((3, 3, 3, 5)), ((0, 0), (-1, 0)))


# (a shape, b shape, dimension numbers, preferred element type, dtype,
#  oneDNN's matmul expected): the products agejax.conv computes, each
#  transpose, batch dimensions, then what must stay on lax.dot_general.
_DOTS = (
    ('nn', (6, 5), (5, 4), (((1,), (0,)), ((), ())), None, jnp.float32, True),
    ('tn', (5, 6), (5, 4), (((0,), (0,)), ((), ())), jnp.float32, jnp.float32, True),
    ('nt', (6, 5), (4, 5), (((1,), (1,)), ((), ())), None, jnp.float32, True),
    ('tt', (5, 6), (4, 5), (((0,), (1,)), ((), ())), None, jnp.float32, True),
    ('batched_nn', (3, 6, 5), (3, 5, 4), (((2,), (1,)), ((0,), (0,))), None, jnp.float32, True),
    ('batched_tn', (16, 7, 5), (16, 7, 4), (((1,), (1,)), ((0,), (0,))), None, jnp.float32, True),
    ('batched_nt', (16, 7, 5), (16, 4, 5), (((2,), (2,)), ((0,), (0,))), None, jnp.float32, True),
    ('two_batch_dims', (2, 3, 6, 5), (2, 3, 5, 4), (((3,), (2,)), ((0, 1), (0, 1))), None,
     jnp.float32, True),
    ('bfloat16_to_float32', (6, 5), (5, 4), (((1,), (0,)), ((), ())), jnp.float32, jnp.bfloat16,
     _NATIVE_BFLOAT16),
    ('batched_bfloat16', (16, 7, 5), (16, 7, 4), (((1,), (1,)), ((0,), (0,))), None,
     jnp.bfloat16, _NATIVE_BFLOAT16),
    ('float16', (6, 5), (5, 4), (((1,), (0,)), ((), ())), None, jnp.float16, False),
    ('narrower_result', (6, 5), (5, 4), (((1,), (0,)), ((), ())), jnp.bfloat16, jnp.float32,
     False),
    ('two_contracted', (3, 6, 5), (3, 5, 4), (((0, 2), (0, 1)), ((), ())), None, jnp.float32,
     False),
    ('trailing_batch', (6, 5, 3), (5, 4, 3), (((1,), (0,)), ((2,), (2,))), None, jnp.float32,
     False),
    ('matrix_vector', (6, 5), (5,), (((1,), (0,)), ((), ())), None, jnp.float32, False),
    ('outer_product', (6, 1), (1, 4), (((), ()), ((), ())), None, jnp.float32, False),
)


@absltest.skipUnless(_TESTED_HERE, _SKIP_REASON)
class DotGeneralTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_DOTS)
  def test_matches_lax(self, a_shape, b_shape, dims, preferred, dtype, want_onednn):
    a, b = _normal(2, a_shape, dtype), _normal(3, b_shape, dtype)
    fn = lambda x, y: onednn.dot_general(x, y, dims, preferred_element_type=preferred)
    want = lax.dot_general(a, b, dims, preferred_element_type=preferred)
    got = self.variant(fn)(a, b)
    self.assertEqual(got.dtype, want.dtype)
    chex.assert_shape(got, want.shape)
    tol = _TOL if dtype == jnp.float32 else 1e-2
    chex.assert_trees_all_close(got, want, rtol=tol, atol=tol)
    self.assertEqual(_onednn_calls(fn, a, b), (0, int(want_onednn)))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*(case for case in _DOTS if case[-1]))
  def test_gradients_match_lax(self, a_shape, b_shape, dims, preferred, dtype, want_onednn):
    del want_onednn
    a, b = _normal(2, a_shape, dtype), _normal(3, b_shape, dtype)

    def loss(dot, x, y):
      out = dot(x, y, dims, preferred_element_type=preferred)
      return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    want = jax.grad(lambda x, y: loss(lax.dot_general, x, y), (0, 1))(a, b)
    got = self.variant(jax.grad(lambda x, y: loss(onednn.dot_general, x, y), (0, 1)))(a, b)
    chex.assert_trees_all_close(got, want, rtol=_TOL, atol=_TOL)

  def test_stays_on_lax_without_onednn(self):
    a, b = _normal(2, (6, 5)), _normal(3, (5, 4))
    fn = lambda x, y: onednn.dot_general(x, y, (((1,), (0,)), ((), ())))
    with mock.patch.object(onednn, '_DTYPES', ()):
      self.assertEqual(_onednn_calls(fn, a, b), (0, 0))


@absltest.skipUnless(_TESTED_HERE, _SKIP_REASON)
class StudyNetworkTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # Forwards without Winograd (48x48x1, 46x46x32, 7x7x128) and the
      # 46x46x32 input gradient; the im2col kernel gradients (48x48x1, and
      # one in the 46x46x32 chunk loop) and Winograd's products (3 per layer
      # with its forward, 2 for 7x7x128's backward).
      ('float32', 'float32', (4, 13)),
      # No Winograd: every forward, every input gradient but the first
      # layer's, and every layer's im2col kernel gradient (at batch 8 the
      # 46x46x32 and 22x22x64 ones in chunk loops).
      ('bfloat16', 'bfloat16', (11, 6) if _NATIVE_BFLOAT16 else (0, 0)),
  )
  def test_training_step_runs_its_convolutions_and_products_on_onednn(self, dtype, want):
    model_config = config_lib.ModelConfig(dtype=dtype)
    stage = config_lib.StageConfig(name='test', epochs=1, learning_rate=1e-3)
    variables = steps.init_variables(jax.random.PRNGKey(0), model_config.build(), (48, 48, 1))
    state = steps.create_train_state(model_config, stage, variables)
    batch = {
        'image': jnp.zeros((8, 48, 48, 1), jnp.uint8),
        'label': jnp.zeros((8,), jnp.int32),
        'mask': jnp.ones((8,), bool),
    }
    step = lambda s, b, k: steps.train_step(s, b, k)
    jax.clear_caches()
    self.assertEqual(_onednn_calls(step, state, batch, jax.random.PRNGKey(1)), want)
    with mock.patch.object(onednn, '_DTYPES', ()):
      jax.clear_caches()
      # agejax alone emits these calls (XLA:CPU's own oneDNN rewrites are
      # off by default), so the lowered program tells, without a compile.
      self.assertEqual(
          _onednn_calls(step, state, batch, jax.random.PRNGKey(1), compiled=False), (0, 0)
      )
    jax.clear_caches()


if __name__ == '__main__':
  absltest.main()
