"""Data-parallel training over 8 (simulated CPU) devices, or over 2 hosts, equals 1 device;
checkpoints move between device layouts.

XLA fixes the number of host devices when JAX starts, so each case runs in a
subprocess started with ``--xla_force_host_platform_device_count``.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

def _cpu_env(devices: int) -> dict[str, str]:
  """This process's environment, for a JAX subprocess on ``devices`` CPU devices."""
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


_SCRIPT = textwrap.dedent("""
    import jax, numpy as np, optax
    from agejax import augment, batching, config, evaluate, freezing, parallel, steps, synthetic
    assert jax.device_count() == 8, jax.devices()
    model = config.ModelConfig(
        num_classes=100, conv_filters=((4, 4), (8, 8), (8, 8)),
        dense_units=(16, 16), bn_momentum=0.9)
    stage = config.StageConfig('s', 1, 1e-2, freeze='paper')
    data = synthetic.make_age_splits(seed=0, n_train=64, n_val=0, n_test=0)['train']
    step_config = config.StepConfig(augment=augment.AugmentConfig.study())

    def new_state(optimizer, mesh):
      variables = steps.init_variables(jax.random.key(0), model.build(), model.input_shape)
      state = steps.create_train_state(model, stage, variables)
      tx = optimizer(state.params)
      return parallel.replicate(state.replace(tx=tx, opt_state=tx.init(state.params)), mesh)

    def gradients(mesh):
      # SGD at learning rate 1: one step moves each parameter by minus its gradient.
      state = new_state(lambda params: optax.sgd(1.0), mesh)
      before = jax.device_get(state.params)
      batch = next(batching.train_batches(data, np.arange(16)[None]))
      state, _ = steps.train_step(
          state, parallel.shard_batch(batch, mesh), jax.random.key(1), config=step_config)
      return jax.tree.map(np.subtract, before, jax.device_get(state.params))

    def train(mesh, mode):
      # The stage's freezing with plain SGD, whose steps are linear in the
      # gradients. The two programs' gradients differ by float32 rounding;
      # Adam (which divides by each gradient's running RMS) and momentum
      # amplify that over steps into differences training does not care
      # about: 8 steps of Adam with epsilon 1e-3 put a bias 1.5e-5 apart on a
      # Zen 4, SGD with momentum 0.9 80x the tolerance below.
      state = new_state(lambda params: freezing.make_optimizer(
          params, stage.freeze, lambda: optax.sgd(stage.learning_rate)), mesh)
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

    if MODE == 'gradients':
      one, eight = gradients(parallel.data_mesh(jax.devices()[:1])), gradients(parallel.data_mesh())
      for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree.leaves(eight),
                              strict=True):
        # float32 rounding: up to 6e-6 of the leaf's largest gradient on a Zen 4
        # (the first convolution's bias, a sum over 16 x 46 x 46 positions).
        tolerance = 2e-5 * float(np.max(np.abs(a)))
        np.testing.assert_allclose(a, b, rtol=0, atol=tolerance, err_msg=jax.tree_util.keystr(path))
    else:
      one, eight = train(parallel.data_mesh(jax.devices()[:1]), MODE), train(parallel.data_mesh(), MODE)
      for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    print('8 devices match 1')
    try:
      parallel.check_batch_size(12, parallel.data_mesh())
    except ValueError as e:
      print('batch check:', e)
    try:
      parallel.check_batch_size(16, jax.sharding.Mesh(np.asarray(jax.devices()), ('batch',)))
    except ValueError as e:
      print('axis check:', e)
""")


class DataParallelTest(parameterized.TestCase):

  @parameterized.parameters('gradients', 'loop', 'scan')
  def test_eight_devices_train_like_one(self, mode):
    result = subprocess.run(
        [sys.executable, '-c', _SCRIPT.replace('MODE', repr(mode))],
        capture_output=True, text=True, env=_cpu_env(8), timeout=600,
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('8 devices match 1', result.stdout)
    self.assertIn('does not divide evenly over 8 devices', result.stdout)
    self.assertIn("axis check: The mesh has axes ('batch',)", result.stdout)


_HOST_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from agejax import parallel
    process, port, workdir, epoch_mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    if port != 'none':
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      parallel.initialize_distributed(f'localhost:{port}', 2, process)
    from agejax import config, synthetic, train
    model = config.ModelConfig(
        num_classes=100, conv_filters=((4, 4), (8, 8), (8, 8)),
        dense_units=(16, 16), bn_momentum=0.9)
    run = config.TrainConfig(
        model=model,
        stages=(config.StageConfig('s1', 1, 1e-3, freeze='paper'),
                config.StageConfig('s2', 1, 1e-4, freeze='none')),
        batch_size=16, eval_batch_size=16, epoch_mode=epoch_mode)
    # 24 validation and test faces in batches of 16: the last batch is padded.
    data = synthetic.make_age_splits(seed=3, n_train=64, n_val=24, n_test=24)
    results = train.train_and_evaluate(run, data, workdir, show_progress=False, log=print)
    history = [{k: v for k, v in h.items() if k != 'seconds'} for h in results['history']]
    print('RESULTS', json.dumps({'test': results['test'], 'history': history}))
""")


_SAVE_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from agejax import checkpoints, config, parallel, steps, train
    model = config.ModelConfig(num_classes=7, conv_filters=((4, 4),), dense_units=(8,))
    variables = steps.init_variables(jax.random.key(5), model.build(), model.input_shape)
    run = checkpoints.RunCheckpoints(sys.argv[1] + '/checkpoints')
    run.save_best(1, parallel.replicate(variables, parallel.data_mesh()),
                  {'model': train.config_dict(model), 'epoch': 1})
    run.wait()
    run.close()
    np.savez(sys.argv[1] + '/saved.npz', *jax.tree.leaves(jax.device_get(variables)))
    print('saved on', jax.device_count(), 'devices')
""")

_TRANSFER_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from agejax import config, train
    model = config.ModelConfig(num_classes=7, conv_filters=((4, 4),), dense_units=(8,))
    variables, report = train.initial_variables(
        config.TrainConfig(model=model, init_from=sys.argv[1]), log=lambda line: None)
    saved = np.load(sys.argv[1] + '/saved.npz')
    for i, leaf in enumerate(jax.tree.leaves(jax.device_get(variables))):
      np.testing.assert_array_equal(leaf, saved[f'arr_{i}'])
    print('loaded on', jax.device_count(), 'devices:', len(report.loaded), 'arrays')
""")


def _run_on(devices: int, script: str, *args: str) -> str:
  """Runs ``script`` on ``devices`` CPU devices; its stdout."""
  result = subprocess.run([sys.executable, '-c', script, *args],
                          capture_output=True, text=True, env=_cpu_env(devices), timeout=600)
  if result.returncode:
    raise AssertionError(result.stderr[-3000:])
  return result.stdout


class CheckpointAcrossDevicesTest(parameterized.TestCase):
  """A checkpoint written on one device layout transfers on another."""

  @parameterized.parameters((8, 1), (1, 8))
  def test_transfer_from_a_checkpoint_saved_on_other_devices(self, saved_on, loaded_on):
    with tempfile.TemporaryDirectory() as tmp:
      self.assertIn(f'saved on {saved_on} devices', _run_on(saved_on, _SAVE_SCRIPT, tmp))
      self.assertIn(f'loaded on {loaded_on} devices',
                    _run_on(loaded_on, _TRANSFER_SCRIPT, tmp))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


class MultiHostTest(absltest.TestCase):
  """Two processes (hosts) of two CPU devices each train like one process of four."""

  def _start(self, process, port, workdir, devices, epoch_mode='loop'):
    proc = subprocess.Popen(
        [sys.executable, '-c', _HOST_SCRIPT, str(process), str(port), workdir, epoch_mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_cpu_env(devices),
    )
    # After a failed assertion: killed and reaped before its directory goes.
    self.addCleanup(proc.wait)
    self.addCleanup(proc.kill)
    return proc

  def _results(self, proc):
    out, err = proc.communicate(timeout=600)
    self.assertEqual(proc.returncode, 0, err[-3000:])
    line = [l for l in out.splitlines() if l.startswith('RESULTS ')]
    self.assertLen(line, 1, out[-2000:])
    return json.loads(line[0][len('RESULTS '):])

  def _assert_like(self, got, one):
    self.assertEqual(got['test']['count'], 24)  # one global batch, not one per host
    np.testing.assert_array_equal(got['test']['confusion'], one['test']['confusion'])
    for key in ('loss', 'accuracy', 'mae', 'mae_expected'):
      self.assertAlmostEqual(got['test'][key], one['test'][key], delta=1e-5, msg=key)
    for h_got, h_one in zip(got['history'], one['history'], strict=True):
      for key, value in h_one.items():
        if isinstance(value, float):
          self.assertAlmostEqual(h_got[key], value, delta=1e-5, msg=key)

  def test_two_hosts_train_like_one(self):
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp)  # after the processes' cleanups, registered later
    port = _free_port()
    hosts = [self._start(p, port, f'{tmp}/hosts', devices=2) for p in (0, 1)]
    single = self._start(0, 'none', f'{tmp}/one', devices=4)
    host_results = [self._results(h) for h in hosts]
    one = self._results(single)
    run = pathlib.Path(tmp) / 'hosts'
    self.assertLen(list((run / 'tensorboard').iterdir()), 1)  # process 0 writes alone
    with np.load(run / 'predictions_test.npz') as saved:
      self.assertEqual(saved['pred'].shape, (24,))
    saved = json.loads((run / 'results.json').read_text())
    self.assertEqual(saved['test']['count'], 24)
    (session,) = saved['environment']  # one line per session, from process 0 alone
    self.assertEqual((session['processes'], session['devices']), (2, 4))
    for got in host_results:
      self._assert_like(got, one)

    # The newest checkpoint cut short on shared storage: both hosts resume
    # from the epoch before (process 0 sets the damaged one aside), and the
    # run ends as before; now with scanned epochs (the default off the CPU),
    # the training set replicated over both hosts' devices.
    latest = run / 'checkpoints' / 'latest'
    for f in (latest / '2' / 'state').rglob('*'):
      if f.is_file():
        f.unlink()
    port = _free_port()
    hosts = [self._start(p, port, f'{tmp}/hosts', devices=2, epoch_mode='scan') for p in (0, 1)]
    for got in [self._results(h) for h in hosts]:
      self._assert_like(got, one)
    self.assertEqual(sorted(os.listdir(latest)), ['1', '2', '2.unreadable'])
    sessions = json.loads((run / 'results.json').read_text())['environment']
    self.assertEqual([s['epochs_before'] for s in sessions], [0, 1])


if __name__ == '__main__':
  absltest.main()
