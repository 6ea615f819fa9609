"""Fixed-shape batches from in-memory arrays.

Datasets here are small enough to hold as uint8 arrays (UTKFace at 48x48 gray
is about 55 MB), so batching is plain indexing. Every batch has the same
shape, so each step compiles once: training drops the last partial batch,
evaluation pads it and marks the padding with ``mask=False``.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]

BATCH_KEYS = ('image', 'label', 'age')


def _select(arrays: Arrays, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
  missing = [k for k in ('image', 'label') if k not in arrays]
  if missing:
    raise KeyError(
        f'Dataset arrays need keys {missing}; got {sorted(arrays)}.'
    )
  n = len(arrays['image'])
  out = {k: np.asarray(arrays[k]) for k in keys if k in arrays}
  bad = {k: len(v) for k, v in out.items() if len(v) != n}
  if bad:
    raise ValueError(f'Arrays differ in length from image ({n}): {bad}.')
  return out


def check_arrays(
    arrays: Arrays, *, image_shape: tuple[int, ...], num_classes: int, name: str
) -> None:
  """Raises a ValueError naming split ``name`` unless the model can train on it.

  The steps cannot tell these mistakes apart from data: float images already
  in [0, 1] would be scaled by 1/255 again, and a label outside the classes
  would count in the loss's denominator with zero loss but in no score of the
  confusion matrix.

  Args:
    arrays: ``image`` uint8 [N, *image_shape] and ``label`` integer [N] in
      ``0..num_classes-1`` (and optionally ``age`` [N]).
    image_shape: The model's (height, width, channels).
    num_classes: The model's number of classes.
    name: The split, for the message.
  """
  try:
    data = _select(arrays, BATCH_KEYS)
  except (KeyError, ValueError) as e:
    raise ValueError(f'Split {name!r}: {e.args[0]}') from e
  image, label = data['image'], data['label']
  if image.dtype != np.uint8 or image.shape[1:] != tuple(image_shape):
    raise ValueError(
        f'Split {name!r}: images must be uint8 [N, {", ".join(map(str, image_shape))}] as'
        f' read from image files (0..255); got {image.dtype} {list(image.shape)}.'
    )
  if label.ndim != 1 or not np.issubdtype(label.dtype, np.integer):
    raise ValueError(
        f'Split {name!r}: labels must be integer class indices [N]; got {label.dtype}'
        f' {list(label.shape)}.'
    )
  bad = label[(label < 0) | (label >= num_classes)]
  if bad.size:
    raise ValueError(
        f'Split {name!r}: {bad.size} labels lie outside 0..{num_classes - 1}'
        f' (e.g. {sorted(set(bad.tolist()))[:5]}); filter or relabel them, or build'
        ' the model with more classes.'
    )


def train_batches(
    arrays: Arrays, indices: np.ndarray
) -> Iterator[dict[str, np.ndarray]]:
  """Yields one full batch per row of ``indices`` [steps, batch_size]."""
  data = _select(arrays, BATCH_KEYS)
  for idx in np.asarray(indices):
    batch = {k: v[idx] for k, v in data.items()}
    batch['mask'] = np.ones(len(idx), bool)
    yield batch


def eval_batches(
    arrays: Arrays, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
  """Yields the dataset in order; the last batch is zero-padded and masked."""
  data = _select(arrays, BATCH_KEYS)
  n = len(data['image'])
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    batch = {
        k: np.concatenate([v[start:stop], np.zeros((pad, *v.shape[1:]), v.dtype)])
        for k, v in data.items()
    }
    batch['mask'] = np.arange(batch_size) < (stop - start)
    yield batch
