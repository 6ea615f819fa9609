"""A small synthetic face dataset, generated in code, labelled by age and emotion.

No real data ships with agejax, so the quickstart and the tests run on
cartoon faces drawn here. Each face's features depend on its labels:

* emotion (FER2013 codes 0=angry 1=disgust 2=fear 3=happy 4=sad 5=surprise
  6=neutral) sets eyebrow height and slant, eye openness and mouth
  curvature, width, openness and tilt;
* age (0..99) changes the face continuously: children have rounder heads,
  larger eyes set lower on the face and a shorter lower face; with age come
  forehead wrinkles (more lines, more contrast), crow's feet, nasolabial
  folds, under-eye bags, greying hair and eyebrows, and rougher skin.

Position, scale, tilt, skin and hair tone, hair style (by a gender label),
background, lighting and pixel noise vary at random, so neither task is
trivial. Both tasks depend on the same low-level cues (edges of the face
oval, eyes, brows, mouth), which is what makes emotion pretraining a useful
start for age estimation.

Drawing is vectorised over faces with numpy (no per-pixel or per-face Python
loops) and deterministic in ``seed``.
"""

from __future__ import annotations

import numpy as np

EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
NUM_EMOTIONS = len(EMOTIONS)
NUM_AGES = 100  # age classes 0..99, as in the study's UTKFace setup

# Per-emotion expression parameters, indexed by FER code (see EMOTIONS), in
# units of the face half-width: brow heights above the eye line at the inner
# and outer ends, eye opening (relative), mouth corner lift (+ smile,
# - frown), mouth half-width, mouth opening, and a one-sided sneer (disgust).
_BROW_INNER = np.array([0.14, 0.18, 0.40, 0.27, 0.38, 0.46, 0.26], np.float32)
_BROW_OUTER = np.array([0.32, 0.24, 0.30, 0.27, 0.20, 0.44, 0.26], np.float32)
_EYE_OPEN = np.array([0.55, 0.50, 1.25, 0.60, 0.75, 1.35, 0.85], np.float32)
_MOUTH_CURVE = np.array([-0.04, -0.06, -0.03, 0.14, -0.13, 0.0, 0.0], np.float32)
_MOUTH_HALF_WIDTH = np.array([0.30, 0.32, 0.40, 0.45, 0.32, 0.20, 0.34], np.float32)
_MOUTH_OPEN = np.array([0.02, 0.03, 0.10, 0.07, 0.0, 0.20, 0.0], np.float32)
_SNEER = np.array([0.0, 0.18, 0.0, 0.0, 0.0, 0.0, 0.0], np.float32)

_CHUNK = 128  # faces drawn at once: keeps the [chunk, size, size] arrays in cache


def make_faces(
    n: int, *, seed: int, size: int = 48, age_range: tuple[int, int] = (0, 99)
) -> dict[str, np.ndarray]:
  """Draws ``n`` grayscale synthetic faces with uniformly random age and emotion.

  Args:
    n: number of faces (>= 0).
    seed: seed of the generator; equal arguments give equal faces.
    size: image height and width in pixels (>= 24).
    age_range: inclusive (min, max) age, within 0..99.

  Returns:
    A dict with 'image' uint8 ``[n, size, size, 1]``, 'age' int32 ``[n]``,
    'emotion' int32 ``[n]`` in 0..6 (FER codes) and 'gender' int32 ``[n]``
    (0 or 1; it only changes the hair style).
  """
  if n < 0:
    raise ValueError(f"n must be non-negative, got {n}.")
  if size < 24:
    raise ValueError(f"size must be at least 24 pixels, got {size}.")
  lo, hi = age_range
  if not 0 <= lo <= hi < NUM_AGES:
    raise ValueError(f"age_range must satisfy 0 <= min <= max <= 99, got {age_range}.")
  rng = np.random.default_rng(seed)
  age = rng.integers(lo, hi + 1, n).astype(np.int32)
  emotion = rng.integers(0, NUM_EMOTIONS, n).astype(np.int32)
  gender = rng.integers(0, 2, n).astype(np.int32)
  images = np.empty((n, size, size, 1), np.uint8)
  for start in range(0, n, _CHUNK):
    part = slice(start, min(start + _CHUNK, n))
    images[part, ..., 0] = _draw(rng, age[part], emotion[part], gender[part], size)
  return {"image": images, "age": age, "emotion": emotion, "gender": gender}


def make_fer_splits(
    seed: int, n_train: int, n_val: int, n_test: int, *, size: int = 48
) -> dict[str, dict[str, np.ndarray]]:
  """Emotion-recognition splits (the FER2013 stand-in); 'label' is the emotion."""
  return _splits(seed, 0, (n_train, n_val, n_test), "emotion", size)


def make_age_splits(
    seed: int, n_train: int, n_val: int, n_test: int, *, size: int = 48
) -> dict[str, dict[str, np.ndarray]]:
  """Age-estimation splits (the UTKFace stand-in); 'label' is the age class 0..99."""
  return _splits(seed, 1, (n_train, n_val, n_test), "age", size)


def _splits(
    seed: int, task: int, sizes: tuple[int, int, int], label_key: str, size: int
) -> dict[str, dict[str, np.ndarray]]:
  """Draws each split from its own seed stream, so no face is shared and a
  split does not change when another split's size does."""
  out = {}
  for index, (name, n) in enumerate(zip(("train", "validation", "test"), sizes)):
    split_seed = int(np.random.SeedSequence([seed, task, index]).generate_state(1)[0])
    faces = make_faces(n, seed=split_seed, size=size)
    out[name] = {
        "image": faces["image"],
        "label": faces[label_key],
        "age": faces["age"],
        "emotion": faces["emotion"],
    }
  return out


# ----------------------------------------------------------------------------
# Drawing. Shapes are evaluated on face-relative coordinates (u right, v down),
# in units of the face half-width, for all faces of a chunk at once: per-face
# parameters have shape [n, 1, 1] and broadcast against the [n, S, S] grids.
# Left/right-symmetric features are drawn once on |u|. Distances are signed
# (negative inside) and multiplied by `scale` to get pixels.


def _soft(signed_dist_px: np.ndarray) -> np.ndarray:
  """Coverage in [0, 1] from a signed distance in pixels; the one-pixel ramp
  anti-aliases edges."""
  coverage = 0.5 - signed_dist_px
  return np.clip(coverage, 0.0, 1.0, out=coverage)


def _ellipse(u, v, cu, cv, ru, rv):
  """Approximate signed distance to an axis-aligned ellipse."""
  return (np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2) - 1.0) * np.minimum(ru, rv)


def _stroke(u, v, u0, v0, u1, v1, half_width):
  """Signed distance to a straight stroke from (u0, v0) to (u1, v1), u0 < u1,
  with square ends; cheaper than an exact segment distance."""
  slope = (v1 - v0) / (u1 - u0)
  across = np.abs(v - v0 - slope * (u - u0)) / np.sqrt(1.0 + slope * slope)
  return np.maximum(np.maximum(across - half_width, u0 - u), u - u1)


def _paint(canvas, alpha, value):
  """Alpha-composites ``value`` over ``canvas`` in place."""
  canvas += alpha * (value - canvas)


def _col(x):
  """Per-face parameter [n] -> float32 [n, 1, 1], to broadcast over pixels."""
  return np.asarray(x, np.float32)[:, None, None]


def _draw(rng: np.random.Generator, age, emotion, gender, size: int) -> np.ndarray:
  """Draws one chunk of faces; returns uint8 [n, size, size]."""
  n = age.shape[0]
  a = _col(age)
  growth = np.clip(a / 18.0, 0.0, 1.0) ** 0.8  # 0 newborn -> 1 adult
  old = np.clip((a - 30.0) / 60.0, 0.0, 1.0)  # 0 young adult -> 1 at 90
  grey = np.clip((a - 35.0) / 40.0, 0.0, 1.0) ** 1.2

  def jitter(sigma):
    return _col(rng.normal(0.0, sigma, n))

  # Pose: position, scale (pixels per face half-width), small in-plane tilt.
  scale = _col(size * rng.uniform(0.29, 0.35, n))
  cx = _col(size * (0.5 + rng.uniform(-0.05, 0.05, n)))
  cy = _col(size * (0.54 + rng.uniform(-0.04, 0.04, n)))
  tilt = _col(np.deg2rad(rng.uniform(-6.0, 6.0, n)))
  y, x = np.mgrid[0:size, 0:size].astype(np.float32)
  dx, dy = (x - cx) * (1.0 / scale), (y - cy) * (1.0 / scale)
  u = np.cos(tilt) * dx + np.sin(tilt) * dy
  v = np.cos(tilt) * dy - np.sin(tilt) * dx
  au = np.abs(u)

  def paint(dist, value, alpha=1.0):
    _paint(img, _soft(dist * scale) * alpha, value)

  # Background: random level plus a linear lighting gradient.
  img = _col(rng.uniform(0.1, 0.9, n)) + _col(rng.uniform(-0.3, 0.3, n)) * (x / size - 0.5)

  # Proportions: children rounder, eyes lower and larger, lower face shorter.
  half_height = 1.12 + 0.2 * growth + jitter(0.03)
  eye_v = -0.12 * half_height + 0.22 * (1.0 - growth)
  nose_v = eye_v + 0.3 + 0.2 * growth
  mouth_v = eye_v + 0.5 + 0.32 * growth + jitter(0.02)

  skin = _col(rng.uniform(0.5, 0.85, n))
  hair0 = _col(rng.uniform(0.05, 0.4, n))
  hair = hair0 + grey * (0.85 - hair0)
  long_hair = _col(gender == 1)

  # Hair behind the head (long at the sides for gender 1), neck, face oval.
  hair_back = _ellipse(
      u, v, 0.0, -0.12 + 0.5 * long_hair, 1.18 + 0.06 * long_hair,
      half_height + 0.1 + 0.5 * long_hair,
  )
  paint(np.maximum(hair_back, v - 0.2 - long_hair * half_height), hair)
  paint(np.maximum(au - 0.45, 0.7 * half_height - v), skin * 0.8)
  face_r2 = u * u + (v / half_height) ** 2
  face = np.sqrt(face_r2) - 1.0
  paint(face, skin * (1.0 - 0.3 * face_r2 * face_r2))

  # Forehead wrinkles: line k (k = 0..3, upwards) fades in between ages
  # 28 + 11k and 48 + 11k, so their number and contrast grow with age.
  spacing = 0.075
  phase = (eye_v - 0.52 - v + 0.015 * np.sin(5.0 * u)) / spacing
  k = np.round(phase)
  line_strength = np.clip((a - 28.0 - 11.0 * k) / 20.0, 0.0, 1.0) * (np.abs(k - 1.5) < 2)
  wrinkle = np.maximum(np.abs(phase - k) * spacing - 0.014, au - 0.5 + 0.04 * k)
  paint(wrinkle, skin * 0.4, 0.7 * line_strength)

  # Fringe over the forehead; the hairline recedes with age for gender 0.
  hairline = -half_height * (0.66 + 0.2 * old * (1.0 - long_hair)) + jitter(0.03)
  paint(np.maximum(v - hairline, face - 0.02), hair)

  # Eyes: crow's feet and bags with age, then white, iris and eyelid opening.
  ex = 0.38 - 0.03 * (1.0 - growth)
  eye_ru = 0.15 + 0.07 * (1.0 - growth) - 0.02 * old
  eye_open = _col(_EYE_OPEN[emotion]) * (1.0 - 0.15 * old) + jitter(0.04)
  for slope in (-0.5, 0.5):
    crow = _stroke(au, v, ex + 0.2, eye_v, ex + 0.34, eye_v + slope * 0.14, 0.012)
    paint(crow, skin * 0.45, 0.6 * old)
  bag = np.maximum(np.abs(_ellipse(au, v, ex, eye_v + 0.08, eye_ru * 1.1, 0.1)) - 0.012, eye_v + 0.1 - v)
  paint(bag, skin * 0.5, 0.6 * old)
  eye = _ellipse(au, v, ex, eye_v, eye_ru, eye_ru * 0.55 * eye_open)
  paint(eye, 0.92)
  paint(np.maximum(_ellipse(au, v, ex, eye_v, eye_ru * 0.5, eye_ru * 0.5), eye), 0.08)

  # Eyebrows: emotion sets the inner and outer heights; disgust lowers one;
  # brows thin and grey with age.
  one_sided = _col(_SNEER[emotion])
  brow_in = _col(_BROW_INNER[emotion]) + jitter(0.02)
  brow_out = _col(_BROW_OUTER[emotion]) + jitter(0.02)
  above_eye = v - eye_v - one_sided * 0.5 * (u > 0)
  brow = _stroke(au, above_eye, 0.12, -brow_in, 0.62, -brow_out, 0.045 * (1.0 - 0.3 * old))
  paint(brow, hair * 0.8)

  # Nostrils and, with age, nasolabial folds towards the mouth corners.
  mouth_w = _col(_MOUTH_HALF_WIDTH[emotion]) + jitter(0.02)
  paint(_ellipse(au, v, 0.1, nose_v, 0.06, 0.035), skin * 0.4)
  fold = _stroke(au, v, 0.22, nose_v - 0.05, mouth_w + 0.1, mouth_v + 0.06, 0.015)
  paint(fold, skin * 0.5, 0.7 * old)

  # Mouth: a curved band, corners up when happy, down when sad, open and
  # narrow for surprise, pulled up on one side for disgust.
  curve = _col(_MOUTH_CURVE[emotion]) + jitter(0.015)
  opening = _col(_MOUTH_OPEN[emotion]) + np.abs(jitter(0.01))
  t = np.clip(u / mouth_w, -1.0, 1.0)
  half_open = 0.5 * opening * np.sqrt(1.0 - t * t)
  offset = np.abs(v - mouth_v + curve * t * t + one_sided * 0.25 * t - half_open)
  paint(np.maximum(offset - 0.03 - half_open, au - mouth_w), skin * 0.35)
  paint(np.maximum(offset - half_open + 0.01, au - 0.9 * mouth_w), 0.05)

  # Camera: contrast, brightness, sensor noise, and rougher skin with age.
  contrast = _col(rng.uniform(0.75, 1.25, n))
  brightness = _col(rng.uniform(-0.1, 0.1, n))
  sigma = _col(rng.uniform(0.01, 0.04, n)) + _soft(face * scale) * (0.01 + 0.025 * old)
  # Uniform noise with unit variance: as good here as Gaussian, and faster.
  noise = sigma * (rng.random((n, size, size), np.float32) - 0.5) * np.float32(12**0.5)
  img = (img - 0.5) * contrast + 0.5 + brightness + noise
  return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
