"""Train/validation/test splits of UTKFace arrays under three protocols.

- 'dedup' (default): duplicates merged first (`cleaning.deduplicate`), then a seeded split
  stratified by age, so no content hash is in two splits. Byte-identical files only, unless
  ``near_duplicates='group'``: then the same photo saved differently is merged too.
- 'paper': the study's plain random split of all images; duplicates can leak across splits.
- 'leaky': every image doubled before a random split, re-creating the Kaggle copy that holds
  each image twice, to measure what such leakage does to the scores.
Every protocol drops ages above `max_age` and adds 'label' (= age, int32) to each split.
"""

from collections.abc import Sequence

import numpy as np

from agejax.data import arrays as arrays_lib
from agejax.data import cleaning

PROTOCOLS = ('dedup', 'paper', 'leaky')
NEAR_DUPLICATE_POLICIES = ('keep', 'group')
SPLITS = ('train', 'validation', 'test')


def _split_sizes(n: int, fractions: Sequence[float]) -> np.ndarray:
  """Sizes summing to n, largest remainders first (ties to the earlier split)."""
  exact = n * np.asarray(fractions, dtype=np.float64) / np.sum(fractions)
  sizes = np.floor(exact).astype(np.int64)
  order = np.argsort(-(exact - sizes), kind='stable')
  sizes[order[: n - sizes.sum()]] += 1
  return sizes


def _interleaved_ids(n: int, fractions: Sequence[float]) -> np.ndarray:
  """Split ids for n positions, each prefix as close to `fractions` as integers allow."""
  share = np.asarray(fractions, dtype=np.float64) / np.sum(fractions)
  counts = np.zeros(len(share))
  ids = np.empty(n, dtype=np.int64)
  for i in range(n):
    ids[i] = np.argmax((i + 1) * share - counts)
    counts[ids[i]] += 1
  return ids


def stratified_assignment(
    labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
  """Split id per row, stratified by label.

  Rows are ordered by label (random order within a label) and dealt to splits in a pattern
  whose every prefix follows `fractions`, so each label, even one with 3 rows, is split as
  evenly as it can be and the totals match `fractions` to within one row.
  """
  order = np.lexsort((rng.permutation(len(labels)), labels))
  assignment = np.empty(len(labels), dtype=np.int64)
  assignment[order] = _interleaved_ids(len(labels), fractions)
  return assignment


def random_assignment(
    n: int, fractions: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
  """Split id per row from one plain random permutation."""
  assignment = np.empty(n, dtype=np.int64)
  assignment[rng.permutation(n)] = np.repeat(
      np.arange(len(fractions)), _split_sizes(n, fractions))
  return assignment


def hash_leaks(splits: dict[str, arrays_lib.Arrays]) -> dict[str, int]:
  """Rows of validation/test whose content hash also occurs in train."""
  train = set(splits['train']['hash'].tolist())
  return {name: int(np.isin(splits[name]['hash'], list(train)).sum())
          for name in SPLITS[1:]}


def near_duplicate_leaks(splits: dict[str, arrays_lib.Arrays]) -> dict[str, int]:
  """Rows of validation/test with a near-duplicate in train (`cleaning.near_duplicate_leaks`)."""
  return cleaning.near_duplicate_leaks(
      splits['train']['image'], {name: splits[name]['image'] for name in SPLITS[1:]})


def make_splits(
    arrays: arrays_lib.Arrays,
    *,
    protocol: str = 'dedup',
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    max_age: int = 99,
    conflicts: str = 'drop',
    near_duplicates: str = 'keep',
) -> tuple[dict[str, arrays_lib.Arrays], dict]:
  """Splits UTKFace arrays (from `utk_face.load`) into train/validation/test plus a report.

  ``near_duplicates='group'`` (protocol 'dedup' only) merges near-duplicate faces
  (`cleaning.near_duplicate_pairs`) with the byte-identical ones before splitting; 'keep'
  treats them as different faces, as agejax did before it could find them.

  The report counts rows read, rows above max_age (read, and excluded after dedup), duplicate
  and conflicting groups (dedup), rows per split, and validation/test rows whose hash is also
  in train; with 'group' it names the policy and counts the near-duplicate pairs.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f'protocol must be one of {PROTOCOLS}, got {protocol!r}')
  if near_duplicates not in NEAR_DUPLICATE_POLICIES:
    raise ValueError(
        f'near_duplicates must be one of {NEAR_DUPLICATE_POLICIES}, got {near_duplicates!r}')
  if near_duplicates == 'group' and protocol != 'dedup':
    raise ValueError(
        f"near_duplicates='group' merges duplicates, which only protocol 'dedup' does;"
        f' protocol {protocol!r} keeps them on purpose.')
  if len(fractions) != len(SPLITS) or min(fractions) < 0 or sum(fractions) <= 0:
    raise ValueError(f'fractions must be 3 non-negative numbers, got {tuple(fractions)}')
  rng = np.random.default_rng(seed)
  report = {'protocol': protocol, 'seed': seed, 'max_age': max_age,
            'read': arrays_lib.num_rows(arrays),
            'above_max_age_read': int((arrays['age'] > max_age).sum())}
  if protocol == 'dedup':
    near_pairs = None
    if near_duplicates == 'group':
      near_pairs = cleaning.near_duplicate_pairs(arrays['image'])
      report['near_duplicates'] = near_duplicates
    arrays, dedup_report = cleaning.deduplicate(arrays, conflicts=conflicts, near_pairs=near_pairs)
    report |= {'conflicts': conflicts, **dedup_report}
  arrays, report['above_max_age_excluded'] = cleaning.filter_max_age(arrays, max_age=max_age)
  if protocol == 'leaky':
    arrays = arrays_lib.concat([arrays, arrays])
  arrays = arrays | {'label': arrays['age'].astype(np.int32)}
  n = arrays_lib.num_rows(arrays)
  if protocol == 'dedup':
    assignment = stratified_assignment(arrays['label'], fractions, rng)
  else:
    assignment = random_assignment(n, fractions, rng)
  splits = {name: arrays_lib.take(arrays, assignment == i) for i, name in enumerate(SPLITS)}
  report['split_counts'] = {name: int(len(s['label'])) for name, s in splits.items()}
  report['hash_leaks_from_train'] = hash_leaks(splits)
  return splits, report
