"""Flags shared by the experiment programs, and the configs built from them.

This is the only place where flags become `agejax.config` dataclasses; the
library itself never reads flags. The training programs (`finetune`,
`pretrain_fer`) and `data_report` import this module, so they share these flags
and one flagfile format; `run_study` passes them on to its runs through
``--extra_flags``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from agejax import ages
from agejax import augment
from agejax import checkpoints
from agejax import config as config_lib
from agejax import conv
from agejax import freezing
from agejax import parallel
from agejax import run_logging
from agejax import synthetic
from agejax import train
from agejax.data import balance
from agejax.data.errors import DataError
from agejax.data import fer2013
from agejax.data import splits as splits_lib
from agejax.data import utk_face
from experiments import regex_lists

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = os.environ.get('AGEJAX_DATA_DIR', str(REPO_ROOT.parent / 'shared' / 'data'))

# Run.
flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, results).')
flags.DEFINE_integer('seed', 0, 'Seed of initialisation, shuffling, dropout, augmentation.')
flags.DEFINE_string(
    'coordinator_address', None,
    'Multi-host runs: address of process 0 (TPU pods need none: set --multihost).',
)
flags.DEFINE_integer(
    'num_processes', None, 'Multi-host runs with --coordinator_address: how many processes.'
)
flags.DEFINE_integer(
    'process_id', None,
    "Multi-host runs with --coordinator_address: this process's index (0 on process 0).",
)
flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() first.')
flags.DEFINE_bool('progress', True, 'Show a progress bar per epoch.')
flags.DEFINE_string(
    'compilation_cache_dir', None,
    'Folder where JAX keeps the programs it compiles, for later runs to load instead of'
    ' compiling them again (run_study gives its runs one); unset: $JAX_COMPILATION_CACHE_DIR'
    ' or none.',
)
flags.DEFINE_enum(
    'matmul_precision', None, ['default', 'bfloat16', 'tensorfloat32', 'float32'],
    'Precision of float32 matrix products and convolutions (jax_default_matmul_precision).'
    " Unset: $JAX_DEFAULT_MATMUL_PRECISION or JAX's default, which is float32 on CPUs but"
    ' bfloat16 passes on TPUs and TensorFloat-32 on recent NVIDIA GPUs; float32 computes'
    ' as the CPU does everywhere, at some speed off the CPU. Each run records it'
    ' (environment.jsonl).',
)
flags.DEFINE_integer(
    'stop_after_epoch', None,
    'Stop, resumably, after this many epochs of the run (time-boxed jobs);'
    ' rerun without it to finish.',
)

# Data.
flags.DEFINE_enum('data', 'synthetic', ['synthetic', 'real'], 'Synthetic faces or the real datasets.')
flags.DEFINE_string('manual_dir', DEFAULT_DATA_DIR, 'Folder holding UTKFace.tar.gz / fer2013.zip (or extracted).')
flags.DEFINE_string('tfds_data_dir', None, 'Where TFDS keeps prepared datasets (default ~/tensorflow_datasets).')
flags.DEFINE_enum('protocol', 'dedup', list(splits_lib.PROTOCOLS), 'UTKFace split protocol.')
flags.DEFINE_enum(
    'near_duplicates', 'keep', list(splits_lib.NEAR_DUPLICATE_POLICIES),
    "With --protocol=dedup on real UTKFace: 'group' also merges the same photo saved"
    " differently (re-encoded, resized, brightened; docs/DATA.md), so none crosses splits;"
    " 'keep' (the published runs') merges byte-identical files only. Real-data age runs"
    ' report the near-duplicate leaks either way.',
)
flags.register_multi_flags_validator(
    ['near_duplicates', 'protocol'],
    lambda f: f['near_duplicates'] == 'keep' or f['protocol'] == 'dedup',
    message="--near_duplicates=group needs --protocol=dedup (paper and leaky keep duplicates on purpose).",
)
flags.DEFINE_integer('split_seed', 0, 'Seed of the UTKFace split.')
flags.DEFINE_enum('labels', 'ages', ['ages', 'ranges11'], '100 age classes or the 11 study ranges.')
flags.DEFINE_integer(
    'undersample_age', None, "Age whose images are undersampled (the study's 26).", lower_bound=0
)
flags.DEFINE_integer(
    'undersample_n', 0, 'How many images of --undersample_age to remove.', lower_bound=0
)
flags.register_multi_flags_validator(
    ['undersample_age', 'undersample_n'],
    lambda f: not f['undersample_n'] or f['undersample_age'] is not None,
    message='--undersample_n needs --undersample_age: the age whose images are removed.',
)
flags.DEFINE_integer(
    'class_cap', None,
    'Keep at most this many training images per class (per age, or per range with'
    ' --labels=ranges11).',
    lower_bound=0,
)
flags.DEFINE_bool('class_weights', False, "Weight the loss by sklearn's 'balanced' class weights.")
flags.DEFINE_integer('synthetic_train', 2000, 'Synthetic training faces.')
flags.DEFINE_integer('synthetic_eval', 500, 'Synthetic validation and test faces (each).')
flags.DEFINE_integer(
    'max_train_examples', None,
    'Train on this many examples, drawn at random with --split_seed (smoke runs).',
    lower_bound=0,
)

# Model.
flags.DEFINE_list('dense_units', None, 'Hidden dense layers of the head (default: task preset).')
flags.DEFINE_float('bn_momentum', 0.99, "BatchNorm running-statistics decay (Keras' 0.99).")
flags.DEFINE_enum('conv_impl', 'auto', list(conv.IMPLS), 'Convolution implementation (agejax.conv).')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Computation dtype.')

# Training.
regex_lists.define_regex_list(
    'stages', None,
    'Stages as name:epochs:learning_rate:freeze, freeze a preset of'
    ' agejax.freezing.PRESETS or parameter-path regexes (e.g. block1/.*) joined by'
    ' "|" at the top level; a regex may hold ":", and "|" or "," inside groups,'
    r' classes and braces (e.g. block\d{1,2}/.*).',
)
flags.DEFINE_enum(
    'schedule', 'paper', ['paper', 'short'],
    "'paper' runs each stage's epochs as given; 'short' (CPU runs) runs a"
    ' tenth of them, at least one per stage.',
)
flags.DEFINE_integer('batch_size', 64, 'Global training batch size.')
flags.DEFINE_integer('eval_batch_size', 256, 'Global evaluation batch size.')
flags.DEFINE_float('label_smoothing', 0.0, 'Label smoothing.')
flags.DEFINE_bool('augment', False, "The study's augmentation (flip, +-10 deg, +-10% shift and zoom).")
flags.DEFINE_enum('epoch_mode', 'auto', ['auto', 'scan', 'loop'], 'One compiled program per epoch, or a step loop.')
flags.DEFINE_string('select_metric', 'accuracy', 'Validation score that picks the best checkpoint.')
flags.DEFINE_enum(
    'select_mode', 'auto', ['auto', 'max', 'min'],
    "Whether --select_metric is better high or low; 'auto': low for losses and MAEs"
    ' (loss, mae, mae_expected, tol3_mae, ...), high for the rest.',
)
flags.DEFINE_string('init_from', None, 'Run directory of a FER (or other) checkpoint to transfer from.')
regex_lists.define_regex_list(
    'dont_load', [],
    'Parameter-path regexes not copied on transfer, matched against whole paths that'
    " start with the collection, e.g. 'params/logits/.*' or 'batch_stats/block1/.*';"
    ' a "," inside groups, classes and braces stays part of its regex.')

FLAGS = flags.FLAGS



def parse_stages(specs: list[str], schedule: str = 'paper') -> tuple[config_lib.StageConfig, ...]:
  """Parses ``name:epochs:lr:freeze`` strings (see --stages, --schedule).

  ``freeze`` is a preset name (a bare word) or parameter-path regexes joined
  by ``|``; each top-level alternative is one pattern, so that each must match
  some parameter, and a ``|`` inside a group stays part of its pattern.
  """
  stages = []
  for spec in specs:
    parts = spec.split(':', 3)
    if len(parts) != 4:
      raise flags.ValidationError(
          f'--stages entry {spec!r} is not name:epochs:learning_rate:freeze.'
      )
    name, epochs, lr, freeze = parts
    try:
      epochs, lr = int(epochs), float(lr)
    except ValueError as e:
      raise flags.ValidationError(
          f'--stages entry {spec!r}: epochs must be an integer and the learning'
          f' rate a number ({e}).'
      ) from e
    try:
      patterns = freeze if freeze.isidentifier() else regex_lists.split_top_level(freeze, '|')
    except ValueError as e:
      raise flags.ValidationError(f'--stages entry {spec!r}: {e}') from e
    stages.append(
        config_lib.StageConfig(
            name=name,
            epochs=epochs if schedule == 'paper' else max(1, epochs // 10),
            learning_rate=lr,
            freeze=patterns,
        )
    )
  return tuple(stages)


_FER_HISTORY = ('loss', 'accuracy', 'macro_f1', 'weighted_f1')
_LOWER_IS_BETTER = {'loss', 'mae'}


def select_mode(metric: str, mode: str) -> str:
  """``mode``, or for 'auto' the direction in which ``metric`` improves."""
  if mode != 'auto':
    return mode
  return 'min' if _LOWER_IS_BETTER & set(metric.split('_')) else 'max'


def train_config(task: str, *, num_classes: int, class_weights: np.ndarray | None = None) -> config_lib.TrainConfig:
  """The `TrainConfig` the flags describe, for ``task`` 'fer' or 'age'."""
  if not FLAGS.stages:
    raise flags.ValidationError('--stages is required (see --helpfull).')
  preset = config_lib.fer_model_config() if task == 'fer' else config_lib.ModelConfig()
  dense = tuple(int(u) for u in FLAGS.dense_units) if FLAGS.dense_units else preset.dense_units
  model = config_lib.ModelConfig(
      num_classes=num_classes,
      dense_units=dense,
      bn_momentum=FLAGS.bn_momentum,
      conv_impl=FLAGS.conv_impl,
      dtype=FLAGS.dtype,
  )
  class_values = None
  if task == 'age' and FLAGS.labels == 'ranges11':
    class_values = tuple(float(v) for v in np.asarray(ages.range_midpoints()))
  step = config_lib.StepConfig(
      label_smoothing=FLAGS.label_smoothing,
      class_weights=None if class_weights is None else tuple(float(w) for w in class_weights),
      augment=augment.AugmentConfig.study() if FLAGS.augment else augment.AugmentConfig(),
      class_values=class_values,
      ordinal=task == 'age',
  )
  config = config_lib.TrainConfig(
      model=model,
      stages=parse_stages(FLAGS.stages, FLAGS.schedule),
      step=step,
      batch_size=FLAGS.batch_size,
      eval_batch_size=FLAGS.eval_batch_size,
      seed=FLAGS.seed,
      init_from=FLAGS.init_from,
      dont_load=tuple(FLAGS.dont_load),
      select_metric=FLAGS.select_metric,
      select_mode=select_mode(FLAGS.select_metric, FLAGS.select_mode),
      epoch_mode=FLAGS.epoch_mode,
      history_metrics=_FER_HISTORY if task == 'fer' else config_lib.TrainConfig.history_metrics,
  )
  return config


def check_before_training(config: config_lib.TrainConfig, workdir: str) -> None:
  """Fails on what would only fail inside training: a freezing pattern matching nothing, an
  unknown --select_metric, or a missing --init_from checkpoint for a new run (a resumed one
  does not read it). Call it before writing to the run directory."""
  try:
    train.check_score_names(config)
  except ValueError as e:
    raise flags.ValidationError(f'--{e}') from e
  params = train.abstract_variables(config.model)['params']
  for stage in config.stages:
    try:
      freezing.param_labels(params, stage.freeze)
    except ValueError as e:
      raise flags.ValidationError(f'--stages entry {stage.name!r}: {e}') from e
  if config.init_from and not checkpoints.has_latest(pathlib.Path(workdir) / 'checkpoints'):
    checkpoints.best_dir(config.init_from)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
  """Ends the program with just the message of an error a user can fix (flags, data,
  checkpoints): no traceback, and no flag list before it."""
  try:
    yield
  except (flags.ValidationError, DataError, checkpoints.CheckpointError) as e:
    raise SystemExit(f'Error: {e}') from e


def _truncate(splits: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
  if not FLAGS.max_train_examples:
    return splits
  train = balance.random_subset(splits['train'], n=FLAGS.max_train_examples, seed=FLAGS.split_seed)
  return {**splits, 'train': train}


def _synthetic_sizes() -> dict[str, int]:
  """How many synthetic faces a run gets, for its data report."""
  return {'train': FLAGS.synthetic_train, 'eval': FLAGS.synthetic_eval}


def warn_other_source(dataset: str, load_report: dict[str, Any], manual_dir: str) -> None:
  """Logs when the prepared copy in use was made from files outside ``manual_dir``.

  A prepared dataset is reused whatever ``--manual_dir`` says (docs/DATA.md), so
  pointing it at other files changes nothing unless this says so.
  """
  source = load_report.get('source')
  manual = os.path.realpath(os.path.expanduser(manual_dir))
  if source and os.path.commonpath([os.path.realpath(source), manual]) != manual:
    logging.warning(
        '%s: using the copy prepared earlier from %s, not the files in --manual_dir=%s;'
        ' to prepare those instead, pass a fresh --tfds_data_dir.',
        dataset, source, manual_dir)


def _warn_skipped(dataset: str, load_report: dict[str, Any]) -> None:
  """Logs the files the prepare step could not use (they are left out of every split)."""
  corrupt = [c['file'] for c in load_report.get('corrupt', [])]
  unparseable = list(load_report.get('unparseable_names', []))
  if corrupt:
    logging.warning(
        '%s: %d unreadable file(s) or row(s) left out, e.g. %s; replace them from a fresh'
        ' download (the full list is under "load" in data_report.json).',
        dataset, len(corrupt), corrupt[:3])
  if unparseable:
    logging.warning(
        '%s: %d file(s) left out whose names are not age_gender_race_date.jpg.chip.jpg,'
        ' e.g. %s; rename them to that pattern to use them.',
        dataset, len(unparseable), unparseable[:3])


# UTKFace's split and the age task's labels and balancing: FER2013 keeps its
# own splits and its 7 classes, so FER pretraining has no use for them.
AGE_DATA_FLAGS = (
    'protocol', 'near_duplicates', 'labels', 'undersample_age', 'undersample_n', 'class_cap',
)


def warn_unused(names: tuple[str, ...], program: str) -> list[str]:
  """Logs a warning naming those of the flags ``names`` given on the command line.

  For flags every experiment defines (e.g. passed to every run of a study by
  `experiments.run_study --extra_flags`) that ``program`` does not use.
  Returns them, as ``--name``.
  """
  given = [f'--{name}' for name in names if FLAGS[name].present]
  if given:
    logging.warning('%s ignores %s: flags it has no use for.', program, ', '.join(given))
  return given


def fer_data() -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
  """FER splits (train / validation / test) as the flags select, and a report."""
  report: dict[str, Any] = {'data': FLAGS.data}
  if FLAGS.data == 'synthetic':
    splits = synthetic.make_fer_splits(
        FLAGS.split_seed, FLAGS.synthetic_train, FLAGS.synthetic_eval, FLAGS.synthetic_eval
    )
    report['synthetic'] = _synthetic_sizes()
  else:
    splits = fer2013.load(FLAGS.manual_dir, data_dir=FLAGS.tfds_data_dir)
    report['manual_dir'] = FLAGS.manual_dir
    report['load'] = fer2013.prepare_report(FLAGS.tfds_data_dir)
    warn_other_source('FER2013', report['load'], FLAGS.manual_dir)
    _warn_skipped('FER2013', report['load'])
    report['pixel_copies_in_train'] = fer2013.copies_in_train(splits)
  splits = _truncate(splits)
  if FLAGS.max_train_examples:
    report['train_truncated_to'] = len(splits['train']['label'])
  if FLAGS.data == 'synthetic' or FLAGS.max_train_examples:
    report['split_seed'] = FLAGS.split_seed  # FER2013's own splits need none
  return splits, report


def age_data() -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
  """Age splits as the flags select, with labels, balancing and a report."""
  report: dict[str, Any] = {'data': FLAGS.data, 'split_seed': FLAGS.split_seed}
  if FLAGS.data == 'synthetic':
    report['synthetic'] = _synthetic_sizes()
    splits = synthetic.make_age_splits(
        FLAGS.split_seed, FLAGS.synthetic_train, FLAGS.synthetic_eval, FLAGS.synthetic_eval
    )
  else:
    arrays, load_report = utk_face.load(FLAGS.manual_dir, data_dir=FLAGS.tfds_data_dir)
    warn_other_source('UTKFace', load_report, FLAGS.manual_dir)
    _warn_skipped('UTKFace', load_report)
    splits, split_report = splits_lib.make_splits(
        arrays, protocol=FLAGS.protocol, seed=FLAGS.split_seed,
        near_duplicates=FLAGS.near_duplicates,
    )
    report.update(
        load=load_report, split=split_report,
        near_duplicate_leaks_from_train=splits_lib.near_duplicate_leaks(splits),
    )
  splits = _balance(splits, report)
  splits = _truncate(splits)
  if FLAGS.max_train_examples:
    report['train_truncated_to'] = len(splits['train']['label'])
  return splits, report


# The parts of a run's data report that say which faces it trains and is
# scored on (not where the files were read from).
_DATA_IDENTITY = (
    'data', 'split_seed', 'synthetic', 'split', 'balancing', 'train_before_balancing',
    'train_after_balancing', 'train_truncated_to',
)


def write_data_report(workdir: str, report: dict[str, Any]) -> None:
  """Writes ``<workdir>/data_report.json``, refusing to replace one of other data.

  A run resumed or re-evaluated with other data flags would continue on, or
  be scored on, other faces, possibly ones it trained on: `app.UsageError`
  names the file, the differing parts and the flags to check, and the file
  stays as it was.
  """
  try:
    run_logging.write_run_record(pathlib.Path(workdir) / 'data_report.json', report, _DATA_IDENTITY)
  except ValueError as e:
    raise app.UsageError(
        f'{e} Resume the run with its own data flags (--data, --protocol, --near_duplicates, --split_seed,'
        ' --labels, --undersample_age/_n, --class_cap, --max_train_examples,'
        ' --synthetic_train/_eval),'
        ' or choose a new --workdir.'
    ) from e


def _balance(splits: dict[str, dict[str, np.ndarray]], report: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
  """Undersampling of one age, relabelling to --labels, capping per class.

  Undersampling and capping touch the training split only; the cap applies
  to the classes being trained (ages, or the 11 ranges).
  """
  train = splits['train']
  before = len(train['label'])
  undersampled = FLAGS.undersample_age is not None and FLAGS.undersample_n
  # What was done, not only the sizes: another age undersampled by as many
  # images leaves the same sizes and other faces.
  report['balancing'] = {
      'labels': FLAGS.labels,
      'undersample': (
          {'age': FLAGS.undersample_age, 'n': FLAGS.undersample_n} if undersampled else None
      ),
      'class_cap': FLAGS.class_cap or None,
  }
  if undersampled:
    try:
      train = balance.undersample(
          train, label=FLAGS.undersample_age, n_remove=FLAGS.undersample_n, seed=FLAGS.split_seed
      )
    except ValueError as e:
      raise flags.ValidationError(
          f'--undersample_age={FLAGS.undersample_age} --undersample_n={FLAGS.undersample_n}:'
          f' {e} in the training split; lower --undersample_n or pick another age.'
      ) from e
  splits = {**splits, 'train': train}
  if FLAGS.labels == 'ranges11':
    splits = {
        name: {**s, 'label': np.asarray(ages.age_to_range(s['age']))}
        for name, s in splits.items()
    }
  if FLAGS.class_cap:
    splits['train'] = balance.cap_per_class(
        splits['train'], cap=FLAGS.class_cap, seed=FLAGS.split_seed
    )
  report['train_before_balancing'] = before
  report['train_after_balancing'] = len(splits['train']['label'])
  return splits


def num_age_classes() -> int:
  return ages.NUM_RANGES if FLAGS.labels == 'ranges11' else ages.NUM_AGE_CLASSES


def setup() -> None:
  """Applies the process-wide flags: logging, multi-host, matmul precision, compile cache.

  Orbax logs every save and restore at INFO, which absl turns on by default;
  we keep the console to progress lines unless --verbosity is given.
  """
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if FLAGS.multihost or FLAGS.coordinator_address:
    try:
      parallel.initialize_distributed(
          FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
      )
    except ValueError as e:  # e.g. JAX's 'Number of processes must be defined.'
      raise app.UsageError(
          f'Could not join the multi-host run: {e} Outside TPU pods and the'
          ' clusters JAX detects (SLURM, Open MPI), pass --coordinator_address,'
          ' --num_processes and --process_id.'
      ) from e
  if FLAGS.matmul_precision:
    jax.config.update('jax_default_matmul_precision', FLAGS.matmul_precision)
  if FLAGS.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', FLAGS.compilation_cache_dir)
    # Every program, not only those that take a second or more (JAX's
    # default): a run compiles dozens that take a fraction of one each.
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


HEADLINE = (
    'accuracy', 'cs@1', 'cs@2', 'cs@3', 'mae', 'mae_expected',
    'weighted_precision', 'weighted_recall', 'weighted_f1',
    'macro_precision', 'macro_recall', 'macro_f1',
    'tol3_weighted_f1', 'tol3_macro_f1', 'tol3_mae',
)


def format_results(results: dict[str, Any], keys: tuple[str, ...] = HEADLINE) -> str:
  """A small table of the best checkpoint's scores on validation and test."""
  splits = [s for s in ('validation', 'test') if s in results]
  lines = [f'best epoch {results["best_epoch"]}', f'{"metric":<20}' + ''.join(f'{s:>12}' for s in splits)]
  done, planned = results.get('epochs_done'), results.get('epochs_planned')
  if done is not None and planned is not None and done < planned:
    lines.insert(0, f'Stopped after epoch {done} of {planned} (--stop_after_epoch): these are the'
                    ' scores of the best epoch so far; rerun without it to finish.')
  for key in keys:
    if all(key in results[s] for s in splits):
      lines.append(f'{key:<20}' + ''.join(f'{results[s][key]:>12.4f}' for s in splits))
  return '\n'.join(lines)
