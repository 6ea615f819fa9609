"""Runs the whole study: FER pretraining, then every age experiment.

  python -m experiments.run_study --schedule=short --protocols=dedup,paper,leaky

Each experiment is one `experiments.finetune` run of its flagfile in
``experiments/configs/study/``, in its own process, under
``<root>/<protocol>/<experiment>``, transferring from ``<root>/fer`` (except
``scratch``). Finished runs are re-evaluated, killed ones resume, so the
command can be re-run until everything is done. Then
``python -m experiments.report`` (which shares these flags) writes
docs/RESULTS.md.

The FER pretraining can run on its own schedule: for example a 25-epoch FER
model under age runs of the short schedule,

  python -m experiments.run_study --root=runs/study_fer25 --schedule=short \
      --fer_schedule=paper --fer_stages=fer:20:1e-3:none,fer_fine:5:1e-4:none
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys

from absl import app
from absl import flags

from agejax.data import splits as splits_lib
from experiments import regex_lists

EXPERIMENTS = (
    'baseline', 'freeze_last_block', 'freeze_paper', 'fc1', 'fc2', 'ranges11',
    'augment', 'scratch',
)
FROM_SCRATCH = frozenset({'scratch'})
CONFIGS = 'experiments/configs/study'

flags.DEFINE_string('root', 'runs/study', 'Directory of the FER run and every age run.')
flags.DEFINE_enum('schedule', 'short', ['short', 'paper'], 'See experiments.common --schedule.')
flags.DEFINE_enum(
    'fer_schedule', None, ['short', 'paper'], 'Schedule of the FER pretraining (default: --schedule).'
)
regex_lists.define_regex_list(
    'fer_stages', [], "FER stages, name:epochs:lr:freeze as --stages (default: fer.cfg's)."
)
flags.DEFINE_list('protocols', list(splits_lib.PROTOCOLS), 'UTKFace split protocols to run.')
flags.DEFINE_list('experiments', list(EXPERIMENTS), 'Experiments run on the dedup and paper protocols.')
flags.DEFINE_list('leaky_experiments', ['fc1'], 'Experiments run on the leaky protocol.')
flags.DEFINE_enum(
    'near_duplicates', 'keep', list(splits_lib.NEAR_DUPLICATE_POLICIES),
    'Near-duplicate policy of the dedup runs (see experiments.finetune --near_duplicates).',
)
regex_lists.define_regex_list(
    'extra_flags', [],
    'Flags passed to every run, e.g. --conv_impl=lax; commas split them outside regex brackets,'
    ' and an entry in double quotes is taken whole (e.g. "--manual_dir=/data, v2").'
)
flags.DEFINE_bool('skip_fer', False, 'Assume <root>/fer is complete.')
flags.DEFINE_bool(
    'compilation_cache', True,
    'Runs share <root>/compilation_cache: each loads the programs that earlier runs'
    ' compiled (a resumed run; the same experiment on another protocol, on CPU).',
)

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class StudyPlan:
  """The runs of one study and the command of each (what the flags say)."""

  root: str = 'runs/study'
  schedule: str = 'short'
  fer_schedule: str | None = None
  fer_stages: tuple[str, ...] = ()
  protocols: tuple[str, ...] = splits_lib.PROTOCOLS
  experiments: tuple[str, ...] = EXPERIMENTS
  leaky_experiments: tuple[str, ...] = ('fc1',)
  near_duplicates: str = 'keep'
  extra_flags: tuple[str, ...] = ()
  compilation_cache: bool = True

  def __post_init__(self):
    unknown = sorted(set(self.experiments + self.leaky_experiments) - set(EXPERIMENTS))
    if unknown:
      raise ValueError(f'Unknown experiments {unknown}; choose from {EXPERIMENTS}.')
    unknown = sorted(set(self.protocols) - set(splits_lib.PROTOCOLS))
    if unknown:
      raise ValueError(f'Unknown protocols {unknown}; choose from {splits_lib.PROTOCOLS}.')
    if self.near_duplicates not in splits_lib.NEAR_DUPLICATE_POLICIES:
      raise ValueError(
          f'Unknown near_duplicates {self.near_duplicates!r};'
          f' choose from {splits_lib.NEAR_DUPLICATE_POLICIES}.')

  def age_runs(self) -> list[tuple[str, str]]:
    """``(protocol, experiment)`` of every planned age run, in run order."""
    return [
        (protocol, name)
        for protocol in self.protocols
        for name in (self.leaky_experiments if protocol == 'leaky' else self.experiments)
    ]

  def _cache_flags(self) -> list[str]:
    return [f'--compilation_cache_dir={self.root}/compilation_cache'] if self.compilation_cache else []

  def fer_command(self) -> list[str]:
    """Arguments of ``python`` for the FER pretraining."""
    stages = [f'--stages={regex_lists.join_entries(self.fer_stages)}'] if self.fer_stages else []
    return [
        '-m', 'experiments.pretrain_fer', f'--flagfile={CONFIGS}/fer.cfg',
        f'--workdir={self.root}/fer', *stages,
        f'--schedule={self.fer_schedule or self.schedule}', '--noprogress', *self._cache_flags(),
        *self.extra_flags,
    ]

  def age_command(self, protocol: str, experiment: str) -> list[str]:
    """Arguments of ``python`` for one age experiment on one protocol."""
    init = [] if experiment in FROM_SCRATCH else [f'--init_from={self.root}/fer']
    # Only dedup merges duplicates; the other protocols keep them on purpose.
    near = [f'--near_duplicates={self.near_duplicates}'] if (
        protocol == 'dedup' and self.near_duplicates != 'keep') else []
    return [
        '-m', 'experiments.finetune', f'--flagfile={CONFIGS}/{experiment}.cfg',
        f'--protocol={protocol}', f'--workdir={self.root}/{protocol}/{experiment}', *init,
        *near, f'--schedule={self.schedule}', '--noprogress', *self._cache_flags(),
        *self.extra_flags,
    ]

  def study_flags(self) -> list[str]:
    """The `experiments.run_study` flags that give this plan (defaults left out), shell-quoted."""
    default = StudyPlan()
    shown = []
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, bool):
        if value != getattr(default, field.name):
          shown.append(f'--{"" if value else "no"}{field.name}')
      elif field.name == 'schedule' or value != getattr(default, field.name):
        text = regex_lists.join_entries(value) if isinstance(value, tuple) else value
        shown.append(shlex.quote(f'--{field.name}={text}'))
    return shown


def plan_from_flags() -> StudyPlan:
  """The `StudyPlan` of this program's flags (also read by experiments.report)."""
  try:
    return StudyPlan(
        root=FLAGS.root,
        schedule=FLAGS.schedule,
        fer_schedule=FLAGS.fer_schedule,
        fer_stages=tuple(FLAGS.fer_stages),
        protocols=tuple(FLAGS.protocols),
        experiments=tuple(FLAGS.experiments),
        leaky_experiments=tuple(FLAGS.leaky_experiments),
        near_duplicates=FLAGS.near_duplicates,
        extra_flags=tuple(FLAGS.extra_flags),
        compilation_cache=FLAGS.compilation_cache,
    )
  except ValueError as e:
    raise app.UsageError(str(e)) from e


# How long an interrupted run may take to finish its checkpoint saves.
_STOP_GRACE_SECONDS = 120


def _run(args: list[str]) -> None:
  """Runs one program; on Ctrl-C (which it gets too) waits for it to stop on its own.

  `subprocess.run` would kill it 0.25 s after the interrupt, in the middle of
  the checkpoint saves it finishes before exiting.
  """
  print('+', shlex.join(['python', *args]), flush=True)
  with subprocess.Popen([sys.executable, *args]) as proc:
    try:
      returncode = proc.wait()
    except KeyboardInterrupt:
      try:
        proc.wait(timeout=_STOP_GRACE_SECONDS)
      except subprocess.TimeoutExpired:
        proc.kill()
      raise
  if returncode:
    raise subprocess.CalledProcessError(returncode, args)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  plan = plan_from_flags()
  if not FLAGS.skip_fer:
    _run(plan.fer_command())
  for protocol, experiment in plan.age_runs():
    _run(plan.age_command(protocol, experiment))


if __name__ == '__main__':
  app.run(main)
