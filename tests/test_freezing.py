"""Tests for agejax.freezing, and that training obeys the freezing.

A small variant of the study's CNN (same layer names, so every preset
applies) keeps compilation cheap; its variables are shaped by
``jax.eval_shape`` of the real init and filled by NumPy.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from agejax import config, freezing, steps
from tests import fakes

SMALL = fakes.SMALL
_BATCH = 8


def batch(seed):
  rng = np.random.default_rng(100 + seed)
  return {
      'image': rng.integers(0, 256, (_BATCH, 48, 48, 1)).astype(np.uint8),
      'label': rng.integers(0, 5, _BATCH).astype(np.int32),
      'mask': np.ones(_BATCH, bool),
  }


@functools.lru_cache(maxsize=None)
def _adam_state(spec, learning_rate=1e-2):
  # Cached so that tests share one `tx` object, hence one compiled step.
  stage = config.StageConfig('s', 1, learning_rate, spec)
  return steps.create_train_state(SMALL, stage, fakes.fake_variables())


def adam_state(spec, learning_rate=1e-2):
  return fakes.copy(_adam_state(spec, learning_rate))


def train(state, n, first=0):
  for i in range(first, first + n):
    state, metrics = steps.train_step(state, batch(i), jax.random.key(i))
    chex.assert_tree_all_finite(metrics)
  return state


def flat(tree):
  return {
      freezing.path_str(p): v
      for p, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def frozen_paths(labels):
  return {p for p, l in flat(labels).items() if l == freezing.FROZEN}


def _leaves(*layers):
  out = set()
  for layer in layers:
    names = ('scale', 'bias') if '/bn' in layer else ('kernel', 'bias')
    out |= {f'{layer}/{n}' for n in names}
  return out


def _block(b):
  return [f'block{b}/{k}{c}' for k in ('conv', 'bn') for c in (1, 2)]


_HEAD = ['head/dense1', 'head/bn1', 'head/dense2', 'head/bn2', 'logits']
ALL = _leaves(*_block(1), *_block(2), *_block(3), *_HEAD)
BN_LAYERS = (
    'block1/bn1', 'block1/bn2', 'block2/bn1', 'block2/bn2', 'block3/bn1',
    'block3/bn2', 'head/bn1', 'head/bn2',
)

# spec -> (frozen parameter paths, frozen BatchNorm layers)
CASES = dict(
    none=('none', set(), ()),
    paper=(
        'paper',
        _leaves(*_block(1), 'block2/conv1', 'block2/bn1'),
        ('block1/bn1', 'block1/bn2', 'block2/bn1'),
    ),
    last_block_only=(
        'last_block_only',
        _leaves(*_block(1), *_block(2)),
        ('block1/bn1', 'block1/bn2', 'block2/bn1', 'block2/bn2'),
    ),
    head_only=(
        'head_only',
        _leaves(*_block(1), *_block(2), *_block(3)),
        BN_LAYERS[:6],
    ),
    user_head=(
        (r'head/.*',),
        _leaves('head/dense1', 'head/bn1', 'head/dense2', 'head/bn2'),
        ('head/bn1', 'head/bn2'),
    ),
    user_kernels=(
        (r'.*/kernel',),
        {p for p in ALL if p.endswith('/kernel')},
        (),
    ),
    # Half a BatchNorm frozen: the layer still trains (and runs in train mode).
    user_bn_scale_only=((r'block1/bn1/scale',), {'block1/bn1/scale'}, ()),
    user_several=(
        [r'logits/bias', r'block3/conv2/.*', r'head/bn2/(scale|bias)'],
        {'logits/bias', 'block3/conv2/kernel', 'block3/conv2/bias',
         'head/bn2/scale', 'head/bn2/bias'},
        ('head/bn2',),
    ),
    user_everything=((r'.*',), ALL, BN_LAYERS),
)


class SpecTest(parameterized.TestCase):

  @parameterized.named_parameters(*((k, *v) for k, v in CASES.items()))
  def test_labels_and_frozen_batch_norm(self, spec, frozen, frozen_bn):
    variables = fakes.fake_variables()
    labels = freezing.param_labels(variables['params'], spec)
    chex.assert_trees_all_equal_structs(labels, variables['params'])
    self.assertEqual(set(flat(labels)), ALL)
    self.assertEqual(frozen_paths(labels), frozen)
    self.assertEqual(
        freezing.frozen_batch_norm_layers(
            variables['params'], variables['batch_stats'], spec
        ),
        frozen_bn,
    )
    sizes = {p: v.size for p, v in flat(variables['params']).items()}
    self.assertEqual(
        freezing.count_params(variables['params'], spec),
        {
            'frozen': sum(sizes[p] for p in frozen),
            'trainable': sum(sizes[p] for p in ALL - frozen),
        },
    )

  @parameterized.named_parameters(
      ('none', 'none', ()),
      ('paper', 'paper', (r'block1/.*', r'block2/(conv1|bn1)/.*')),
      ('list', ['a', 'b.*'], ('a', 'b.*')),
  )
  def test_resolve(self, spec, patterns):
    self.assertEqual(freezing.resolve(spec), patterns)

  def test_presets_are_the_documented_ones(self):
    self.assertEqual(
        set(freezing.PRESETS), {'none', 'paper', 'last_block_only', 'head_only'}
    )

  @parameterized.named_parameters(
      ('unknown_preset', 'Paper', 'Unknown freezing preset'),
      ('unknown_preset_all', 'all', 'Unknown freezing preset'),
      # A lone string is a preset name, never a regex.
      ('regex_as_string', r'block1/.*', 'Unknown freezing preset'),
      ('invalid_regex', [r'block1/('], 'Invalid freezing pattern'),
      ('invalid_regex_second', [r'head/.*', r'[bn'], 'Invalid freezing pattern'),
      ('matches_nothing', [r'block4/.*'], 'match no parameter'),
      # Patterns must match the whole path: a layer name alone matches nothing.
      ('fullmatch_layer_name', [r'block1/conv1'], 'match no parameter'),
      ('one_of_two_unused', [r'head/.*', r'haed/.*'], r"\['haed/\.\*'\]"),
  )
  def test_raises(self, spec, regex):
    variables = fakes.fake_variables()
    params = variables['params']
    calls = (
        lambda: freezing.param_labels(params, spec),
        lambda: freezing.count_params(params, spec),
        lambda: freezing.frozen_batch_norm_layers(
            params, variables['batch_stats'], spec
        ),
        lambda: freezing.make_optimizer(params, spec, lambda: optax.sgd(0.1)),
    )
    for call in calls:
      with self.assertRaisesRegex(ValueError, regex):
        call()

  def test_path_str(self):
    tree = {'a': [{'b': 1}], 'block1/conv1': {'kernel': 2}}
    self.assertEqual(
        [freezing.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)],
        ['a/0/b', 'block1/conv1/kernel'],
    )


class TrainingObeysFreezingTest(parameterized.TestCase):
  """The issue's must-show: frozen values never change, the rest all move."""

  @parameterized.named_parameters(
      ('paper', 'paper'),
      ('user_several', 'user_several'),
  )
  def test_adam_steps(self, case):
    spec, frozen, frozen_bn = CASES[case]
    spec = spec if isinstance(spec, str) else tuple(spec)
    state = adam_state(spec)
    before = jax.device_get(
        {'params': state.params, 'batch_stats': state.batch_stats}
    )
    self.assertEqual(state.apply_fn.__self__.frozen_bn, frozen_bn)
    state = train(state, 3)
    self.assertEqual(int(state.step), 3)

    params_before, params_after = flat(before['params']), flat(state.params)
    for path in ALL:
      if path in frozen:
        chex.assert_trees_all_equal(
            params_after[path], params_before[path], custom_message=path
        )
      else:
        self.assertFalse(
            np.array_equal(params_after[path], params_before[path]), path
        )
    for layer in BN_LAYERS:
      old, new = before['batch_stats'][layer], state.batch_stats[layer]
      if layer in frozen_bn:
        chex.assert_trees_all_equal(new, old, custom_message=layer)
      else:
        for stat in ('mean', 'var'):
          self.assertFalse(np.array_equal(new[stat], old[stat]), layer)

  def test_sgd_update_scales_with_learning_rate(self):
    variables = fakes.fake_variables()
    frozen = CASES['paper'][1]
    model = SMALL.build(
        freezing.frozen_batch_norm_layers(
            variables['params'], variables['batch_stats'], 'paper'
        )
    )
    lrs = (0.3, 0.05)
    updates = []
    for lr in lrs:
      state = steps.TrainState.create(
          apply_fn=model.apply,
          params=fakes.copy(variables['params']),
          batch_stats=fakes.copy(variables['batch_stats']),
          tx=freezing.make_optimizer(
              variables['params'], 'paper', lambda lr=lr: optax.sgd(lr)
          ),
      )
      new, _ = steps.train_step(state, batch(0), jax.random.key(0))
      updates.append(
          {
              p: np.asarray(new_leaf, np.float64) - np.asarray(old, np.float64)
              for (p, new_leaf), old in zip(
                  flat(new.params).items(), flat(variables['params']).values()
              )
          }
      )
    ratio = lrs[0] / lrs[1]
    for path in ALL:
      u1, u2 = updates[0][path], updates[1][path]
      if path in frozen:
        np.testing.assert_array_equal(u1, 0.0, err_msg=path)
        np.testing.assert_array_equal(u2, 0.0, err_msg=path)
        continue
      self.assertGreater(np.linalg.norm(u2), 0.0, path)
      np.testing.assert_allclose(
          np.linalg.norm(u1) / np.linalg.norm(u2), ratio, rtol=1e-5,
          err_msg=path,
      )
      # Elementwise too, up to the rounding of ``param + update``.
      atol = 4 * np.finfo(np.float32).eps * np.max(
          np.abs(flat(variables['params'])[path])
      )
      np.testing.assert_allclose(u1, ratio * u2, rtol=1e-5, atol=ratio * atol,
                                 err_msg=path)


def _adam_groups(state):
  """{group: (count, mu, nu)} of every trainable group's Adam state."""
  out = {}
  for group, inner in state.opt_state.inner_states.items():
    if group != freezing.FROZEN:
      adam = inner.inner_state[0]
      out[group] = (int(adam.count), flat(adam.mu), flat(adam.nu))
  return out


def _adam_moments(state):
  """(count, mu, nu) of the first stage's trainable group."""
  return _adam_groups(state)[freezing.TRAINABLE]


class StartStageTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('unfreeze', 'paper', 'none'),
      ('freeze_more', 'paper', 'head_only'),
      ('same_freezing_new_lr', 'paper', 'paper'),
      ('user_pattern', 'paper', 'user_head'),
  )
  def test_moments_carry_over(self, first, second):
    state = train(adam_state(first), 2)
    old_count, old_mu, old_nu = jax.device_get(_adam_moments(state))
    params_before = jax.device_get(state.params)
    spec = CASES[second][0]
    spec = spec if isinstance(spec, str) else tuple(spec)
    first_stage = config.StageConfig('one', 1, 1e-2, first)
    new = steps.start_stage(
        state, SMALL, config.StageConfig('two', 1, 1e-3, spec), [first_stage]
    )

    new_frozen = CASES[second][1]
    self.assertEqual(new.apply_fn.__self__.frozen_bn, CASES[second][2])
    self.assertEqual(int(new.step), 2)
    groups = jax.device_get(_adam_groups(new))
    count, mu, nu = groups[freezing.TRAINABLE]
    self.assertEqual(count, 2)
    # Leaves trainable in both stages keep their moments and step count.
    self.assertEqual(set(mu), (ALL - new_frozen) & set(old_mu))
    for path in mu:
      np.testing.assert_array_equal(mu[path], old_mu[path], err_msg=path)
      np.testing.assert_array_equal(nu[path], old_nu[path], err_msg=path)
      self.assertTrue(np.any(mu[path] != 0), path)
    # Newly trainable leaves get their own Adam state, from step 0.
    newly = (ALL - new_frozen) - set(old_mu)
    if newly:
      self.assertEqual(set(groups), {freezing.TRAINABLE, 'trainable_since_stage1'})
      count1, mu1, nu1 = groups['trainable_since_stage1']
      self.assertEqual(count1, 0)
      self.assertEqual(set(mu1), newly)
      for path in newly:
        np.testing.assert_array_equal(mu1[path], 0.0, err_msg=path)
        np.testing.assert_array_equal(nu1[path], 0.0, err_msg=path)
    else:
      self.assertEqual(set(groups), {freezing.TRAINABLE})
    # The parameters and statistics themselves are untouched.
    chex.assert_trees_all_equal(new.params, params_before)

  def test_newly_trainable_layers_take_bias_corrected_steps(self):
    # Adam's first step moves every trainable value by about the learning
    # rate (sign of the gradient); a layer unfrozen after 20 steps must do
    # the same, not ~3x that, as it would with the carried step count.
    lr = 1e-3
    stages = [config.StageConfig('one', 1, 1e-2, 'paper'), config.StageConfig('two', 1, lr, 'none')]
    state = train(adam_state('paper'), 20)
    state = steps.start_stage(state, SMALL, stages[1], stages[:1])
    before = jax.device_get(flat(state.params))
    state = train(state, 1, first=20)
    after = jax.device_get(flat(state.params))
    for path in CASES['paper'][1]:
      step = np.abs(after[path] - before[path])
      moved = step[step > 0]
      self.assertNotEmpty(moved, path)
      np.testing.assert_allclose(np.median(moved), lr, rtol=0.05, err_msg=path)

  def test_start_stage_needs_the_earlier_stages(self):
    with self.assertRaisesRegex(ValueError, 'stages before'):
      steps.start_stage(adam_state('paper'), SMALL, config.StageConfig('two', 1, 1e-3, 'none'), [])

  def test_unfreeze_train_then_freeze_again(self):
    stages = [
        config.StageConfig('one', 1, 1e-2, 'paper'),
        config.StageConfig('two', 1, 1e-3, 'none'),
        config.StageConfig('three', 1, 1e-4, 'paper'),
        config.StageConfig('four', 1, 1e-4, 'none'),
    ]
    state = train(adam_state('paper'), 2)
    before = jax.device_get(state.params)
    state = steps.start_stage(state, SMALL, stages[1], stages[:1])
    state = train(state, 1, first=2)
    self.assertEqual(int(state.step), 3)
    groups = jax.device_get(_adam_groups(state))
    self.assertEqual(groups[freezing.TRAINABLE][0], 3)
    self.assertEqual(groups['trainable_since_stage1'][0], 1)
    after = flat(state.params)
    for path, old in flat(before).items():  # including the once-frozen ones
      self.assertFalse(np.array_equal(after[path], old), path)

    # Back to the paper's freezing: the leaves unfrozen in stage two lose
    # their moments, the others keep theirs, and their count goes on.
    state = steps.start_stage(state, SMALL, stages[2], stages[:2])
    groups3 = jax.device_get(_adam_groups(state))
    self.assertEqual(set(groups3), {freezing.TRAINABLE})
    count3, mu3, nu3 = groups3[freezing.TRAINABLE]
    self.assertEqual(count3, 3)
    self.assertEqual(int(state.step), 3)
    self.assertEqual(set(mu3), ALL - CASES['paper'][1])
    for path in mu3:
      np.testing.assert_array_equal(mu3[path], groups[freezing.TRAINABLE][1][path], err_msg=path)
      np.testing.assert_array_equal(nu3[path], groups[freezing.TRAINABLE][2][path], err_msg=path)

    # Unfrozen once more: a break in training means a fresh Adam state.
    state = steps.start_stage(state, SMALL, stages[3], stages[:3])
    groups4 = jax.device_get(_adam_groups(state))
    self.assertEqual(set(groups4), {freezing.TRAINABLE, 'trainable_since_stage3'})
    self.assertEqual(groups4['trainable_since_stage3'][0], 0)


class CarryOptStateTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      dict(
          testcase_name='same_paths',
          old={'a': 1.0 * np.ones(3), 'b': 2.0 * np.ones(2)},
          new={'a': np.zeros(3), 'b': np.zeros(2)},
          expected={'a': np.ones(3), 'b': 2.0 * np.ones(2)},
      ),
      dict(
          testcase_name='new_leaf_and_shape_change',
          old={'a': np.ones(3), 'b': np.ones(2), 'gone': np.ones(1)},
          new={'a': np.zeros(3), 'b': np.zeros(4), 'c': np.zeros(1)},
          expected={'a': np.ones(3), 'b': np.zeros(4), 'c': np.zeros(1)},
      ),
      dict(
          testcase_name='masked_nodes',
          old={'a': optax.MaskedNode(), 'b': np.ones(2)},
          new={'a': np.zeros(3), 'b': np.zeros(2)},
          expected={'a': np.zeros(3), 'b': np.ones(2)},
      ),
      dict(
          testcase_name='nothing_in_common',
          old={'x': np.ones(3)},
          new={'a': np.zeros(3)},
          expected={'a': np.zeros(3)},
      ),
  )
  def test_carry(self, old, new, expected):
    old = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), old)
    new = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), new)
    out = self.variant(freezing.carry_opt_state)(old, new)
    expected = jax.tree.map(lambda x: np.asarray(x, np.float32), expected)
    chex.assert_trees_all_equal(out, expected)


if __name__ == '__main__':
  absltest.main()
