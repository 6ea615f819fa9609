"""The CPU-fast CNN (conv_impl='matmul') computes what the lax one does.

`agejax.conv` replaces, on CPU, the convolution's forward pass and gradients
and the 2x2 max-pooling's gradient by faster formulations. Each is checked
op by op in tests/test_conv.py; here the whole study network must agree with
``conv_impl='lax'`` (plain ``lax.conv`` and ``nn.max_pool``) to 1e-5.

Why BatchNorm runs on its running statistics in the convolution comparison:
with batch statistics the network's gradients are ill-conditioned at float32
rounding level. Multiplying the input images by (1 + 1e-7) changes lax's own
gradients by up to 3 % (block3/conv1, batch 24), exactly as much as switching
the convolution does, so an elementwise 1e-5 comparison there would test
float32, not the implementation. The max-pooling change is exact, so it is
compared with training-mode BatchNorm as well (at batch 24).

Why the convolution comparison pools by averaging in both networks: max
pooling sends each window's gradient to its largest input, and every batch
tried has windows whose two largest inputs differ by less than float32
rounding (relative gaps down to 5e-8 at batches 10-26, 8e-7 at batch 2).
Two convolutions that round differently can then route a window's gradient
to different inputs: with oneDNN's first convolution (outputs within 2.4e-7
of lax's) 2 of the 3.2 million cotangent elements at the 46x46x32 layer's
output moved, which changed that layer's kernel gradient by 4.6e-3 of its
largest value (docs/performance_log.md, session 14). The pooling's own
gradient is exact and tested in tests/test_conv.py and below.
"""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from agejax import conv
from agejax import model
from agejax import onednn

_TOL = 1e-5
_ALL_BN = tuple(f'block{b}/bn{c}' for b in (1, 2, 3) for c in (1, 2)) + tuple(
    f'head/bn{d}' for d in (1, 2, 3)
)


def _batch(batch: int) -> tuple[jax.Array, jax.Array]:
  """Images in [0, 1) and age labels, drawn on the host.

  Not with jax.random, which would compile a program for each batch size.
  """
  rng = np.random.default_rng(1)
  images = rng.random((batch, 48, 48, 1), np.float32)
  return jnp.asarray(images), jnp.asarray(rng.integers(0, 100, batch, np.int32))


def _average_pool_for(impl: str, window: tuple[int, int]) -> conv.PoolFn:
  """2x2 average pooling whatever ``impl``: no window routes the gradient."""
  del impl
  return lambda x: nn.avg_pool(x, window, strides=window)


@functools.cache
def _variables() -> dict[str, jax.Array]:
  """The age network's initial variables, whatever its implementation or dtype.

  Initialized once: the parameters (float32) and their initializers do not
  depend on ``conv_impl``, ``dtype``, ``frozen_bn`` or the batch size.
  """
  net = model.age_model(conv_impl='lax')
  return jax.jit(lambda x: net.init(jax.random.PRNGKey(0), x, train=False))(
      jnp.zeros((1, 48, 48, 1))
  )


def _step(net: model.CNN, images: jax.Array, labels: jax.Array):
  """Loss, logits, new BatchNorm statistics and parameter gradients."""
  variables = _variables()

  def loss_fn(params):
    logits, updates = net.apply(
        {'params': params, 'batch_stats': variables['batch_stats']},
        images,
        train=True,
        rngs={'dropout': jax.random.PRNGKey(3)},
        mutable=['batch_stats'],
    )
    logp = jax.nn.log_softmax(logits)
    loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
    return loss, (logits, updates['batch_stats'])

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      variables['params']
  )


class CnnSpeedEquivalenceTest(parameterized.TestCase):

  @parameterized.parameters(2, 26)
  def test_matmul_training_step_equals_lax(self, batch):
    # Winograd both ways from 64 input channels; the 46x46x32 layer's kernel
    # gradient as one im2col product at batch 2, in chunks of 4 images (and
    # 2 left over) at batch 26; oneDNN's kernels where `agejax.onednn` is
    # available, and XLA's own as on CPUs without AVX-512 (the lax network
    # uses neither). Dropout is on; BatchNorm uses its running statistics and
    # both networks pool by averaging (see module docstring).
    images, labels = _batch(batch)
    with mock.patch.object(conv, 'max_pool_for', _average_pool_for):
      want = _step(
          model.age_model(conv_impl='lax', frozen_bn=_ALL_BN), images, labels
      )
      no_onednn = mock.patch.object(onednn, 'available', return_value=False)
      for use_onednn in (True, False):
        with (
            self.subTest(use_onednn=use_onednn),
            contextlib.nullcontext() if use_onednn else no_onednn,
        ):
          got = _step(
              model.age_model(conv_impl='matmul', frozen_bn=_ALL_BN),
              images,
              labels,
          )
          chex.assert_trees_all_close(got, want, rtol=_TOL, atol=_TOL)

  def test_ynnpack_training_step_equals_lax(self):
    # The first convolution as shifted products, its ReLU as a select; the
    # rest is lax. Meant for inference, but it trains the same too.
    images, labels = _batch(4)
    want = _step(
        model.age_model(conv_impl='lax', frozen_bn=_ALL_BN), images, labels
    )
    got = _step(
        model.age_model(conv_impl='ynnpack', frozen_bn=_ALL_BN), images, labels
    )
    chex.assert_trees_all_close(got, want, rtol=_TOL, atol=_TOL)

  def test_bfloat16_matmul_training_step_errs_like_bfloat16_lax(self):
    # In bfloat16 the matmul path runs oneDNN's bfloat16 convolutions, or
    # Winograd with bfloat16 tiles on the layers with at least 64 input
    # channels, on CPUs with bfloat16 instructions, and computes in float32
    # elsewhere. Against the float32 lax step, each gradient's error (L2) is
    # at most twice that of the bfloat16 lax step (measured: up to 1.64x on
    # an Intel Xeon, both ~25-30 % of the gradient, bfloat16 rounding through
    # the network; 1.18x computed in float32 on a Zen 3, where bfloat16
    # Winograd tiles erred up to 31x as much: docs/performance_log.md,
    # session 27).
    images, labels = _batch(8)
    (_, (want_logits, _)), want = _step(
        model.age_model(conv_impl='lax', frozen_bn=_ALL_BN), images, labels
    )
    errors = {}
    for impl in ('lax', 'matmul'):
      (_, (logits, _)), grads = _step(
          model.age_model(
              conv_impl=impl, frozen_bn=_ALL_BN, dtype=jnp.bfloat16
          ),
          images,
          labels,
      )
      chex.assert_trees_all_equal_dtypes(grads, want)  # float32 parameters
      errors[impl] = jax.tree.map(
          lambda a, b: float(jnp.linalg.norm((a - b).ravel())), grads, want
      )
      errors[impl]['logits'] = float(jnp.max(jnp.abs(logits - want_logits)))
    for path, matmul_error in jax.tree_util.tree_leaves_with_path(errors['matmul']):
      lax_error = errors['lax']
      for key in path:
        lax_error = lax_error[key.key]
      with self.subTest(jax.tree_util.keystr(path)):
        self.assertLessEqual(matmul_error, 2 * lax_error)

  def test_fast_max_pool_training_step_equals_flax_max_pool(self):
    # Training-mode BatchNorm, lax convolutions: only the pooling differs.
    # (Not at batch 2: there, batch statistics over two images amplify the
    # last-bit differences of XLA fusing the two programs differently to
    # ~1e-4 in the logits although the pooling's values are identical.)
    images, labels = _batch(24)
    net = model.age_model(conv_impl='lax')
    want = _step(net, images, labels)
    max_pool_for = conv.max_pool_for
    fast = lambda impl, window: max_pool_for('matmul', window)
    with mock.patch.object(conv, 'max_pool_for', fast):
      got = _step(net, images, labels)
    chex.assert_trees_all_close(got, want, rtol=_TOL, atol=_TOL)

  def test_fused_relu_batch_norm_training_step_equals_flax_layers(self):
    # Training-mode BatchNorm under 'matmul': ReLU, BatchNorm and each
    # block's max-pooling run as agejax.relu_batch_norm; against flax's
    # nn.relu, nn.BatchNorm and max-pooling with the same convolutions.
    images, labels = _batch(24)
    net = model.age_model(conv_impl='matmul')
    jaxpr = str(
        jax.make_jaxpr(
            lambda v, x: net.apply(
                v,
                x,
                train=True,
                rngs={'dropout': jax.random.PRNGKey(3)},
                mutable=['batch_stats'],
            )
        )(_variables(), images)
    )
    self.assertEqual(jaxpr.count('name=relu_batch_norm'), 9)  # 6 conv + 3 dense
    got = _step(net, images, labels)
    with mock.patch.object(model, '_FUSED_NORM_IMPLS', ()):
      want = _step(net, images, labels)
    chex.assert_trees_all_close(got, want, rtol=_TOL, atol=_TOL)

  def test_matmul_eval_logits_equal_lax(self):
    images, _ = _batch(24)
    logits = {}
    for impl in ('lax', 'matmul'):
      net = model.age_model(conv_impl=impl)
      logits[impl] = jax.jit(lambda v, x: net.apply(v, x, train=False))(
          _variables(), images
      )
    chex.assert_trees_all_close(
        logits['matmul'], logits['lax'], rtol=_TOL, atol=_TOL
    )

  @parameterized.parameters((24, True, True), (128, True, False), (128, False, True))
  def test_auto_eval_resolves_by_batch_and_equals_lax(self, batch, avx512, matmul):
    # On CPU, 'auto' inference takes the matmul path below batch 128 and,
    # on CPUs with AVX-512, 'ynnpack' (lax convolutions in one fused YNNPACK
    # graph, the first as shifted products) from 128 up; values agree
    # either way.
    images, _ = _batch(batch)
    net = model.age_model(conv_impl='auto')
    variables = _variables()
    apply = lambda v, x: net.apply(v, x, train=False)
    with mock.patch.object(conv, '_ynnpack_inference_cpu', return_value=avx512):
      jaxpr = str(jax.make_jaxpr(apply)(variables, images))
      got = jax.jit(apply)(variables, images)
    self.assertEqual('custom_vjp_call' in jaxpr, matmul)
    if not matmul:
      self.assertEqual(jaxpr.count('conv_general_dilated'), 5)
    want = jax.jit(
        lambda v, x: model.age_model(conv_impl='lax').apply(v, x, train=False)
    )(variables, images)
    chex.assert_trees_all_close(got, want, rtol=_TOL, atol=_TOL)


if __name__ == '__main__':
  absltest.main()
