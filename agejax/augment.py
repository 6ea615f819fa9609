"""Keras-style geometric image augmentation as pure, jittable JAX functions.

The study augments training faces with ``ImageDataGenerator``-like random
horizontal flips, rotations (+-10 degrees), translations (+-10%) and zooms
(+-10%). Here every operation is a pure function of a single ``[H, W, C]``
float image (and, for the random ones, an explicit PRNG key), so it can be
``vmap``-ed over a batch and run inside the jitted train step.

Rotation, translation and zoom are composed into ONE affine sampling matrix
about the image centre, so an image is resampled (bilinearly) once, not three
times.

Coordinate convention: a point is ``(row, col)`` measured from the image
centre ``((H - 1) / 2, (W - 1) / 2)``. A *sampling matrix* ``M`` (3x3,
homogeneous) maps an output pixel ``p`` to the input location ``M @ p`` it is
read from -- the convention of ``scipy.ndimage.affine_transform`` and Keras'
``apply_affine_transform``. ``rotation_matrix`` and friends return sampling
matrices for the named forward motion of the image content.

``AugmentConfig`` is frozen and hashable: under ``jax.jit`` pass it as a static
argument (or close over it), since its values decide which ops are traced.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Fill modes of jax.scipy.ndimage.map_coordinates matching Keras' fill_mode.
FILL_MODES = ("nearest", "constant", "reflect")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Strengths of the random augmentations; all zero means no augmentation.

  Attributes:
    flip_prob: probability of a horizontal (left-right) flip.
    rotation_deg: rotation angle drawn uniformly from [-rotation_deg, +rotation_deg].
    translate_frac: shift drawn uniformly from [-translate_frac, +translate_frac]
      times the image height (rows) and width (cols), independently.
    zoom_frac: zoom factor drawn uniformly from [1 - zoom_frac, 1 + zoom_frac],
      independently for rows and cols (as Keras does); > 1 magnifies.
    fill: how points sampled outside the image are filled: 'nearest' (Keras'
      default), 'constant' (``fill_value``) or 'reflect'.
    fill_value: the value used by ``fill='constant'``, in [0, 1] like the
      images (`random_augment` keeps its output in [0, 1]).
  """

  flip_prob: float = 0.0
  rotation_deg: float = 0.0
  translate_frac: float = 0.0
  zoom_frac: float = 0.0
  fill: str = "nearest"
  fill_value: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.flip_prob <= 1.0:
      raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}.")
    if not 0.0 <= self.rotation_deg <= 180.0:
      raise ValueError(f"rotation_deg must be in [0, 180], got {self.rotation_deg}.")
    if not 0.0 <= self.translate_frac < 1.0:
      raise ValueError(f"translate_frac must be in [0, 1), got {self.translate_frac}.")
    if not 0.0 <= self.zoom_frac < 1.0:
      raise ValueError(f"zoom_frac must be in [0, 1), got {self.zoom_frac}.")
    _check_fill(self.fill)
    if not 0.0 <= self.fill_value <= 1.0:
      raise ValueError(f"fill_value must be in [0, 1] like the images, got {self.fill_value}.")

  @classmethod
  def study(cls) -> AugmentConfig:
    """The study's augmentation: flip p=0.5, +-10 deg, +-10% shift, +-10% zoom."""
    return cls(flip_prob=0.5, rotation_deg=10.0, translate_frac=0.1, zoom_frac=0.1)

  @property
  def is_geometric_identity(self) -> bool:
    """True when no rotation, translation or zoom is applied (no resampling)."""
    return self.rotation_deg == 0.0 and self.translate_frac == 0.0 and self.zoom_frac == 0.0

  @property
  def is_identity(self) -> bool:
    """True when augmentation leaves every image unchanged."""
    return self.flip_prob == 0.0 and self.is_geometric_identity


def _check_fill(fill: str) -> None:
  if fill not in FILL_MODES:
    raise ValueError(f"fill must be one of {FILL_MODES}, got {fill!r}.")


def _check_image(image: jax.Array, ndim: int = 3) -> None:
  layout = "[H, W, C]" if ndim == 3 else "[B, H, W, C]"
  if image.ndim != ndim:
    raise ValueError(f"Expected an image of shape {layout}, got shape {image.shape}.")
  if not jnp.issubdtype(image.dtype, jnp.floating):
    raise TypeError(f"Expected a floating-point image, got dtype {image.dtype}.")


def flip_left_right(image: jax.Array) -> jax.Array:
  """Mirrors an ``[H, W, C]`` image horizontally (exact, no resampling)."""
  _check_image(image)
  return image[:, ::-1, :]


def rotation_matrix(angle_deg: jax.typing.ArrayLike) -> jax.Array:
  """Sampling matrix that rotates content counter-clockwise by ``angle_deg``.

  With this convention ``rotate(image, 90)`` equals ``np.rot90(image)``.
  """
  theta = jnp.deg2rad(jnp.asarray(angle_deg, jnp.float32))
  c, s = jnp.cos(theta), jnp.sin(theta)
  return jnp.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]], jnp.float32)


def translation_matrix(dy: jax.typing.ArrayLike, dx: jax.typing.ArrayLike) -> jax.Array:
  """Sampling matrix that moves content ``dy`` pixels down and ``dx`` right."""
  dy = jnp.asarray(dy, jnp.float32)
  dx = jnp.asarray(dx, jnp.float32)
  return jnp.array([[1.0, 0.0, -dy], [0.0, 1.0, -dx], [0.0, 0.0, 1.0]], jnp.float32)


def zoom_matrix(zy: jax.typing.ArrayLike, zx: jax.typing.ArrayLike) -> jax.Array:
  """Sampling matrix that magnifies content by ``zy`` (rows) and ``zx`` (cols)."""
  zy = jnp.asarray(zy, jnp.float32)
  zx = jnp.asarray(zx, jnp.float32)
  return jnp.array([[1.0 / zy, 0.0, 0.0], [0.0, 1.0 / zx, 0.0], [0.0, 0.0, 1.0]], jnp.float32)


def affine_warp(
    image: jax.Array,
    matrix: jax.Array,
    *,
    fill: str = "nearest",
    fill_value: float = 0.0,
) -> jax.Array:
  """Resamples an ``[H, W, C]`` image bilinearly through a sampling matrix.

  Args:
    image: float image of shape ``[H, W, C]``.
    matrix: ``[3, 3]`` or ``[2, 3]`` sampling matrix in centred ``(row, col)``
      coordinates (see the module docstring): output pixel ``p`` reads the
      input at ``matrix @ p``.
    fill: 'nearest', 'constant' or 'reflect' handling of outside points.
    fill_value: value of outside points when ``fill='constant'``.

  Returns:
    The warped image, same shape and dtype as ``image``.
  """
  _check_image(image)
  _check_fill(fill)
  if matrix.shape not in ((3, 3), (2, 3)):
    raise ValueError(f"matrix must have shape (3, 3) or (2, 3), got {matrix.shape}.")
  height, width, _ = image.shape
  centre = jnp.array([(height - 1) / 2.0, (width - 1) / 2.0], jnp.float32)
  rows, cols = jnp.meshgrid(
      jnp.arange(height, dtype=jnp.float32) - centre[0],
      jnp.arange(width, dtype=jnp.float32) - centre[1],
      indexing="ij",
  )
  m = matrix.astype(jnp.float32)
  src_rows = m[0, 0] * rows + m[0, 1] * cols + m[0, 2] + centre[0]
  src_cols = m[1, 0] * rows + m[1, 1] * cols + m[1, 2] + centre[1]

  def warp_channel(channel: jax.Array) -> jax.Array:
    return jax.scipy.ndimage.map_coordinates(
        channel, [src_rows, src_cols], order=1, mode=fill, cval=fill_value
    )

  warped = jax.vmap(warp_channel, in_axes=-1, out_axes=-1)(image.astype(jnp.float32))
  return warped.astype(image.dtype)


def rotate(
    image: jax.Array,
    angle_deg: jax.typing.ArrayLike,
    *,
    fill: str = "nearest",
    fill_value: float = 0.0,
) -> jax.Array:
  """Rotates an ``[H, W, C]`` image counter-clockwise about its centre."""
  return affine_warp(image, rotation_matrix(angle_deg), fill=fill, fill_value=fill_value)


def translate(
    image: jax.Array,
    dy: jax.typing.ArrayLike,
    dx: jax.typing.ArrayLike,
    *,
    fill: str = "nearest",
    fill_value: float = 0.0,
) -> jax.Array:
  """Shifts an ``[H, W, C]`` image's content ``dy`` pixels down, ``dx`` right."""
  return affine_warp(image, translation_matrix(dy, dx), fill=fill, fill_value=fill_value)


def zoom(
    image: jax.Array,
    zy: jax.typing.ArrayLike,
    zx: jax.typing.ArrayLike,
    *,
    fill: str = "nearest",
    fill_value: float = 0.0,
) -> jax.Array:
  """Zooms an ``[H, W, C]`` image about its centre; factors > 1 magnify."""
  return affine_warp(image, zoom_matrix(zy, zx), fill=fill, fill_value=fill_value)


def random_matrix(key: jax.Array, height: int, width: int, config: AugmentConfig) -> jax.Array:
  """Draws one sampling matrix: rotate, then zoom, then translate the content."""
  k_rot, k_shift, k_zoom = jax.random.split(key, 3)
  angle = jax.random.uniform(k_rot, (), minval=-config.rotation_deg, maxval=config.rotation_deg)
  shift = jax.random.uniform(
      k_shift, (2,), minval=-config.translate_frac, maxval=config.translate_frac
  ) * jnp.array([height, width], jnp.float32)
  factors = jax.random.uniform(
      k_zoom, (2,), minval=1.0 - config.zoom_frac, maxval=1.0 + config.zoom_frac
  )
  # Forward motion T = translate . zoom . rotate, so sampling is T^-1 = R^-1 Z^-1 S^-1.
  return (
      rotation_matrix(angle)
      @ zoom_matrix(factors[0], factors[1])
      @ translation_matrix(shift[0], shift[1])
  )


def random_augment(key: jax.Array, image: jax.Array, config: AugmentConfig) -> jax.Array:
  """Randomly augments one ``[H, W, C]`` image in [0, 1]; the output stays in [0, 1].

  The geometric warp (one bilinear resampling) is applied first, then the
  flip, as in Keras. With ``config.is_identity`` the input is returned as is.
  """
  _check_image(image)
  if config.is_identity:
    return image
  k_warp, k_flip = jax.random.split(key)
  out = image
  if not config.is_geometric_identity:
    matrix = random_matrix(k_warp, image.shape[0], image.shape[1], config)
    warped = affine_warp(image, matrix, fill=config.fill, fill_value=config.fill_value)
    # Bilinear weights sum to 1 only up to rounding; keep the documented range.
    out = jnp.clip(warped, 0.0, 1.0)
  if config.flip_prob > 0.0:
    do_flip = jax.random.bernoulli(k_flip, config.flip_prob)
    out = jnp.where(do_flip, flip_left_right(out), out)
  return out


def augment_batch(key: jax.Array, images: jax.Array, config: AugmentConfig) -> jax.Array:
  """Augments a ``[B, H, W, C]`` batch, image ``i`` with ``jax.random.split(key, B)[i]``."""
  _check_image(images, ndim=4)
  if config.is_identity:
    return images
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(random_augment, in_axes=(0, 0, None))(keys, images, config)
