"""Evaluation metrics for age classification, as pure jittable ``jnp`` functions.

Metrics are accumulated as sums and counts, never as averages of batch
averages: per batch, compute a confusion matrix (and, for real-valued age
predictions, ``abs_error_sum`` / ``cs_counts`` / ``valid_count``), add these
over the epoch, and derive every score from the totals with the ``*_from_cm``
functions or ``summary_from_confusion``. A ``mask`` (bool or float ``[B]``,
nonzero = real example) drops the padding of a padded last batch, so totals
are exact.

Definitions (``cm[i, j]`` = number of examples of true class ``i`` predicted
as class ``j``, rows = true, columns = predicted, as in scikit-learn):

* accuracy = ``trace(cm) / sum(cm)``.
* CS(k) (cumulative score, tolerance accuracy) = fraction of examples with
  ``|pred - true| <= k``; ``k`` is in class units, i.e. years for the 100 age
  classes and adjacent ranges for the 11 study ranges.
* MAE = mean ``|v[pred] - v[true]|`` with class values ``v`` (the class index,
  i.e. the age in years, by default).
* Per-class precision ``tp / (tp + fp)``, recall ``tp / (tp + fn)``, F1
  ``2 tp / (2 tp + fp + fn)`` and support ``tp + fn``; a zero denominator
  gives ``zero_division`` (0, 1 or NaN), as in scikit-learn.
* Tolerance-adjusted metrics (the study's): a prediction within ``k`` classes
  of the true class, ``|pred - true| <= k``, is counted as the true class,
  and precision / recall / F1 / accuracy / MAE are computed on these adjusted
  predictions. On a confusion matrix this moves every count with
  ``|i - j| <= k`` onto the diagonal (``tolerance_adjust_confusion``); thus
  tolerance-adjusted accuracy equals CS(k).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp

_AVERAGES = ("macro", "weighted", "micro")
_LABEL_SETS = ("all", "present")


def _check_num_classes(num_classes: int) -> None:
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(f"num_classes must be a Python int >= 1, got {num_classes!r}.")


def _check_k(k: int) -> int:
  if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 0:
    raise ValueError(f"tolerance k must be a Python int >= 0, got {k!r}.")
  return int(k)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
  if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or not ks:
    raise ValueError(f"ks must be a non-empty tuple of Python ints >= 0, got {ks!r}.")
  return tuple(_check_k(k) for k in ks)


def _check_zero_division(zero_division: float) -> float:
  if not isinstance(zero_division, (int, float)) or not (
      zero_division in (0.0, 1.0) or math.isnan(zero_division)
  ):
    raise ValueError(f"zero_division must be 0.0, 1.0 or nan, got {zero_division!r}.")
  return float(zero_division)


def _check_cm(cm: jax.Array) -> jax.Array:
  cm = jnp.asarray(cm)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f"confusion matrix must have shape [C, C], got {cm.shape}.")
  return cm


def _check_class_values(class_values: jax.Array | None, num_classes: int) -> jax.Array:
  if class_values is None:
    return jnp.arange(num_classes, dtype=jnp.float32)
  class_values = jnp.asarray(class_values, dtype=jnp.float32)
  if class_values.shape != (num_classes,):
    raise ValueError(
        f"class_values must have shape ({num_classes},), got {class_values.shape}."
    )
  return class_values


def _check_pair(labels: jax.Array, preds: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``labels`` and ``preds`` checked, unsigned integers widened to int32.

  Differences of unsigned integers wrap around (3 - 5 is 254 in uint8).
  """
  labels, preds = jnp.asarray(labels), jnp.asarray(preds)
  if labels.ndim != 1:
    raise ValueError(f"labels must have shape [B], got {labels.shape}.")
  if preds.shape != labels.shape:
    raise ValueError(f"preds must have the shape of labels {labels.shape}, got {preds.shape}.")
  return _signed(labels), _signed(preds)


def _signed(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.unsignedinteger):
    return x.astype(jnp.int32)
  return x


def _valid(labels: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Boolean ``[B]`` of examples that count: ``mask != 0``, or all if None."""
  if mask is None:
    return jnp.ones(labels.shape, dtype=bool)
  mask = jnp.asarray(mask)
  if mask.shape != labels.shape:
    raise ValueError(f"mask must have the shape of labels {labels.shape}, got {mask.shape}.")
  return mask.astype(bool)


def _divide(num: jax.Array, den: jax.Array, zero_division: float) -> jax.Array:
  """``num / den`` in float32, with ``zero_division`` where ``den == 0``."""
  num, den = jnp.asarray(num, jnp.float32), jnp.asarray(den, jnp.float32)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), zero_division)


def _class_distance(num_classes: int) -> jax.Array:
  """``int32 [C, C]`` matrix of ``|i - j|``."""
  idx = jnp.arange(num_classes)
  return jnp.abs(idx[:, None] - idx[None, :])


def confusion_matrix(
    labels: jax.Array,
    preds: jax.Array,
    num_classes: int,
    mask: jax.Array | None = None,
) -> jax.Array:
  """Confusion matrix ``cm[i, j]`` = #examples with true class i, predicted j.

  Matches ``sklearn.metrics.confusion_matrix(labels, preds,
  labels=range(num_classes))`` on the unmasked examples: examples whose
  label or prediction lies outside ``[0, num_classes)`` are ignored, as
  scikit-learn ignores values not in ``labels``. Matrices of batches add up
  to the matrix of their union.

  Args:
    labels: ``[B]`` integer true classes.
    preds: ``[B]`` integer predicted classes.
    num_classes: Number of classes ``C`` (Python int).
    mask: Optional ``[B]`` bool/float; examples with ``mask == 0`` are dropped.

  Returns:
    ``int32 [C, C]`` counts, rows = true, columns = predicted.
  """
  _check_num_classes(num_classes)
  labels, preds = _check_pair(labels, preds)
  for name, x in (("labels", labels), ("preds", preds)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be integer class indices, got dtype {x.dtype}.")
  valid = (
      _valid(labels, mask)
      & (labels >= 0) & (labels < num_classes)
      & (preds >= 0) & (preds < num_classes)
  )
  rows = jnp.where(valid, labels, 0)
  cols = jnp.where(valid, preds, 0)
  cm = jnp.zeros((num_classes, num_classes), dtype=jnp.int32)
  return cm.at[rows, cols].add(valid.astype(jnp.int32))


def tolerance_adjust(labels: jax.Array, preds: jax.Array, k: int) -> jax.Array:
  """Replaces predictions within ``k`` of the label by the label.

  Returns ``where(|preds - labels| <= k, labels, preds)`` in the dtype of
  ``preds``: the study's tolerance adjustment, applied before computing
  tolerance-adjusted precision / recall / F1 / MAE.

  Args:
    labels: ``[B]`` true classes.
    preds: ``[B]`` predicted classes.
    k: Tolerance in classes (Python int >= 0).

  Returns:
    ``[B]`` adjusted predictions.
  """
  k = _check_k(k)
  dtype = jnp.asarray(preds).dtype
  labels, preds = _check_pair(labels, preds)
  return jnp.where(jnp.abs(preds - labels) <= k, labels.astype(preds.dtype), preds).astype(dtype)


def tolerance_adjust_confusion(cm: jax.Array, k: int) -> jax.Array:
  """Confusion matrix of tolerance-adjusted predictions, from ``cm``.

  Moves every count ``cm[i, j]`` with ``|i - j| <= k`` onto ``cm[i, i]``;
  this equals ``confusion_matrix(labels, tolerance_adjust(labels, preds,
  k), C)``, so adjusted metrics can be derived from accumulated totals.

  Args:
    cm: ``[C, C]`` confusion matrix.
    k: Tolerance in classes (Python int >= 0).

  Returns:
    ``[C, C]`` adjusted confusion matrix, dtype of ``cm``.
  """
  k = _check_k(k)
  cm = _check_cm(cm)
  near = _class_distance(cm.shape[0]) <= k
  moved = jnp.sum(jnp.where(near, cm, 0), axis=1)
  return jnp.where(near, 0, cm) + jnp.diag(moved).astype(cm.dtype)


def decode_argmax(scores: jax.Array) -> jax.Array:
  """Most probable class: ``argmax`` over the last axis of probs or logits.

  Args:
    scores: ``[..., C]`` probabilities or logits.

  Returns:
    ``int32 [...]`` class indices.
  """
  scores = jnp.asarray(scores)
  if scores.ndim < 1:
    raise ValueError("scores must have a class axis [..., C].")
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def decode_expected(probs: jax.Array, class_values: jax.Array | None = None) -> jax.Array:
  """Expected value decoding (DEX): ``sum_i p_i * v_i``.

  With the default ``v_i = i`` this is the expected age in years of the
  predicted age distribution. ``probs`` must be normalised (softmax output).

  Args:
    probs: ``[..., C]`` class probabilities.
    class_values: Optional ``[C]`` value of each class (e.g. range midpoints).

  Returns:
    ``float32 [...]`` expected values.
  """
  probs = jnp.asarray(probs, jnp.float32)
  if probs.ndim < 1:
    raise ValueError("probs must have a class axis [..., C].")
  # A product and a sum, not ``probs @ values``: a matmul runs at the backend's
  # default precision, bfloat16 passes on TPU and TF32 on recent GPUs.
  return jnp.sum(probs * _check_class_values(class_values, probs.shape[-1]), axis=-1)


def decode_median(probs: jax.Array) -> jax.Array:
  """Median decoding: the smallest class whose CDF is ``>= 0.5``.

  The CDF is the cumulative sum of ``probs`` over the last axis (in floating
  point, so a CDF that is 0.5 in exact arithmetic may round to either side).
  If the CDF never reaches 0.5 (unnormalised input) the last class is
  returned.

  Args:
    probs: ``[..., C]`` class probabilities.

  Returns:
    ``int32 [...]`` median classes.
  """
  probs = jnp.asarray(probs)
  if probs.ndim < 1:
    raise ValueError("probs must have a class axis [..., C].")
  below = jnp.sum(jnp.cumsum(probs, axis=-1) < 0.5, axis=-1)
  return jnp.minimum(below, probs.shape[-1] - 1).astype(jnp.int32)


def valid_count(labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Number of examples that count (``mask != 0``), the denominator for sums.

  Args:
    labels: ``[B]`` labels (only the shape is used).
    mask: Optional ``[B]`` bool/float mask.

  Returns:
    ``int32`` scalar.
  """
  labels = jnp.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must have shape [B], got {labels.shape}.")
  return jnp.sum(_valid(labels, mask), dtype=jnp.int32)


def cs_counts(
    labels: jax.Array,
    preds: jax.Array,
    ks: tuple[int, ...],
    mask: jax.Array | None = None,
) -> jax.Array:
  """Counts of examples with ``|preds - labels| <= k`` for each ``k`` in ``ks``.

  Divide the accumulated counts by the accumulated ``valid_count`` to get
  CS(k). ``preds`` may be real-valued (e.g. ``decode_expected`` ages).

  Args:
    labels: ``[B]`` true classes / ages.
    preds: ``[B]`` predicted classes / ages.
    ks: Tolerances (tuple of Python ints >= 0), e.g. ``(0, 1, 2, 3)``.
    mask: Optional ``[B]`` bool/float mask.

  Returns:
    ``int32 [len(ks)]`` counts.
  """
  ks = _check_ks(ks)
  labels, preds = _check_pair(labels, preds)
  valid = _valid(labels, mask)
  err = jnp.abs(preds - labels)
  within = err[None, :] <= jnp.asarray(ks)[:, None]
  return jnp.sum(within & valid[None, :], axis=1, dtype=jnp.int32)


def abs_error_sum(
    labels: jax.Array, pred_ages: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """Sum of ``|pred_ages - labels|`` over unmasked examples, in float32.

  Divide the accumulated sum by the accumulated ``valid_count`` to get the
  MAE in years; this handles real-valued (DEX) predictions, which a
  confusion matrix cannot.

  Args:
    labels: ``[B]`` true ages.
    pred_ages: ``[B]`` predicted ages, integer or float.
    mask: Optional ``[B]`` bool/float mask.

  Returns:
    ``float32`` scalar.
  """
  labels, pred_ages = _check_pair(labels, pred_ages)
  valid = _valid(labels, mask)
  err = jnp.abs(pred_ages.astype(jnp.float32) - labels.astype(jnp.float32))
  return jnp.sum(jnp.where(valid, err, 0.0))


def precision_recall_f1_support(
    cm: jax.Array, *, zero_division: float = 0.0
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Per-class precision, recall, F1 and support from a confusion matrix.

  For labels and predictions in ``[0, C)`` (out-of-range ones are not in
  ``cm``; sklearn would count them as errors), matches
  ``sklearn.metrics.precision_recall_fscore_support(y_true, y_pred,
  labels=range(C), average=None, zero_division=zero_division)``: precision
  ``tp / pred_count``, recall ``tp / true_count``, F1 ``2 tp / (true_count +
  pred_count)``, each ``zero_division`` where its denominator is 0.

  Args:
    cm: ``[C, C]`` confusion matrix (rows = true).
    zero_division: Value for undefined ratios: 0.0, 1.0 or nan.

  Returns:
    ``(precision, recall, f1, support)``: three ``float32 [C]`` and one
    ``int32 [C]``.
  """
  zero_division = _check_zero_division(zero_division)
  cm = _check_cm(cm)
  tp = jnp.diag(cm)
  true_count = jnp.sum(cm, axis=1)
  pred_count = jnp.sum(cm, axis=0)
  precision = _divide(tp, pred_count, zero_division)
  recall = _divide(tp, true_count, zero_division)
  f1 = _divide(2 * tp, true_count + pred_count, zero_division)
  return precision, recall, f1, true_count.astype(jnp.int32)


def _nan_average(values: jax.Array, selected: jax.Array, weights: jax.Array) -> jax.Array:
  """scikit-learn's ``_nanaverage`` over ``selected`` entries.

  NaN entries are skipped; if the remaining weights sum to 0 the plain mean
  is used; with no entry left the result is NaN.
  """
  keep = selected & ~jnp.isnan(values)
  weights = jnp.where(keep, weights, 0.0)
  vals = jnp.where(keep, values, 0.0)
  weighted = _divide(jnp.sum(vals * weights), jnp.sum(weights), jnp.nan)
  plain = _divide(jnp.sum(vals), jnp.sum(keep), jnp.nan)
  return jnp.where(jnp.sum(weights) > 0, weighted, plain)


def averaged_prf(
    cm: jax.Array,
    *,
    average: str = "macro",
    labels: str = "present",
    zero_division: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Averaged precision, recall and F1 from a confusion matrix.

  Matches ``sklearn.metrics.precision_recall_fscore_support(..., average=
  average, zero_division=zero_division)`` with ``labels=range(C)`` for
  ``labels='all'``, and without ``labels`` (scikit-learn's default) for
  ``labels='present'``, where the classes averaged over are those occurring
  as a true or predicted class (nonzero row or column of ``cm``).

  * ``'macro'``: unweighted mean of the per-class scores.
  * ``'weighted'``: mean weighted by support (true count).
  * ``'micro'``: scores of the pooled counts; all three equal accuracy
    (``zero_division`` if ``cm`` is empty) for single-label data.

  With ``zero_division=nan`` undefined per-class scores are left out of the
  average, as in scikit-learn; an average over no class is NaN.

  Args:
    cm: ``[C, C]`` confusion matrix (rows = true).
    average: ``'macro'``, ``'weighted'`` or ``'micro'``.
    labels: ``'present'`` or ``'all'``.
    zero_division: Value for undefined ratios: 0.0, 1.0 or nan.

  Returns:
    ``(precision, recall, f1)`` float32 scalars.
  """
  if average not in _AVERAGES:
    raise ValueError(f"average must be one of {_AVERAGES}, got {average!r}.")
  if labels not in _LABEL_SETS:
    raise ValueError(f"labels must be one of {_LABEL_SETS}, got {labels!r}.")
  zero_division = _check_zero_division(zero_division)
  cm = _check_cm(cm)
  if average == "micro":
    micro = _divide(jnp.trace(cm), jnp.sum(cm), zero_division)
    return micro, micro, micro
  precision, recall, f1, support = precision_recall_f1_support(
      cm, zero_division=zero_division
  )
  if labels == "all":
    selected = jnp.ones(support.shape, dtype=bool)
  else:
    selected = (jnp.sum(cm, axis=0) + support) > 0
  weights = support.astype(jnp.float32) if average == "weighted" else jnp.ones(support.shape)
  return tuple(_nan_average(v, selected, weights) for v in (precision, recall, f1))


def accuracy_from_cm(cm: jax.Array) -> jax.Array:
  """Exact accuracy ``trace(cm) / sum(cm)`` (NaN for an empty ``cm``)."""
  cm = _check_cm(cm)
  return _divide(jnp.trace(cm), jnp.sum(cm), jnp.nan)


def cs_from_cm(cm: jax.Array, ks: tuple[int, ...]) -> jax.Array:
  """CS(k): fraction of examples with ``|i - j| <= k``, for each ``k`` in ``ks``.

  Args:
    cm: ``[C, C]`` confusion matrix.
    ks: Tolerances in classes (tuple of Python ints >= 0).

  Returns:
    ``float32 [len(ks)]`` (NaN for an empty ``cm``).
  """
  ks = _check_ks(ks)
  cm = _check_cm(cm)
  dist = _class_distance(cm.shape[0])
  within = dist[None] <= jnp.asarray(ks)[:, None, None]
  counts = jnp.sum(jnp.where(within, cm[None], 0), axis=(1, 2))
  return _divide(counts, jnp.sum(cm), jnp.nan)


def mae_from_cm(cm: jax.Array, class_values: jax.Array | None = None) -> jax.Array:
  """MAE ``sum_ij cm[i, j] |v_i - v_j| / sum(cm)`` (NaN for an empty ``cm``).

  Args:
    cm: ``[C, C]`` confusion matrix.
    class_values: Optional ``[C]`` value of each class in years; defaults to
      the class index (age classes). For the study ranges pass
      ``ages.range_midpoints()``; the true age is then also represented by
      its range's value.

  Returns:
    ``float32`` scalar.
  """
  cm = _check_cm(cm)
  values = _check_class_values(class_values, cm.shape[0])
  dist = jnp.abs(values[:, None] - values[None, :])
  return _divide(jnp.sum(cm.astype(jnp.float32) * dist), jnp.sum(cm), jnp.nan)


def _core_scores(
    cm: jax.Array, labels: str, zero_division: float, class_values: jax.Array | None
) -> dict[str, jax.Array]:
  """Accuracy, MAE and macro / weighted precision, recall, F1 of ``cm``."""
  scores = {"accuracy": accuracy_from_cm(cm), "mae": mae_from_cm(cm, class_values)}
  for average in ("macro", "weighted"):
    prf = averaged_prf(cm, average=average, labels=labels, zero_division=zero_division)
    for name, value in zip(("precision", "recall", "f1"), prf):
      scores[f"{average}_{name}"] = value
  return scores


def summary_from_confusion(
    cm: jax.Array,
    *,
    ks: tuple[int, ...] = (1, 2, 3),
    tolerance_k: int | tuple[int, ...] = 3,
    labels: str = "present",
    zero_division: float = 0.0,
    class_values: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """All scalar scores of an accumulated confusion matrix (jittable).

  Keys: ``count``; ``accuracy``; ``mae``; ``cs@k`` for each ``k`` in ``ks``;
  ``{macro,weighted}_{precision,recall,f1}``; and for each tolerance ``t``
  in ``tolerance_k`` the same accuracy / MAE / precision / recall / F1 keys
  prefixed ``tol{t}_``, computed on ``tolerance_adjust_confusion(cm, t)``
  (see the module docstring for the definition).

  Args:
    cm: ``[C, C]`` confusion matrix (rows = true).
    ks: Tolerances for CS(k) (tuple of Python ints >= 0).
    tolerance_k: Tolerance(s) for the adjusted metrics; ``()`` for none.
    labels: Classes averaged over, ``'present'`` or ``'all'``
      (see ``averaged_prf``).
    zero_division: Value for undefined ratios: 0.0, 1.0 or nan.
    class_values: Optional ``[C]`` class values for MAE (see ``mae_from_cm``).

  Returns:
    Flat dict of float32 scalars.
  """
  cm = _check_cm(cm)
  ks = _check_ks(ks)
  if isinstance(tolerance_k, numbers.Integral):
    tol_ks = (_check_k(tolerance_k),)
  elif isinstance(tolerance_k, (tuple, list)):
    tol_ks = tuple(_check_k(k) for k in tolerance_k)
  else:
    raise ValueError(f"tolerance_k must be an int or a tuple of ints, got {tolerance_k!r}.")
  summary = {"count": jnp.sum(cm).astype(jnp.float32)}
  summary.update(_core_scores(cm, labels, zero_division, class_values))
  for k, value in zip(ks, cs_from_cm(cm, ks)):
    summary[f"cs@{k}"] = value
  for k in tol_ks:
    adjusted = tolerance_adjust_confusion(cm, k)
    for name, value in _core_scores(adjusted, labels, zero_division, class_values).items():
      summary[f"tol{k}_{name}"] = value
  return summary


@functools.partial(
    jax.jit, static_argnames=("ks", "tolerance_k", "labels", "zero_division")
)
def _compiled_summary(
    cm: jax.Array,
    class_values: jax.Array | None,
    *,
    ks: tuple[int, ...],
    tolerance_k: int | tuple[int, ...],
    labels: str,
    zero_division: float,
) -> dict[str, jax.Array]:
  """`summary_from_confusion` as one program per matrix shape and options."""
  return summary_from_confusion(
      cm,
      ks=ks,
      tolerance_k=tolerance_k,
      labels=labels,
      zero_division=zero_division,
      class_values=class_values,
  )


def report_from_confusion(
    cm: jax.Array,
    *,
    ks: tuple[int, ...] = (1, 2, 3),
    tolerance_k: int | tuple[int, ...] = 3,
    labels: str = "present",
    zero_division: float = 0.0,
    class_values: jax.Array | None = None,
) -> dict[str, float]:
  """``summary_from_confusion`` as a dict of Python floats, for logging.

  Not jittable (it transfers to the host); takes the same arguments. Runs
  as one compiled program per matrix shape and options: op by op, its
  ~50 small operations each compiled on first use took ~2 s.
  """
  zero_division = _check_zero_division(zero_division)
  summary = _compiled_summary(
      _check_cm(cm),
      class_values,
      ks=_check_ks(ks),
      tolerance_k=tuple(tolerance_k) if isinstance(tolerance_k, list) else tolerance_k,
      labels=labels,
      # One NaN object, so that equal options find the same compiled program.
      zero_division=math.nan if math.isnan(zero_division) else zero_division,
  )
  return {name: float(value) for name, value in jax.device_get(summary).items()}
