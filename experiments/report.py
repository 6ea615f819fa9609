"""Writes docs/RESULTS.md, per-run JSON and figures from the study's run directories.

  python -m experiments.report --root=runs/study --out=docs --schedule=short

Reads ``<root>/fer`` and ``<root>/<protocol>/<experiment>`` (the layout
`experiments.run_study` writes) and writes

* ``<out>/RESULTS.md``: the study's tables, every number read from the runs'
  ``results.json`` (the study's published figures come from `STUDY_FIGURES`
  only); runs without ``results.json`` show as "not run";
* ``<out>/results/<protocol>_<experiment>.json`` (and ``fer.json``): every
  validation and test score except the confusion matrix, plus the best epoch;
* ``<out>/figures/<protocol>_<experiment>_{confusion,per_class_f1,cs_curve,curves}.png``
  for the experiments in ``--figures`` only, so the repository stays small.

The commands printed in RESULTS.md are `experiments.run_study`'s own (its
`StudyPlan`), built from its flags (``--root``, ``--schedule``,
``--fer_schedule``, ``--fer_stages``, ``--protocols``, ``--experiments``,
``--leaky_experiments``, ``--extra_flags``), which this program shares: pass
the values the study was run with.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
import platform
import shlex
import zipfile
import zlib
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
import jax
from matplotlib import colors
from matplotlib import figure
from matplotlib import ticker
import numpy as np

from agejax import ages
from agejax import bootstrap
from agejax import metrics
from agejax import run_logging
from agejax.data import splits as splits_lib
from agejax.data import utkface_names
from experiments import run_study

flags.DEFINE_string(
    'out', None, "Where RESULTS.md, results/ and figures/ go (the repository's own: docs).")
DEFAULT_FIGURES = ('fc1', 'baseline', 'ranges11', 'scratch')

flags.DEFINE_list(
    'figures', list(DEFAULT_FIGURES),
    'Experiments (on every protocol) that get PNG figures.',
)
flags.DEFINE_string('schedule_note', '', 'Free text on the schedule, for the header of RESULTS.md.')
flags.DEFINE_string(
    'hardware_note', None,
    'Hardware the runs used, for the header (default: this machine, from platform and jax.devices()).',
)
flags.DEFINE_string(
    'discussion', None,
    "Markdown file with the authors' discussion, placed after the drafted sentences.",
)
flags.DEFINE_enum(
    'detail_protocol', 'dedup', list(splits_lib.PROTOCOLS),
    'Protocol whose fc1 and ranges11 runs get per-class tables and inline figures.',
)

flags.adopt_module_key_flags(run_study)
FLAGS = flags.FLAGS

# The study's published figures: the only numbers in RESULTS.md not read from a run.
STUDY_FIGURES: dict[str, Any] = {
    'fer_accuracy': 0.65,  # FER2013 emotion CNN, test accuracy (approximate)
    'accuracy': 0.57,
    'cs@1': 0.6438,
    'cs@2': 0.7106,
    'cs@3': 0.7697,
    'mae': (2.09, 2.65),  # years, the range the study reports
    'weighted_precision': 0.59,
    'weighted_recall': 0.55,
    'weighted_f1': 0.56,
    'macro_precision': 0.56,
    'macro_recall': 0.45,
    'macro_f1': 0.47,
    'ranges11_accuracy': 0.6076,
    'baseline_collapse_age': 26,  # the study's first model predicted this age for everything
    'modern_utkface_mae': 4.2,  # large modern models on UTKFace, years (for comparison)
}

TABLE_PROTOCOLS = ('dedup', 'paper')
FIGURE_KINDS = ('confusion', 'per_class_f1', 'cs_curve', 'curves')
CS_KS = tuple(range(11))
FIGURE_DPI = 80

# (key in results.json, column header, how to format it).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ('accuracy', 'Acc %', 'pct'),
    ('cs@1', 'CS1 %', 'pct'),
    ('cs@2', 'CS2 %', 'pct'),
    ('cs@3', 'CS3 %', 'pct'),
    ('mae', 'MAE', 'years'),
    ('mae_expected', 'MAE exp.', 'years'),
    ('weighted_precision', 'wP', 'ratio'),
    ('weighted_recall', 'wR', 'ratio'),
    ('weighted_f1', 'wF1', 'ratio'),
    ('macro_precision', 'mP', 'ratio'),
    ('macro_recall', 'mR', 'ratio'),
    ('macro_f1', 'mF1', 'ratio'),
    ('tol3_weighted_f1', 'tol3 wF1', 'ratio'),
)
AGE_METRICS = tuple(dict.fromkeys(
    [k for k, _, _ in COLUMNS] + [f'cs@{k}' for k in CS_KS] + ['count', 'per_class', 'confusion']
))
# `agejax.evaluate.summarize` leaves the tolerance scores out for age ranges.
RANGE_METRICS = tuple(k for k in AGE_METRICS if not k.startswith('tol'))
PER_CLASS_KEYS = ('precision', 'recall', 'f1', 'support')
NOT_RUN = 'not run'


class ReportError(ValueError):
  """A run directory holds a file the report cannot use; the message names it."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One finished run: its ``results.json`` and, when present, config and data report."""

  key: str  # 'fer' or '<protocol>/<experiment>'
  path: pathlib.Path
  results: dict[str, Any]
  config: dict[str, Any] | None
  data_report: dict[str, Any] | None

  @property
  def stem(self) -> str:
    """File-name stem of the run's outputs: 'fer' or '<protocol>_<experiment>'."""
    return self.key.replace('/', '_')


@dataclasses.dataclass(frozen=True)
class Study:
  """Every finished run, keyed like `Run.key`, and the run directories without results."""

  runs: dict[str, Run]
  unfinished: frozenset[str]

  def get(self, protocol: str, experiment: str) -> Run | None:
    return self.runs.get(f'{protocol}/{experiment}')


@dataclasses.dataclass(frozen=True)
class Options:
  """What RESULTS.md says about how the numbers were made (see the flags)."""

  plan: run_study.StudyPlan = run_study.StudyPlan()
  schedule_note: str = ''
  hardware_note: str = ''
  detail_protocol: str = 'dedup'
  out_dir: str = 'docs'
  figures: tuple[str, ...] = DEFAULT_FIGURES
  discussion: str = ''
  discussion_file: str = ''


# Reading runs.


def _fix_hint(path: pathlib.Path) -> str:
  """What to do about ``path``, a file of a run directory the report cannot use."""
  rerun = 're-run `python -m experiments.run_study` with the same flags'
  if path.name == 'data_report.json':  # the training programs refuse an unreadable one too
    return f'Move {path} aside, then {rerun} to write it again.'
  if path.suffix == '.npz':  # optional: the report does without it
    return f'Delete {path}, or {rerun} (finished runs are re-evaluated and save it again).'
  if path.name == 'config.json':  # optional too
    return f'Move {path} aside (the report does without it), or {rerun} to write it again.'
  return (
      f'{rerun[0].upper()}{rerun[1:]} (finished runs are re-evaluated), or move {path} aside to'
      ' report the run as not run.'
  )


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ReportError(f'{path} is not valid JSON ({e}). {_fix_hint(path)}') from e
  except OSError as e:
    raise ReportError(f'{path} is unreadable ({e}). {_fix_hint(path)}') from e


def _require(mapping: Any, keys: Sequence[str], path: pathlib.Path, where: str) -> None:
  if not isinstance(mapping, dict):
    raise ReportError(f'{path}: {where} is not a JSON object. {_fix_hint(path)}')
  missing = [k for k in keys if k not in mapping]
  if missing:
    raise ReportError(f'{path}: {where} lacks {missing}. {_fix_hint(path)}')


def _check_results(results: Any, path: pathlib.Path, *, key: str) -> None:
  """Raises `ReportError` naming ``path`` unless it has every score the report reads."""
  _require(results, ('best_epoch', 'history', 'validation', 'test'), path, 'the file')
  age = key != 'fer'
  required = ('accuracy',)
  if age:
    required = RANGE_METRICS if key.endswith('/ranges11') else AGE_METRICS
  for split in ('validation', 'test'):
    _require(results[split], required, path, f'{split!r}')
    if not age:
      continue
    per_class = results[split]['per_class']
    _require(per_class, PER_CLASS_KEYS, path, f'{split!r}.per_class')
    n = len(per_class['f1'])
    confusion = results[split]['confusion']
    if len(confusion) != n or any(len(row) != n for row in confusion):
      raise ReportError(
          f'{path}: {split!r}.confusion is not {n} x {n} like its per_class scores. {_fix_hint(path)}'
      )


def read_run(path: str | pathlib.Path, key: str) -> Run | None:
  """The finished run in ``path``, or None when it has no ``results.json`` yet.

  Raises:
    ReportError: a JSON file is unreadable or lacks scores; the message names it.
  """
  path = pathlib.Path(path)
  results_path = path / 'results.json'
  if not results_path.exists():
    return None
  results = _read_json(results_path)
  _check_results(results, results_path, key=key)
  optional = {
      name: _read_json(path / f'{name}.json') if (path / f'{name}.json').exists() else None
      for name in ('config', 'data_report')
  }
  return Run(key=key, path=path, results=results, **optional)


def load_study(runs_dir: str | pathlib.Path) -> Study:
  """Every run of the study layout under ``runs_dir`` (see `experiments.run_study`)."""
  runs_dir = pathlib.Path(runs_dir)
  keys = ['fer'] + [f'{p}/{e}' for p in splits_lib.PROTOCOLS for e in run_study.EXPERIMENTS]
  runs, unfinished = {}, set()
  for key in keys:
    run = read_run(runs_dir / key, key)
    if run is not None:
      runs[key] = run
    elif (runs_dir / key).is_dir():
      unfinished.add(key)
  return Study(runs=runs, unfinished=frozenset(unfinished))


def scores_json(run: Run) -> dict[str, Any]:
  """What ``results/<stem>.json`` holds: best epoch and every score but the confusion matrix."""
  out: dict[str, Any] = {'best_epoch': run.results['best_epoch'], 'source': str(run.path / 'results.json')}
  for split in ('validation', 'test'):
    out[split] = {k: v for k, v in run.results[split].items() if k != 'confusion'}
  return out


# Formatting.


def fmt(value: float | None, kind: str) -> str:
  """A score as RESULTS.md shows it: 'pct' as percent, 'years' and 'ratio' as decimals."""
  if value is None:
    return ''
  if isinstance(value, float) and math.isnan(value):
    return '–'
  if kind == 'pct':
    return f'{100 * value:.2f}'
  if kind == 'years':
    return f'{value:.2f}'
  return f'{value:.3f}'


def fmt_diff(value: float, kind: str) -> str:
  """A signed difference: points for 'pct', years for 'years', plain for 'ratio'."""
  if kind == 'pct':
    return f'{100 * value:+.2f} points'
  if kind == 'years':
    return f'{value:+.2f} years'
  return f'{value:+.3f}'


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
  """A Markdown table: the first ``left`` columns (text) left-aligned, the rest right-aligned."""
  align = [':--' if i < left else '--:' for i in range(len(header))]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(align) + '|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return '\n'.join(lines)


def _status(study: Study, key: str) -> str:
  return f'{NOT_RUN} (unfinished)' if key in study.unfinished else NOT_RUN


def _score_row(name: str, scores: Mapping[str, Any] | None, status: str) -> list[str]:
  if scores is None:
    return [name, status] + [''] * (len(COLUMNS) - 1)
  return [name] + [fmt(scores.get(key), kind) for key, _, kind in COLUMNS]


def _study_row() -> list[str]:
  cells = ['**study** (100 ages)']
  for key, _, kind in COLUMNS:
    value = STUDY_FIGURES.get(key)
    if isinstance(value, tuple):
      cells.append('–'.join(fmt(v, kind) for v in value))
    else:
      cells.append(fmt(value, kind))
  return cells


def _shown(study: Study, plan: run_study.StudyPlan, protocol: str, experiment: str) -> bool:
  """Whether a run has a place in the tables: planned by ``plan``, started or finished."""
  key = f'{protocol}/{experiment}'
  return (protocol, experiment) in plan.age_runs() or key in study.runs or key in study.unfinished


def _label_names(num_classes: int) -> list[str]:
  if num_classes == ages.NUM_RANGES:
    return list(ages.RANGE_NAMES)
  return [str(i) for i in range(num_classes)]


# Sections of RESULTS.md.


def _stage_plan(run: Run) -> str:
  plan = 'no config.json'
  if run.config is not None:
    plan = ' + '.join(
        f'{s["name"]} {s["epochs"]} epoch{"" if s["epochs"] == 1 else "s"}'
        for s in run.config['stages']
    )
  done, planned = run.results.get('epochs_done'), run.results.get('epochs_planned')
  if done is not None and done < planned:
    plan += f' (stopped after {done} of {planned} epochs: --stop_after_epoch)'
  return plan


def _session_label(env: Mapping[str, Any]) -> str:
  """One session of a run (a line of its environment.jsonl), in words."""
  processes = env.get('processes', 1)
  return (
      f'{env.get("devices")} x {env.get("device_kind")} ({env.get("backend")}'
      + (f', {processes} processes' if processes > 1 else '')
      + f'), JAX {env.get("versions", {}).get("jax")},'
      f' matmul precision {env.get("matmul_precision")}'
  )


def devices_lines(study: Study) -> list[str]:
  """Which devices each run trained and was evaluated on, as the run recorded it.

  Runs that moved between machines (a resumed Colab run) list every one;
  runs made before agejax recorded this say so. Empty when no run did.
  """
  where = collections.defaultdict(list)
  for key, run in sorted(study.runs.items()):
    sessions = run.results.get('environment') or []
    labels = sorted({_session_label(s) for s in sessions}) or ['not recorded']
    where[' and '.join(labels)].append(f'`{key}`')
  if set(where) <= {'not recorded'}:
    return []
  return [
      "- Devices, as each run recorded them (its environment.jsonl):",
      *(f'  - {label}: {", ".join(keys)}' for label, keys in sorted(where.items())),
  ]


def header_section(study: Study, options: Options) -> str:
  """Title, schedule, hardware and data source of the numbers."""
  plans = collections.defaultdict(list)
  for run in study.runs.values():
    plans[_stage_plan(run)].append(run.key)
  plan_lines = [f'  - {plan}: {", ".join(keys)}' for plan, keys in sorted(plans.items())]
  hours = sum(h.get('seconds', 0.0) for r in study.runs.values() for h in r.results['history']) / 3600
  sources = {
      task: sorted({
          str(r.data_report.get('data', 'unknown'))
          for key, r in study.runs.items()
          if r.data_report and (key == 'fer') == (task == 'FER')
      })
      for task in ('FER', 'Age')
  }
  lines = [
      '# Results',
      '',
      'Generated by `python -m experiments.report` from the run directories under'
      f' `{options.plan.root}`; every number below is read from their `results.json`,'
      ' except the rows and figures labelled **study**, which are the published ones.',
      '',
      f'- Schedule: `--schedule={options.plan.schedule}`'
      + (f' (FER: `--schedule={options.plan.fer_schedule}`)' if options.plan.fer_schedule else '')
      + (f'. {options.schedule_note}' if options.schedule_note else '')
      + '. Stages as recorded in each run\'s config.json:',
      *(plan_lines or ['  - no finished runs']),
      f'- Hardware: {options.hardware_note}',
      *devices_lines(study),
      f'- Training time of the finished runs: {hours:.2f} h.',
      *(
          f'- {task} data: {", ".join(found) if found else "no data_report.json found"}.'
          for task, found in sources.items()
      ),
  ]
  near = sorted({
      r.data_report['split'].get('near_duplicates', 'keep')
      for key, r in study.runs.items()
      if key.startswith('dedup/') and r.data_report and 'split' in r.data_report
  })
  if near:
    lines.append(
        '- `dedup` split: ' + ', '.join(f'`--near_duplicates={p}`' for p in near)
        + ' (keep: only byte-identical copies merged; group: near-duplicates too; docs/DATA.md).'
    )
  synthetic = [task for task, found in sources.items() if 'synthetic' in found]
  if synthetic:
    datasets = ' or '.join({'FER': 'FER2013', 'Age': 'UTKFace'}[task] for task in synthetic)
    lines.append(
        f'- **Warning: some runs used synthetic faces; their scores say nothing about {datasets}.**'
    )
  truncated = sorted(
      key for key, r in study.runs.items()
      if r.data_report and r.data_report.get('train_truncated_to')
  )
  if truncated:
    lines.append(
        f'- **Warning: {", ".join(truncated)} trained on a random subset of the training faces'
        ' (`--max_train_examples`): smoke runs, not the study\'s experiments.**'
    )
  return '\n'.join(lines)


def fer_section(study: Study) -> str:
  """The FER checkpoint's PublicTest / PrivateTest accuracy vs the study's."""
  run = study.runs.get('fer')
  study_acc = fmt(STUDY_FIGURES['fer_accuracy'], 'pct')
  if run is None:
    rows = [['agejax FER checkpoint', _status(study, 'fer'), '', '']]
  else:
    r = run.results
    rows = [[
        'agejax FER checkpoint',
        fmt(r['validation']['accuracy'], 'pct'),
        fmt(r['test']['accuracy'], 'pct'),
        str(r['best_epoch']),
    ]]
  rows.append(['**study**', '', f'~{study_acc}', ''])
  return '\n'.join([
      '## FER2013 pretraining',
      '',
      md_table(['Model', 'PublicTest acc %', 'PrivateTest acc %', 'Best epoch'], rows),
  ])


def protocol_section(study: Study, plan: run_study.StudyPlan, protocol: str) -> str:
  """Test scores of the experiments on ``protocol`` (see `_shown`), with the study's row.

  Empty when ``plan`` has no run on ``protocol`` and none was started there.
  """
  experiments = [e for e in run_study.EXPERIMENTS if _shown(study, plan, protocol, e)]
  if not experiments:
    return ''
  rows = []
  for experiment in experiments:
    run = study.get(protocol, experiment)
    scores = None if run is None else run.results['test']
    name = experiment
    if experiment == 'ranges11':
      name = f'{experiment} (11 ranges)'
      if scores is not None:  # runs before agejax.evaluate left tol3 out for ranges
        scores = {k: v for k, v in scores.items() if not k.startswith('tol')}
    rows.append(_score_row(name, scores, _status(study, f'{protocol}/{experiment}')))
  rows.append(_study_row())
  note = (
      'Acc and CS@k in %, MAE in years (argmax decoding; "exp." = expected value, DEX),'
      ' w/m = weighted/macro precision, recall, F1; tol3 = the study\'s ±3-tolerance'
      ' adjusted score. wR is the accuracy by definition (recall weighted by support,'
      ' as in scikit-learn); the study\'s wR (0.55) and accuracy (57%) differ, so its'
      ' scores did not all come from one set of predictions.'
  )
  if 'ranges11' in experiments:
    rows.append(
        ['**study** (11 ranges)', fmt(STUDY_FIGURES['ranges11_accuracy'], 'pct')] + [''] * (len(COLUMNS) - 1)
    )
    note += (
        ' ranges11 is scored over 11 ranges: CS@k counts ranges, MAE is in years from the'
        ' predicted range\'s midpoint to the true age, and tol3 is left blank (±3 classes'
        ' would be ±3 ranges, not the study\'s ±3 years).'
    )
  return '\n'.join([
      f'## Test scores, `{protocol}` protocol',
      '',
      md_table(['Experiment'] + [h for _, h, _ in COLUMNS], rows),
      '',
      note,
  ])


_TRANSFER_KEYS = (('accuracy', 'pct'), ('cs@3', 'pct'), ('mae', 'years'))
# Scores with bootstrap intervals, as functions of the test confusion matrix.
# MAE only for the 100 age classes: the ranges11 MAE is measured against each
# face's age in years, which its confusion matrix does not hold.
_INTERVAL_SCORES: dict[str, bootstrap.Score] = {
    'accuracy': metrics.accuracy_from_cm,
    'cs@3': lambda cm: metrics.cs_from_cm(cm, (3,))[0],
    'mae': metrics.mae_from_cm,
}
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0


def _test_confusion(run: Run) -> np.ndarray:
  return np.asarray(run.results['test']['confusion'], np.int32)


def _has_interval(run: Run, key: str) -> bool:
  return key != 'mae' or _test_confusion(run).shape[0] == ages.NUM_AGE_CLASSES


def transfer_diffs(study: Study, protocol: str) -> dict[str, float] | None:
  """fc1 minus scratch test scores on ``protocol``, or None if either is not run."""
  fc1, scratch = study.get(protocol, 'fc1'), study.get(protocol, 'scratch')
  if fc1 is None or scratch is None:
    return None
  return {k: fc1.results['test'][k] - scratch.results['test'][k] for k, _ in _TRANSFER_KEYS}


def _fmt_range(low: float, high: float, kind: str) -> str:
  return f'{fmt(low, kind)} to {fmt(high, kind)}'


def read_predictions(run: Run, split: str = 'test') -> dict[str, np.ndarray] | None:
  """The run's per-example predictions on ``split`` (``predictions_<split>.npz``), if saved."""
  path = run.path / f'predictions_{split}.npz'
  if not path.exists():
    return None
  try:
    with np.load(path) as saved:
      return {k: saved[k] for k in saved.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise ReportError(
        f'{path} is unreadable ({type(e).__name__}: {e}). {_fix_hint(path)}'
    ) from e


def per_example_scores(predictions: Mapping[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
  """Each test face's contribution to accuracy, CS3 and MAE (their means are the scores).

  MAE is in years against the face's age, as `agejax.steps.eval_step`
  measures it: the predicted class's value (the age, or for the 11 ranges the
  range midpoint) minus the true age.
  """
  label, pred = predictions['label'], predictions['pred']
  values = np.arange(num_classes, dtype=np.float64)
  if num_classes == ages.NUM_RANGES:
    values = np.asarray(ages.range_midpoints(), np.float64)
  true_age = predictions['age'] if 'age' in predictions else values[label]
  return {
      'accuracy': (pred == label).astype(np.float64),
      'cs@3': (np.abs(pred - label) <= 3).astype(np.float64),
      'mae': np.abs(values[pred] - true_age),
  }


def _paired(a: Run, b: Run) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
  """Per-example test scores of two runs, if both saved predictions on the same faces."""
  pa, pb = read_predictions(a), read_predictions(b)
  if pa is None or pb is None:
    return None
  key = 'hash' if 'hash' in pa and 'hash' in pb else 'label'
  if not np.array_equal(pa[key], pb[key]):
    return None
  num_classes = len(a.results['test']['confusion'])
  return per_example_scores(pa, num_classes), per_example_scores(pb, num_classes)


def transfer_section(study: Study, plan: run_study.StudyPlan) -> str:
  """What FER transfer buys: fc1 minus scratch, per protocol, with bootstrap intervals."""
  rows = []
  for protocol in TABLE_PROTOCOLS:
    if not (_shown(study, plan, protocol, 'fc1') or _shown(study, plan, protocol, 'scratch')):
      continue
    diffs = transfer_diffs(study, protocol)
    if diffs is None:
      rows.append([protocol, NOT_RUN, '', '', ''])
      continue
    fc1, scratch = study.get(protocol, 'fc1'), study.get(protocol, 'scratch')
    paired = _paired(fc1, scratch)
    cells = [protocol]
    for key, kind in _TRANSFER_KEYS:
      rng = jax.random.key(BOOTSTRAP_SEED)
      if paired is not None:
        low, high = bootstrap.mean_interval(
            rng, paired[0][key] - paired[1][key], num_samples=BOOTSTRAP_SAMPLES
        )
      else:
        low, high = bootstrap.difference_interval(
            rng, _test_confusion(fc1), _test_confusion(scratch), _INTERVAL_SCORES[key],
            num_samples=BOOTSTRAP_SAMPLES,
        )
      cells.append(f'{fmt_diff(diffs[key], kind)} ({_fmt_range(low, high, kind)})')
    rows.append(cells + ['paired' if paired is not None else 'unpaired'])
  if not rows:
    return ''
  return '\n'.join([
      '## Transfer vs scratch (fc1 minus scratch, test)',
      '',
      md_table(['Protocol', 'Accuracy', 'CS3', 'MAE', 'Interval'], rows),
      '',
      f'In brackets: 95 % bootstrap intervals of the difference ({BOOTSTRAP_SAMPLES} resamples,'
      ' `agejax.bootstrap`). *paired*: the test faces resampled once for both runs, from their'
      ' per-example predictions (`predictions_test.npz`); *unpaired*: each run\'s test confusion'
      ' matrix resampled on its own (runs without saved predictions), which ignores that both'
      ' runs scored the same faces and so gives wider intervals. An interval that excludes 0 is'
      ' a difference the test set resolves.',
  ])


def uncertainty_section(study: Study) -> str:
  """95 % bootstrap intervals of every finished age run's test accuracy, CS3 and MAE."""
  rows = []
  for protocol in splits_lib.PROTOCOLS:
    for experiment in run_study.EXPERIMENTS:
      run = study.get(protocol, experiment)
      if run is None:
        continue
      cells = [f'`{protocol}/{experiment}`', f'{run.results["test"]["count"]:.0f}']
      for key, kind in _TRANSFER_KEYS:
        if not _has_interval(run, key):
          cells.append('–')
          continue
        low, high = bootstrap.interval(
            jax.random.key(BOOTSTRAP_SEED), _test_confusion(run), _INTERVAL_SCORES[key],
            num_samples=BOOTSTRAP_SAMPLES,
        )
        cells.append(f'{fmt(run.results["test"][key], kind)} ({_fmt_range(low, high, kind)})')
      rows.append(cells)
  if not rows:
    return '## Uncertainty (test)\n\nNo finished age runs.'
  return '\n'.join([
      '## Uncertainty (test, 95 % bootstrap intervals)',
      '',
      md_table(['Run', 'Test faces', 'Acc %', 'CS3 %', 'MAE'], rows),
      '',
      f'Percentile bootstrap over the test faces ({BOOTSTRAP_SAMPLES} resamples of each run\'s'
      ' test confusion matrix, `agejax.bootstrap`, seed 0): how much each score would move'
      ' on another test set of the same size, not across training seeds.'
      + (
          ' ranges11 scores count ranges; its MAE, measured against ages in years, has no'
          ' interval here.' if any('ranges11' in row[0] for row in rows) else ''
      ),
  ])


def hash_leaks(run: Run) -> tuple[dict[str, int], dict[str, int]] | None:
  """(validation/test rows whose image hash is in train, rows per split), if recorded."""
  split = (run.data_report or {}).get('split')
  if not split or 'hash_leaks_from_train' not in split:
    return None
  return split['hash_leaks_from_train'], split.get('split_counts', {})


def leak_section(study: Study, plan: run_study.StudyPlan) -> str:
  """fc1 on dedup, paper and leaky side by side, with the hash-leak counts."""
  rows = []
  for protocol in splits_lib.PROTOCOLS:
    if not _shown(study, plan, protocol, 'fc1'):
      continue
    run = study.get(protocol, 'fc1')
    if run is None:
      rows.append([protocol, _status(study, f'{protocol}/fc1')] + [''] * 6)
      continue
    test = run.results['test']
    leaks = hash_leaks(run)
    if leaks is None:
      leak_cells = ['n/a', 'n/a', 'n/a']
    else:
      leaked, counts = leaks
      n_test = counts.get('test')
      share = fmt(leaked['test'] / n_test, 'pct') if n_test else 'n/a'
      leak_cells = [str(leaked['validation']), f'{leaked["test"]} of {n_test}', share]
    rows.append(
        [protocol] + [fmt(test[k], kind) for k, kind in (('accuracy', 'pct'), ('cs@3', 'pct'), ('mae', 'years'), ('macro_f1', 'ratio'))]
        + leak_cells
    )
  if len(rows) < 2:  # nothing to compare
    return ''
  lo, hi = STUDY_FIGURES['mae']
  return '\n'.join([
      '## Leakage: fc1 on the three split protocols',
      '',
      md_table(
          ['Protocol', 'Acc %', 'CS3 %', 'MAE', 'mF1', 'Val leaks', 'Test leaks', 'Test leaked %'], rows
      ),
      '',
      'Leaks are validation/test images whose content hash also occurs in the'
      ' training split (`data_report.json`, `split.hash_leaks_from_train`).'
      ' `dedup` merges duplicates before a stratified split; `paper` splits every'
      ' image as read, as the study did; `leaky` doubles every image first,'
      ' re-creating a copy of UTKFace that holds each image more than once.',
      '',
      f'**Leakage hypothesis.** The study reports an MAE of {lo:.2f}–{hi:.2f} years'
      ' from 48x48 grayscale faces, better than large modern models reach on UTKFace'
      f' (about {STUDY_FIGURES["modern_utkface_mae"]:.1f} years). The usual Kaggle copy'
      ' of UTKFace merges several folders that hold the same images, so a random split'
      ' puts copies of one photo in both train and test, and the test score partly'
      ' measures memorisation. If that explains the gap, scores should rise from'
      ' `dedup` to `paper` to `leaky` with the share of leaked test images.',
      '',
      '<!-- discussion -->',
  ])


_SUBGROUPS = (('race', utkface_names.RACES), ('gender', utkface_names.GENDERS))


def subgroup_section(study: Study, plan: run_study.StudyPlan, protocol: str) -> str:
  """fc1's test accuracy and MAE per ethnicity and gender, with bootstrap intervals."""
  if not _shown(study, plan, protocol, 'fc1'):
    return ''
  title = f'## Subgroups: fc1 on `{protocol}` (test, 95 % bootstrap intervals)'
  run = study.get(protocol, 'fc1')
  if run is None:
    return f'{title}\n\n{_status(study, f"{protocol}/fc1")}.'
  predictions = read_predictions(run)
  if predictions is None:
    return (
        f'{title}\n\nNo per-example predictions in {run.path}: re-run'
        ' `python -m experiments.run_study` with the same flags (finished runs are'
        ' re-evaluated and save `predictions_test.npz`).'
    )
  if not all(field in predictions for field, _ in _SUBGROUPS):
    return (
        f'{title}\n\nThe test faces of {run.path} have no ethnicity and gender'
        ' (synthetic faces, or data without UTKFace\'s file names): no subgroups to score.'
    )
  scores = per_example_scores(predictions, len(run.results['test']['confusion']))
  rows = []
  for field, names in _SUBGROUPS:
    codes = predictions[field]
    for code in sorted(set(codes.tolist())):
      name = names[code] if 0 <= code < len(names) else 'not in the file name'
      members = codes == code
      cells = [f'{field}: {name}', str(int(members.sum()))]
      for key, kind in (('accuracy', 'pct'), ('mae', 'years')):
        values = scores[key][members]
        low, high = bootstrap.mean_interval(
            jax.random.key(BOOTSTRAP_SEED), values, num_samples=BOOTSTRAP_SAMPLES
        )
        cells.append(f'{fmt(float(values.mean()), kind)} ({_fmt_range(low, high, kind)})')
      rows.append(cells)
  return '\n'.join([
      title, '',
      md_table(['Group', 'Test faces', 'Acc %', 'MAE'], rows),
      '',
      'Ethnicity and gender as UTKFace labels them (file names). Groups differ in their age'
      ' distributions as well as in appearance, so a gap here mixes both.',
  ])


def per_class_section(study: Study, plan: run_study.StudyPlan, protocol: str) -> str:
  """Test F1 (support) of every age class of fc1, ten ages to a row (the study's Figure A9)."""
  if not _shown(study, plan, protocol, 'fc1'):
    return ''
  title = f'## Per-class test F1 (support), fc1 on `{protocol}`'
  run = study.get(protocol, 'fc1')
  if run is None:
    return f'{title}\n\n{_status(study, f"{protocol}/fc1")}.'
  per_class = run.results['test']['per_class']
  predicted = _test_confusion(run).sum(axis=0)
  n = len(per_class['f1'])

  def cell(i: int) -> str:
    support = int(per_class['support'][i])
    undefined = support == 0 and predicted[i] == 0
    return f'{"–" if undefined else fmt(per_class["f1"][i], "ratio")} ({support})'

  rows = []
  for start in range(0, n, 10):
    cells = [cell(i) for i in range(start, min(start + 10, n))]
    rows.append([f'{start}–{start + len(cells) - 1}'] + cells + [''] * (10 - len(cells)))
  return '\n'.join([
      title, '', md_table(['Ages'] + [f'+{i}' for i in range(10)], rows),
      '', '"–": F1 undefined (the class is neither in the labels nor predicted).',
  ])


def ranges_section(study: Study, plan: run_study.StudyPlan, protocol: str) -> str:
  """Per-range test precision, recall, F1 and support of ranges11 (the study's Figure A10)."""
  if not _shown(study, plan, protocol, 'ranges11'):
    return ''
  title = f'## 11 age ranges, `{protocol}` protocol (test)'
  run = study.get(protocol, 'ranges11')
  if run is None:
    return f'{title}\n\n{_status(study, f"{protocol}/ranges11")}.'
  test = run.results['test']
  per_class = test['per_class']
  names = _label_names(len(per_class['f1']))
  rows = [
      [name] + [fmt(per_class[k][i], 'ratio') for k in ('precision', 'recall', 'f1')]
      + [str(int(per_class['support'][i]))]
      for i, name in enumerate(names)
  ]
  for avg in ('macro', 'weighted'):
    rows.append([f'*{avg}*'] + [fmt(test[f'{avg}_{k}'], 'ratio') for k in ('precision', 'recall', 'f1')] + [''])
  return '\n'.join([
      title, '',
      f'Accuracy {fmt(test["accuracy"], "pct")}% (study: {fmt(STUDY_FIGURES["ranges11_accuracy"], "pct")}%),'
      f' MAE {fmt(test["mae"], "years")} years (predicted range\'s midpoint to the true age).',
      '', md_table(['Range', 'Precision', 'Recall', 'F1', 'Support'], rows),
  ])


def figures_section(figures: Mapping[str, Sequence[str]], detail_protocol: str) -> str:
  """Links to every run's figures, with fc1's on ``detail_protocol`` shown inline."""
  if not figures:
    return '## Figures\n\nNone written (no finished run is in --figures).'
  lines = ['## Figures', '']
  inline = figures.get(f'{detail_protocol}/fc1', ())
  lines += [f'![{pathlib.Path(p).stem}]({p})' for p in inline]
  lines.append('')
  for key, paths in sorted(figures.items()):
    stem = key.replace('/', '_')
    links = ' · '.join(f'[{pathlib.Path(p).stem[len(stem) + 1:]}]({p})' for p in paths)
    lines.append(f'- `{key}`: {links}')
  return '\n'.join(lines)


def _command(args: Sequence[str]) -> str:
  return shlex.join(['python', *args])


def commands_section(study: Study, options: Options) -> str:
  """The commands behind every number, with each run's epochs, best epoch and time."""
  plan = options.plan
  planned = set(plan.age_runs())
  entries = [('fer', _command(plan.fer_command()), True)] + [
      (f'{p}/{e}', _command(plan.age_command(p, e)), (p, e) in planned)
      for p in splits_lib.PROTOCOLS for e in run_study.EXPERIMENTS
  ]
  rows = []
  for key, command, is_planned in entries:
    run = study.runs.get(key)
    if run is None:
      if key in study.unfinished or is_planned:
        rows.append([f'`{key}`', _status(study, key), '', '', f'`{command}`'])
      continue
    minutes = sum(h.get('seconds', 0.0) for h in run.results['history']) / 60
    rows.append([
        f'`{key}`', _stage_plan(run), str(run.results['best_epoch']), f'{minutes:.1f}', f'`{command}`'
    ])
  report = (
      'python -m experiments.report ' + ' '.join(plan.study_flags())
      + f' --out={options.out_dir} --figures={",".join(options.figures)}'
      + (f' --discussion={options.discussion_file}' if options.discussion_file else '')
      + (f' --schedule_note={shlex.quote(options.schedule_note)}' if options.schedule_note else '')
      + (f' --detail_protocol={options.detail_protocol}'
         if options.detail_protocol != Options.detail_protocol else '')
      + f' --hardware_note={shlex.quote(options.hardware_note)}'
  )
  return '\n'.join([
      '## Commands',
      '',
      'Everything (re-running it resumes killed runs and re-evaluates finished ones):',
      '',
      f'    python -m experiments.run_study {" ".join(plan.study_flags())}',
      f'    {report}',
      '',
      'Each run on its own:',
      '',
      md_table(['Run', 'Epochs per stage', 'Best epoch', 'Train min', 'Command'], rows, left=5),
  ])


def discussion_drafts(study: Study) -> list[str]:
  """Neutral sentences computed from the runs, for the author to keep, edit or drop."""
  drafts = []
  for protocol in TABLE_PROTOCOLS:
    diffs = transfer_diffs(study, protocol)
    if diffs is not None:
      drafts.append(
          f'On `{protocol}`, FER transfer (fc1 vs scratch) changes test accuracy by'
          f' {fmt_diff(diffs["accuracy"], "pct")}, CS3 by {fmt_diff(diffs["cs@3"], "pct")}'
          f' and MAE by {fmt_diff(diffs["mae"], "years")}.'
      )
    fc1 = study.get(protocol, 'fc1')
    if fc1 is not None:
      test = fc1.results['test']
      drafts.append(
          f'fc1 on `{protocol}` reaches {fmt(test["accuracy"], "pct")}% test accuracy and'
          f' {fmt(test["mae"], "years")} years MAE; the study reports'
          f' {fmt(STUDY_FIGURES["accuracy"], "pct")}% and'
          f' {"–".join(fmt(v, "years") for v in STUDY_FIGURES["mae"])} years.'
      )
    baseline = study.get(protocol, 'baseline')
    if baseline is not None:
      predicted = np.asarray(baseline.results['test']['confusion']).sum(axis=0)
      top = int(np.argmax(predicted))
      drafts.append(
          f'The baseline on `{protocol}` predicts age {_label_names(len(predicted))[top]}'
          f' for {fmt(predicted[top] / predicted.sum(), "pct")}% of test images (the study'
          f' saw every prediction collapse to age {STUDY_FIGURES["baseline_collapse_age"]}).'
      )
  dedup, leaky = study.get('dedup', 'fc1'), study.get('leaky', 'fc1')
  if dedup is not None and leaky is not None:
    gap = leaky.results['test']['accuracy'] - dedup.results['test']['accuracy']
    mae_gap = leaky.results['test']['mae'] - dedup.results['test']['mae']
    drafts.append(
        f'Leaky vs dedup (fc1): test accuracy {fmt_diff(gap, "pct")}, MAE {fmt_diff(mae_gap, "years")}.'
    )
  return drafts


def discussion_section(study: Study, discussion: str = '') -> str:
  """Sentences drafted from the tables, then the authors' ``discussion`` text."""
  drafts = discussion_drafts(study)
  return '\n'.join([
      '## Discussion',
      '',
      '<!-- discussion: the sentences below are drafts computed from the tables. -->',
      '',
      *([f'- {d}' for d in drafts] or ['- (no finished runs to discuss yet)']),
      '',
      '<!-- discussion -->',
      *(['', discussion.strip()] if discussion.strip() else []),
  ])


def render_markdown(
    study: Study, options: Options, figures: Mapping[str, Sequence[str]] | None = None
) -> str:
  """The whole of RESULTS.md; ``figures`` maps run keys to figure paths relative to it.

  Tables and sections cover the runs of ``options.plan`` and any other run
  found under its root, so a report of part of the study (some protocols or
  experiments) has no rows for runs nobody meant to make.
  """
  plan = options.plan
  sections = [
      header_section(study, options),
      fer_section(study),
      *(protocol_section(study, plan, p) for p in TABLE_PROTOCOLS),
      transfer_section(study, plan),
      uncertainty_section(study),
      leak_section(study, plan),
      subgroup_section(study, plan, options.detail_protocol),
      per_class_section(study, plan, options.detail_protocol),
      ranges_section(study, plan, options.detail_protocol),
      figures_section(figures or {}, options.detail_protocol),
      commands_section(study, options),
      discussion_section(study, options.discussion),
  ]
  return '\n\n'.join(section for section in sections if section) + '\n'


# Figures.


def _new_figure(width: float, height: float) -> tuple[figure.Figure, Any]:
  fig = figure.Figure(figsize=(width, height), layout='constrained')
  return fig, fig.add_subplot()


def confusion_figure(confusion: np.ndarray, title: str) -> figure.Figure:
  """Confusion heatmap (rows true); a log colour scale when there are many classes."""
  cm = np.asarray(confusion, dtype=np.float64)
  n = len(cm)
  fig, ax = _new_figure(4.6, 4.0)
  names = _label_names(n)
  if n > ages.NUM_RANGES:
    image = ax.imshow(
        np.ma.masked_equal(cm, 0), cmap='viridis', interpolation='nearest',
        norm=colors.LogNorm(vmin=1, vmax=max(cm.max(), 1)),
    )
    ticks = np.arange(0, n, 10)
    ax.set_xticks(ticks, [names[i] for i in ticks])
    ax.set_yticks(ticks, [names[i] for i in ticks])
  else:
    image = ax.imshow(cm, cmap='viridis', interpolation='nearest')
    ax.set_xticks(range(n), names, rotation=90)
    ax.set_yticks(range(n), names)
  bar = fig.colorbar(image, ax=ax, shrink=0.8, label='test images')
  if n > ages.NUM_RANGES:
    bar.ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    bar.ax.yaxis.set_major_formatter(ticker.StrMethodFormatter('{x:g}'))
    bar.ax.yaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(title, fontsize=9)
  return fig


def per_class_figure(
    per_class: Mapping[str, Sequence[float]], confusion: Sequence[Sequence[int]], title: str
) -> figure.Figure:
  """Test F1 per class as bars, with the class support as a line on a second axis.

  A class neither in the labels nor predicted gets no bar: its F1 is
  undefined ("–" in the per-class table), not 0.
  """
  f1 = np.nan_to_num(np.asarray(per_class['f1'], dtype=np.float64))
  support = np.asarray(per_class['support'], dtype=np.float64)
  defined = (support > 0) | (np.asarray(confusion).sum(axis=0) > 0)
  n = len(f1)
  fig, ax = _new_figure(7.0, 2.8)
  ax.bar(np.arange(n)[defined], f1[defined], color='tab:blue', width=0.8)
  ax.set_ylabel('F1', color='tab:blue')
  ax.set_ylim(0, 1)
  twin = ax.twinx()
  twin.plot(np.arange(n), support, color='tab:orange', lw=1)
  twin.set_ylabel('support', color='tab:orange')
  names = _label_names(n)
  ticks = np.arange(0, n, 10) if n > ages.NUM_RANGES else np.arange(n)
  ax.set_xticks(ticks, [names[i] for i in ticks])
  ax.set_title(title, fontsize=9)
  return fig


def cs_figure(results: Mapping[str, Any], title: str) -> figure.Figure:
  """Test (and validation) CS@k for k = 0..10, with the study's CS1-3 for 100 age classes."""
  fig, ax = _new_figure(4.0, 3.0)
  for split, style in (('test', '-o'), ('validation', '--')):
    ax.plot(CS_KS, [100 * results[split][f'cs@{k}'] for k in CS_KS], style, ms=3, label=split)
  ranges = len(results['test']['per_class']['f1']) == ages.NUM_RANGES
  if not ranges:
    ax.plot([1, 2, 3], [100 * STUDY_FIGURES[f'cs@{k}'] for k in (1, 2, 3)], 'k*', label='study')
  ax.set_xlabel('k (ranges)' if ranges else 'k (years)')
  ax.set_ylabel('CS@k %')
  ax.set_ylim(0, 100)
  ax.legend(fontsize=7)
  ax.set_title(title, fontsize=9)
  return fig


def curves_figure(history: Sequence[Mapping[str, Any]], best_epoch: int, title: str) -> figure.Figure:
  """Training and validation loss and accuracy per epoch; the best epoch marked."""
  fig = figure.Figure(figsize=(7.0, 2.6), layout='constrained')
  epochs = [h['epoch'] for h in history]
  for i, metric in enumerate(('loss', 'accuracy')):
    ax = fig.add_subplot(1, 2, i + 1)
    for split in ('train', 'val'):
      ax.plot(epochs, [h[f'{split}_{metric}'] for h in history], '-o', ms=3, label=split)
    ax.axvline(best_epoch, color='grey', ls=':', lw=1)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel('epoch')
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  return fig


def write_figures(run: Run, figures_dir: str | pathlib.Path) -> list[pathlib.Path]:
  """Writes the run's four PNGs (`FIGURE_KINDS`) and returns their paths."""
  figures_dir = pathlib.Path(figures_dir)
  figures_dir.mkdir(parents=True, exist_ok=True)
  r = run.results
  title = run.key
  made = {
      'confusion': confusion_figure(r['test']['confusion'], f'{title}: test confusion'),
      'per_class_f1': per_class_figure(
          r['test']['per_class'], r['test']['confusion'], f'{title}: test F1 per class'
      ),
      'cs_curve': cs_figure(r, f'{title}: CS@k'),
      'curves': curves_figure(r['history'], r['best_epoch'], f'{title}: training curves'),
  }
  paths = []
  for kind in FIGURE_KINDS:
    path = figures_dir / f'{run.stem}_{kind}.png'
    made[kind].savefig(path, dpi=FIGURE_DPI)
    paths.append(path)
  return paths


def write_report(study: Study, out_dir: str | pathlib.Path, options: Options) -> pathlib.Path:
  """Writes results/*.json, the figures of ``options.figures`` and RESULTS.md; returns its path."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  for run in study.runs.values():
    run_logging.write_json(out_dir / 'results' / f'{run.stem}.json', scores_json(run))
  figures = {}
  for key, run in sorted(study.runs.items()):
    if key != 'fer' and key.split('/')[1] in options.figures:
      paths = write_figures(run, out_dir / 'figures')
      figures[key] = [str(p.relative_to(out_dir)) for p in paths]
  path = out_dir / 'RESULTS.md'
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(render_markdown(study, options, figures))
  tmp.replace(path)  # a crash mid-write leaves the previous RESULTS.md whole
  return path


def default_hardware_note() -> str:
  """This machine: OS, CPU count and JAX devices (for runs made where the report runs)."""
  devices = ', '.join(sorted({d.device_kind for d in jax.devices()}))
  return (
      f'{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores,'
      f' JAX {jax.__version__} on {jax.default_backend()} ({len(jax.devices())} x {devices})'
      ' — the machine that wrote this report'
  )


def _read_discussion(path: str | None) -> str:
  if not path:
    return ''
  try:
    return pathlib.Path(path).read_text()
  except OSError as e:
    raise app.UsageError(f'Cannot read --discussion={path}: {e}') from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  plan = run_study.plan_from_flags()
  runs_dir = pathlib.Path(plan.root)
  if not runs_dir.is_dir():
    raise app.UsageError(f'--root={plan.root} is not a directory; run `python -m experiments.run_study` first.')
  unknown = sorted(set(FLAGS.figures) - set(run_study.EXPERIMENTS))
  if unknown:
    raise app.UsageError(f'--figures has unknown experiments {unknown}; choose from {run_study.EXPERIMENTS}.')
  options = Options(
      plan=plan,
      schedule_note=FLAGS.schedule_note,
      hardware_note=FLAGS.hardware_note or default_hardware_note(),
      detail_protocol=FLAGS.detail_protocol,
      out_dir=FLAGS.out,
      figures=tuple(FLAGS.figures),
      discussion=_read_discussion(FLAGS.discussion),
      discussion_file=FLAGS.discussion or '',
  )
  try:
    study = load_study(runs_dir)
    path = write_report(study, FLAGS.out, options)
  except ReportError as e:  # its message names the file and what to do
    raise SystemExit(f'Error: {e}') from e
  print(f'Wrote {path} ({len(study.runs)} finished runs, {len(study.unfinished)} unfinished).')


if __name__ == '__main__':
  flags.mark_flag_as_required('out')
  app.run(main)
