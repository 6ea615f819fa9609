"""Tests for agejax.synthetic: determinism, shapes, label ranges, learnability."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import numpy as np

from agejax import synthetic


def _ridge_probe(train_x, train_y, test_x, l2=0.1):
  """Least-squares linear probe on 2x2-pooled pixels; returns test predictions."""

  def features(images):
    x = images[..., 0].astype(np.float32) / 255.0
    n, s, _ = x.shape
    x = x.reshape(n, s // 2, 2, s // 2, 2).mean(axis=(2, 4)).reshape(n, -1)
    return np.concatenate([x, np.ones((n, 1), np.float32)], axis=1)

  a, b = features(train_x), features(test_x)
  gram = a.T @ a
  reg = l2 * np.trace(gram) / gram.shape[0] * np.eye(gram.shape[0], dtype=np.float32)
  return b @ np.linalg.solve(gram + reg, a.T @ train_y)


class MakeFacesTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("empty", 0, 48), ("one", 1, 48), ("across_chunks", 300, 48), ("small", 10, 32), ("large", 5, 64)
  )
  def test_shapes_and_dtypes(self, n, size):
    faces = synthetic.make_faces(n, seed=0, size=size)
    self.assertEqual(set(faces), {"image", "age", "emotion", "gender"})
    chex.assert_shape(faces["image"], (n, size, size, 1))
    chex.assert_shape([faces["age"], faces["emotion"], faces["gender"]], (n,))
    self.assertEqual(faces["image"].dtype, np.uint8)
    for key in ("age", "emotion", "gender"):
      self.assertEqual(faces[key].dtype, np.int32, key)

  def test_deterministic_in_seed(self):
    first = synthetic.make_faces(50, seed=7)
    second = synthetic.make_faces(50, seed=7)
    other = synthetic.make_faces(50, seed=8)
    chex.assert_trees_all_equal(first, second)
    self.assertFalse(np.array_equal(first["image"], other["image"]))

  @parameterized.named_parameters(
      ("full", (0, 99)), ("adults", (20, 30)), ("single_age", (42, 42)), ("babies", (0, 2))
  )
  def test_label_ranges(self, age_range):
    faces = synthetic.make_faces(700, seed=1, age_range=age_range)
    self.assertGreaterEqual(faces["age"].min(), age_range[0])
    self.assertLessEqual(faces["age"].max(), age_range[1])
    np.testing.assert_array_equal(np.unique(faces["emotion"]), np.arange(synthetic.NUM_EMOTIONS))
    np.testing.assert_array_equal(np.unique(faces["gender"]), [0, 1])

  def test_images_are_not_flat(self):
    images = synthetic.make_faces(64, seed=2)["image"].astype(np.float32)
    per_image_std = images.reshape(64, -1).std(axis=1)
    self.assertGreater(per_image_std.min(), 10.0)
    self.assertGreater(np.abs(images[0] - images[1]).mean(), 10.0)

  def test_mean_face_changes_with_age(self):
    young = synthetic.make_faces(500, seed=3, age_range=(0, 15))["image"].astype(np.float32)
    old = synthetic.make_faces(500, seed=4, age_range=(75, 99))["image"].astype(np.float32)
    old_again = synthetic.make_faces(500, seed=5, age_range=(75, 99))["image"].astype(np.float32)
    age_gap = np.abs(young.mean(0) - old.mean(0)).mean()
    sampling_noise = np.abs(old_again.mean(0) - old.mean(0)).mean()
    self.assertGreater(age_gap, 3.0 * sampling_noise)

  def test_both_labels_are_linearly_learnable_from_pixels(self):
    train = synthetic.make_faces(2500, seed=10)
    test = synthetic.make_faces(800, seed=11)
    targets = np.concatenate(
        [np.eye(synthetic.NUM_EMOTIONS, dtype=np.float32)[train["emotion"]], train["age"][:, None] / 100.0],
        axis=1,
    )
    pred = _ridge_probe(train["image"], targets, test["image"])
    accuracy = (pred[:, :7].argmax(1) == test["emotion"]).mean()
    mae = np.abs(pred[:, 7] * 100.0 - test["age"]).mean()
    mean_predictor_mae = np.abs(test["age"] - train["age"].mean()).mean()
    # Chance is 1/7 and ~25 years; the probe reaches about 0.6 and 11 years.
    self.assertGreater(accuracy, 2.5 / synthetic.NUM_EMOTIONS)
    self.assertGreater(mean_predictor_mae, 22.0)
    self.assertLess(mae, 0.6 * mean_predictor_mae)

  @parameterized.named_parameters(
      ("negative_n", dict(n=-1, seed=0)),
      ("tiny_size", dict(n=1, seed=0, size=16)),
      ("negative_age", dict(n=1, seed=0, age_range=(-1, 10))),
      ("age_too_big", dict(n=1, seed=0, age_range=(0, 100))),
      ("reversed_range", dict(n=1, seed=0, age_range=(50, 40))),
  )
  def test_bad_arguments_raise(self, kwargs):
    with self.assertRaises(ValueError):
      synthetic.make_faces(**kwargs)


class SplitsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("fer", synthetic.make_fer_splits, "emotion"), ("age", synthetic.make_age_splits, "age")
  )
  def test_structure_and_labels(self, make_splits, label_key):
    splits = make_splits(0, 30, 20, 10)
    self.assertEqual(set(splits), {"train", "validation", "test"})
    for name, n in (("train", 30), ("validation", 20), ("test", 10)):
      split = splits[name]
      self.assertEqual(set(split), {"image", "label", "age", "emotion"})
      chex.assert_shape(split["image"], (n, 48, 48, 1))
      np.testing.assert_array_equal(split["label"], split[label_key])
      self.assertEqual(split["label"].dtype, np.int32)

  @parameterized.named_parameters(
      ("fer", synthetic.make_fer_splits), ("age", synthetic.make_age_splits)
  )
  def test_deterministic_and_disjoint(self, make_splits):
    splits = make_splits(3, 20, 20, 20)
    chex.assert_trees_all_equal(splits, make_splits(3, 20, 20, 20))
    self.assertFalse(np.array_equal(splits["train"]["image"], splits["validation"]["image"]))
    self.assertFalse(np.array_equal(splits["validation"]["image"], splits["test"]["image"]))
    self.assertFalse(np.array_equal(splits["train"]["image"], make_splits(4, 20, 20, 20)["train"]["image"]))

  def test_split_does_not_depend_on_other_split_sizes(self):
    small = synthetic.make_age_splits(5, 10, 15, 5)
    large = synthetic.make_age_splits(5, 40, 15, 5)
    chex.assert_trees_all_equal(small["validation"], large["validation"])
    chex.assert_trees_all_equal(small["test"], large["test"])

  def test_fer_and_age_data_differ(self):
    fer = synthetic.make_fer_splits(0, 10, 0, 0)["train"]
    age = synthetic.make_age_splits(0, 10, 0, 0)["train"]
    self.assertFalse(np.array_equal(fer["image"], age["image"]))


if __name__ == "__main__":
  absltest.main()
