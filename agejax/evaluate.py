"""Evaluating a train state on a whole dataset, exactly.

`eval_step` sums are accumulated on device over fixed-shape, padded and masked
batches; every score is then derived from the totals (see `agejax.metrics`).
Scores from counts (accuracy, CS@k, precision, recall, F1, the confusion
matrix) therefore do not depend on the batch size at all; those from float
sums (loss, the MAEs) only to float32 rounding, the order of the additions
changing with the batch size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Mapping

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from agejax import batching
from agejax import config as config_lib
from agejax import metrics
from agejax import parallel
from agejax import steps

CS_CURVE_KS = tuple(range(11))
TOLERANCE_K = 3
# Scores that read class indices as ordered values (see StepConfig.ordinal).
_TOLERANCE_PREFIX = f'tol{TOLERANCE_K}_'
_ORDINAL_PREFIXES = ('mae', 'cs@', _TOLERANCE_PREFIX)


def _sharded_batches(
    arrays: Mapping[str, np.ndarray], batch_size: int, mesh: jax.sharding.Mesh | None
) -> Iterator[dict[str, jax.Array]]:
  """`batching.eval_batches` of ``arrays``, each split over ``mesh`` (default: every device)."""
  mesh = parallel.data_mesh() if mesh is None else mesh
  parallel.check_platform(mesh)
  parallel.check_batch_size(batch_size, mesh)
  for batch in batching.eval_batches(arrays, batch_size):
    yield parallel.shard_batch(batch, mesh)


def accumulate(
    state: steps.TrainState,
    arrays: Mapping[str, np.ndarray],
    *,
    config: config_lib.StepConfig,
    batch_size: int,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, np.ndarray]:
  """Sums of `agejax.steps.eval_step` over every example of ``arrays``."""
  totals = None
  for batch in _sharded_batches(arrays, batch_size, mesh):
    sums = steps.eval_step(state, batch, config=config)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError('Cannot evaluate on an empty dataset.')
  return jax.device_get(totals)


# One compiled program per number of classes, not one per operation.
_per_class_scores = jax.jit(metrics.precision_recall_f1_support)


def summarize(
    totals: Mapping[str, np.ndarray], *, config: config_lib.StepConfig
) -> dict[str, Any]:
  """All scores of accumulated eval sums, as plain Python values.

  Keys: ``loss`` (plain cross-entropy, see `agejax.steps.eval_step`);
  ``accuracy``; ``cs@k`` for k = 0..10 (in classes: years for age classes);
  ``mae`` (argmax decoding, years), ``mae_expected`` (DEX) and
  ``mae_median``; ``{macro,weighted}_{precision,recall,f1}`` over the classes
  present in labels or predictions; the same with prefix ``tol3_`` for the
  study's tolerance-adjusted metrics; and ``per_class`` precision, recall,
  F1 and support lists. When ``config.ordinal`` is False, the MAE, ``cs@k``
  and ``tol3_`` keys are left out. With ``config.class_values`` (the 11 age
  ranges) the ``tol3_`` keys are left out too: the study's tolerance is
  +-3 years, and +-3 classes would be +-3 ranges (7 of the 11 counted right
  around 25-34); ``cs@k`` is kept, in ranges.
  """
  cm = np.asarray(totals['confusion'])
  count = float(totals['count'])
  values = None if config.class_values is None else np.asarray(config.class_values)
  summary = metrics.report_from_confusion(
      cm, ks=CS_CURVE_KS, tolerance_k=TOLERANCE_K, class_values=values
  )
  summary['loss'] = float(totals['loss_sum']) / count
  summary['mae'] = float(totals['abs_err_argmax']) / count
  summary['mae_expected'] = float(totals['abs_err_expected']) / count
  summary['mae_median'] = float(totals['abs_err_median']) / count
  if not config.ordinal:
    summary = {k: v for k, v in summary.items() if not k.startswith(_ORDINAL_PREFIXES)}
  elif values is not None:
    summary = {k: v for k, v in summary.items() if not k.startswith(_TOLERANCE_PREFIX)}
  p, r, f1, support = jax.device_get(_per_class_scores(cm))
  summary['per_class'] = {
      'precision': p.tolist(),
      'recall': r.tolist(),
      'f1': f1.tolist(),
      'support': support.tolist(),
  }
  return summary


def score_names(config: config_lib.StepConfig, num_classes: int) -> tuple[str, ...]:
  """The names of the scores `summarize` gives, sorted, without ``count`` and ``per_class``.

  These are the scores an epoch can be compared on (``count`` is the same
  every epoch). Read off `summarize` itself, of any totals, so the two
  cannot disagree.
  """
  any_totals = {
      'confusion': np.eye(num_classes, dtype=np.int64),
      'count': num_classes,
      **{k: 0.0 for k in ('loss_sum', 'abs_err_argmax', 'abs_err_expected', 'abs_err_median')},
  }
  scores = summarize(any_totals, config=config)
  return tuple(sorted(k for k in scores if k not in ('per_class', 'count')))


def evaluate(
    state: steps.TrainState,
    arrays: Mapping[str, np.ndarray],
    *,
    config: config_lib.StepConfig,
    batch_size: int,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
  """Returns (`summarize` scores, confusion matrix) of ``state`` on ``arrays``."""
  totals = accumulate(
      state, arrays, config=config, batch_size=batch_size, mesh=mesh
  )
  return summarize(totals, config=config), np.asarray(totals['confusion'])


def predict(
    state: steps.TrainState,
    arrays: Mapping[str, np.ndarray],
    *,
    config: config_lib.StepConfig,
    batch_size: int,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, np.ndarray]:
  """`agejax.steps.predict_step` outputs for every example of ``arrays``, in order.

  Per-example predictions are what paired comparisons of two models and
  scores per subgroup (e.g. per ethnicity) need; the summed scores of
  `evaluate` cannot give them.
  """
  parts = []
  for batch in _sharded_batches(arrays, batch_size, mesh):
    out = steps.predict_step(state, batch, config=config)
    # The outputs are split over the devices (of every host): gather them whole.
    out, mask = multihost_utils.process_allgather((out, batch['mask']), tiled=True)
    parts.append({k: np.asarray(v)[np.asarray(mask)] for k, v in out.items()})
  if not parts:
    raise ValueError('Cannot predict on an empty dataset.')
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
