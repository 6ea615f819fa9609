"""Exact-duplicate grouping and age filtering for UTKFace arrays.

UTKFace ships byte-identical images under different names, some with different ages. A group
with one age is kept once; a group with conflicting ages has no trustworthy label and is
dropped by default ('keep_first' keeps its first image instead).
"""

import collections

import numpy as np

from agejax.data import arrays as arrays_lib

CONFLICT_POLICIES = ('drop', 'keep_first')


def duplicate_groups(hashes: np.ndarray) -> list[np.ndarray]:
  """Row indices of each group of two or more equal hashes, in first-seen order."""
  groups = collections.defaultdict(list)
  for i, h in enumerate(hashes.tolist()):
    groups[h].append(i)
  return [np.array(rows) for rows in groups.values() if len(rows) > 1]


def deduplicate(
    arrays: arrays_lib.Arrays, *, conflicts: str = 'drop'
) -> tuple[arrays_lib.Arrays, dict]:
  """Keeps one row per content hash; conflicting-age groups follow `conflicts`.

  Returns the kept rows (original order) and counts: duplicate groups, extra copies removed,
  conflicting groups and the rows they lost, unique hashes.
  """
  if conflicts not in CONFLICT_POLICIES:
    raise ValueError(f'conflicts must be one of {CONFLICT_POLICIES}, got {conflicts!r}')
  n = arrays_lib.num_rows(arrays)
  keep = np.ones(n, dtype=bool)
  conflicting, conflict_rows_dropped = 0, 0
  groups = duplicate_groups(arrays['hash'])
  for rows in groups:
    keep[rows[1:]] = False
    if len(np.unique(arrays['age'][rows])) > 1:
      conflicting += 1
      if conflicts == 'drop':
        keep[rows[0]] = False
        conflict_rows_dropped += len(rows)
  report = {
      'duplicate_groups': len(groups),
      'duplicate_extra_copies': int(sum(len(rows) - 1 for rows in groups)),
      'unique_hashes': int(n - sum(len(rows) - 1 for rows in groups)),
      'conflicting_groups': conflicting,
      'conflicting_rows_dropped': conflict_rows_dropped,
      'kept': int(keep.sum()),
  }
  return arrays_lib.take(arrays, keep), report


def filter_max_age(arrays: arrays_lib.Arrays, *, max_age: int) -> tuple[arrays_lib.Arrays, int]:
  """Drops rows with age > max_age (outside the 0..max_age classes); returns the count dropped."""
  keep = arrays['age'] <= max_age
  return arrays_lib.take(arrays, keep), int((~keep).sum())
