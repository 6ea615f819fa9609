"""Tests of experiments.common: the configs the study's flagfiles build."""

import contextlib
import pathlib

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized

from experiments import common

FLAGS = flags.FLAGS
_CFG = 'experiments/configs/study'
_ROOT = pathlib.Path(__file__).resolve().parents[1]


class TrainConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('fer', 'fer', 'fer.cfg', 7, False),
      ('age', 'age', 'fc1.cfg', 100, True),
      ('ranges11', 'age', 'ranges11.cfg', 11, True),
  )
  def test_only_age_classes_get_ordinal_scores(self, task, cfg, num_classes, ordinal):
    self.enter_context(contextlib.chdir(_ROOT))  # flagfiles name each other from the root
    with flagsaver.flagsaver():
      FLAGS(['prog', f'--flagfile={_CFG}/{cfg}', '--schedule=paper'])
      train_config = common.train_config(task, num_classes=num_classes)
    self.assertEqual(train_config.step.ordinal, ordinal)
    self.assertEqual(train_config.model.num_classes, num_classes)
    self.assertEqual(train_config.step.class_values is not None, cfg == 'ranges11.cfg')


if __name__ == '__main__':
  absltest.main()
