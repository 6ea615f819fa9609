"""Tests of `experiments.report` on small fabricated run directories."""

import json
import pathlib
import re
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from agejax import ages
from agejax import config
from agejax import evaluate
from agejax import synthetic
from agejax import train
from experiments import report
from experiments import run_study

_ROOT = pathlib.Path(__file__).resolve().parents[1]

def _scores(num_classes: int, accuracy: float, seed: int) -> dict:
  """The scores `agejax.evaluate` writes for one split, set to easily recognised values.

  The keys are what `agejax.evaluate.summarize` gives for ``num_classes`` (the
  11 age ranges have no tolerance scores), so the report is tested on the
  files training writes.
  """
  rng = np.random.default_rng(seed)
  confusion = rng.integers(0, 3, (num_classes, num_classes)) + 5 * np.eye(num_classes, dtype=int)
  confusion[0, :] = confusion[:, 0] = 0  # class 0 neither in the labels nor predicted
  support = confusion.sum(axis=1)
  count = float(support.sum())
  class_values = None
  if num_classes == ages.NUM_RANGES:
    class_values = tuple(float(v) for v in np.asarray(ages.range_midpoints()))
  totals = {'confusion': confusion, 'count': count, 'loss_sum': 1.5 * count,
            'abs_err_argmax': count, 'abs_err_expected': count, 'abs_err_median': count}
  scores = evaluate.summarize(totals, config=config.StepConfig(class_values=class_values))
  f1 = np.linspace(0.0, 0.9, num_classes)
  recognisable = {
      'accuracy': accuracy,
      **{f'cs@{k}': min(1.0, accuracy + 0.01 * k) for k in evaluate.CS_CURVE_KS},
      'mae': 3.25 + accuracy,
      'mae_expected': 3.5,
      'mae_median': 3.4,
      'weighted_precision': 0.1234,
      'weighted_recall': 0.2347,
      'weighted_f1': 0.3456,
      'macro_precision': 0.4567,
      'macro_recall': 0.5678,
      'macro_f1': 0.6789,
      'tol3_weighted_f1': 0.7891,
      'per_class': {
          'precision': f1.tolist(),
          'recall': f1.tolist(),
          'f1': f1.tolist(),  # 0.0 for class 0, as zero_division=0 gives
          'support': support.astype(float).tolist(),
      },
  }
  scores.update({k: v for k, v in recognisable.items() if k in scores})
  return {**scores, 'confusion': confusion.tolist()}


def _results(num_classes: int, accuracy: float, seed: int = 0) -> dict:
  history = [
      {'epoch': e, 'stage': 'stage1', 'train_loss': 2.0 / e, 'val_loss': 2.5 / e,
       'train_accuracy': 0.1 * e, 'val_accuracy': 0.08 * e, 'seconds': 60.0}
      for e in (1, 2)
  ]
  return {
      'best_epoch': 2,
      'history': history,
      'transfer': None,
      'validation': _scores(num_classes, accuracy - 0.01, seed),
      'test': _scores(num_classes, accuracy, seed + 1),
  }


def _write_run(
    root: pathlib.Path, key: str, results: dict, leaks: dict | None = None, data: str = 'real'
) -> None:
  path = root / key
  path.mkdir(parents=True)
  (path / 'results.json').write_text(json.dumps(results))
  (path / 'config.json').write_text(json.dumps({'stages': [{'name': 'stage1', 'epochs': 2}]}))
  data_report = {'data': data}
  if leaks is not None:
    data_report['split'] = {
        'hash_leaks_from_train': leaks,
        'split_counts': {'train': 700, 'validation': 150, 'test': 200},
    }
  (path / 'data_report.json').write_text(json.dumps(data_report))


def _fake_study(root: pathlib.Path) -> None:
  fer = _results(7, 0.6)
  fer['validation']['accuracy'] = 0.6512
  _write_run(root, 'fer', fer)
  _write_run(root, 'dedup/fc1', _results(100, 0.4321), {'validation': 0, 'test': 0})
  _write_run(root, 'dedup/scratch', _results(100, 0.30, seed=5), {'validation': 0, 'test': 0})
  _write_run(root, 'dedup/ranges11', _results(ages.NUM_RANGES, 0.55))
  _write_run(root, 'leaky/fc1', _results(100, 0.80, seed=7), {'validation': 12, 'test': 34})
  (root / 'paper' / 'fc1').mkdir(parents=True)  # started, not finished


_PLAN = run_study.StudyPlan()


class HeaderTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('real', 'real', 'real', None),
      ('synthetic_fer', 'synthetic', 'real', 'FER2013'),
      ('synthetic_age', 'real', 'synthetic', 'UTKFace'),
      ('both_synthetic', 'synthetic', 'synthetic', 'FER2013 or UTKFace'),
  )
  def test_data_sources_per_task(self, fer_data, age_data, warned_about):
    with tempfile.TemporaryDirectory() as tmp:
      root = pathlib.Path(tmp)
      _write_run(root, 'fer', _results(7, 0.6), data=fer_data)
      _write_run(root, 'dedup/fc1', _results(100, 0.4), data=age_data)
      header = report.header_section(report.load_study(root), report.Options(hardware_note='box'))
    self.assertIn(f'- FER data: {fer_data}.\n- Age data: {age_data}.', header)
    warnings = re.findall(r'say nothing about (.*)\.\*\*', header)
    self.assertEqual(warnings, [warned_about] if warned_about else [])

  def test_devices_as_each_run_recorded_them(self):
    def session(backend, kind, devices, precision):
      return {'backend': backend, 'device_kind': kind, 'devices': devices, 'processes': 1,
              'matmul_precision': precision, 'versions': {'jax': '0.10.2'}}

    tpu = session('tpu', 'TPU v5 lite', 1, 'float32')
    cpu = session('cpu', 'cpu', 1, 'default')
    with tempfile.TemporaryDirectory() as tmp:
      root = pathlib.Path(tmp)
      _write_run(root, 'fer', {**_results(7, 0.6), 'environment': [tpu, tpu]})
      _write_run(root, 'dedup/fc1', {**_results(100, 0.4), 'environment': [tpu, cpu]})
      _write_run(root, 'dedup/scratch', _results(100, 0.3))
      header = report.header_section(report.load_study(root), report.Options(hardware_note='box'))
    tpu_words = '1 x TPU v5 lite (tpu), JAX 0.10.2, matmul precision float32'
    cpu_words = '1 x cpu (cpu), JAX 0.10.2, matmul precision default'
    self.assertIn(
        '- Devices, as each run recorded them (its environment.jsonl):\n'
        f'  - {tpu_words}: `fer`\n'
        f'  - {tpu_words} and {cpu_words}: `dedup/fc1`\n'
        '  - not recorded: `dedup/scratch`\n',
        header,
    )

  def test_no_devices_lines_when_no_run_recorded_them(self):
    with tempfile.TemporaryDirectory() as tmp:
      root = pathlib.Path(tmp)
      _write_run(root, 'fer', _results(7, 0.6))
      header = report.header_section(report.load_study(root), report.Options(hardware_note='box'))
    self.assertNotIn('Devices', header)


class FromTrainingTest(parameterized.TestCase):
  """The report reads what `agejax.train.train_and_evaluate` writes, not only fixtures."""

  @parameterized.named_parameters(('ages', 'fc1'), ('ranges', 'ranges11'))
  def test_reads_a_trained_run(self, experiment):
    data = synthetic.make_age_splits(seed=0, n_train=32, n_val=16, n_test=16)
    num_classes, class_values = 100, None
    if experiment == 'ranges11':
      num_classes = ages.NUM_RANGES
      class_values = tuple(float(v) for v in np.asarray(ages.range_midpoints()))
      data = {k: {**v, 'label': np.asarray(ages.age_to_range(v['age']))} for k, v in data.items()}
    model = config.ModelConfig(
        num_classes=num_classes, conv_filters=((2, 2), (2, 2), (2, 2)), dense_units=(4,)
    )
    train_config = config.TrainConfig(
        model=model,
        stages=(config.StageConfig('s1', 1, 1e-3),),
        step=config.StepConfig(class_values=class_values),
        batch_size=16,
        eval_batch_size=16,
        epoch_mode='loop',
    )
    with tempfile.TemporaryDirectory() as tmp:
      root = pathlib.Path(tmp)
      train.train_and_evaluate(
          train_config, data, root / 'dedup' / experiment, log=lambda _: None, show_progress=False
      )
      study = report.load_study(root)
      md = report.write_report(study, root / 'docs', report.Options(figures=())).read_text()
    self.assertEqual(sorted(study.runs), [f'dedup/{experiment}'])
    self.assertRegex(md, rf'\| {experiment}( \(11 ranges\))? \| \d+\.\d\d \|')
    self.assertRegex(md, rf'  - \d+ x \S+ \({jax.default_backend()}\), JAX {jax.__version__}, .*`dedup/{experiment}`')


class ReportTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    root = pathlib.Path(cls._tmp.name)
    _fake_study(root / 'runs')
    cls.out = root / 'docs'
    cls.study = report.load_study(root / 'runs')
    cls.options = report.Options(hardware_note='test box', figures=('fc1', 'ranges11'))
    cls.md_path = report.write_report(cls.study, cls.out, cls.options)
    cls.md = cls.md_path.read_text()

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  @parameterized.named_parameters(
      ('defaults', {}, ' --hardware_note=box'),
      ('notes_and_protocol', {'schedule_note': 'short runs', 'detail_protocol': 'paper'},
       " --schedule_note='short runs' --detail_protocol=paper --hardware_note=box"),
  )
  def test_report_command_gives_back_its_options(self, options, flags_tail):
    section = report.commands_section(
        self.study, report.Options(hardware_note='box', figures=('fc1',), **options))
    (line,) = [l for l in section.splitlines() if 'python -m experiments.report' in l]
    self.assertTrue(line.endswith(' --out=docs --figures=fc1' + flags_tail), line)

  def test_finds_finished_and_unfinished_runs(self):
    self.assertCountEqual(
        self.study.runs, ['fer', 'dedup/fc1', 'dedup/scratch', 'dedup/ranges11', 'leaky/fc1']
    )
    self.assertEqual(self.study.unfinished, {'paper/fc1'})

  @parameterized.named_parameters(
      ('fc1_row', '| fc1 | 43.21 | 44.21 | 45.21 | 46.21 | 3.68 | 3.50 | 0.123 | 0.235 | 0.346 | 0.457 | 0.568 | 0.679 | 0.789 |'),
      ('study_row', '| **study** (100 ages) | 57.00 | 64.38 | 71.06 | 76.97 | 2.09–2.65 |'),
      ('study_ranges', '| **study** (11 ranges) | 60.76 |'),
      ('fer', '| agejax FER checkpoint | 65.12 | 60.00 | 2 |'),
      ('leaky_row', '| leaky | 80.00 | 83.00 | 4.05 | 0.679 | 12 | 34 of 200 | 17.00 |'),
      ('missing_run', '| fc2 | not run |'),
      ('unfinished_run', '| paper | not run (unfinished) |'),
      ('per_class_undefined_first', '| 0–9 | – (0) | 0.009 ('),
      ('range_row', '| 65+ | 0.900 | 0.900 | 0.900 |'),
      ('hardware', '- Hardware: test box'),
      ('stage_plan', '  - stage1 2 epochs: '),
      ('weighted_recall_note', 'wR is the accuracy by definition'),
      ('near_duplicate_policy', '- `dedup` split: `--near_duplicates=keep` (keep: only byte-identical'),
      ('discussion', '<!-- discussion -->'),
      ('draft', 'changes test accuracy by +13.21 points'),
      ('command', '`python -m experiments.finetune --flagfile=experiments/configs/study/fc1.cfg'
                  ' --protocol=dedup --workdir=runs/study/dedup/fc1 --init_from=runs/study/fer'
                  ' --schedule=short --noprogress'
                  ' --compilation_cache_dir=runs/study/compilation_cache`'),
  )
  def test_markdown_contains(self, expected):
    self.assertIn(expected, self.md)

  @parameterized.named_parameters(
      ('one_epoch', [1, 3], {}, 's1 1 epoch + s2 3 epochs'),
      ('stopped', [2, 2], {'epochs_done': 3, 'epochs_planned': 4},
       's1 2 epochs + s2 2 epochs (stopped after 3 of 4 epochs: --stop_after_epoch)'),
      ('stopped_without_config', None, {'epochs_done': 1, 'epochs_planned': 4},
       'no config.json (stopped after 1 of 4 epochs: --stop_after_epoch)'),
  )
  def test_stage_plan(self, epochs, results, expected):
    config = None
    if epochs is not None:
      config = {'stages': [{'name': f's{i + 1}', 'epochs': e} for i, e in enumerate(epochs)]}
    run = report.Run('dedup/fc1', pathlib.Path('.'), results, config, None)
    self.assertEqual(report._stage_plan(run), expected)

  def test_ranges_row_leaves_tol3_blank(self):
    row = next(line for line in self.md.splitlines() if line.startswith('| ranges11 (11 ranges) |'))
    self.assertTrue(row.endswith('| 0.679 |  |'), row)  # mF1, then no tol3 wF1

  def test_transfer_differences_have_intervals(self):
    interval = r'\(-?\d+\.\d\d to -?\d+\.\d\d\)'
    self.assertRegex(
        self.md,
        rf'\| dedup \| \+13\.21 points {interval} \| \+13\.21 points {interval}'
        rf' \| \+0\.13 years {interval} \|',
    )

  def test_uncertainty_rows_for_finished_age_runs(self):
    section = self.md.split('## Uncertainty')[1].split('## ')[0]
    rows = [line for line in section.splitlines() if line.startswith('| `')]
    self.assertEqual(
        [row.split(' | ')[0] for row in rows],
        ['| `dedup/fc1`', '| `dedup/ranges11`', '| `dedup/scratch`', '| `leaky/fc1`'],
    )
    self.assertTrue(rows[1].endswith('| – |'))  # ranges11: no MAE interval

  def test_paper_table_has_no_numbers_of_its_own(self):
    paper = self.md.split('## Test scores, `paper` protocol')[1].split('## ')[0]
    rows = [line for line in paper.splitlines() if line.startswith('| ') and 'study' not in line]
    self.assertLen(rows, 1 + 8)  # header + every experiment
    for row in rows[1:]:
      self.assertIn('not run', row)

  def test_figures_only_for_selected_experiments_and_small(self):
    pngs = sorted(p.name for p in (self.out / 'figures').iterdir())
    expected = sorted(
        f'{run}_{kind}.png'
        for run in ('dedup_fc1', 'dedup_ranges11', 'leaky_fc1')
        for kind in report.FIGURE_KINDS
    )
    self.assertEqual(pngs, expected)
    for name in pngs:
      data = (self.out / 'figures' / name).read_bytes()
      self.assertTrue(data.startswith(b'\x89PNG'), name)
      self.assertLess(len(data), 100_000, name)
    self.assertIn('](figures/dedup_fc1_confusion.png)', self.md)

  def test_results_json_has_scores_without_confusion(self):
    saved = json.loads((self.out / 'results' / 'dedup_fc1.json').read_text())
    self.assertEqual(saved['best_epoch'], 2)
    self.assertEqual(saved['test']['accuracy'], 0.4321)
    self.assertNotIn('confusion', saved['test'])
    self.assertNotIn('confusion', saved['validation'])
    self.assertLen(saved['test']['per_class']['support'], 100)
    self.assertTrue((self.out / 'results' / 'fer.json').exists())

  @parameterized.parameters(
      (0.57, 'pct', '57.00'),
      (2.094, 'years', '2.09'),
      (0.5556, 'ratio', '0.556'),
      (float('nan'), 'ratio', '–'),
      (None, 'pct', ''),
  )
  def test_fmt(self, value, kind, expected):
    self.assertEqual(report.fmt(value, kind), expected)


class IntervalTest(absltest.TestCase):

  def test_interval_brackets_a_consistent_run(self):
    cm = np.zeros((100, 100), int)
    cm[np.arange(100), np.arange(100)] = 3
    cm[np.arange(100), (np.arange(100) + 5) % 100] = 7
    scores = _scores(100, 0.3, seed=0)
    scores.update({'confusion': cm.tolist(), 'accuracy': 0.3, 'count': 1000.0,
                   'cs@3': 0.3, 'mae': float(np.sum(cm * np.abs(np.subtract.outer(
                       np.arange(100), np.arange(100)))) / 1000)})
    results = _results(100, 0.3)
    results['test'] = scores
    with tempfile.TemporaryDirectory() as tmp:
      _write_run(pathlib.Path(tmp), 'dedup/fc1', results)
      section = report.uncertainty_section(report.load_study(tmp))
    row = next(line for line in section.splitlines() if line.startswith('| `dedup/fc1`'))
    cells = row.strip('| ').split(' | ')
    self.assertEqual(cells[1], '1000')
    for cell in cells[2:]:
      point, low, high = map(float, re.fullmatch(r'(\S+) \((\S+) to (\S+)\)', cell).groups())
      self.assertLess(low, point)
      self.assertLess(point, high)


def _write_predictions(path: pathlib.Path, pred: np.ndarray, seed: int = 0, hashes=None) -> None:
  rng = np.random.default_rng(seed)
  n = len(pred)
  age = rng.integers(0, 100, n)
  np.savez(
      path / 'predictions_test.npz', label=age, age=age, pred=pred,
      race=np.arange(n) % 5, gender=np.arange(n) % 2,
      hash=np.array([f'h{i}' for i in range(n)] if hashes is None else hashes),
  )


class PredictionsTest(parameterized.TestCase):
  """Paired intervals and subgroups, from runs that saved per-example predictions."""

  def _study(self, tmp: str, scratch_hashes=None):
    root = pathlib.Path(tmp)
    n = 400
    age = np.random.default_rng(0).integers(0, 100, n)
    fc1_pred = np.where(np.arange(n) % 4 == 0, age, np.clip(age + 5, 0, 99))
    for key, pred in (('dedup/fc1', fc1_pred), ('dedup/scratch', np.full(n, 26))):
      _write_run(root, key, _results(100, 0.3))
      hashes = scratch_hashes if key == 'dedup/scratch' else None
      _write_predictions(root / key, pred, hashes=hashes)
    return report.load_study(root)

  def test_per_example_scores_average_to_the_scores(self):
    with tempfile.TemporaryDirectory() as tmp:
      run = self._study(tmp).get('dedup', 'fc1')
      saved = report.read_predictions(run)
    scores = report.per_example_scores(saved, 100)
    self.assertAlmostEqual(scores['accuracy'].mean(), np.mean(saved['pred'] == saved['age']))
    self.assertGreater(scores['accuracy'].mean(), 0.24)
    np.testing.assert_allclose(scores['mae'], np.abs(saved['pred'] - saved['age']))

  def test_transfer_is_paired_when_both_runs_saved_the_same_faces(self):
    with tempfile.TemporaryDirectory() as tmp:
      section = report.transfer_section(self._study(tmp), _PLAN)
    self.assertRegex(section, r'\| dedup \| .* \| paired \|')

  def test_transfer_is_unpaired_for_different_faces(self):
    with tempfile.TemporaryDirectory() as tmp:
      section = report.transfer_section(
          self._study(tmp, scratch_hashes=[f'x{i}' for i in range(400)]), _PLAN
      )
    self.assertRegex(section, r'\| dedup \| .* \| unpaired \|')

  def test_subgroups_of_fc1(self):
    with tempfile.TemporaryDirectory() as tmp:
      section = report.subgroup_section(self._study(tmp), _PLAN, 'dedup')
    rows = [line for line in section.splitlines() if line.startswith('| race') or line.startswith('| gender')]
    self.assertLen(rows, 5 + 2)
    self.assertTrue(rows[0].startswith('| race: White | 80 | '))
    self.assertTrue(rows[5].startswith('| gender: male | 200 | '))

  def test_subgroups_without_predictions_say_how_to_get_them(self):
    with tempfile.TemporaryDirectory() as tmp:
      _write_run(pathlib.Path(tmp), 'dedup/fc1', _results(100, 0.3))
      section = report.subgroup_section(report.load_study(tmp), _PLAN, 'dedup')
    self.assertIn('No per-example predictions', section)

  def test_subgroups_need_ethnicity_and_gender(self):
    with tempfile.TemporaryDirectory() as tmp:
      root = pathlib.Path(tmp)
      _write_run(root, 'dedup/fc1', _results(100, 0.3))
      np.savez(root / 'dedup/fc1/predictions_test.npz', label=np.arange(4), age=np.arange(4),
               pred=np.arange(4))  # as synthetic faces save them
      section = report.subgroup_section(report.load_study(tmp), _PLAN, 'dedup')
    self.assertIn('have no ethnicity and gender', section)
    self.assertNotIn('re-run', section)

  @parameterized.named_parameters(
      ('not_a_zip', lambda saved: b'not a zip'),
      ('cut_short', lambda saved: saved[: len(saved) // 2]),
      ('damaged', lambda saved: saved[:60] + b'\xff' * 200 + saved[260:]),
  )
  def test_unreadable_predictions_name_the_file(self, damage):
    with tempfile.TemporaryDirectory() as tmp:
      _write_run(pathlib.Path(tmp), 'dedup/fc1', _results(100, 0.3))
      path = pathlib.Path(tmp) / 'dedup/fc1/predictions_test.npz'
      np.savez_compressed(path, pred=np.arange(1000) % 7, label=np.arange(1000) % 5)
      path.write_bytes(damage(path.read_bytes()))
      run = report.load_study(tmp).get('dedup', 'fc1')
      with self.assertRaisesRegex(
          report.ReportError, f'{re.escape(str(path))} is unreadable .*Delete {re.escape(str(path))}'
      ):
        report.read_predictions(run)


class EmptyStudyTest(absltest.TestCase):

  def test_no_runs_renders_not_run_everywhere(self):
    with tempfile.TemporaryDirectory() as tmp:
      (pathlib.Path(tmp) / 'runs' / 'fer').mkdir(parents=True)
      study = report.load_study(pathlib.Path(tmp) / 'runs')
      md = report.write_report(study, pathlib.Path(tmp) / 'out', report.Options()).read_text()
    self.assertIn('| agejax FER checkpoint | not run (unfinished) |', md)
    # Two protocol tables of 8, transfer 2, leakage 3, commands 8 + 8 + 1 (every age run).
    self.assertEqual(md.count('| not run |'), 2 * 8 + 2 + 3 + 17)
    self.assertIn('- (no finished runs to discuss yet)', md)

  def test_smoke_runs_are_flagged(self):
    with tempfile.TemporaryDirectory() as tmp:
      root = pathlib.Path(tmp) / 'runs'
      _write_run(root, 'dedup/fc1', _results(100, 0.4))
      _write_run(root, 'dedup/scratch', _results(100, 0.3))
      report_file = root / 'dedup' / 'fc1' / 'data_report.json'
      report_file.write_text(json.dumps({'data': 'real', 'train_truncated_to': 256}))
      study = report.load_study(root)
      md = report.write_report(study, pathlib.Path(tmp) / 'out', report.Options()).read_text()
    self.assertIn('- **Warning: dedup/fc1 trained on a random subset of the training faces', md)
    self.assertNotIn('dedup/scratch trained on', md)

  def test_partial_plan_shows_only_its_runs(self):
    plan = run_study.StudyPlan(
        root='runs/part', protocols=('dedup',), experiments=('fc1', 'scratch'), leaky_experiments=()
    )
    with tempfile.TemporaryDirectory() as tmp:
      root = pathlib.Path(tmp) / 'runs'
      _write_run(root, 'dedup/fc1', _results(100, 0.4))
      study = report.load_study(root)
      md = report.write_report(study, pathlib.Path(tmp) / 'out', report.Options(plan=plan, figures=('fc1',))).read_text()
    dedup = md.split('## Test scores, `dedup` protocol')[1].split('## ')[0]
    self.assertEqual(
        [line.split(' | ')[0] for line in dedup.splitlines() if line.startswith('| ') and '**' not in line],
        ['| Experiment', '| fc1', '| scratch'],
    )
    self.assertIn('| scratch | not run |', dedup)
    for absent in ('`paper` protocol', '| paper |', '## Leakage', '## 11 age ranges', 'ranges11'):
      self.assertNotIn(absent, md)
    self.assertIn('| dedup | not run |', md.split('## Transfer vs scratch')[1])
    self.assertIn('## Subgroups: fc1 on `dedup`', md)


def _break_json(results: dict) -> str:
  return json.dumps(results)[:-10]


def _drop_test(results: dict) -> str:
  del results['test']
  return json.dumps(results)


def _drop_cs3(results: dict) -> str:
  del results['validation']['cs@3']
  return json.dumps(results)


def _shrink_confusion(results: dict) -> str:
  results['test']['confusion'] = results['test']['confusion'][:5]
  return json.dumps(results)


class MalformedRunTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('invalid_json', _break_json, 'not valid JSON'),
      ('no_test', _drop_test, "lacks ['test']"),
      ('no_metric', _drop_cs3, "'validation' lacks ['cs@3']"),
      ('confusion_shape', _shrink_confusion, 'is not 11 x 11'),
  )
  def test_error_names_file(self, corrupt, message):
    with tempfile.TemporaryDirectory() as tmp:
      run = pathlib.Path(tmp) / 'dedup' / 'ranges11'
      _write_run(pathlib.Path(tmp), 'dedup/ranges11', _results(ages.NUM_RANGES, 0.5))
      (run / 'results.json').write_text(corrupt(_results(ages.NUM_RANGES, 0.5)))
      with self.assertRaisesRegex(report.ReportError, re.escape(message)) as ctx:
        report.load_study(tmp)
      self.assertIn(str(run / 'results.json'), str(ctx.exception))

  def test_data_report_with_bytes_not_utf8_names_the_file_and_what_to_do(self):
    with tempfile.TemporaryDirectory() as tmp:
      _write_run(pathlib.Path(tmp), 'dedup/ranges11', _results(ages.NUM_RANGES, 0.5))
      path = pathlib.Path(tmp) / 'dedup' / 'ranges11' / 'data_report.json'
      path.write_bytes(b'{"data": "\xff\xfe"}')
      with self.assertRaisesRegex(
          report.ReportError, f'{re.escape(str(path))} is not valid JSON .*Move .* aside, then re-run'
      ):
        report.load_study(tmp)

  def test_unreadable_results_names_file(self):
    with tempfile.TemporaryDirectory() as tmp:
      _write_run(pathlib.Path(tmp), 'dedup/ranges11', _results(ages.NUM_RANGES, 0.5))
      results = pathlib.Path(tmp) / 'dedup' / 'ranges11' / 'results.json'
      results.unlink()
      results.mkdir()  # reading it raises IsADirectoryError, an OSError
      with self.assertRaisesRegex(report.ReportError, 'is unreadable') as ctx:
        report.load_study(tmp)
      self.assertIn(str(results), str(ctx.exception))

  def test_program_prints_the_message_without_a_traceback(self):
    with tempfile.TemporaryDirectory() as tmp:
      _write_run(pathlib.Path(tmp), 'dedup/ranges11', _results(ages.NUM_RANGES, 0.5))
      results = pathlib.Path(tmp) / 'dedup' / 'ranges11' / 'results.json'
      results.write_text('{')
      done = subprocess.run(
          [sys.executable, '-m', 'experiments.report', f'--root={tmp}', f'--out={tmp}/out'],
          cwd=_ROOT, capture_output=True, text=True, check=False,
      )
    self.assertEqual(done.returncode, 1)
    self.assertNotIn('Traceback', done.stderr)
    self.assertIn(f'Error: {results} is not valid JSON', done.stderr)

  def test_malformed_config_names_file(self):
    with tempfile.TemporaryDirectory() as tmp:
      _write_run(pathlib.Path(tmp), 'paper/ranges11', _results(ages.NUM_RANGES, 0.5))
      config = pathlib.Path(tmp) / 'paper' / 'ranges11' / 'config.json'
      config.write_text('{')
      with self.assertRaisesRegex(
          report.ReportError, 'not valid JSON .*the report does without it'
      ) as ctx:
        report.load_study(tmp)
      self.assertIn(str(config), str(ctx.exception))


if __name__ == '__main__':
  absltest.main()
