"""Tests for agejax.steps (train/eval steps, epochs) and evaluate.accumulate.

A one-block CNN on 10x10 images (conv 8x8 -> pool 4x4 -> flatten 64) keeps
every compile to about a second; variables are shaped by ``jax.eval_shape``
of the real init and filled by NumPy.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from agejax import augment, batching, config, evaluate, freezing, steps
from tests import fakes

_C = 4
TINY = config.ModelConfig(
    num_classes=_C,
    conv_filters=((4,),),
    dense_units=(8,),
    image_size=10,
    conv_dropout=0.0,
    dense_dropout=0.0,
)
NONE = config.StageConfig('s', 1, 1e-2, 'none')


@functools.lru_cache(maxsize=None)
def _state(model_config=TINY, stage=NONE):
  # Cached so that tests share one `tx` object, hence one compiled step.
  return steps.create_train_state(
      model_config, stage, fakes.fake_variables(model_config)
  )


def state(model_config=TINY, stage=NONE):
  return fakes.copy(_state(model_config, stage))


def arrays(n, seed=0, size=10):
  rng = np.random.default_rng(seed)
  return {
      'image': rng.integers(0, 256, (n, size, size, 1)).astype(np.uint8),
      'label': rng.integers(0, _C, n).astype(np.int32),
      'age': rng.integers(0, 80, n).astype(np.int32),
  }


def full_batch(n, seed=0, with_age=False):
  batch = arrays(n, seed)
  if not with_age:
    del batch['age']
  batch['mask'] = np.ones(n, bool)
  return batch


def pad_with_garbage(batch, pad, seed=99):
  """Appends ``pad`` random rows with ``mask=False``."""
  garbage = arrays(pad, seed)
  out = {
      k: np.concatenate([v, garbage[k]]) for k, v in batch.items() if k != 'mask'
  }
  out['mask'] = np.concatenate([batch['mask'], np.zeros(pad, bool)])
  return out


class TrainStepTest(parameterized.TestCase):

  def test_jitted_and_donated(self):
    s = state()
    old_leaves = jax.tree.leaves(s)
    # A device copy: a host view (device_get) would pin the buffers and
    # prevent their donation on CPU.
    before = fakes.copy(s.params)
    new, metrics = steps.train_step(s, full_batch(6), jax.random.key(0))
    # The old state's buffers were donated to the new state.
    self.assertTrue(all(leaf.is_deleted() for leaf in old_leaves))
    self.assertEqual(int(new.step), 1)
    self.assertEqual(set(metrics), {'loss_sum', 'correct', 'count'})
    chex.assert_shape(list(metrics.values()), ())
    chex.assert_tree_all_finite(metrics)
    self.assertEqual(float(metrics['count']), 6.0)
    self.assertBetween(float(metrics['correct']), 0.0, 6.0)
    self.assertGreater(float(metrics['loss_sum']), 0.0)
    for path, leaf in jax.tree_util.tree_leaves_with_path(new.params):
      old = before
      for k in path:
        old = old[k.key]
      self.assertFalse(np.array_equal(leaf, old), freezing.path_str(path))
    # A second call reuses the compiled step.
    size = steps.train_step._cache_size()
    new, _ = steps.train_step(new, full_batch(6, 1), jax.random.key(1))
    self.assertEqual(steps.train_step._cache_size(), size)
    self.assertEqual(int(new.step), 2)

  @parameterized.named_parameters(
      ('plain', 0.0, None),
      ('label_smoothing', 0.1, None),
      ('class_weights', 0.0, (0.5, 1.0, 2.0, 4.0)),
      ('both', 0.2, (3.0, 0.25, 1.0, 1.5)),
  )
  def test_loss_matches_reference(self, smoothing, class_weights):
    step_config = config.StepConfig(
        label_smoothing=smoothing, class_weights=class_weights
    )
    s = state()
    batch = full_batch(6)
    # Without dropout or augmentation the train-mode forward pass is
    # deterministic and can be recomputed here.
    logits, updates = s.apply_fn(
        {'params': s.params, 'batch_stats': s.batch_stats},
        jnp.asarray(batch['image'], jnp.float32) / 255.0,
        train=True,
        mutable=['batch_stats'],
    )
    targets = optax.smooth_labels(jax.nn.one_hot(batch['label'], _C), smoothing)
    per_example = optax.softmax_cross_entropy(logits, targets)
    if class_weights is not None:
      per_example = per_example * jnp.asarray(class_weights)[batch['label']]
    expected_updates = jax.device_get(updates['batch_stats'])

    new, metrics = steps.train_step(
        s, batch, jax.random.key(0), config=step_config
    )
    np.testing.assert_allclose(
        metrics['loss_sum'], jnp.sum(per_example), rtol=1e-5
    )
    self.assertEqual(
        float(metrics['correct']),
        float(np.sum(np.argmax(logits, -1) == batch['label'])),
    )
    chex.assert_trees_all_close(new.batch_stats, expected_updates, rtol=1e-5)
    chex.assert_tree_all_finite(new.params)

  def test_mask_ignores_padding_in_train_step(self):
    # With every BatchNorm frozen (inference mode) and no dropout, examples do
    # not interact, so garbage padding rows must change nothing at all.
    stage = config.StageConfig('bn_frozen', 1, 1e-2, (r'.*/bn\d+/.*',))
    s = state(stage=stage)
    self.assertEqual(s.apply_fn.__self__.frozen_bn, ('block1/bn1', 'head/bn1'))
    real = full_batch(5)
    padded = pad_with_garbage(real, 3)
    out = {}
    for name, batch in (('real', real), ('padded', padded)):
      new, metrics = steps.train_step(fakes.copy(s), batch, jax.random.key(0))
      out[name] = (jax.device_get(new.params), jax.device_get(metrics))
    chex.assert_trees_all_close(out['padded'], out['real'], rtol=1e-5, atol=1e-7)
    self.assertEqual(float(out['padded'][1]['count']), 5.0)


class EvalStepTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('labels_only', False, None),
      ('with_age', True, None),
      ('class_values', True, (5.0, 15.0, 30.0, 60.0)),
  )
  def test_mask_ignores_padding(self, with_age, class_values):
    step_config = config.StepConfig(class_values=class_values)
    s = _state()
    real = full_batch(5, with_age=with_age)
    padded = pad_with_garbage(real, 3)
    a = steps.eval_step(s, real, config=step_config)
    b = steps.eval_step(s, padded, config=step_config)
    self.assertEqual(
        set(a),
        {'loss_sum', 'count', 'confusion', 'abs_err_argmax',
         'abs_err_expected', 'abs_err_median'},
    )
    chex.assert_shape(a['confusion'], (_C, _C))
    chex.assert_trees_all_equal(b['confusion'], a['confusion'])
    chex.assert_trees_all_close(b, a, rtol=1e-6)
    self.assertEqual(float(b['count']), 5.0)
    self.assertEqual(int(np.sum(b['confusion'])), 5)

  def test_sums_match_reference(self):
    values = np.array([5.0, 15.0, 30.0, 60.0], np.float32)
    step_config = config.StepConfig(class_values=tuple(values.tolist()))
    s = _state()
    batch = full_batch(6, with_age=True)
    logits = np.asarray(
        s.apply_fn(
            {'params': s.params, 'batch_stats': s.batch_stats},
            jnp.asarray(batch['image'], jnp.float32) / 255.0,
            train=False,
        ),
        np.float64,
    )
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    preds = logits.argmax(-1)
    out = steps.eval_step(s, batch, config=step_config)
    confusion = np.zeros((_C, _C), int)
    np.add.at(confusion, (batch['label'], preds), 1)
    np.testing.assert_array_equal(out['confusion'], confusion)
    np.testing.assert_allclose(
        out['loss_sum'],
        -np.log(probs[np.arange(6), batch['label']]).sum(),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        out['abs_err_argmax'], np.abs(values[preds] - batch['age']).sum(),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        out['abs_err_expected'], np.abs(probs @ values - batch['age']).sum(),
        rtol=1e-5,
    )


class AccumulateTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('7_vs_64', 7, 64),
      ('13_vs_50', 13, 50),
  )
  def test_totals_do_not_depend_on_batch_size(self, small, big):
    data = arrays(50, seed=3)
    s = _state()
    step_config = config.StepConfig()
    a = evaluate.accumulate(s, data, config=step_config, batch_size=small)
    b = evaluate.accumulate(s, data, config=step_config, batch_size=big)
    chex.assert_trees_all_equal(a['confusion'], b['confusion'])
    chex.assert_trees_all_close(a, b, rtol=1e-5)
    self.assertEqual(float(a['count']), 50.0)
    self.assertEqual(int(np.sum(a['confusion'])), 50)
    np.testing.assert_array_equal(
        np.sum(a['confusion'], 1), np.bincount(data['label'], minlength=_C)
    )

  def test_empty_dataset_raises(self):
    data = {k: v[:0] for k, v in arrays(3).items()}
    with self.assertRaisesRegex(ValueError, 'empty'):
      evaluate.accumulate(_state(), data, config=config.StepConfig(), batch_size=4)


class SummarizeTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('ordinal', True, True),
      ('nominal', False, False),
  )
  def test_ordinal_scores_only_for_ordered_classes(self, ordinal, has_ordinal_scores):
    step_config = config.StepConfig(ordinal=ordinal)
    totals = evaluate.accumulate(_state(), arrays(20, seed=5), config=step_config, batch_size=8)
    summary = evaluate.summarize(totals, config=step_config)
    ordinal_keys = {'mae', 'mae_expected', 'mae_median', 'cs@1', 'cs@10', 'tol3_accuracy', 'tol3_macro_f1'}
    self.assertEqual(ordinal_keys <= summary.keys(), has_ordinal_scores)
    self.assertEqual(bool(ordinal_keys & summary.keys()), has_ordinal_scores)
    for key in ('loss', 'accuracy', 'macro_f1', 'weighted_f1', 'per_class'):
      self.assertIn(key, summary)
    self.assertAlmostEqual(
        summary['accuracy'], np.trace(totals['confusion']) / np.sum(totals['confusion']), places=6
    )

  def test_classes_with_values_have_no_tolerance_scores(self):
    step_config = config.StepConfig(class_values=(5.0, 15.0, 30.0, 60.0))
    totals = evaluate.accumulate(_state(), arrays(20, seed=5), config=step_config, batch_size=8)
    summary = evaluate.summarize(totals, config=step_config)
    self.assertContainsSubset({'mae', 'mae_expected', 'cs@1', 'macro_f1'}, summary.keys())
    self.assertEmpty([k for k in summary if k.startswith('tol')])


class ScoreNamesTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('ordinal', config.StepConfig(), True),
      ('nominal', config.StepConfig(ordinal=False), False),
      ('class_values', config.StepConfig(class_values=(5.0, 15.0, 30.0, 60.0)), False),
  )
  def test_names_of_the_scores_summarize_gives(self, step_config, has_tolerance):
    totals = evaluate.accumulate(_state(), arrays(20, seed=5), config=step_config, batch_size=8)
    summary = evaluate.summarize(totals, config=step_config)
    names = evaluate.score_names(step_config, _C)
    self.assertEqual(list(names), sorted(summary.keys() - {'per_class', 'count'}))
    self.assertEqual('tol3_weighted_f1' in names, has_tolerance)


class PredictTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('class_index', None),
      ('class_values', (5.0, 15.0, 30.0, 60.0)),
  )
  def test_predictions_agree_with_eval_sums(self, class_values):
    step_config = config.StepConfig(class_values=class_values)
    s = _state()
    data = arrays(23, seed=4)
    out = evaluate.predict(s, data, config=step_config, batch_size=8)
    chex.assert_shape([out['pred'], out['expected']], [(23,), (23,)])
    chex.assert_type(out['pred'], np.int32)
    totals = evaluate.accumulate(s, data, config=step_config, batch_size=8)
    confusion = np.zeros((_C, _C), np.int64)
    np.add.at(confusion, (data['label'], out['pred']), 1)
    np.testing.assert_array_equal(confusion, totals['confusion'])
    np.testing.assert_allclose(
        np.abs(out['expected'] - data['age']).sum(), totals['abs_err_expected'], rtol=1e-5
    )

  def test_padding_is_dropped_and_order_kept(self):
    s = _state()
    data = arrays(11, seed=5)
    whole = evaluate.predict(s, data, config=config.StepConfig(), batch_size=16)
    pieces = evaluate.predict(s, data, config=config.StepConfig(), batch_size=3)
    chex.assert_trees_all_close(whole, pieces, rtol=1e-6)

  def test_empty_dataset_raises(self):
    data = {k: v[:0] for k, v in arrays(3).items()}
    with self.assertRaisesRegex(ValueError, 'empty'):
      evaluate.predict(_state(), data, config=config.StepConfig(), batch_size=4)


# Dropout and flips make the test sensitive to the per-step keys.
DROPOUT = dataclasses.replace(TINY, conv_dropout=0.25, dense_dropout=0.5)
FLIP = config.StepConfig(augment=augment.AugmentConfig(flip_prob=0.5))


class EpochTest(chex.TestCase):

  def _loop(self, s, data, key, batch_size):
    perm_key, step_key = steps.epoch_keys(key)
    indices = steps.epoch_indices(perm_key, len(data['image']), batch_size)
    totals = None
    for i, batch in enumerate(batching.train_batches(data, indices)):
      s, sums = steps.train_step(
          s, batch, jax.random.fold_in(step_key, i), config=FLIP
      )
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return s, totals

  def test_scan_epoch_equals_step_loop(self):
    data = arrays(22, seed=5)
    del data['age']
    base = state(DROPOUT)
    # Adam with epsilon 1e-3: with its default (1e-8) the first steps move a
    # parameter by about the learning rate however small its gradient, so a
    # gradient at float32's rounding level (a conv bias ahead of BatchNorm
    # whose ReLU never clips: 5e-8 here) moves it by chance, up to 1.4e-3
    # apart in the two programs. Here such a gradient moves it by ~1e-7.
    tx = optax.adam(1e-2, eps=1e-3)
    base = base.replace(tx=tx, opt_state=tx.init(base.params))
    key = jax.random.key(7)
    tree = lambda s: (s.step, s.params, s.batch_stats, s.opt_state)

    looped, loop_sums = self._loop(fakes.copy(base), data, key, 4)
    scanned, scan_sums = steps.train_epoch(
        fakes.copy(base), jnp.asarray(data['image']), jnp.asarray(data['label']),
        key, batch_size=4, config=FLIP,
    )
    self.assertEqual(int(scanned.step), 5)  # 22 // 4; the remainder dropped
    self.assertEqual(float(scan_sums['count']), 20.0)
    # The two programs round differently (~1e-5 of each gradient): 1.2e-5
    # apart at most after 5 steps; another key moves them by ~2e-2 (below).
    atol = 1e-4
    chex.assert_trees_all_close(tree(scanned), tree(looped), rtol=1e-5, atol=atol)
    chex.assert_trees_all_close(scan_sums, loop_sums, rtol=1e-5)

    # The comparison is sensitive: another epoch key trains differently.
    other, _ = steps.train_epoch(
        fakes.copy(base), jnp.asarray(data['image']), jnp.asarray(data['label']),
        jax.random.key(8), batch_size=4, config=FLIP,
    )
    for a, b in zip(jax.tree.leaves(other.params), jax.tree.leaves(scanned.params)):
      self.assertGreater(np.max(np.abs(a - b)), 4 * atol)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ('exact', 12, 4, 3),
      ('remainder_dropped', 14, 4, 3),
      ('one_batch', 5, 5, 1),
  )
  def test_epoch_indices(self, n, batch_size, num_steps):
    fn = self.variant(steps.epoch_indices, static_argnums=(1, 2))
    key = jax.random.key(0)
    idx = np.asarray(fn(key, n, batch_size))
    chex.assert_shape(idx, (num_steps, batch_size))
    flat = idx.ravel()
    self.assertLen(set(flat.tolist()), flat.size)  # no repeats
    self.assertTrue(np.all((flat >= 0) & (flat < n)))
    np.testing.assert_array_equal(np.asarray(fn(key, n, batch_size)), idx)
    np.testing.assert_array_equal(
        flat, np.asarray(jax.random.permutation(key, n))[: flat.size]
    )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('empty', 0, 4), ('too_small', 3, 4))
  def test_epoch_indices_raises(self, n, batch_size):
    fn = self.variant(steps.epoch_indices, static_argnums=(1, 2))
    with self.assertRaisesRegex(ValueError, 'smaller than one batch'):
      fn(jax.random.key(0), n, batch_size)

  def test_epoch_keys(self):
    key = jax.random.key(3)
    perm_key, step_key = steps.epoch_keys(key)
    expected = jax.random.split(key)
    chex.assert_trees_all_equal(
        jax.random.key_data(jnp.stack([perm_key, step_key])),
        jax.random.key_data(expected),
    )
    self.assertFalse(
        np.array_equal(jax.random.key_data(perm_key), jax.random.key_data(step_key))
    )


if __name__ == '__main__':
  absltest.main()
