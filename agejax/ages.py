"""Mappings between ages in years, age classes and the study's 11 age ranges.

Age estimation is posed as classification. Two label spaces are used:

* **Age classes** (``NUM_AGE_CLASSES = 100``): class ``i`` is the age of
  ``i`` completed years, ``0..99``, so an age is its own class.
  `age_to_class` maps other ages into that range (any older age to 99), for
  data whose ages are fractional or unbounded; the study's splits instead drop
  UTKFace's faces older than 99 (it runs to 116,
  `agejax.data.cleaning.filter_max_age`).
* **Study ranges** (``NUM_RANGES = 11``): the inclusive integer ranges
  0-2, 3-5, 6-9, 10-12, 13-17, 18-24, 25-34, 35-44, 45-54, 55-64 and the
  open-ended 65+, used by the study's 11-range variant.

All functions are pure ``jnp`` code and can be jitted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NUM_AGE_CLASSES: int = 100

# (lower, upper) inclusive bounds in completed years; ``None`` = open-ended.
STUDY_RANGES: tuple[tuple[int, int | None], ...] = (
    (0, 2),
    (3, 5),
    (6, 9),
    (10, 12),
    (13, 17),
    (18, 24),
    (25, 34),
    (35, 44),
    (45, 54),
    (55, 64),
    (65, None),
)
NUM_RANGES: int = len(STUDY_RANGES)
RANGE_LOWER_BOUNDS: tuple[int, ...] = tuple(lo for lo, _ in STUDY_RANGES)
RANGE_NAMES: tuple[str, ...] = tuple(
    f"{lo}+" if hi is None else f"{lo}-{hi}" for lo, hi in STUDY_RANGES
)


def age_to_class(ages: jax.Array, num_classes: int = NUM_AGE_CLASSES) -> jax.Array:
  """Maps ages in years to age classes.

  Ages are clipped to ``[0, num_classes - 1]`` and truncated to completed
  years, so fractional ages fall into the class of their whole year and all
  ages ``>= num_classes - 1`` share the last class.

  Args:
    ages: Ages in years, any shape, integer or float.
    num_classes: Number of age classes (a Python int >= 1).

  Returns:
    ``int32`` class indices with the shape of ``ages``.
  """
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a Python int >= 1, got {num_classes!r}.")
  ages = jnp.asarray(ages)
  if jnp.issubdtype(ages.dtype, jnp.integer):
    # In a narrow integer type the clip bound itself could wrap around.
    ages = ages.astype(jnp.int32)
  return jnp.clip(ages, 0, num_classes - 1).astype(jnp.int32)


def age_to_range(ages: jax.Array) -> jax.Array:
  """Maps ages in years (or age classes) to indices into ``STUDY_RANGES``.

  The index is that of the last range whose lower bound is ``<= age``
  (``searchsorted`` on ``RANGE_LOWER_BOUNDS``), so fractional ages fall into
  the range of their completed year, ages ``>= 65`` map to ``65+`` and
  negative ages map to ``0-2``.

  Args:
    ages: Ages in years, any shape, integer or float.

  Returns:
    ``int32`` range indices in ``[0, NUM_RANGES)`` with the shape of ``ages``.
  """
  ages = jnp.asarray(ages)
  bounds = jnp.asarray(RANGE_LOWER_BOUNDS, dtype=ages.dtype)
  idx = jnp.searchsorted(bounds, ages, side="right") - 1
  return jnp.clip(idx, 0, NUM_RANGES - 1).astype(jnp.int32)


def range_midpoints(max_age: int = NUM_AGE_CLASSES - 1) -> jax.Array:
  """Representative age of each study range, for MAE on range predictions.

  The representative age of the inclusive range ``[lo, hi]`` is its midpoint
  ``(lo + hi) / 2``; the open range ``65+`` is closed at ``max_age`` (by
  default 99, the last age class), giving 82. MAE between ranges is then the
  distance between their midpoints (pass the result as ``class_values`` to
  ``metrics.mae_from_cm``). Midpoints are data-independent; per-range mean
  ages of a data set are an alternative the caller can pass instead.

  Args:
    max_age: Age that closes the open-ended last range (Python int >= 65).

  Returns:
    ``float32`` array ``[NUM_RANGES]`` of representative ages in years.
  """
  last_lo = STUDY_RANGES[-1][0]
  if not isinstance(max_age, int) or max_age < last_lo:
    raise ValueError(f"max_age must be a Python int >= {last_lo}, got {max_age!r}.")
  mids = [(lo + (max_age if hi is None else hi)) / 2 for lo, hi in STUDY_RANGES]
  return jnp.asarray(mids, dtype=jnp.float32)
