"""Tests for agejax.checkpoints: latest/best round trips, errors, resuming.

Uses a two-block CNN on 22x22 images (20,18,9 | 7,5,2), small enough to
compile quickly yet with a ``block2`` so that the paper's freezing (and so
optax ``MaskedNode``s in the optimizer state) applies.
"""

import dataclasses
import functools
import json
import os
import pathlib
import tempfile
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl.testing import absltest, parameterized

from agejax import checkpoints, config, steps
from tests import fakes

SMALL = config.ModelConfig(
    num_classes=5,
    conv_filters=((4, 4), (8, 8)),
    dense_units=(16,),
    image_size=22,
    conv_dropout=0.0,
    dense_dropout=0.0,
)
PAPER = config.StageConfig('stage1', 1, 1e-2, 'paper')


def fake_variables(seed=0):
  return fakes.fake_variables(SMALL, seed)


@functools.lru_cache(maxsize=None)
def _initial_state():
  return steps.create_train_state(SMALL, PAPER, fake_variables())


def batch(i):
  rng = np.random.default_rng(50 + i)
  return {
      'image': rng.integers(0, 256, (6, 22, 22, 1)).astype(np.uint8),
      'label': rng.integers(0, 5, 6).astype(np.int32),
      'mask': np.ones(6, bool),
  }


def train(state, first, last):
  for i in range(first, last):
    state, _ = steps.train_step(state, batch(i), jax.random.key(i))
  return state


@functools.lru_cache(maxsize=None)
def _trained_state():
  return train(fakes.copy(_initial_state()), 0, 2)


def state_tree(state):
  """What `agejax.train` checkpoints: every array of the train state."""
  return {
      'step': state.step,
      'params': state.params,
      'batch_stats': state.batch_stats,
      'opt_state': state.opt_state,
  }


def _masked_nodes(tree):
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  return sum(map(is_masked, jax.tree.leaves(tree, is_leaf=is_masked)))


class TempDirTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.root = pathlib.Path(tmp.name)

  def run_checkpoints(self, directory):
    ckpts = checkpoints.RunCheckpoints(directory)
    self.addCleanup(ckpts.close)
    return ckpts


_ABSTRACT_TARGETS = {
    # From the very tree that was saved.
    'saved_tree': lambda saved: checkpoints.abstract_like(saved),
    # From a fresh concrete state, as `agejax.train` builds it to resume
    # (its step is still the Python int 0).
    'fresh_state': lambda _: checkpoints.abstract_like(
        state_tree(steps.create_train_state(SMALL, PAPER, fake_variables(seed=9)))
    ),
    # Without computing anything.
    'eval_shape': lambda _: jax.eval_shape(
        lambda: state_tree(
            steps.create_train_state(
                SMALL, PAPER,
                steps.init_variables(
                    jax.random.key(1), SMALL.build(), SMALL.input_shape
                ),
            )
        )
    ),
}


class AbstractLikeTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('python_int', 0, (), jnp.int32),
      ('python_float', 1.5, (), jnp.float32),
      ('numpy', np.zeros((2, 3), np.uint8), (2, 3), jnp.uint8),
      ('jax_bf16', jnp.ones((4,), jnp.bfloat16), (4,), jnp.bfloat16),
      ('abstract', jax.ShapeDtypeStruct((5, 1), jnp.float32), (5, 1), jnp.float32),
  )
  def test_leaf(self, leaf, shape, dtype):
    (out,) = jax.tree.leaves(checkpoints.abstract_like({'x': leaf}))
    self.assertIsInstance(out, jax.ShapeDtypeStruct)
    self.assertEqual(out.shape, shape)
    self.assertEqual(out.dtype, dtype)

  def test_sharding(self):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out = checkpoints.abstract_like({'x': jnp.ones(3)}, sharding)
    self.assertEqual(out['x'].sharding, sharding)


class LatestTest(TempDirTest):

  @parameterized.named_parameters(*((k, k) for k in _ABSTRACT_TARGETS))
  def test_round_trip_is_bit_exact(self, target):
    saved = state_tree(_trained_state())
    self.assertGreater(_masked_nodes(saved['opt_state']), 0)
    progress = {'epoch': 2, 'history': [{'loss': 1.5}], 'best': None}
    ckpts = self.run_checkpoints(self.root)
    self.assertIsNone(ckpts.latest_progress())
    ckpts.save_latest(2, saved, progress)
    ckpts.wait()

    abstract = _ABSTRACT_TARGETS[target](saved)
    restored = ckpts.restore_latest(abstract)
    chex.assert_trees_all_equal_structs(restored, saved)
    chex.assert_trees_all_equal_dtypes(restored, saved)
    chex.assert_trees_all_equal(restored, saved)
    for leaf in jax.tree.leaves(restored):
      self.assertIsInstance(leaf, jax.Array)
    self.assertEqual(_masked_nodes(restored['opt_state']), _masked_nodes(saved['opt_state']))
    self.assertEqual(ckpts.latest_progress(), progress)

  def test_keeps_the_two_newest(self):
    states = {e: state_tree(train(fakes.copy(_initial_state()), 0, e)) for e in (1, 2, 3)}
    ckpts = self.run_checkpoints(self.root)
    for epoch, state in states.items():
      ckpts.save_latest(epoch, state, {'epoch': epoch})
    ckpts.wait()
    self.assertEqual(sorted(os.listdir(self.root / checkpoints.LATEST)), ['2', '3'])
    self.assertEqual(ckpts.latest_epochs(), [3, 2])
    self.assertEqual(ckpts.latest_progress(), {'epoch': 3})
    for epoch in (None, 3, 2):
      restored = ckpts.restore_latest(checkpoints.abstract_like(states[2]), epoch)
      chex.assert_trees_all_equal(restored, states[epoch or 3])
    self.assertEqual(ckpts.latest_progress(2), {'epoch': 2})

  def test_set_aside_keeps_the_files_and_lets_the_epoch_be_saved_again(self):
    state = state_tree(_trained_state())
    ckpts = self.run_checkpoints(self.root)
    for epoch in (1, 2):
      ckpts.save_latest(epoch, state, {'epoch': epoch})
    ckpts.wait()
    latest = self.root / checkpoints.LATEST
    for name in ('2.unreadable', '2.unreadable-2'):
      files = sorted(p.relative_to(latest / '2') for p in (latest / '2').rglob('*'))
      aside = ckpts.set_aside_latest(2)
      self.assertEqual(aside, latest / name)
      self.assertEqual(sorted(p.relative_to(aside) for p in aside.rglob('*')), files)
      self.assertEqual(ckpts.latest_epochs(), [1])
      ckpts.save_latest(2, state, {'epoch': 2, 'again': name})
      ckpts.wait()
    reopened = self.run_checkpoints(self.root)
    self.assertEqual(reopened.latest_epochs(), [2, 1])
    self.assertEqual(
        reopened.latest_progress(), {'epoch': 2, 'again': '2.unreadable-2'}
    )
    self.assertEqual(
        sorted(os.listdir(latest)), ['1', '2', '2.unreadable', '2.unreadable-2']
    )

  def test_restore_without_checkpoint_raises(self):
    ckpts = self.run_checkpoints(self.root)
    with self.assertRaisesRegex(checkpoints.CheckpointError, 'No checkpoint to resume'):
      ckpts.restore_latest(checkpoints.abstract_like(state_tree(_trained_state())))


  def test_saving_an_epoch_not_after_the_saved_one_raises(self):
    # Orbax skips such a save silently; a fresh run in an old run's folder
    # would then keep reporting the old run's best epoch as its own.
    ckpts = self.run_checkpoints(self.root)
    ckpts.save_best(4, fake_variables(seed=4), {'epoch': 4})
    ckpts.save_latest(4, state_tree(_trained_state()), {'epoch': 4})
    ckpts.wait()
    for save in (
        lambda: ckpts.save_best(2, fake_variables(seed=2), {'epoch': 2}),
        lambda: ckpts.save_latest(2, state_tree(_trained_state()), {'epoch': 2}),
    ):
      with self.assertRaisesRegex(checkpoints.CheckpointError, 'holds epoch 4'):
        save()
    self.assertEqual(ckpts.best_epoch(), 4)

  @parameterized.named_parameters(
      ('metadata_missing', '_METADATA', 'delete'),
      ('metadata_truncated', '_METADATA', 'truncate'),
      ('data_missing', 'ocdbt.process_0/d/*', 'delete'),
      ('data_truncated', 'ocdbt.process_0/d/*', 'truncate'),
      ('manifest_truncated', 'manifest.ocdbt', 'truncate'),
  )
  def test_incomplete_state_is_unreadable(self, pattern, damage):
    # What a copy cut short leaves behind (Google Drive after a disconnect);
    # never arrays silently filled in.
    saved = state_tree(_trained_state())
    ckpts = self.run_checkpoints(self.root)
    ckpts.save_latest(1, saved, {'epoch': 1})
    ckpts.wait()
    damaged = sorted((self.root / checkpoints.LATEST / '1' / 'state').glob(pattern))
    self.assertNotEmpty(damaged)
    for f in damaged:
      if damage == 'delete':
        f.unlink()
      else:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with self.assertRaisesRegex(
        checkpoints.UnreadableCheckpointError,
        f'Checkpoint {self.root / checkpoints.LATEST}/1 could not be read',
    ):
      self.run_checkpoints(self.root).restore_latest(checkpoints.abstract_like(saved))

  @parameterized.named_parameters(
      ('array_data', 'variables', 'best'),
      ('metadata_json', 'meta', 'best'),
      ('progress_json', 'progress', 'latest'),
  )
  def test_damaged_checkpoint_raises_naming_it(self, item, which):
    ckpts = self.run_checkpoints(self.root)
    ckpts.save_best(1, fake_variables(), {'model': _model_json(SMALL)})
    ckpts.save_latest(1, state_tree(_trained_state()), {'epoch': 1})
    ckpts.wait()
    folder = self.root / which / '1' / item
    files = sorted(p for p in folder.rglob('*') if p.is_file())
    # Remove the data (not just the index) so every reader has to fail.
    for f in files if item != 'variables' else [max(files, key=os.path.getsize)]:
      f.unlink()
    reads = {
        'best': (
            lambda: checkpoints.load_meta(self.root),
            lambda: checkpoints.load_variables(
                self.root, lambda _: fakes.abstract_variables(SMALL)
            ),
        ),
        'latest': (self.run_checkpoints(self.root).latest_progress,),
    }[which]
    failed = 0
    for read in reads:
      try:
        read()
      except checkpoints.UnreadableCheckpointError as e:
        failed += 1
        self.assertIn(str(self.root / which), str(e))
    self.assertGreater(failed, 0)


def _other_classes(saved):
  other = dataclasses.replace(SMALL, num_classes=6)
  return {**saved, **fakes.abstract_variables(other)}


def _no_opt_state(saved):
  return {k: v for k, v in saved.items() if k != 'opt_state'}


def _bfloat16_params(saved):
  as_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  return {**saved, 'params': jax.tree.map(as_bf16, saved['params'])}


def _extra_key(saved):
  return {**saved, 'ema': saved['params']}


def _other_freezing(saved):
  # The optimizer state of another freezing has other leaves.
  state = steps.create_train_state(
      SMALL, config.StageConfig('s', 1, 1e-3, 'none'), fake_variables()
  )
  return {**saved, 'opt_state': state.opt_state}


class MismatchTest(TempDirTest):

  @parameterized.named_parameters(
      (
          'other_num_classes',
          _other_classes,
          'params.logits.bias: (5,) float32 in checkpoint, (6,) float32 expected',
      ),
      (
          'other_dtype',
          _bfloat16_params,
          'params.block1/bn1.bias: (4,) float32 in checkpoint, (4,) bfloat16'
          ' expected',
      ),
      ('missing_item', _no_opt_state, 'not in model: opt_state.'),
      ('extra_item', _extra_key, 'missing from checkpoint: ema.'),
      (
          'other_freezing',
          _other_freezing,
          'missing from checkpoint: opt_state.inner_states.trainable.',
      ),
  )
  def test_latest_mismatch_raises(self, make_target, names):
    saved = state_tree(_trained_state())
    ckpts = self.run_checkpoints(self.root)
    ckpts.save_latest(2, saved, {'epoch': 2})
    ckpts.wait()
    target = checkpoints.abstract_like(make_target(saved))
    # Checked from the metadata, before Orbax starts reading arrays.
    with mock.patch.object(
        ocp.CheckpointManager, 'restore', side_effect=AssertionError
    ):
      with self.assertRaisesRegex(
          checkpoints.CheckpointError, 'does not fit the model'
      ) as cm:
        ckpts.restore_latest(target)
    self.assertIn(str(self.root / checkpoints.LATEST), str(cm.exception))
    self.assertIn(names, str(cm.exception))

  def test_best_mismatch_raises(self):
    ckpts = self.run_checkpoints(self.root)
    ckpts.save_best(1, fake_variables(), {'model': _model_json(SMALL)})
    ckpts.wait()
    other = dataclasses.replace(SMALL, dense_units=(12,))
    with self.assertRaisesRegex(
        checkpoints.CheckpointError, 'does not fit the model'
    ):
      checkpoints.load_variables(
          self.root, lambda _: fakes.abstract_variables(other)
      )


def _model_json(model_config):
  return json.loads(json.dumps(dataclasses.asdict(model_config)))


class BestTest(TempDirTest):

  @parameterized.named_parameters(
      ('run_dir', 'checkpoints', ''),
      ('checkpoints_dir', 'checkpoints', 'checkpoints'),
      ('best_dir', 'checkpoints', 'checkpoints/best'),
      ('bare_run_dir', '', ''),
  )
  def test_round_trip(self, save_under, load_from):
    meta = {
        'model': _model_json(SMALL),
        'epoch': 3,
        'validation': {'accuracy': 0.25, 'mae': 7.5},
    }
    variables = fake_variables(seed=3)
    ckpts = self.run_checkpoints(self.root / save_under)
    ckpts.save_best(1, fake_variables(seed=1), {'epoch': 1})
    ckpts.save_best(3, variables, meta)
    ckpts.wait()

    seen = []

    def abstract_fn(m):
      seen.append(m)
      return fakes.abstract_variables(config.model_config_from_dict(m['model']))

    path = self.root / load_from
    self.assertEqual(
        checkpoints.best_dir(path), self.root / save_under / checkpoints.BEST
    )
    loaded, loaded_meta = checkpoints.load_variables(str(path), abstract_fn)
    self.assertEqual(loaded_meta, meta)
    self.assertEqual(seen, [meta])
    self.assertEqual(config.model_config_from_dict(meta['model']), SMALL)
    chex.assert_trees_all_equal_dtypes(loaded, variables)
    chex.assert_trees_all_equal(loaded, variables)
    self.assertEqual(checkpoints.load_meta(path), meta)

  @parameterized.named_parameters(
      ('missing', 'does/not/exist', ()),
      ('empty', 'empty', ('empty',)),
      ('no_epoch_folders', 'run', ('run/checkpoints/best/tmp', 'run/best/x')),
  )
  def test_best_dir_raises(self, path, make_dirs):
    for d in make_dirs:
      (self.root / d).mkdir(parents=True)
    path = self.root / path
    for call in (
        lambda: checkpoints.best_dir(path),
        lambda: checkpoints.load_meta(path),
        lambda: checkpoints.load_variables(path, fakes.abstract_variables),
    ):
      with self.assertRaises(checkpoints.CheckpointError) as cm:
        call()
      self.assertIn(str(path), str(cm.exception))


@functools.lru_cache(maxsize=None)
def _fresh_template():
  # Not the initial state: other values, its own optimizer object. Cached so
  # that the cases share one compiled step.
  return steps.create_train_state(SMALL, PAPER, fake_variables(seed=7))


class ResumeTest(TempDirTest):

  @parameterized.named_parameters(('after_1', 1), ('after_3', 3))
  def test_resume_equals_straight_through(self, k):
    n = 4
    straight = train(fakes.copy(_initial_state()), 0, n)

    partial = train(fakes.copy(_initial_state()), 0, k)
    ckpts = self.run_checkpoints(self.root)
    ckpts.save_latest(k, state_tree(partial), {'epoch': k})
    ckpts.wait()
    ckpts.close()

    # As `agejax.train` resumes: a fresh template from other variables.
    template = fakes.copy(_fresh_template())
    resumed_ckpts = self.run_checkpoints(self.root)
    self.assertEqual(resumed_ckpts.latest_progress(), {'epoch': k})
    restored = resumed_ckpts.restore_latest(
        checkpoints.abstract_like(state_tree(template))
    )
    resumed = train(template.replace(**restored), k, n)

    self.assertEqual(int(resumed.step), n)
    chex.assert_trees_all_equal(state_tree(resumed), state_tree(straight))
    # And the run did train: the result is not the initial state.
    self.assertFalse(
        np.array_equal(
            straight.params['logits']['kernel'],
            _initial_state().params['logits']['kernel'],
        )
    )


if __name__ == '__main__':
  absltest.main()
