"""UTKFace file-name parsing, including the malformed names of the real archive."""

from absl.testing import absltest
from absl.testing import parameterized

from agejax.data import utkface_names


class ParseNameTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('regular', '26_1_2_20170116174525125.jpg.chip.jpg', 26, 1, 2, False),
      ('above_99', '116_1_0_20170120134921760.jpg.chip.jpg', 116, 1, 0, False),
      ('no_race', '39_1_20170116174525125.jpg.chip.jpg', 39, 1, -1, True),
      ('no_race_2', '61_1_20170109150557335.jpg.chip.jpg', 61, 1, -1, True),
      ('space_before_jpg', '24_0_1_20170116220224657 .jpg.chip.jpg', 24, 0, 1, True),
      ('missing_dot', '55_0_0_20170116232725357jpg.chip.jpg', 55, 0, 0, True),
  )
  def test_parses(self, name, age, gender, race, malformed):
    self.assertEqual(utkface_names.parse_name(name),
                     utkface_names.ParsedName(age, gender, race, malformed))

  @parameterized.named_parameters(
      ('no_age', 'x_1_2_20170116174525125.jpg.chip.jpg'),
      ('gender_out_of_range', '26_7_2_20170116174525125.jpg.chip.jpg'),
      ('only_age', '26.jpg.chip.jpg'),
  )
  def test_unreadable_age_returns_none(self, name):
    self.assertIsNone(utkface_names.parse_name(name))

  @parameterized.named_parameters(
      ('face', '1_0_0_20170109150557335.jpg.chip.jpg', True),
      ('hidden', '._1_0_0_20170109150557335.jpg.chip.jpg', False),
      ('readme', 'README.txt', False),
  )
  def test_is_face_file(self, name, expected):
    self.assertEqual(utkface_names.is_face_file(name), expected)


if __name__ == '__main__':
  absltest.main()
