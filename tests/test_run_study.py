"""Tests of experiments.run_study's plan: which runs, and the command of each."""

from absl.testing import absltest
from absl.testing import parameterized

from experiments import run_study

_CFG = 'experiments/configs/study'


class StudyPlanTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('default_fer', run_study.StudyPlan(), None,
       f'-m experiments.pretrain_fer --flagfile={_CFG}/fer.cfg --workdir=runs/study/fer'
       ' --schedule=short --noprogress'),
      ('fer_own_schedule_and_stages',
       run_study.StudyPlan(root='runs/x', fer_schedule='paper', fer_stages=('a:2:1e-3:none', 'b:1:1e-4:none')),
       None,
       f'-m experiments.pretrain_fer --flagfile={_CFG}/fer.cfg --workdir=runs/x/fer'
       ' --stages=a:2:1e-3:none,b:1:1e-4:none --schedule=paper --noprogress'),
      ('transfer_from_root', run_study.StudyPlan(root='runs/x', extra_flags=('--conv_impl=lax',)),
       ('leaky', 'fc1'),
       f'-m experiments.finetune --flagfile={_CFG}/fc1.cfg --protocol=leaky'
       ' --workdir=runs/x/leaky/fc1 --init_from=runs/x/fer --schedule=short --noprogress'
       ' --conv_impl=lax'),
      ('scratch_loads_nothing', run_study.StudyPlan(schedule='paper'), ('paper', 'scratch'),
       f'-m experiments.finetune --flagfile={_CFG}/scratch.cfg --protocol=paper'
       ' --workdir=runs/study/paper/scratch --schedule=paper --noprogress'),
      ('near_duplicates_for_dedup', run_study.StudyPlan(near_duplicates='group'), ('dedup', 'fc1'),
       f'-m experiments.finetune --flagfile={_CFG}/fc1.cfg --protocol=dedup'
       ' --workdir=runs/study/dedup/fc1 --init_from=runs/study/fer --near_duplicates=group'
       ' --schedule=short --noprogress'),
      ('near_duplicates_not_for_paper', run_study.StudyPlan(near_duplicates='group'),
       ('paper', 'fc1'),
       f'-m experiments.finetune --flagfile={_CFG}/fc1.cfg --protocol=paper'
       ' --workdir=runs/study/paper/fc1 --init_from=runs/study/fer --schedule=short'
       ' --noprogress'),
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
          protocols=('dedup',), experiments=('fc1',), extra_flags=('--stop_after_epoch=2',)),
       ['--root=runs/x', '--schedule=short', '--fer_schedule=paper',
        '--fer_stages=a:2:1e-3:none,b:1:1e-4:none', '--protocols=dedup', '--experiments=fc1',
        '--extra_flags=--stop_after_epoch=2']),
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


if __name__ == '__main__':
  absltest.main()
