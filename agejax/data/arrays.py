"""Helpers for datasets held as a dict of equal-length numpy arrays (one row per example)."""

from collections.abc import Sequence

import numpy as np

Arrays = dict[str, np.ndarray]


def num_rows(arrays: Arrays) -> int:
  """The common length of all arrays; ValueError if they differ or the dict is empty."""
  lengths = {key: len(value) for key, value in arrays.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f'arrays must be non-empty and share one length, got {lengths}')
  return next(iter(lengths.values()))


def take(arrays: Arrays, index: np.ndarray) -> Arrays:
  """The rows at `index` (integer positions or a boolean mask) of every array."""
  return {key: value[index] for key, value in arrays.items()}


def concat(parts: Sequence[Arrays]) -> Arrays:
  """Row-wise concatenation of datasets with the same keys."""
  return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
