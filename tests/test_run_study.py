"""Tests of experiments.run_study: which runs, the command of each, and stopping one."""

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
from absl.testing import parameterized

from experiments import run_study

_CFG = 'experiments/configs/study'
_ROOT = pathlib.Path(__file__).resolve().parents[1]

# A run that needs a second after Ctrl-C to finish (as training finishes its
# checkpoint saves), started through run_study._run.
_PARENT = textwrap.dedent('''
    import signal, sys
    from experiments import run_study
    # Ctrl-C raises KeyboardInterrupt, as in a terminal, also when the tests
    # run in a background job, which starts this process with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    child = (
        'import pathlib, signal, sys, time\\n'
        'def stop(*_):\\n'
        '  time.sleep(1.0)\\n'
        '  pathlib.Path(sys.argv[1]).write_text("saved")\\n'
        '  sys.exit(130)\\n'
        'signal.signal(signal.SIGINT, stop)\\n'
        'print("ready", flush=True)\\n'
        'time.sleep(60)\\n'
    )
    try:
      run_study._run(['-c', child, sys.argv[1]])
    except KeyboardInterrupt:
      print('interrupted', flush=True)
''')


class StudyPlanTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('default_fer', run_study.StudyPlan(), None,
       f'-m experiments.pretrain_fer --flagfile={_CFG}/fer.cfg --workdir=runs/study/fer'
       ' --schedule=short --noprogress --compilation_cache_dir=runs/study/compilation_cache'),
      ('fer_own_schedule_and_stages',
       run_study.StudyPlan(root='runs/x', fer_schedule='paper', fer_stages=('a:2:1e-3:none', 'b:1:1e-4:none')),
       None,
       f'-m experiments.pretrain_fer --flagfile={_CFG}/fer.cfg --workdir=runs/x/fer'
       ' --stages=a:2:1e-3:none,b:1:1e-4:none --schedule=paper --noprogress'
       ' --compilation_cache_dir=runs/x/compilation_cache'),
      ('transfer_from_root', run_study.StudyPlan(root='runs/x', extra_flags=('--conv_impl=lax',)),
       ('leaky', 'fc1'),
       f'-m experiments.finetune --flagfile={_CFG}/fc1.cfg --protocol=leaky'
       ' --workdir=runs/x/leaky/fc1 --init_from=runs/x/fer --schedule=short --noprogress'
       ' --compilation_cache_dir=runs/x/compilation_cache --conv_impl=lax'),
      ('scratch_loads_nothing', run_study.StudyPlan(schedule='paper'), ('paper', 'scratch'),
       f'-m experiments.finetune --flagfile={_CFG}/scratch.cfg --protocol=paper'
       ' --workdir=runs/study/paper/scratch --schedule=paper --noprogress'
       ' --compilation_cache_dir=runs/study/compilation_cache'),
      ('near_duplicates_for_dedup', run_study.StudyPlan(near_duplicates='group'), ('dedup', 'fc1'),
       f'-m experiments.finetune --flagfile={_CFG}/fc1.cfg --protocol=dedup'
       ' --workdir=runs/study/dedup/fc1 --init_from=runs/study/fer --near_duplicates=group'
       ' --schedule=short --noprogress --compilation_cache_dir=runs/study/compilation_cache'),
      ('near_duplicates_not_for_paper', run_study.StudyPlan(near_duplicates='group'),
       ('paper', 'fc1'),
       f'-m experiments.finetune --flagfile={_CFG}/fc1.cfg --protocol=paper'
       ' --workdir=runs/study/paper/fc1 --init_from=runs/study/fer --schedule=short'
       ' --noprogress --compilation_cache_dir=runs/study/compilation_cache'),
      ('without_compilation_cache', run_study.StudyPlan(compilation_cache=False),
       ('dedup', 'scratch'),
       f'-m experiments.finetune --flagfile={_CFG}/scratch.cfg --protocol=dedup'
       ' --workdir=runs/study/dedup/scratch --schedule=short --noprogress'),
  )
  def test_command(self, plan, age_run, expected):
    args = plan.fer_command() if age_run is None else plan.age_command(*age_run)
    self.assertEqual(' '.join(args), expected)

  def test_age_runs_order_and_leaky_subset(self):
    plan = run_study.StudyPlan(protocols=('dedup', 'leaky'), experiments=('fc1', 'scratch'))
    self.assertEqual(
        plan.age_runs(), [('dedup', 'fc1'), ('dedup', 'scratch'), ('leaky', 'fc1')]
    )

  @parameterized.named_parameters(
      ('defaults', run_study.StudyPlan(), ['--schedule=short']),
      ('everything', run_study.StudyPlan(
          root='runs/x', fer_schedule='paper', fer_stages=('a:2:1e-3:none', 'b:1:1e-4:none'),
          protocols=('dedup',), experiments=('fc1',), extra_flags=('--stop_after_epoch=2',),
          compilation_cache=False),
       ['--root=runs/x', '--schedule=short', '--fer_schedule=paper',
        '--fer_stages=a:2:1e-3:none,b:1:1e-4:none', '--protocols=dedup', '--experiments=fc1',
        '--extra_flags=--stop_after_epoch=2', '--nocompilation_cache']),
      ('shell_quoted', run_study.StudyPlan(
          fer_stages=(r'a:2:1e-3:block\d{1,2}/.*',), near_duplicates='group'),
       ['--schedule=short', r"'--fer_stages=a:2:1e-3:block\d{1,2}/.*'",
        '--near_duplicates=group']),
  )
  def test_study_flags(self, plan, expected):
    self.assertEqual(plan.study_flags(), expected)

  @parameterized.named_parameters(
      ('experiment', dict(experiments=('fc1', 'fc3')), 'fc3'),
      ('leaky_experiment', dict(leaky_experiments=('nope',)), 'nope'),
      ('protocol', dict(protocols=('kaggle',)), 'kaggle'),
      ('near_duplicates', dict(near_duplicates='merge'), 'merge'),
  )
  def test_unknown_names_raise(self, kwargs, name):
    with self.assertRaisesRegex(ValueError, name):
      run_study.StudyPlan(**kwargs)


class StopTest(absltest.TestCase):

  def test_ctrl_c_lets_the_run_finish_its_saves(self):
    with tempfile.TemporaryDirectory() as tmp:
      marker = pathlib.Path(tmp) / 'saved'
      parent = subprocess.Popen(
          [sys.executable, '-c', _PARENT, str(marker)], cwd=_ROOT, stdout=subprocess.PIPE,
          text=True, start_new_session=True,
      )
      lines = []  # the command run_study prints, then the run's 'ready'
      while not lines or lines[-1] not in ('ready\n', ''):
        lines.append(parent.stdout.readline())
      self.assertEqual(lines[-1], 'ready\n', repr(lines))
      os.killpg(parent.pid, signal.SIGINT)  # as a terminal's or a notebook's Ctrl-C does
      out, _ = parent.communicate(timeout=60)
      self.assertEqual(marker.read_text(), 'saved')
    self.assertIn('interrupted', out)


if __name__ == '__main__':
  absltest.main()
