"""Tests for agejax.transfer.merge_params and its report.

Small variants of the study's two networks stand in for the real ones: the
FER model has head (16, 8) -> 7 classes, the age model head (16, 16, 8) -> 100
classes, mirroring (512, 256) -> 7 and (512, 512, 256) -> 100. Variables are
shaped by ``jax.eval_shape`` of the real init and filled by NumPy, so the
tests compile nothing.
"""

import chex
import jax
import numpy as np
from absl.testing import absltest, parameterized

from agejax import config, freezing, transfer
from tests import fakes

_FILTERS = ((4, 4), (8, 8), (8, 8))
FER = config.ModelConfig(num_classes=7, conv_filters=_FILTERS, dense_units=(16, 8))
AGE = config.ModelConfig(num_classes=100, conv_filters=_FILTERS, dense_units=(16, 16, 8))
# Every layer differs in width from FER/AGE: no leaf has a matching shape.
OTHER = config.ModelConfig(
    num_classes=3, conv_filters=((6, 6), (10, 10), (10, 10)), dense_units=(12, 12)
)
MODELS = {'fer': FER, 'age': AGE, 'other': OTHER}


def fake_variables(model_config, seed):
  """``{'params', 'batch_stats'}`` of the model, random but not initialised.

  Every leaf ~ N(0, 1), unlike ``fakes.fill``: nothing here runs the model,
  so BatchNorm needs no valid statistics.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: rng.normal(size=s.shape).astype(s.dtype),
      fakes.abstract_variables(model_config),
  )


def _flat(tree):
  return {
      freezing.path_str(p): v
      for p, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def _layer(prefix, *layers):
  """Paths of every leaf of ``layers`` under ``prefix`` ('params'...)."""
  leaves = {
      'conv': ('kernel', 'bias'),
      'dense': ('kernel', 'bias'),
      'logits': ('kernel', 'bias'),
      'bn': ('scale', 'bias'),
      'stats': ('mean', 'var'),
  }
  out = set()
  for layer in layers:
    kind = layer.rsplit('/', 1)[-1].rstrip('0123456789')
    kind = 'stats' if prefix == 'batch_stats' else kind
    out |= {f'{prefix}/{layer}/{leaf}' for leaf in leaves[kind]}
  return out


_CONV = [f'block{b}/conv{c}' for b in (1, 2, 3) for c in (1, 2)]
_CONV_BN = [f'block{b}/bn{c}' for b in (1, 2, 3) for c in (1, 2)]
BLOCKS = _layer('params', *_CONV, *_CONV_BN) | _layer('batch_stats', *_CONV_BN)
# Same shape in FER and age models: first dense layer and its BatchNorm.
HEAD1 = _layer('params', 'head/dense1', 'head/bn1') | _layer(
    'batch_stats', 'head/bn1'
)
# Present in both, shapes differ ((16, 8) vs (16, 16); 8 vs 16; 7 vs 100).
HEAD2_LOGITS = (
    _layer('params', 'head/dense2', 'head/bn2', 'logits')
    | _layer('batch_stats', 'head/bn2')
)
HEAD3 = _layer('params', 'head/dense3', 'head/bn3') | _layer(
    'batch_stats', 'head/bn3'
)
HEAD = HEAD1 | HEAD2_LOGITS | HEAD3


class MergeParamsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(
          testcase_name='same_model',
          source='age', target='age', dont_load=(),
          loaded=BLOCKS | HEAD, not_loaded=set(), mismatched=set(),
          missing=set(), unexpected=set(),
      ),
      dict(
          testcase_name='fer_to_age',
          source='fer', target='age', dont_load=(),
          loaded=BLOCKS | HEAD1, not_loaded=set(), mismatched=HEAD2_LOGITS,
          missing=HEAD3, unexpected=set(),
      ),
      dict(
          testcase_name='age_to_fer',
          source='age', target='fer', dont_load=(),
          loaded=BLOCKS | HEAD1, not_loaded=set(), mismatched=HEAD2_LOGITS,
          missing=set(), unexpected=HEAD3,
      ),
      dict(
          testcase_name='fer_to_age_dont_load_head',
          source='fer', target='age',
          dont_load=(r'params/head/.*', r'batch_stats/head/.*', r'params/logits/.*'),
          loaded=BLOCKS, not_loaded=HEAD, mismatched=set(),
          missing=set(), unexpected=set(),
      ),
      dict(
          testcase_name='same_model_dont_load_block3_and_logits',
          source='age', target='age',
          dont_load=(r'.*/block3/.*', r'params/logits/kernel'),
          loaded=(BLOCKS | HEAD)
          - {p for p in BLOCKS if '/block3/' in p}
          - {'params/logits/kernel'},
          not_loaded={p for p in BLOCKS if '/block3/' in p}
          | {'params/logits/kernel'},
          mismatched=set(), missing=set(), unexpected=set(),
      ),
  )
  def test_report_and_values(
      self, source, target, dont_load, loaded, not_loaded, mismatched,
      missing, unexpected,
  ):
    src = fake_variables(MODELS[source], seed=1)
    init = fake_variables(MODELS[target], seed=2)
    merged, report = transfer.merge_params(src, init, dont_load)

    self.assertEqual(set(report.loaded), loaded)
    self.assertEqual(set(report.not_loaded), not_loaded)
    self.assertEqual({p for p, _, _ in report.mismatched}, mismatched)
    self.assertEqual(set(report.missing), missing)
    self.assertEqual(set(report.unexpected), unexpected)
    # Every path of the model is accounted for exactly once.
    target_paths = set(_flat(init))
    self.assertEqual(loaded | not_loaded | mismatched | missing, target_paths)
    self.assertLen(
        report.loaded + report.not_loaded + report.missing + report.mismatched,
        len(target_paths),
    )

    # Shapes reported for mismatches are (checkpoint, model).
    flat_src, flat_init, flat_merged = _flat(src), _flat(init), _flat(merged)
    for path, src_shape, dst_shape in report.mismatched:
      self.assertEqual(src_shape, flat_src[path].shape)
      self.assertEqual(dst_shape, flat_init[path].shape)

    # Values: loaded leaves come from the checkpoint, the rest keep init.
    chex.assert_trees_all_equal_shapes_and_dtypes(merged, init)
    for path, value in flat_merged.items():
      expected = flat_src[path] if path in loaded else flat_init[path]
      np.testing.assert_array_equal(value, expected, err_msg=path)

    sizes = {p: int(np.size(v)) for p, v in flat_init.items()}
    self.assertEqual(report.total_size, sum(sizes.values()))
    self.assertEqual(report.loaded_size, sum(sizes[p] for p in loaded))

  def test_loaded_values_take_the_model_dtype(self):
    src = jax.tree.map(lambda x: x.astype(np.float16), fake_variables(AGE, 1))
    init = fake_variables(AGE, 2)
    merged, _ = transfer.merge_params(src, init)
    chex.assert_trees_all_equal_shapes_and_dtypes(merged, init)
    chex.assert_trees_all_close(merged, src, rtol=1e-3)

  @parameterized.named_parameters(
      ('pattern_matches_nothing', 'age', ('params/head/dense9/.*',), 'match no'),
      # Full match: a bare layer name is not a path.
      ('fullmatch_not_search', 'age', ('logits',), 'match no'),
      ('one_of_two_matches_nothing', 'age', (r'params/logits/.*', 'typo'), 'typo'),
      ('incompatible_model', 'other', (), 'No array'),
      ('everything_dont_load', 'age', ('.*',), 'No array'),
  )
  def test_raises(self, source, dont_load, regex):
    src = fake_variables(MODELS[source], seed=1)
    init = fake_variables(AGE, seed=2)
    with self.assertRaisesRegex(ValueError, regex):
      transfer.merge_params(src, init, dont_load)

  def test_unrelated_tree_raises(self):
    init = fake_variables(AGE, seed=2)
    with self.assertRaisesRegex(ValueError, 'No array'):
      transfer.merge_params({'foo': {'w': np.zeros(3)}}, init)


class TransferReportTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('fer_to_age', 'fer', 'age', (r'params/block1/conv1/.*',)),
      ('age_to_fer', 'age', 'fer', (r'batch_stats/head/bn1/mean',)),
  )
  def test_format_mentions_every_path_not_loaded(self, source, target, dont_load):
    _, report = transfer.merge_params(
        fake_variables(MODELS[source], 1),
        fake_variables(MODELS[target], 2),
        dont_load,
    )
    text = report.format()
    lines = text.splitlines()
    not_loaded = (
        list(report.not_loaded)
        + list(report.missing)
        + [p for p, _, _ in report.mismatched]
        + list(report.unexpected)
    )
    self.assertNotEmpty(not_loaded)
    # One line per path, plus the summary.
    self.assertLen(lines, 1 + len(not_loaded))
    for path in not_loaded:
      self.assertTrue(
          any(line.endswith(': ' + path) for line in lines[1:]), path
      )
    for path in report.loaded:
      self.assertFalse(
          any(line.endswith(': ' + path) for line in lines[1:]), path
      )
    self.assertIn(f'loaded {len(report.loaded)} arrays', lines[0])
    self.assertIn(f'{report.loaded_size:,} of {report.total_size:,}', lines[0])
    for path, src, dst in report.mismatched:
      self.assertIn(f'shape {src} in checkpoint, {dst} in model): {path}', text)

  def test_to_dict(self):
    _, report = transfer.merge_params(
        fake_variables(FER, 1), fake_variables(AGE, 2)
    )
    d = report.to_dict()
    self.assertEqual(
        set(d),
        {'loaded', 'not_loaded', 'missing', 'mismatched', 'unexpected',
         'loaded_size', 'total_size'},
    )
    self.assertEqual(tuple(d['loaded']), report.loaded)


if __name__ == '__main__':
  absltest.main()
