"""Duplicate grouping and age filtering for UTKFace arrays.

UTKFace ships byte-identical images under different names, some with different ages, and
also the same photo saved again (re-encoded, resized or brightened) under other names and
ages. A group with one age is kept once; a group with conflicting ages has no
trustworthy label and is dropped by default ('keep_first' keeps its first image instead).
Groups are byte-identical files (equal md5), plus, on request, near-duplicates
(`near_duplicate_pairs`), mirrored copies included.
"""

import collections
from collections.abc import Iterator

import numpy as np

from agejax.data import arrays as arrays_lib

CONFLICT_POLICIES = ('drop', 'keep_first')

# Two faces are taken for one photo when their 12x12 block means, each standardised to mean 0
# and variance 1, correlate at least this much. On UTKFace's 48x48 gray faces every pair
# above it that we inspected is one photo saved twice; from 0.97 down, different photos of
# look-alike faces appear (docs/DATA.md).
NEAR_DUPLICATE_MIN_CORR = 0.98
_SIGNATURE_SIDE = 12


def duplicate_groups(hashes: np.ndarray, pairs: np.ndarray | None = None) -> list[np.ndarray]:
  """Row indices of each group of two or more rows, in first-seen order.

  Rows with equal ``hashes`` are one group; ``pairs`` ([P, 2] row indices) joins more rows,
  transitively (a near-duplicate of a copy joins the copy's group).
  """
  parent = np.arange(len(hashes))

  def root(i: int) -> int:
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  first = {}
  links = [(first.setdefault(h, i), i) for i, h in enumerate(hashes.tolist())]
  if pairs is not None:
    links += [(int(i), int(j)) for i, j in pairs]
  for i, j in links:
    ri, rj = root(i), root(j)
    if ri != rj:
      parent[max(ri, rj)] = min(ri, rj)
  groups = collections.defaultdict(list)
  for i in range(len(hashes)):
    groups[root(i)].append(i)
  return [np.array(rows) for rows in groups.values() if len(rows) > 1]


def _signatures(images: np.ndarray) -> np.ndarray:
  """[N, 144] float32 signatures whose dot products are the correlations compared.

  The 12x12 block means of each (gray) image, standardised, divided by sqrt(144).
  """
  if images.ndim not in (3, 4) or min(images.shape[1:3]) < _SIGNATURE_SIDE:
    raise ValueError(
        f'Near-duplicate search needs [N, H, W] or [N, H, W, C] images of at least'
        f' {_SIGNATURE_SIDE}x{_SIGNATURE_SIDE} pixels, got shape {images.shape}.')
  n, h, w = images.shape[:3]
  channels = images.shape[3] if images.ndim == 4 else 1
  gray = images.reshape(n, h, w, channels).mean(axis=-1, dtype=np.float32)
  # Centre crop to whole blocks (64 -> 60 for the rgb64 config).
  bh, bw = h // _SIGNATURE_SIDE, w // _SIGNATURE_SIDE
  top, left = (h - bh * _SIGNATURE_SIDE) // 2, (w - bw * _SIGNATURE_SIDE) // 2
  gray = gray[:, top:top + bh * _SIGNATURE_SIDE, left:left + bw * _SIGNATURE_SIDE]
  blocks = gray.reshape(n, _SIGNATURE_SIDE, bh, _SIGNATURE_SIDE, bw).mean(axis=(2, 4))
  flat = blocks.reshape(n, _SIGNATURE_SIDE * _SIGNATURE_SIDE)
  flat = flat - flat.mean(axis=1, keepdims=True)
  norm = np.sqrt(np.sum(flat * flat, axis=1, keepdims=True))
  # A flat image (no contrast) correlates with nothing.
  return np.divide(flat, norm, out=np.zeros_like(flat), where=norm > 1e-2)


def _correlations(
    queries: np.ndarray, keys: np.ndarray, budget_bytes: int = 256 << 20
) -> Iterator[tuple[int, np.ndarray]]:
  """(first query row, [rows, len(keys)] correlations) of `_signatures`, block by block.

  Each block's matrix holds at most ``budget_bytes`` (at least one row).
  """
  block = max(1, budget_bytes // (4 * max(1, len(keys))))
  for start in range(0, len(queries), block):
    yield start, queries[start:start + block] @ keys.T


def _signatures_and_mirrored(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`_signatures` of the images and of their left-right mirror images.

  UTKFace holds photos saved again mirrored, often under another age; training flips faces
  at random, so a mirrored copy in another split leaks that face as much as a plain copy.
  """
  return _signatures(images), _signatures(images[:, :, ::-1])


def near_duplicate_pairs(
    images: np.ndarray, *, min_corr: float = NEAR_DUPLICATE_MIN_CORR
) -> np.ndarray:
  """[P, 2] row pairs ``i < j`` whose images are near-duplicates (see `NEAR_DUPLICATE_MIN_CORR`).

  Image ``j`` or its mirror image is compared with image ``i``. Compares every pair of images
  exactly (blocked matrix products, seconds for UTKFace's 23,708 faces). Byte-identical images
  are among the pairs; an image that is its own mirror image is not a pair.
  """
  sig, mirrored = _signatures_and_mirrored(images)
  found = [np.zeros((0, 2), np.int64)]
  for keys in (sig, mirrored):
    for start, corr in _correlations(sig, keys):
      rows, cols = np.nonzero(corr >= min_corr)
      rows = rows + start
      pairs = np.stack([np.minimum(rows, cols), np.maximum(rows, cols)], axis=1)
      found.append(pairs[rows != cols])
  return np.unique(np.concatenate(found).astype(np.int64), axis=0)


def near_duplicate_leaks(
    train: np.ndarray, others: dict[str, np.ndarray], *, min_corr: float = NEAR_DUPLICATE_MIN_CORR
) -> dict[str, int]:
  """Rows of each of ``others`` (images) with a near-duplicate, or a mirrored one, in ``train``."""
  train_sigs = _signatures_and_mirrored(train)
  leaks = {}
  for name, images in others.items():
    queries = _signatures(images)
    best = np.full(len(images), -1.0, np.float32)
    for keys in train_sigs:
      for start, corr in _correlations(queries, keys):
        rows = slice(start, start + len(corr))
        best[rows] = np.maximum(best[rows], np.max(corr, axis=1, initial=-1.0))
    leaks[name] = int(np.sum(best >= min_corr))
  return leaks


def deduplicate(
    arrays: arrays_lib.Arrays, *, conflicts: str = 'drop', near_pairs: np.ndarray | None = None
) -> tuple[arrays_lib.Arrays, dict]:
  """Keeps one row per duplicate group; conflicting-age groups follow `conflicts`.

  Groups are equal content hashes, joined by ``near_pairs`` when given (`near_duplicate_pairs`).
  Returns the kept rows (original order) and counts: duplicate groups, extra copies removed,
  conflicting groups and the rows they lost, unique hashes (and, with ``near_pairs``, how many
  pairs there were).
  """
  if conflicts not in CONFLICT_POLICIES:
    raise ValueError(f'conflicts must be one of {CONFLICT_POLICIES}, got {conflicts!r}')
  n = arrays_lib.num_rows(arrays)
  keep = np.ones(n, dtype=bool)
  conflicting, conflict_rows_dropped = 0, 0
  groups = duplicate_groups(arrays['hash'], near_pairs)
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
      'unique_hashes': len(set(arrays['hash'].tolist())),
      'conflicting_groups': conflicting,
      'conflicting_rows_dropped': conflict_rows_dropped,
      'kept': int(keep.sum()),
  }
  if near_pairs is not None:
    report['near_duplicate_pairs'] = len(near_pairs)
  return arrays_lib.take(arrays, keep), report


def filter_max_age(arrays: arrays_lib.Arrays, *, max_age: int) -> tuple[arrays_lib.Arrays, int]:
  """Drops rows with age > max_age (outside the 0..max_age classes); returns the count dropped."""
  keep = arrays['age'] <= max_age
  return arrays_lib.take(arrays, keep), int((~keep).sum())
