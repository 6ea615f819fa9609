"""Tests for agejax.augment: exactness of flips/shifts, identities, range, jit parity."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from agejax import augment

STUDY = augment.AugmentConfig.study()


def _random_images(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(np.float32)


def _ramp(height: int, width: int, row_coef: float, col_coef: float) -> np.ndarray:
  """A linear image, which bilinear sampling reproduces exactly."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return (row_coef * rows + col_coef * cols).astype(np.float32)[..., None]


class AugmentConfigTest(parameterized.TestCase):

  def test_study_values(self):
    self.assertEqual(
        (STUDY.flip_prob, STUDY.rotation_deg, STUDY.translate_frac, STUDY.zoom_frac, STUDY.fill),
        (0.5, 10.0, 0.1, 0.1, "nearest"),
    )
    self.assertFalse(STUDY.is_identity)

  @parameterized.named_parameters(
      ("default", augment.AugmentConfig(), True, True),
      ("flip_only", augment.AugmentConfig(flip_prob=0.5), False, True),
      ("rotation_only", augment.AugmentConfig(rotation_deg=5.0), False, False),
      ("translate_only", augment.AugmentConfig(translate_frac=0.1), False, False),
      ("zoom_only", augment.AugmentConfig(zoom_frac=0.1), False, False),
  )
  def test_identity_properties(self, config, is_identity, is_geometric_identity):
    self.assertEqual(config.is_identity, is_identity)
    self.assertEqual(config.is_geometric_identity, is_geometric_identity)

  @parameterized.named_parameters(
      ("flip_negative", dict(flip_prob=-0.1)),
      ("flip_above_one", dict(flip_prob=1.5)),
      ("rotation_negative", dict(rotation_deg=-1.0)),
      ("rotation_too_big", dict(rotation_deg=270.0)),
      ("translate_negative", dict(translate_frac=-0.1)),
      ("translate_one", dict(translate_frac=1.0)),
      ("zoom_negative", dict(zoom_frac=-0.1)),
      ("zoom_one", dict(zoom_frac=1.0)),
      ("unknown_fill", dict(fill="wrap")),
      ("fill_value_above_one", dict(fill="constant", fill_value=255.0)),
      ("fill_value_negative", dict(fill="constant", fill_value=-1.0)),
  )
  def test_bad_config_raises(self, kwargs):
    with self.assertRaises(ValueError):
      augment.AugmentConfig(**kwargs)

  def test_config_is_frozen(self):
    with self.assertRaises(AttributeError):
      STUDY.flip_prob = 0.0  # pytype: disable=not-writable


class FlipTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("gray", (48, 48, 1)), ("rgb_odd", (5, 7, 3)))
  def test_flip_is_exact_and_an_involution(self, shape):
    image = _random_images(0, shape)
    flip = self.variant(augment.flip_left_right)
    flipped = flip(image)
    np.testing.assert_array_equal(np.asarray(flipped), image[:, ::-1, :])
    np.testing.assert_array_equal(np.asarray(flip(flipped)), image)

  @chex.variants(with_jit=True, without_jit=True)
  def test_flip_prob_one_flips_every_image_exactly(self):
    images = _random_images(1, (4, 9, 9, 1))
    config = augment.AugmentConfig(flip_prob=1.0)
    out = self.variant(functools.partial(augment.augment_batch, config=config))(
        jax.random.key(0), images
    )
    np.testing.assert_array_equal(np.asarray(out), images[:, :, ::-1, :])

  def test_flip_prob_half_flips_about_half(self):
    images = np.broadcast_to(_random_images(2, (1, 8, 8, 1)), (400, 8, 8, 1))
    out = np.asarray(
        augment.augment_batch(jax.random.key(3), images, augment.AugmentConfig(flip_prob=0.5))
    )
    flipped = np.all(out == images[:, :, ::-1, :], axis=(1, 2, 3))
    kept = np.all(out == images, axis=(1, 2, 3))
    np.testing.assert_array_equal(flipped, ~kept)
    self.assertBetween(flipped.mean(), 0.4, 0.6)


class WarpTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(
      fill=augment.FILL_MODES, matrix=(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)[:2])
  )
  def test_identity_matrix_is_identity(self, fill, matrix):
    image = _random_images(4, (11, 13, 2))
    out = self.variant(functools.partial(augment.affine_warp, fill=fill))(image, matrix)
    chex.assert_shape(out, image.shape)
    chex.assert_trees_all_close(out, image, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("90", 90.0, 1), ("180", 180.0, 2), ("minus_90", -90.0, 3))
  def test_right_angle_rotation_matches_rot90(self, angle, quarter_turns):
    image = _random_images(5, (10, 10, 2))
    out = self.variant(augment.rotate)(image, angle)
    chex.assert_trees_all_close(out, np.rot90(image, quarter_turns), atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("down_right", 2, 3), ("up_left", -3, -1), ("rows_only", 4, 0), ("cols_only", 0, -5)
  )
  def test_integer_translation_shifts_interior(self, dy, dx):
    image = _random_images(6, (16, 12, 1))
    out = np.asarray(self.variant(augment.translate)(image, dy, dx))
    height, width = image.shape[:2]
    rows_out = slice(max(dy, 0), height + min(dy, 0))
    cols_out = slice(max(dx, 0), width + min(dx, 0))
    rows_in = slice(max(-dy, 0), height + min(-dy, 0))
    cols_in = slice(max(-dx, 0), width + min(-dx, 0))
    np.testing.assert_allclose(out[rows_out, cols_out], image[rows_in, cols_in], atol=1e-6)
    filled = np.asarray(
        self.variant(functools.partial(augment.translate, fill="constant", fill_value=0.5))(
            image, dy, dx
        )
    )
    np.testing.assert_allclose(filled[rows_out, cols_out], image[rows_in, cols_in], atol=1e-6)
    outside = np.ones((height, width), bool)
    outside[rows_out, cols_out] = False
    np.testing.assert_array_equal(filled[outside], 0.5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("in", 1.25, 1.25), ("out", 0.8, 0.8), ("anisotropic", 1.1, 0.9))
  def test_zoom_of_linear_ramp_is_exact(self, zy, zx):
    height, width = 21, 17
    image = _ramp(height, width, 0.5, 1.0)
    out = np.asarray(self.variant(augment.zoom)(image, zy, zx))
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    cy, cx = (height - 1) / 2, (width - 1) / 2
    expected = 0.5 * ((rows - cy) / zy + cy) + 1.0 * ((cols - cx) / zx + cx)
    # Zooming in samples only inside the image; zooming out, check the centre.
    window = (slice(6, 15), slice(5, 12))
    np.testing.assert_allclose(out[window][..., 0], expected[window], atol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_small_rotation_of_linear_ramp_is_exact(self):
    height = width = 21
    image = _ramp(height, width, 0.0, 1.0)  # value = column index
    angle = 10.0
    out = np.asarray(self.variant(augment.rotate)(image, angle))
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    c = (width - 1) / 2
    theta = np.deg2rad(angle)
    expected = -np.sin(theta) * (rows - c) + np.cos(theta) * (cols - c) + c
    np.testing.assert_allclose(out[5:16, 5:16, 0], expected[5:16, 5:16], atol=1e-4)

  @parameterized.named_parameters(
      ("image_2d", (8, 8), (3, 3), ValueError),
      ("image_4d", (1, 8, 8, 1), (3, 3), ValueError),
      ("matrix_2x2", (8, 8, 1), (2, 2), ValueError),
      ("matrix_vector", (8, 8, 1), (9,), ValueError),
  )
  def test_bad_shapes_raise(self, image_shape, matrix_shape, error):
    with self.assertRaises(error):
      augment.affine_warp(jnp.zeros(image_shape), jnp.zeros(matrix_shape))

  def test_integer_image_raises(self):
    with self.assertRaisesRegex(TypeError, "floating"):
      augment.affine_warp(jnp.zeros((8, 8, 1), jnp.uint8), jnp.eye(3))

  def test_unknown_fill_raises(self):
    with self.assertRaisesRegex(ValueError, "fill"):
      augment.affine_warp(jnp.zeros((8, 8, 1)), jnp.eye(3), fill="wrap")


class RandomMatrixTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("rotation", augment.AugmentConfig(rotation_deg=10.0)),
      ("translation", augment.AugmentConfig(translate_frac=0.1)),
      ("zoom", augment.AugmentConfig(zoom_frac=0.1)),
  )
  def test_parameters_stay_within_strength(self, config):
    keys = jax.random.split(jax.random.key(7), 256)
    mats = np.asarray(jax.vmap(lambda k: augment.random_matrix(k, 40, 50, config))(keys))
    linear, offset = mats[:, :2, :2], mats[:, :2, 2]
    # Angle from the rotation part; zoom from the diagonal; shift from the offset.
    angles = np.rad2deg(np.arctan2(linear[:, 0, 1], linear[:, 0, 0]))
    self.assertLessEqual(np.abs(angles).max(), config.rotation_deg + 1e-4)
    self.assertLessEqual(np.abs(offset[:, 0]).max(), config.translate_frac * 40 + 1e-4)
    self.assertLessEqual(np.abs(offset[:, 1]).max(), config.translate_frac * 50 + 1e-4)
    if config.zoom_frac:
      diag = np.stack([linear[:, 0, 0], linear[:, 1, 1]])
      self.assertGreaterEqual(diag.min(), 1 / (1 + config.zoom_frac) - 1e-5)
      self.assertLessEqual(diag.max(), 1 / (1 - config.zoom_frac) + 1e-5)
      self.assertGreater(diag.std(), 0.01)  # it is actually random
    np.testing.assert_array_equal(mats[:, 2], np.tile([0.0, 0.0, 1.0], (256, 1)))


class RandomAugmentTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_strength_is_exact_identity(self):
    images = _random_images(8, (3, 12, 12, 1))
    config = augment.AugmentConfig()
    out = self.variant(functools.partial(augment.augment_batch, config=config))(
        jax.random.key(0), images
    )
    np.testing.assert_array_equal(np.asarray(out), images)
    single = self.variant(functools.partial(augment.random_augment, config=config))(
        jax.random.key(1), images[0]
    )
    np.testing.assert_array_equal(np.asarray(single), images[0])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("study_nearest", STUDY),
      ("study_reflect", augment.AugmentConfig(0.5, 10.0, 0.1, 0.1, fill="reflect")),
      ("study_constant", augment.AugmentConfig(0.5, 10.0, 0.1, 0.1, fill="constant", fill_value=1.0)),
      ("strong", augment.AugmentConfig(0.5, 45.0, 0.3, 0.5)),
  )
  def test_output_in_range_and_finite(self, config):
    # Saturated binary pixels are where rounding could escape [0, 1].
    images = (_random_images(9, (8, 24, 24, 1)) > 0.5).astype(np.float32)
    out = self.variant(functools.partial(augment.augment_batch, config=config))(
        jax.random.key(2), images
    )
    chex.assert_shape(out, images.shape)
    chex.assert_type(out, jnp.float32)
    chex.assert_tree_all_finite(out)
    self.assertGreaterEqual(float(out.min()), 0.0)
    self.assertLessEqual(float(out.max()), 1.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_variant_matches_eager_reference(self):
    images = _random_images(10, (4, 20, 20, 1))
    key = jax.random.key(3)
    with jax.disable_jit():
      reference = augment.augment_batch(key, images, STUDY)
    out = self.variant(functools.partial(augment.augment_batch, config=STUDY))(key, images)
    chex.assert_trees_all_close(out, reference, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_batch_equals_per_image_with_split_keys(self):
    images = _random_images(11, (5, 16, 16, 1))
    key = jax.random.key(4)
    out = self.variant(functools.partial(augment.augment_batch, config=STUDY))(key, images)
    keys = jax.random.split(key, images.shape[0])
    per_image = jnp.stack([augment.random_augment(k, x, STUDY) for k, x in zip(keys, images)])
    chex.assert_trees_all_close(out, per_image, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_different_keys_give_different_augmentations(self):
    image = _random_images(12, (16, 16, 1))
    fn = self.variant(functools.partial(augment.random_augment, config=STUDY))
    a, b, a_again = fn(jax.random.key(0), image), fn(jax.random.key(1), image), fn(jax.random.key(0), image)
    self.assertGreater(float(jnp.abs(a - b).mean()), 1e-3)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a_again))

  def test_images_in_a_batch_get_different_augmentations(self):
    images = np.broadcast_to(_random_images(13, (1, 16, 16, 1)), (2, 16, 16, 1))
    out = augment.augment_batch(jax.random.key(5), images, STUDY)
    self.assertGreater(float(jnp.abs(out[0] - out[1]).mean()), 1e-3)

  @parameterized.named_parameters(
      ("single_2d", augment.random_augment, (8, 8), ValueError),
      ("single_batched", augment.random_augment, (2, 8, 8, 1), ValueError),
      ("batch_3d", augment.augment_batch, (8, 8, 1), ValueError),
      ("batch_5d", augment.augment_batch, (1, 2, 8, 8, 1), ValueError),
  )
  def test_bad_shapes_raise(self, fn, shape, error):
    with self.assertRaises(error):
      fn(jax.random.key(0), jnp.zeros(shape), STUDY)

  def test_integer_batch_raises(self):
    with self.assertRaisesRegex(TypeError, "floating"):
      augment.augment_batch(jax.random.key(0), jnp.zeros((2, 8, 8, 1), jnp.uint8), STUDY)


if __name__ == "__main__":
  absltest.main()
