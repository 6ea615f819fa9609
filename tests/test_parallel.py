"""Data-parallel training (and prediction) over 8 (simulated CPU) devices equals 1 device.

XLA fixes the number of host devices when JAX starts, so the comparison runs
in a subprocess started with ``--xla_force_host_platform_device_count=8``.
"""

import os
import subprocess
import sys
import textwrap
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from agejax import parallel

_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from agejax import augment, batching, config, evaluate, parallel, steps, synthetic
    assert jax.device_count() == 8, jax.devices()
    model = config.ModelConfig(
        num_classes=100, conv_filters=((4, 4), (8, 8), (8, 8)),
        dense_units=(16, 16), bn_momentum=0.9)
    stage = config.StageConfig('s', 1, 1e-3, freeze='paper')
    data = synthetic.make_age_splits(seed=0, n_train=64, n_val=0, n_test=0)['train']
    step_config = config.StepConfig(augment=augment.AugmentConfig.study())

    def run(mesh, mode):
      variables = steps.init_variables(jax.random.key(0), model.build(), model.input_shape)
      state = parallel.replicate(steps.create_train_state(model, stage, variables), mesh)
      key = jax.random.key(1)
      if mode == 'scan':
        images = parallel.replicate(data['image'], mesh)
        labels = parallel.replicate(data['label'], mesh)
        for epoch in range(2):
          state, _ = steps.train_epoch(
              state, images, labels, jax.random.fold_in(key, epoch), batch_size=16,
              config=step_config, batch_sharding=parallel.batch_sharding(mesh))
      else:
        for epoch in range(2):
          perm_key, step_key = steps.epoch_keys(jax.random.fold_in(key, epoch))
          idx = np.asarray(steps.epoch_indices(perm_key, 64, 16))
          for i, batch in enumerate(batching.train_batches(data, idx)):
            state, _ = steps.train_step(
                state, parallel.shard_batch(batch, mesh),
                jax.random.fold_in(step_key, i), config=step_config)
      sums = steps.eval_step(state, parallel.shard_batch(
          next(batching.eval_batches(data, 64)), mesh))
      # 60 faces in batches of 16: the last batch is padded.
      preds = evaluate.predict(
          state, {k: v[:60] for k, v in data.items()}, config=config.StepConfig(),
          batch_size=16, mesh=mesh)
      assert preds['pred'].shape == (60,), preds['pred'].shape
      return jax.device_get((state.params, state.batch_stats, sums, preds))

    one = run(parallel.data_mesh(jax.devices()[:1]), MODE)
    eight = run(parallel.data_mesh(), MODE)
    flat1, flat8 = jax.tree.leaves(one), jax.tree.leaves(eight)
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(flat1, flat8))
    for a, b in zip(flat1, flat8):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    print('max abs difference', worst)
    try:
      parallel.check_batch_size(12, parallel.data_mesh())
    except ValueError as e:
      print('batch check:', e)
""")


class DataParallelTest(parameterized.TestCase):

  @parameterized.parameters('loop', 'scan')
  def test_eight_devices_train_like_one(self, mode):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
               JAX_PLATFORMS='cpu')
    result = subprocess.run(
        [sys.executable, '-c', _SCRIPT.replace('MODE', repr(mode))],
        capture_output=True, text=True, env=env, timeout=600,
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('max abs difference', result.stdout)
    self.assertIn('does not divide evenly over 8 devices', result.stdout)


class ShardBatchTest(parameterized.TestCase):

  @parameterized.named_parameters(('one_host', 1), ('every_host_holds_the_batch', 2))
  def test_global_batch_keeps_its_shape(self, hosts):
    # A multi-host run cannot start here; with process_count() patched, the
    # multi-host path must still place the one global batch, not one per host.
    batch = {'image': np.arange(8 * 3, dtype=np.uint8).reshape(8, 3), 'label': np.arange(8)}
    with mock.patch.object(jax, 'process_count', return_value=hosts):
      out = parallel.shard_batch(batch, parallel.data_mesh())
    for key, value in batch.items():
      self.assertEqual(out[key].shape, value.shape)
      np.testing.assert_array_equal(np.asarray(out[key]), value)


if __name__ == '__main__':
  absltest.main()
