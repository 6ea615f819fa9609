"""Tests of experiments.common: the configs the study's flagfiles build.

Each case runs in a subprocess: experiments.common and experiments.run_study
both define absl flags such as --schedule, so they cannot share a process.
"""

import json
import pathlib
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_CFG = 'experiments/configs/study'
_SCRIPT = """
import json, sys
from absl import flags
from experiments import common
flags.FLAGS(['prog', *json.loads(sys.argv[2])])
config = common.train_config(sys.argv[1], num_classes=int(sys.argv[3]))
print(json.dumps([config.step.ordinal, config.model.num_classes, config.step.class_values is not None]))
"""


def _train_config(task: str, args: list[str], num_classes: int) -> list:
  """[step.ordinal, model.num_classes, has class_values] of common.train_config."""
  result = subprocess.run(
      [sys.executable, '-c', _SCRIPT, task, json.dumps(args), str(num_classes)],
      cwd=_ROOT, capture_output=True, text=True, check=False,
  )
  if result.returncode:
    raise AssertionError(f'train_config({task!r}) failed for {args}:\n{result.stderr[-2000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


class TrainConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('fer', 'fer', 'fer.cfg', 7, [False, 7, False]),
      ('age', 'age', 'fc1.cfg', 100, [True, 100, False]),
      ('ranges11', 'age', 'ranges11.cfg', 11, [True, 11, True]),
  )
  def test_only_age_classes_get_ordinal_scores(self, task, cfg, num_classes, expected):
    args = [f'--flagfile={_CFG}/{cfg}', '--schedule=paper']
    self.assertEqual(_train_config(task, args, num_classes), expected)


if __name__ == '__main__':
  absltest.main()
