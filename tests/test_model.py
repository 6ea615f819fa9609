"""Tests for agejax.model: the study's CNN, its sizes, names and BatchNorm.

Parameter counts, names and shapes are checked on the full network through
``jax.eval_shape`` (nothing is computed); behaviour on a small variant.
"""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from agejax import config, freezing, model
from tests import fakes

# The small variant of the study's CNN, on 48x48 inputs.
SMALL = fakes.SMALL

AGE_PARAMS = 1_631_524
AGE_STATS = 4_032
FER_PARAMS = 1_343_943
FER_STATS = 3_008
PAPER_FROZEN = 93_120
PAPER_FROZEN_STATS = 448


def _size(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _abstract_variables(module, image_size=48, channels=1):
  return jax.eval_shape(
      lambda: module.init(
          jax.random.key(0),
          jnp.zeros((1, image_size, image_size, channels)),
          train=False,
      )
  )


def _images(n=4, size=48, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(0, 1, (n, size, size, 1)), jnp.float32)


class ParameterCountTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('age_model', model.age_model, AGE_PARAMS, AGE_STATS),
      ('age_config', lambda: config.ModelConfig().build(), AGE_PARAMS, AGE_STATS),
      ('fer_model', model.fer_model, FER_PARAMS, FER_STATS),
      ('fer_config', lambda: config.fer_model_config().build(), FER_PARAMS, FER_STATS),
  )
  def test_counts(self, make, params, stats):
    variables = _abstract_variables(make())
    self.assertEqual(set(variables), {'params', 'batch_stats'})
    self.assertEqual(_size(variables['params']), params)
    self.assertEqual(_size(variables['batch_stats']), stats)
    self.assertEqual(
        freezing.count_params(variables['params']),
        {'frozen': 0, 'trainable': params},
    )

  def test_age_total_is_contract(self):
    variables = _abstract_variables(model.age_model())
    self.assertEqual(_size(variables), 1_635_556)

  @parameterized.named_parameters(
      ('age', model.age_model, AGE_PARAMS, AGE_STATS, 1_538_404),
      ('fer', model.fer_model, FER_PARAMS, FER_STATS, 1_250_823),
  )
  def test_paper_freezing_counts(self, make, params, stats, trainable):
    variables = _abstract_variables(make())
    counts = freezing.count_params(variables['params'], 'paper')
    self.assertEqual(counts, {'frozen': PAPER_FROZEN, 'trainable': trainable})
    self.assertEqual(counts['frozen'] + counts['trainable'], params)
    frozen_bn = freezing.frozen_batch_norm_layers(
        variables['params'], variables['batch_stats'], 'paper'
    )
    self.assertEqual(frozen_bn, ('block1/bn1', 'block1/bn2', 'block2/bn1'))
    frozen_stats = sum(_size(variables['batch_stats'][l]) for l in frozen_bn)
    self.assertEqual(frozen_stats, PAPER_FROZEN_STATS)
    if make is model.age_model:
      # The study's "94.1% trainable": of all 1,635,556 stored values.
      self.assertEqual(round(100 * trainable / (params + stats), 1), 94.1)


_AGE_LAYERS = [
    *(f'block{b}/{k}{c}' for b in (1, 2, 3) for k in ('conv', 'bn') for c in (1, 2)),
    'head/dense1', 'head/bn1', 'head/dense2', 'head/bn2',
    'head/dense3', 'head/bn3', 'logits',
]
_FER_LAYERS = [l for l in _AGE_LAYERS if not l.endswith('3')]


class LayerNamesTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('age', model.age_model, _AGE_LAYERS),
      ('fer', model.fer_model, _FER_LAYERS),
  )
  def test_names(self, make, layers):
    variables = _abstract_variables(make())
    self.assertEqual(set(variables['params']), set(layers))
    self.assertEqual(
        set(variables['batch_stats']), {l for l in layers if '/bn' in l}
    )
    flat = {
        freezing.path_str(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(variables['params'])
    }
    for path in ('block1/conv1/kernel', 'block2/bn1/scale',
                 'head/dense1/kernel', 'logits/bias'):
      self.assertIn(path, flat)


_FULL_SHAPES = {
    'block1/conv1': (2, 46, 46, 32),
    'block1/conv2': (2, 44, 44, 64),
    'Dropout_0': (2, 22, 22, 64),  # after block 1's 2x2 max-pool
    'block2/conv1': (2, 20, 20, 128),
    'block2/conv2': (2, 18, 18, 128),
    'Dropout_1': (2, 9, 9, 128),
    'block3/conv1': (2, 7, 7, 128),
    'block3/conv2': (2, 5, 5, 256),
    'Dropout_2': (2, 2, 2, 256),
    'head/dense1': (2, 512),
    'head/dense2': (2, 512),
    'head/dense3': (2, 256),
    'logits': (2, 100),
}


class GeometryTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    net = model.age_model()
    variables = _abstract_variables(net)
    cls.variables = variables
    images = jax.ShapeDtypeStruct((2, 48, 48, 1), jnp.float32)
    cls.logits, state = jax.eval_shape(
        lambda v, x: net.apply(
            v, x, train=False, capture_intermediates=True,
            mutable=['intermediates'],
        ),
        variables,
        images,
    )
    cls.intermediates = state['intermediates']

  @parameterized.named_parameters(
      (layer.replace('/', '_'), layer, shape)
      for layer, shape in _FULL_SHAPES.items()
  )
  def test_intermediate_shape(self, layer, shape):
    (out,) = self.intermediates[layer]['__call__']
    chex.assert_shape(out, shape)

  def test_output_shape(self):
    chex.assert_shape(self.logits, (2, 100))

  def test_flatten_is_1024(self):
    chex.assert_shape(self.variables['params']['head/dense1']['kernel'], (1024, 512))


class InputTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('rank2', (48, 48)),
      ('rank3', (48, 48, 1)),
      ('rank5', (1, 1, 48, 48, 1)),
  )
  def test_wrong_rank_raises(self, shape):
    net = SMALL.build()
    with self.assertRaisesRegex(ValueError, r'\[batch, height, width, channels\]'):
      jax.eval_shape(
          lambda: net.init(jax.random.key(0), jnp.zeros(shape), train=False)
      )

  def test_unknown_dtype_raises(self):
    with self.assertRaisesRegex(ValueError, 'dtype'):
      config.ModelConfig(dtype='float16')


class DtypeTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('float32', 'float32', jnp.float32),
      ('bfloat16', 'bfloat16', jnp.bfloat16),
  )
  def test_params_and_outputs_float32(self, dtype, compute_dtype):
    mc = config.ModelConfig(dtype=dtype)  # the full network, shapes only
    net = mc.build()
    variables = _abstract_variables(net)
    for leaf in jax.tree.leaves(variables):
      self.assertEqual(leaf.dtype, jnp.float32)
    images = jax.ShapeDtypeStruct((2, 48, 48, 1), jnp.float32)
    for train in (False, True):
      (logits, state) = jax.eval_shape(
          lambda v, x: net.apply(
              v, x, train=train, capture_intermediates=True,
              mutable=['intermediates', 'batch_stats'],
              rngs={'dropout': jax.random.key(0)},
          ),
          variables,
          images,
      )
      self.assertEqual(logits.dtype, jnp.float32)
      # The computation itself runs in the requested dtype ...
      (conv,) = state['intermediates']['block2/conv1']['__call__']
      self.assertEqual(conv.dtype, compute_dtype)
      # ... while updated BatchNorm statistics stay float32.
      if train:
        for leaf in jax.tree.leaves(state['batch_stats']):
          self.assertEqual(leaf.dtype, jnp.float32)

  def test_bfloat16_close_to_float32(self):
    variables = fakes.fill(_abstract_variables(SMALL.build()))
    images = _images()
    out = {}
    for dtype in ('float32', 'bfloat16'):
      net = dataclasses.replace(SMALL, dtype=dtype).build()
      out[dtype] = jax.jit(lambda v, x: net.apply(v, x, train=False))(
          variables, images
      )
      self.assertEqual(out[dtype].dtype, jnp.float32)
      chex.assert_tree_all_finite(out[dtype])
    self.assertFalse(np.array_equal(out['float32'], out['bfloat16']))
    chex.assert_trees_all_close(out['bfloat16'], out['float32'], atol=0.1, rtol=0.1)


_ALL_BN = (
    'block1/bn1', 'block1/bn2', 'block2/bn1', 'block2/bn2', 'block3/bn1',
    'block3/bn2', 'head/bn1', 'head/bn2',
)


class FrozenBatchNormTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('none', ()),
      ('paper', ('block1/bn1', 'block1/bn2', 'block2/bn1')),
      ('mixed', ('block2/bn2', 'head/bn1')),
      ('all', _ALL_BN),
  )
  def test_frozen_layers_keep_statistics_in_train_mode(self, frozen_bn):
    net = SMALL.build(frozen_bn)
    variables = fakes.fill(_abstract_variables(net))
    images = _images()
    logits, updates = jax.jit(
        lambda v, x: net.apply(v, x, train=True, mutable=['batch_stats'])
    )(variables, images)
    chex.assert_tree_all_finite(logits)
    new_stats = updates['batch_stats']
    self.assertEqual(set(new_stats), set(_ALL_BN))
    for layer in _ALL_BN:
      old, new = variables['batch_stats'][layer], new_stats[layer]
      if layer in frozen_bn:
        chex.assert_trees_all_equal(new, old)
      else:
        for stat in ('mean', 'var'):
          self.assertFalse(
              np.any(np.asarray(new[stat]) == old[stat]), f'{layer}/{stat}'
          )
    if set(frozen_bn) == set(_ALL_BN):
      # Every BatchNorm uses its running statistics: with no dropout, train
      # mode computes exactly what inference does.
      eval_logits = jax.jit(lambda v, x: net.apply(v, x, train=False))(
          variables, images
      )
      chex.assert_trees_all_close(logits, eval_logits, rtol=1e-6, atol=1e-6)

  def test_eval_mode_never_updates(self):
    net = SMALL.build()
    variables = fakes.fill(_abstract_variables(net))
    _, updates = jax.jit(
        lambda v, x: net.apply(v, x, train=False, mutable=['batch_stats'])
    )(variables, _images())
    chex.assert_trees_all_equal(updates['batch_stats'], variables['batch_stats'])


if __name__ == '__main__':
  absltest.main()
