"""Runs the whole study: FER pretraining, then every age experiment.

  python -m experiments.run_study --schedule=short --protocols=dedup,paper,leaky

Each experiment is one `experiments.finetune` run of its flagfile in
``experiments/configs/study/``, in its own process, under
``runs/study/<protocol>/<experiment>``. Finished runs are re-evaluated, killed
ones resume, so the command can be re-run until everything is done. Then
``python -m experiments.report`` writes docs/RESULTS.md.
"""

import subprocess
import sys

from absl import app
from absl import flags

EXPERIMENTS = (
    'baseline', 'freeze_last_block', 'freeze_paper', 'fc1', 'fc2', 'ranges11',
    'augment', 'scratch',
)
CONFIGS = 'experiments/configs/study'

flags.DEFINE_enum('schedule', 'short', ['short', 'paper'], 'See experiments.common --schedule.')
flags.DEFINE_list('protocols', ['dedup', 'paper', 'leaky'], 'UTKFace split protocols to run.')
flags.DEFINE_list('experiments', list(EXPERIMENTS), 'Experiments run on the dedup and paper protocols.')
flags.DEFINE_list('leaky_experiments', ['fc1'], 'Experiments run on the leaky protocol.')
flags.DEFINE_list('extra_flags', [], 'Flags passed to every run, e.g. --conv_impl=lax.')
flags.DEFINE_bool('skip_fer', False, 'Assume runs/study/fer is complete.')

FLAGS = flags.FLAGS


def _run(module: str, args: list[str]) -> None:
  cmd = [sys.executable, '-m', module, *args, f'--schedule={FLAGS.schedule}', '--noprogress', *FLAGS.extra_flags]
  print('+', ' '.join(cmd[1:]), flush=True)
  subprocess.run(cmd, check=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS.skip_fer:
    _run('experiments.pretrain_fer', [f'--flagfile={CONFIGS}/fer.cfg'])
  for protocol in FLAGS.protocols:
    names = FLAGS.leaky_experiments if protocol == 'leaky' else FLAGS.experiments
    for name in names:
      if name not in EXPERIMENTS:
        raise app.UsageError(f'Unknown experiment {name!r}; choose from {EXPERIMENTS}.')
      _run(
          'experiments.finetune',
          [
              f'--flagfile={CONFIGS}/{name}.cfg',
              f'--protocol={protocol}',
              f'--workdir=runs/study/{protocol}/{name}',
          ],
      )


if __name__ == '__main__':
  app.run(main)
