"""Class balance for the training split: the study's undersampling, a per-class cap, weights.

Also a random subset of a split, for smoke runs.

Apply these to train only; validation and test keep the natural age distribution.
"""

import numpy as np

from agejax.data import arrays as arrays_lib

WEIGHT_SCHEMES = ('balanced', 'uniform')


def undersample(
    arrays: arrays_lib.Arrays, *, label: int, n_remove: int, seed: int
) -> arrays_lib.Arrays:
  """Removes `n_remove` random rows of class `label` (the study: 500 of age 26), order kept."""
  rows = np.flatnonzero(arrays['label'] == label)
  if not 0 <= n_remove <= len(rows):
    raise ValueError(f'cannot remove {n_remove} rows of label {label}: it has {len(rows)}')
  drop = np.random.default_rng(seed).choice(rows, size=n_remove, replace=False)
  keep = np.ones(len(arrays['label']), dtype=bool)
  keep[drop] = False
  return arrays_lib.take(arrays, keep)


def cap_per_class(arrays: arrays_lib.Arrays, *, cap: int, seed: int) -> arrays_lib.Arrays:
  """Keeps at most `cap` random rows of every class, order kept."""
  if cap < 0:
    raise ValueError(f'cap must be >= 0, got {cap}')
  rng = np.random.default_rng(seed)
  keep = np.zeros(len(arrays['label']), dtype=bool)
  for label in np.unique(arrays['label']):
    rows = np.flatnonzero(arrays['label'] == label)
    keep[rng.choice(rows, size=min(cap, len(rows)), replace=False)] = True
  return arrays_lib.take(arrays, keep)


def random_subset(arrays: arrays_lib.Arrays, *, n: int, seed: int) -> arrays_lib.Arrays:
  """``n`` random rows (all when there are fewer), order kept.

  For smoke runs on part of a split: real splits are sorted by file name,
  which starts with the age, so their first rows would hold a few ages only.
  """
  total = arrays_lib.num_rows(arrays)
  if n < 0:
    raise ValueError(f'n must be >= 0, got {n}')
  if n >= total:
    return arrays
  keep = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
  return arrays_lib.take(arrays, keep)


def class_weights(labels: np.ndarray, num_classes: int, *, scheme: str = 'balanced') -> np.ndarray:
  """Per-class loss weights, float32 [num_classes].

  'balanced' is scikit-learn's n_samples / (n_present_classes * count[c]) for every class
  present in `labels`; classes absent from `labels` get weight 0 (they contribute no loss
  term anyway, and 0 keeps them from inflating the normalisation). 'uniform' is all ones.
  """
  if scheme not in WEIGHT_SCHEMES:
    raise ValueError(f'scheme must be one of {WEIGHT_SCHEMES}, got {scheme!r}')
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'labels must lie in 0..{num_classes - 1}')
  if scheme == 'uniform':
    return np.ones(num_classes, dtype=np.float32)
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  present = counts > 0
  weights = np.zeros(num_classes, dtype=np.float64)
  weights[present] = labels.size / (present.sum() * counts[present])
  return weights.astype(np.float32)
