"""Shared test helpers: a small model and fake (NumPy-filled) variables.

Initialising a model for real runs JAX's random ops, which compile slowly on
the CPUs the tests run on. The tests need variables of the right structure,
not properly initialised ones, so they take the shapes of the real init from
``jax.eval_shape`` (which compiles nothing) and fill them with NumPy random
values instead.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from agejax import config, freezing, steps

# A small variant of the study's CNN with the same layer names (so every
# freezing preset applies). Three blocks of 3x3 VALID convs need 48x48
# inputs: 46,44,22 | 20,18,9 | 7,5,2.
SMALL = config.ModelConfig(
    num_classes=5,
    conv_filters=((4, 4), (8, 8), (8, 8)),
    dense_units=(16, 16),
    image_size=48,
    conv_dropout=0.0,
    dense_dropout=0.0,
)


@functools.lru_cache(maxsize=None)
def _abstract_variables(model_config):
  return jax.eval_shape(
      lambda: steps.init_variables(
          jax.random.key(0), model_config.build(), model_config.input_shape
      )
  )


def abstract_variables(model_config):
  """``{'params', 'batch_stats'}`` of the model as ``ShapeDtypeStruct``s.

  Shapes come from ``jax.eval_shape`` of ``steps.init_variables``, so nothing
  is compiled or computed (the RNG ops of a real init compile slowly on CPU).
  Cached per config; each call returns fresh containers, safe to modify.
  """
  return jax.tree.map(lambda s: s, _abstract_variables(model_config))


def normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
  """Standard normal float32 values, drawn with NumPy.

  Not with ``jax.random``: each new shape compiles a threefry program (~1 s
  on 2 cores), and one drawn inside a jitted test function is compiled with
  it.
  """
  return np.random.default_rng(seed).standard_normal(shape, np.float32)


def fill(abstract, seed=0):
  """NumPy float32 values for an abstract tree, random but valid.

  Chosen by leaf name: kernels ~ N(0, 1/fan_in), BatchNorm ``scale`` and
  ``var`` ~ U(0.5, 1.5) (positive, so BatchNorm is well defined), anything
  else ~ N(0, 0.1). NumPy rather than ``jax.random``, whose ops compile slowly
  on the CPUs the tests run on.
  """
  rng = np.random.default_rng(seed)

  def one(path, s):
    name = freezing.path_str(path).rsplit('/', 1)[-1]
    if name == 'kernel':
      scale = 1 / np.sqrt(np.prod(s.shape[:-1]))
      return rng.normal(0, scale, s.shape).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return rng.normal(0, 0.1, s.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(one, abstract)


def fake_variables(model_config=SMALL, seed=0):
  """``{'params', 'batch_stats'}`` of the model as JAX arrays, filled by NumPy.

  Stands in for ``steps.init_variables`` without compiling its RNG ops:
  shapes from :func:`abstract_variables`, values from :func:`fill`.
  """
  return jax.tree.map(
      jnp.asarray, fill(abstract_variables(model_config), seed)
  )


def copy(tree):
  """A copy whose buffers survive the donation of the original."""
  return jax.tree.map(jnp.copy, tree)
