"""Bootstrap confidence intervals of test scores, and of differences between runs.

A test set is a sample: a model's test accuracy of 8.7 % on 3,462 faces is
known to about +-1 point, and two experiments 1 point apart may not differ at
all. Accuracy, CS(k) and MAE depend on the test examples only through their
``(true, predicted)`` pairs, i.e. the confusion matrix, so resampling the
examples with replacement is resampling the matrix's cells in proportion to
their counts. This module does that (the percentile bootstrap, Efron &
Tibshirani 1993) with explicit PRNG keys and returns intervals for any score
function of a confusion matrix, e.g. `agejax.metrics.accuracy_from_cm`.

Differences between two runs are bootstrapped by resampling each run's matrix
independently (`difference_interval`). When both runs saw the same test faces
this ignores the pairing; as models' errors on the same faces are positively
correlated, the interval is then wider than a paired one would be
(conservative). With per-example predictions, `mean_interval` of the
per-example differences gives the paired interval.
"""

from __future__ import annotations

from collections.abc import Callable
import functools

import jax
import jax.numpy as jnp
import numpy as np

Score = Callable[[jax.Array], jax.Array]


def _check_cm(cm: jax.Array | np.ndarray) -> np.ndarray:
  cm = np.asarray(cm)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f'confusion matrix must have shape [C, C], got {cm.shape}.')
  if not np.issubdtype(cm.dtype, np.integer) or bool(np.any(cm < 0)):
    raise ValueError('confusion matrix must hold non-negative integer counts.')
  if int(np.sum(cm)) == 0:
    raise ValueError('confusion matrix is empty: there is nothing to resample.')
  return cm.astype(np.int32)


def resample_confusion(key: jax.Array, cm: jax.Array, num_samples: int) -> jax.Array:
  """Confusion matrices of the examples of ``cm`` drawn with replacement.

  Args:
    key: PRNG key.
    cm: ``[C, C]`` integer confusion matrix of ``n`` examples.
    num_samples: How many bootstrap samples.

  Returns:
    ``int32 [num_samples, C, C]``; each sample holds ``n`` examples.
  """
  cm = _check_cm(cm)
  _check_num_samples(num_samples)
  return _resample(key, cm, num_samples, int(np.sum(cm)))


@functools.partial(jax.jit, static_argnames=('num_samples', 'num_examples'))
def _resample(
    key: jax.Array, cm: jax.Array, num_samples: int, num_examples: int
) -> jax.Array:
  """`resample_confusion` of a checked ``cm`` holding ``num_examples`` examples."""
  counts = cm.ravel()
  # Example e (in cell order) lies in cell searchsorted(cumsum, e, 'right').
  cells = jnp.searchsorted(jnp.cumsum(counts), jnp.arange(num_examples), side='right')
  drawn = cells[jax.random.randint(key, (num_samples, num_examples), 0, num_examples)]
  samples = jax.vmap(lambda c: jnp.bincount(c, length=counts.size))(drawn)
  return samples.reshape(num_samples, *cm.shape).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=('score', 'num_samples', 'num_examples')
)
def _resampled_scores(
    key: jax.Array, cm: jax.Array, score: Score, num_samples: int, num_examples: int
) -> jax.Array:
  """``score`` of each of `_resample`'s matrices, as one compiled program.

  Compiled once per score function, matrix shape and number of examples
  (every run of a study scores the same test set), instead of once per
  operation on first use.
  """
  return jax.vmap(score)(_resample(key, cm, num_samples, num_examples))


def _scores(key: jax.Array, cm: jax.Array, score: Score, num_samples: int) -> jax.Array:
  cm = _check_cm(cm)
  _check_num_samples(num_samples)
  return _resampled_scores(key, cm, score, num_samples, int(np.sum(cm)))


def interval(
    key: jax.Array,
    cm: jax.Array,
    score: Score,
    *,
    num_samples: int = 1000,
    level: float = 0.95,
) -> tuple[float, float]:
  """Percentile bootstrap interval of ``score(cm)`` over resampled test examples.

  Args:
    key: PRNG key.
    cm: ``[C, C]`` integer confusion matrix.
    score: Jittable function of a ``[C, C]`` matrix giving a scalar.
    num_samples: Bootstrap samples.
    level: Coverage of the interval, in (0, 1).

  Returns:
    ``(low, high)``.
  """
  _check_level(level)
  return _percentiles(_scores(key, cm, score, num_samples), level)


def difference_interval(
    key: jax.Array,
    cm_a: jax.Array,
    cm_b: jax.Array,
    score: Score,
    *,
    num_samples: int = 1000,
    level: float = 0.95,
) -> tuple[float, float]:
  """Percentile bootstrap interval of ``score(cm_a) - score(cm_b)``.

  The two matrices are resampled independently (see the module docstring:
  conservative when both runs scored the same test examples).
  """
  _check_level(level)
  key_a, key_b = jax.random.split(key)
  values_a = _scores(key_a, cm_a, score, num_samples)
  values_b = _scores(key_b, cm_b, score, num_samples)
  return _percentiles(values_a - values_b, level)


def mean_interval(
    key: jax.Array,
    values: jax.Array | np.ndarray,
    *,
    num_samples: int = 1000,
    level: float = 0.95,
) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of per-example ``values``.

  With ``values`` the per-example difference of two models on the same test
  examples (e.g. correct_a - correct_b, or |error_a| - |error_b|), this is
  the paired interval of their difference in accuracy or MAE: tighter than
  `difference_interval`, which cannot pair.
  """
  _check_level(level)
  values = jnp.asarray(values, jnp.float32)
  if values.ndim != 1 or values.shape[0] == 0:
    raise ValueError(f'values must have shape [n] with n >= 1, got {values.shape}.')
  _check_num_samples(num_samples)
  return _percentiles(_resampled_means(key, values, num_samples), level)


@functools.partial(jax.jit, static_argnames='num_samples')
def _resampled_means(key: jax.Array, values: jax.Array, num_samples: int) -> jax.Array:
  """Means of ``num_samples`` resamples of ``values``, as one compiled program."""
  n = values.shape[0]
  return jnp.mean(values[jax.random.randint(key, (num_samples, n), 0, n)], axis=1)


def _check_num_samples(num_samples: int) -> None:
  is_int = isinstance(num_samples, (int, np.integer)) and not isinstance(num_samples, bool)
  if not is_int or num_samples < 1:
    raise ValueError(f'num_samples must be an int >= 1, got {num_samples!r}.')


def _check_level(level: float) -> None:
  if not 0.0 < level < 1.0:
    raise ValueError(f'level must be in (0, 1), got {level}.')


def _percentiles(values: jax.Array, level: float) -> tuple[float, float]:
  tail = 100.0 * (1.0 - level) / 2.0
  low, high = np.percentile(np.asarray(values, np.float64), [tail, 100.0 - tail])
  return float(low), float(high)
