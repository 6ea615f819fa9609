"""Tests of experiments.common: configs, stages and data as the flags build them.

Each case runs in a subprocess: experiments.common and experiments.run_study
both define absl flags such as --schedule, so they cannot share a process.
"""

import json
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

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


def _run_script(script: str, *args: str) -> Any:
  """The JSON that ``script`` prints last, run with ``args`` in a fresh Python."""
  result = subprocess.run(
      [sys.executable, '-c', script, *args],
      cwd=_ROOT, capture_output=True, text=True, check=False,
  )
  if result.returncode:
    raise AssertionError(f'Script failed for {args}:\n{result.stderr[-2000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def _train_config(task: str, args: list[str], num_classes: int) -> list:
  """[step.ordinal, model.num_classes, has class_values] of common.train_config."""
  return _run_script(_SCRIPT, task, json.dumps(args), str(num_classes))


class TrainConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('fer', 'fer', 'fer.cfg', 7, [False, 7, False]),
      ('age', 'age', 'fc1.cfg', 100, [True, 100, False]),
      ('ranges11', 'age', 'ranges11.cfg', 11, [True, 11, True]),
  )
  def test_only_age_classes_get_ordinal_scores(self, task, cfg, num_classes, expected):
    args = [f'--flagfile={_CFG}/{cfg}', '--schedule=paper']
    self.assertEqual(_train_config(task, args, num_classes), expected)



_DATA_REPORT_SCRIPT = """
import json, sys
from absl import app, flags
from experiments import common
task, workdir, flag_sets = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
results = []
for extra in flag_sets:
  flags.FLAGS.unparse_flags()
  flags.FLAGS(['prog', '--data=synthetic', '--synthetic_train=32', '--synthetic_eval=16',
               '--workdir=' + workdir, *extra])
  _, report = getattr(common, task + '_data')()
  try:
    common.write_data_report(workdir, report)
    results.append('ok')
  except app.UsageError as e:
    results.append(str(e))
print(json.dumps(results))
"""


def _write_data_report(task: str, workdir: str, *flag_sets: list[str]) -> list[str]:
  """Runs common.<task>_data + write_data_report once per flag set, in order.

  Returns 'ok' or the UsageError's message for each.
  """
  return _run_script(_DATA_REPORT_SCRIPT, task, workdir, json.dumps(flag_sets))


class DataReportTest(parameterized.TestCase):

  @parameterized.product(
      task=('fer', 'age'),
      change=(
          (['--split_seed=1'], 'split_seed'),
          (['--synthetic_train=48'], 'synthetic'),
          (['--max_train_examples=8'], 'train_truncated_to'),
      ),
  )
  def test_resuming_on_other_faces_is_refused(self, task, change):
    flags, key = change
    with self.subTest('same flags'), tempfile.TemporaryDirectory() as tmp:
      self.assertEqual(_write_data_report(task, tmp, [], []), ['ok', 'ok'])
    with tempfile.TemporaryDirectory() as tmp:
      first, second = _write_data_report(task, tmp, [], flags)
    self.assertEqual(first, 'ok')
    self.assertRegex(second, rf'records other inputs \(.*{key}.*differ\)')

  def test_undersampling_another_age_as_much_is_refused(self):
    # The same sizes before and after balancing, but other faces.
    with tempfile.TemporaryDirectory() as tmp:
      first, second = _write_data_report(
          'age', tmp,
          ['--undersample_age=15', '--undersample_n=1'],
          ['--undersample_age=16', '--undersample_n=1'],
      )
      saved = json.loads((pathlib.Path(tmp) / 'data_report.json').read_text())
    self.assertEqual(first, 'ok')
    self.assertRegex(second, r'records other inputs \(balancing differ\)')
    self.assertEqual(saved['balancing']['undersample'], {'age': 15, 'n': 1})


_SOURCE_SCRIPT = """
import json, sys
from absl import flags
from experiments import common
flags.FLAGS(['prog'])
common.warn_other_source('UTKFace', {'source': sys.argv[1]}, sys.argv[2])
print(json.dumps('done'))
"""


class OtherSourceWarningTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('inside', 'data/UTKFace.tar.gz', 'data', False),
      ('the_folder_itself', 'data/UTKFace', 'data/UTKFace', False),
      ('elsewhere', 'old/UTKFace.tar.gz', 'data', True),
      ('sibling_with_a_common_prefix', 'data2/UTKFace.tar.gz', 'data', True),
  )
  def test_warns_when_the_prepared_copy_came_from_elsewhere(self, source, manual, warns):
    with tempfile.TemporaryDirectory() as tmp:
      result = subprocess.run(
          [sys.executable, '-c', _SOURCE_SCRIPT, f'{tmp}/{source}', f'{tmp}/{manual}'],
          cwd=_ROOT, capture_output=True, text=True, check=True,
      )
    warned = 'using the copy prepared earlier from' in result.stderr
    self.assertEqual(warned, warns, result.stderr[-2000:])
    if warns:
      self.assertIn(f'{tmp}/{source}, not the files in --manual_dir={tmp}/{manual}',
                    result.stderr)


_CAP_SCRIPT = """
import json
import numpy as np
from absl import flags
from experiments import common
flags.FLAGS(['prog', '--data=synthetic', '--synthetic_train=400', '--synthetic_eval=16',
             '--labels=ranges11', '--class_cap=5'])
data, _ = common.age_data()
print(json.dumps(np.bincount(data['train']['label'], minlength=11).tolist()))
"""


class ClassCapTest(absltest.TestCase):

  def test_cap_applies_per_range_with_ranges11(self):
    counts = _run_script(_CAP_SCRIPT)
    self.assertLessEqual(max(counts), 5)
    self.assertEqual(max(counts), 5)  # some range had more than the cap


_UNUSED_SCRIPT = """
import json, sys
from absl import flags
from experiments import common
flags.FLAGS(['prog', *json.loads(sys.argv[1])])
print(json.dumps(common.warn_unused(common.AGE_DATA_FLAGS, 'pretrain_fer')))
"""


class WarnUnusedTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('none', ['--data=real', '--class_weights'], []),
      ('age_data_flags', ['--class_cap=5', '--seed=2', '--protocol=paper', '--labels=ages'],
       ['--protocol', '--labels', '--class_cap']),
  )
  def test_names_the_age_data_flags_given(self, args, want):
    self.assertEqual(_run_script(_UNUSED_SCRIPT, json.dumps(args)), want)


_STAGES_SCRIPT = """
import json, sys
from absl import flags
from experiments import common
try:
  stages = common.parse_stages([sys.argv[1]])
  print(json.dumps([stages[0].epochs, stages[0].learning_rate, stages[0].freeze]))
except flags.ValidationError as e:
  print(json.dumps(['ValidationError', str(e)]))
"""


_SELECT_SCRIPT = """
import json, sys
from experiments import common
print(json.dumps([common.select_mode(m, 'auto') for m in sys.argv[1].split(',')]
                 + [common.select_mode('mae', 'max')]))
"""


class SelectModeTest(absltest.TestCase):

  def test_auto_is_low_for_losses_and_maes(self):
    metrics = 'loss,mae,mae_expected,tol3_mae,accuracy,cs@3,macro_f1,tol3_weighted_f1'
    self.assertEqual(
        _run_script(_SELECT_SCRIPT, metrics),
        ['min', 'min', 'min', 'min', 'max', 'max', 'max', 'max', 'max'],
    )


class UserErrorsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('freezing_typo', ['--stages=s:1:1e-3:blok1/.*'], "--stages entry 's': Freezing patterns"),
      ('missing_init_from', ['--stages=s:1:1e-3:paper', '--init_from=/nonexistent/fer'],
       'No agejax checkpoint under /nonexistent/fer'),
      ('select_metric_typo', ['--stages=s:1:1e-3:none', '--select_metric=acuracy'],
       "--select_metric 'acuracy': not a validation score; choose from"),
      ('undersample_more_than_there_are',
       ['--stages=s:1:1e-3:none', '--undersample_age=26', '--undersample_n=100000'],
       '--undersample_age=26 --undersample_n=100000: cannot remove 100000 rows of label 26'),
      ('undersample_n_without_age', ['--stages=s:1:1e-3:none', '--undersample_n=5'],
       '--undersample_n needs --undersample_age'),
  )
  def test_message_without_traceback_and_nothing_written(self, args, message):
    with tempfile.TemporaryDirectory() as tmp:
      workdir = pathlib.Path(tmp) / 'run'
      result = subprocess.run(
          [sys.executable, '-m', 'experiments.finetune', f'--workdir={workdir}',
           '--synthetic_train=64', '--synthetic_eval=32', *args],
          cwd=_ROOT, capture_output=True, text=True, check=False,
      )
      self.assertFalse(workdir.exists())
    self.assertEqual(result.returncode, 1, result.stderr[-2000:])
    self.assertIn(message, result.stderr)
    self.assertNotIn('Traceback', result.stderr)


_INIT_FROM_SCRIPT = """
import json, pathlib, sys
from absl import flags
from agejax import checkpoints
from experiments import common
flags.FLAGS(['prog', '--stages=s:1:1e-3:paper', '--init_from=/nonexistent/fer'])
config = common.train_config('age', num_classes=100)
workdir = pathlib.Path(sys.argv[1])
out = []
for resuming in (False, True):
  if resuming:
    (workdir / 'checkpoints' / 'latest' / '3').mkdir(parents=True)
  try:
    common.check_before_training(config, str(workdir))
    out.append('ok')
  except checkpoints.CheckpointError as e:
    out.append(str(e)[:40])
print(json.dumps(out))
"""


class CheckBeforeTrainingTest(absltest.TestCase):

  def test_init_from_is_needed_only_by_a_new_run(self):
    with tempfile.TemporaryDirectory() as tmp:
      self.assertEqual(
          _run_script(_INIT_FROM_SCRIPT, tmp),
          ['No agejax checkpoint under /nonexistent/', 'ok'],
      )


_FORMAT_SCRIPT = """
import json
from experiments import common
scores = {'validation': {'accuracy': 0.5}, 'test': {'accuracy': 0.25}}
print(json.dumps(common.format_results(
    {'best_epoch': 1, 'epochs_done': 1, 'epochs_planned': 3, **scores}).splitlines()))
"""


class FormatResultsTest(absltest.TestCase):

  def test_stopped_run_says_so(self):
    lines = _run_script(_FORMAT_SCRIPT)
    self.assertTrue(lines[0].startswith('Stopped after epoch 1 of 3 (--stop_after_epoch)'), lines)
    self.assertEqual(lines[1], 'best epoch 1')


class ParseStagesTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('preset', 's:10:1e-4:paper', [10, 1e-4, 'paper']),
      ('unknown_preset_stays_a_name', 's:10:1e-4:papr', [10, 1e-4, 'papr']),
      ('one_regex_without_slash', 's:1:0.1:logits.*', [1, 0.1, ['logits.*']]),
      ('alternation_inside_a_group', 's:1:0.1:block1/.*|block2/(conv1|bn1)/.*',
       [1, 0.1, ['block1/.*', 'block2/(conv1|bn1)/.*']]),
      ('colon_and_class', 's:1:0.1:(?:head)/.*|[|]x', [1, 0.1, ['(?:head)/.*', '[|]x']]),
      ('quantifier', r's:1:0.1:block\d{1,2}/.*|logits/.*', [1, 0.1, [r'block\d{1,2}/.*', 'logits/.*']]),
      ('bad_epochs', 's:five:0.1:paper', ['ValidationError', "'s:five:0.1:paper': epochs must"]),
      ('three_fields', 's:1:0.1', ['ValidationError', 'is not name:epochs:learning_rate:freeze']),
  )
  def test_parse(self, spec, want):
    got = _run_script(_STAGES_SCRIPT, spec)
    if want[0] == 'ValidationError':
      self.assertEqual(got[0], 'ValidationError')
      self.assertIn(want[1], got[1])
    else:
      self.assertEqual(got, want)


_CACHE_SCRIPT = """
import json, sys
from absl import flags
import jax, jax.numpy as jnp
from experiments import common
events = []
jax.monitoring.register_event_listener(lambda event, **kwargs: events.append(event))
flags.FLAGS(['prog', *sys.argv[1:]])
common.setup()
jax.jit(lambda x: jnp.sin(x) + 1)(jnp.ones(3)).block_until_ready()
print(json.dumps([events.count(f'/jax/compilation_cache/{e}')
                  for e in ('compile_requests_use_cache', 'cache_hits')]))
"""


class CompilationCacheTest(absltest.TestCase):

  def test_a_later_run_loads_what_an_earlier_one_compiled(self):
    # Programs that compile in well under a second, which JAX's default
    # threshold would not have cached: the second run loads every one.
    with tempfile.TemporaryDirectory() as tmp:
      flag = f'--compilation_cache_dir={tmp}/cache'
      programs, hits = _run_script(_CACHE_SCRIPT, flag)
      self.assertGreater(programs, 0)
      self.assertEqual(hits, 0)
      self.assertNotEmpty(list(pathlib.Path(tmp, 'cache').iterdir()))
      again = subprocess.run(
          [sys.executable, '-c', _CACHE_SCRIPT, flag],
          cwd=_ROOT, capture_output=True, text=True, check=True,
      )
    if 'Machine type used for XLA:CPU compilation' in again.stderr:
      self.skipTest('XLA:CPU rejects the programs it cached on this CPU (openxla/xla#44565).')
    self.assertEqual(
        json.loads(again.stdout.splitlines()[-1]), [programs, programs], again.stderr[-2000:]
    )


_PRECISION_SCRIPT = """
import json, os, sys
os.environ.pop('JAX_DEFAULT_MATMUL_PRECISION', None)
from absl import flags
import jax, jax.numpy as jnp
from experiments import common
try:
  flags.FLAGS(['prog', *sys.argv[1:]])
except flags.Error as e:
  print(json.dumps(['Error', str(e)]))
  sys.exit()
common.setup()
x = jnp.arange(4.0).reshape(2, 2)
hlo = jax.jit(lambda a: a @ a).lower(x).as_text()
print(json.dumps([jax.config.jax_default_matmul_precision, 'HIGHEST' in hlo]))
"""


class MatmulPrecisionTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('unset', [], [None, False]),
      ('float32', ['--matmul_precision=float32'], ['float32', True]),
      ('bfloat16', ['--matmul_precision=bfloat16'], ['bfloat16', False]),
      ('unknown', ['--matmul_precision=fast'], ['Error', 'value should be one of']),
  )
  def test_setup_sets_the_precision_programs_compile_with(self, args, want):
    got = _run_script(_PRECISION_SCRIPT, *args)
    if want[0] == 'Error':
      self.assertEqual(got[0], 'Error')
      self.assertIn(want[1], got[1])
    else:
      self.assertEqual(got, want)


if __name__ == '__main__':
  absltest.main()
