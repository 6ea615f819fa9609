"""The training loop: stages, epochs, evaluation, checkpoints, resume.

`train_and_evaluate` is the one entry point the experiments call. A run is a
directory; running the same config on the same directory again resumes after
the last completed epoch and ends with the same metrics as a run that was
never interrupted, because every random key is derived from the seed, the
epoch and the step, and the whole train state is checkpointed each epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from agejax import batching
from agejax import checkpoints
from agejax import config as config_lib
from agejax import evaluate as evaluate_lib
from agejax import parallel
from agejax import run_logging
from agejax import steps
from agejax import transfer

Arrays = Mapping[str, np.ndarray]

def config_dict(config: Any) -> dict[str, Any]:
  """A frozen config dataclass as JSON-compatible nested dicts and lists."""
  return _jsonable(dataclasses.asdict(config))


# Fields that change only what is reported, or how the same training runs
# (a scanned or looped epoch, the evaluation batch size: equal to float
# rounding), not what is trained. A run resumes across a change in them, and
# across their absence from a run saved by an agejax that did not have them.
_REPORT_ONLY_FIELDS = (
    ('history_metrics',), ('step', 'ordinal'), ('epoch_mode',), ('eval_batch_size',)
)


def training_identity(run_config: Mapping[str, Any]) -> dict[str, Any]:
  """``run_config`` (a `config_dict`) without its report-only fields.

  A resumed run must match its checkpoint's config in everything that shapes
  the trained weights; which scores it reports may change.
  """
  identity = copy.deepcopy(dict(run_config))
  for *parents, name in _REPORT_ONLY_FIELDS:
    node = identity
    for parent in parents:
      node = node.get(parent, {})
    node.pop(name, None)
  return identity


def _differences(saved: Any, new: Any, path: str = '') -> list[str]:
  """``'path: saved -> new'`` for each value that differs between two config dicts."""
  if isinstance(saved, dict) and isinstance(new, dict):
    return [
        change
        for key in sorted(set(saved) | set(new), key=str)
        for change in _differences(
            saved.get(key), new.get(key), f'{path}.{key}' if path else str(key)
        )
    ]
  if _jsonable(saved) == _jsonable(new):
    return []
  return [f'{path}: {saved!r} -> {new!r}']


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


def abstract_variables(model_config: config_lib.ModelConfig) -> Any:
  """Shapes and dtypes of ``{'params', 'batch_stats'}``, without computing them."""
  return jax.eval_shape(
      lambda: steps.init_variables(
          jax.random.key(0), model_config.build(), model_config.input_shape
      )
  )


def initial_variables(
    config: config_lib.TrainConfig,
    log: Callable[[str], None] = functools.partial(print, flush=True),
) -> tuple[dict[str, Any], transfer.TransferReport | None]:
  """Random initialisation, then transfer from ``config.init_from`` if set."""
  init_key = jax.random.fold_in(jax.random.key(config.seed), 0)
  model_config = config.model
  variables = steps.init_variables(
      init_key, model_config.build(), model_config.input_shape
  )
  if not config.init_from:
    return variables, None
  loaded, _ = checkpoints.load_variables(
      config.init_from,
      lambda meta: abstract_variables(config_lib.model_config_from_dict(meta['model'])),
  )
  variables, report = transfer.merge_params(loaded, variables, config.dont_load)
  log(report.format())
  return variables, report


def _state_tree(state: steps.TrainState) -> dict[str, Any]:
  return {
      'step': state.step,
      'params': state.params,
      'batch_stats': state.batch_stats,
      'opt_state': state.opt_state,
  }


def _better(value: float, best: float | None, mode: str) -> bool:
  """Whether ``value`` beats ``best``; a NaN or infinite score beats only no score."""
  if not math.isfinite(value):
    return best is None
  if best is None or not math.isfinite(best):
    return True
  return value > best if mode == 'max' else value < best


def _drop_unfinished_best(
    ckpts: checkpoints.RunCheckpoints,
    done: int,
    saved_through: int,
    run_config: Mapping[str, Any],
    workdir: pathlib.Path,
    log: Callable[[str], None],
) -> None:
  """Deletes best checkpoints of epochs after ``done`` that this run wrote.

  A run killed after saving an epoch's best checkpoint and before its latest
  one leaves a best epoch that its progress does not record: only the epoch
  after the newest latest checkpoint, ``saved_through``
  (`checkpoints.RunCheckpoints.save_best` waits for the previous latest
  save). Resuming from the epoch before an unreadable newest checkpoint
  (`_resume`) leaves the best epochs up to that one's too. The resumed run
  trains those epochs again and saves them again. Anything else (another
  run's best epoch, one written by an agejax that did not record its run,
  or epochs further ahead, e.g. after ``latest/`` was deleted by hand) is
  not ours to delete: CheckpointError.
  """
  ahead = [e for e in ckpts.best_epochs() if e > done]
  if not ahead:
    return
  identity = training_identity(run_config)
  best = workdir / 'checkpoints' / checkpoints.BEST

  def ours(epoch: int) -> bool:
    saved = ckpts.best_meta(epoch).get('run')
    return saved is not None and training_identity(saved) == identity

  if max(ahead) > saved_through + 1 or not all(ours(e) for e in ahead):
    raise checkpoints.CheckpointError(
        f'{best} holds best epoch(s) {ahead}, after the last epoch whose latest'
        f' checkpoint exists ({done}): another run\'s, or a run whose latest'
        ' checkpoint is gone. This run cannot resume it and would report it as its'
        f' own. Move {workdir / "checkpoints"} aside to start over, or choose a'
        ' new --workdir.'
    )
  for epoch in ahead:
    ckpts.delete_best(epoch)
  log(
      f'Deleted best epoch(s) {ahead} in {best}: saved after the epoch this run'
      f' resumes from ({done}) by a run stopped before it finished; they are'
      ' retrained.'
  )


def _resume(
    ckpts: checkpoints.RunCheckpoints,
    config: config_lib.TrainConfig,
    plan: list[tuple[int, int]],
    run_config: Mapping[str, Any],
    workdir: pathlib.Path,
    mesh: jax.sharding.Mesh,
    log: Callable[[str], None],
) -> tuple[dict[str, Any], steps.TrainState] | None:
  """The progress and train state of the run's newest readable latest checkpoint.

  None for a new run. A newest checkpoint whose files cannot be read (on
  Google Drive, a copy cut off by a Colab disconnect) is set aside
  (`checkpoints.RunCheckpoints.set_aside_latest`, which keeps its files) and
  the run resumes from the epoch before, which it logs; if that one cannot
  be read either, its error is raised. A checkpoint of another config or
  model raises CheckpointError: that is not damage to work around.
  """
  epochs = ckpts.latest_epochs()
  if not epochs:
    return None
  # The checkpoint replaces every value: only shapes and structure are needed.
  variables = abstract_variables(config.model)

  def restore(epoch: int) -> tuple[dict[str, Any], steps.TrainState]:
    progress = ckpts.latest_progress(epoch)
    _check_same_training(progress['config'], run_config, workdir)
    stage_idx = plan[progress['epoch'] - 1][0]
    template = jax.eval_shape(
        lambda v: steps.create_train_state(
            config.model, config.stages[stage_idx], v, config.stages[:stage_idx]
        ),
        variables,
    )
    restored = ckpts.restore_latest(
        checkpoints.abstract_like(_state_tree(template), parallel.replicated(mesh)),
        epoch,
    )
    return progress, template.replace(**restored)

  newest, *older = epochs
  if older:
    try:
      return restore(newest)
    except checkpoints.UnreadableCheckpointError as e:
      aside = ckpts.set_aside_latest(newest)
      log(
          f'The latest checkpoint of epoch {newest} could not be read'
          f' ({e.__cause__!r}); moved it to {aside} and resuming from epoch'
          f' {older[0]}, whose next epochs are trained again.'
      )
  return restore(older[0] if older else newest)


def _check_same_training(
    saved: Mapping[str, Any], run_config: Mapping[str, Any], workdir: pathlib.Path
) -> None:
  """Raises CheckpointError if a saved run's training differs from ``run_config``'s."""
  if training_identity(saved) == training_identity(run_config):
    return
  changes = _differences(training_identity(saved), training_identity(run_config))
  raise checkpoints.CheckpointError(
      f'{workdir} holds a run with a different config ({"; ".join(changes[:5])});'
      ' resume it with the same flags, or choose a new --workdir. Saved:'
      f' {workdir / "config.json"}.'
  )


def train_and_evaluate(
    config: config_lib.TrainConfig,
    data: Mapping[str, Arrays],
    workdir: str | pathlib.Path,
    *,
    mesh: jax.sharding.Mesh | None = None,
    log: Callable[[str], None] = functools.partial(print, flush=True),
    show_progress: bool = True,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
  """Trains through every stage of ``config``, then evaluates the best epoch.

  Args:
    config: The run's configuration.
    data: ``'train'``, ``'validation'`` and optionally ``'test'`` splits, each
      a dict of arrays with ``image`` uint8 [N, H, W, C] and ``label`` int32
      [N] (and ``age`` for MAE in years when classes are age ranges).
    workdir: The run directory: checkpoints, ``config.json``,
      ``metrics.jsonl``, ``tensorboard/``, ``results.json``,
      ``predictions_{validation,test}.npz`` (per-example predictions of the
      best checkpoint, see `agejax.run_logging.write_predictions`) and
      ``environment.jsonl`` (one line per call: where it ran, see
      `agejax.run_logging.environment`, and the epochs done before and
      after it).
    mesh: Devices to train on (default: every device, data parallel).
    log: Where progress lines go.
    show_progress: Show a progress bar per epoch.
    stop_after_epoch: Stop (resumably) once this many epochs of the run are
      done, e.g. to fit a time-boxed job; the best checkpoint so far is then
      evaluated. Not part of the config: the same run continues when called
      again with a later (or no) stop.

  Returns:
    ``{'best_epoch', 'epochs_done', 'epochs_planned', 'history',
    'transfer', 'environment', 'validation', 'test'}``; the validation and
    test entries are `agejax.evaluate.summarize` scores of the best
    checkpoint plus its ``confusion`` matrix; ``environment`` holds the lines
    of ``environment.jsonl``, this call's last.

  Raises:
    ValueError: before anything is written, when ``mesh`` is not of JAX's
      default backend (`agejax.parallel.check_platform`), a split's arrays
      do not fit the model (`agejax.batching.check_arrays`) or a score name
      in ``config`` is unknown (`check_score_names`).
  """
  workdir = pathlib.Path(workdir)
  mesh = parallel.data_mesh() if mesh is None else mesh
  parallel.check_platform(mesh)
  for size in (config.batch_size, config.eval_batch_size):
    parallel.check_batch_size(size, mesh)
  missing = [s for s in ('train', 'validation') if s not in data]
  if missing:
    raise KeyError(f'data needs splits {missing}; got {sorted(data)}.')
  check_score_names(config)
  for name, arrays in data.items():
    batching.check_arrays(
        arrays,
        image_shape=config.model.input_shape,
        num_classes=config.model.num_classes,
        name=name,
    )

  run_config = config_dict(config)
  model_config = config.model
  train_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  plan = [
      (s, e) for s, stage in enumerate(config.stages) for e in range(stage.epochs)
  ]
  ckpts = checkpoints.RunCheckpoints(workdir / 'checkpoints')
  saved_through = max(ckpts.latest_epochs(), default=0)
  resumed = _resume(ckpts, config, plan, run_config, workdir, mesh, log)
  _drop_unfinished_best(
      ckpts,
      0 if resumed is None else resumed[0]['epoch'],
      saved_through,
      run_config,
      workdir,
      log,
  )
  if resumed is None:
    variables, report = initial_variables(config, log)
    transfer_report = None if report is None else report.to_dict()
    if transfer_report is not None:
      run_logging.write_json(workdir / 'transfer_report.json', transfer_report)
    done, history, best, stage_idx = 0, [], None, 0
    state = steps.create_train_state(model_config, config.stages[0], variables)
  else:
    # The transfer is not redone; its report was saved by the first run.
    saved = workdir / 'transfer_report.json'
    transfer_report = json.loads(saved.read_text()) if saved.exists() else None
    progress, state = resumed
    done, history, best = progress['epoch'], progress['history'], progress['best']
    stage_idx = plan[done - 1][0]
    log(f'Resuming {workdir} after epoch {done} of {len(plan)}.')
  run_logging.write_json(workdir / 'config.json', run_config)
  state = parallel.replicate(state, mesh)

  train = data['train']
  train_bytes = train['image'].nbytes + train['label'].nbytes
  epoch_mode = resolve_epoch_mode(config.epoch_mode, train_bytes, mesh.local_devices[0])
  if config.epoch_mode == 'auto':
    log(f'Epochs: {epoch_mode} (training set {train_bytes / 2**20:.1f} MiB).')
  if epoch_mode == 'scan':
    on_device = parallel.replicate(
        {'image': train['image'], 'label': train['label']}, mesh
    )

  last = len(plan) if stop_after_epoch is None else min(stop_after_epoch, len(plan))
  run_logging.append_json_line(
      workdir / 'environment.jsonl',
      {**run_logging.environment(mesh), 'epochs_before': done, 'epochs_after': last},
  )
  writer = run_logging.TensorBoardWriter(workdir / 'tensorboard')
  try:
    for g in range(done, last):
      s, e = plan[g]
      stage = config.stages[s]
      if s != stage_idx:
        # The new stage's fresh optimizer state is not yet on the mesh.
        state = parallel.replicate(
            steps.start_stage(state, model_config, stage, config.stages[:s]), mesh
        )
        stage_idx = s
      start = time.time()
      epoch_key = jax.random.fold_in(train_key, g)
      desc = f'{stage.name} epoch {e + 1}/{stage.epochs}'
      if epoch_mode == 'scan':
        state, sums = steps.train_epoch(
            state,
            on_device['image'],
            on_device['label'],
            epoch_key,
            batch_size=config.batch_size,
            config=config.step,
            batch_sharding=parallel.batch_sharding(mesh),
        )
      else:
        state, sums = _train_epoch_loop(
            state, train, epoch_key, config, mesh, desc, show_progress
        )
      sums = jax.device_get(sums)
      val, _ = evaluate_lib.evaluate(
          state,
          data['validation'],
          config=config.step,
          batch_size=config.eval_batch_size,
          mesh=mesh,
      )
      entry = {
          'epoch': g + 1,
          'stage': stage.name,
          'train_loss': float(sums['loss_sum'] / sums['count']),
          'train_accuracy': float(sums['correct'] / sums['count']),
          **{f'val_{k}': val[k] for k in config.history_metrics},
          'seconds': round(time.time() - start, 2),
      }
      history.append(entry)
      log(_format_entry(desc, entry, config.history_metrics))
      writer.scalars(g + 1, {k: v for k, v in entry.items() if k != 'epoch'})
      value = val[config.select_metric]
      if _better(value, best, config.select_mode):
        best = value
        ckpts.save_best(
            g + 1,
            {'params': state.params, 'batch_stats': state.batch_stats},
            {
                'model': config_dict(model_config),
                'epoch': g + 1,
                'validation': {k: v for k, v in val.items() if k != 'per_class'},
                'run': training_identity(run_config),
            },
        )
      ckpts.save_latest(
          g + 1,
          _state_tree(state),
          # A copy: the save is written in the background while history grows.
          {'epoch': g + 1, 'history': list(history), 'best': best, 'config': run_config},
      )
      run_logging.write_history(workdir / 'metrics.jsonl', history)
  finally:
    # Also on an interrupt: let in-flight checkpoint saves finish, so that a
    # rerun resumes after the last epoch that completed.
    writer.close()
    ckpts.wait()
    ckpts.close()

  best_variables, meta = checkpoints.load_variables(
      workdir,
      lambda _: checkpoints.abstract_like(
          {'params': state.params, 'batch_stats': state.batch_stats},
          parallel.replicated(mesh),
      ),
  )
  best_state = state.replace(**best_variables)
  results = {
      'best_epoch': meta['epoch'],
      'epochs_done': max(done, last),
      'epochs_planned': len(plan),
      'history': history,
      'transfer': transfer_report,
      'environment': run_logging.read_json_lines(workdir / 'environment.jsonl'),
  }
  for split in ('validation', 'test'):
    if split in data:
      summary, confusion = evaluate_lib.evaluate(
          best_state,
          data[split],
          config=config.step,
          batch_size=config.eval_batch_size,
          mesh=mesh,
      )
      results[split] = {**summary, 'confusion': confusion.tolist()}
      predictions = evaluate_lib.predict(
          best_state,
          data[split],
          config=config.step,
          batch_size=config.eval_batch_size,
          mesh=mesh,
      )
      run_logging.write_predictions(
          workdir / f'predictions_{split}.npz', data[split], predictions
      )
  run_logging.write_json(workdir / 'results.json', results)
  return results


# 'auto' keeps the training set on every device for a scanned epoch only
# while it takes at most this share of a device's memory; the rest is for
# the train state and the steps' activations.
_SCAN_MAX_MEMORY_SHARE = 0.25


def resolve_epoch_mode(mode: str, train_bytes: int, device: jax.Device) -> str:
  """The epoch mode ``mode`` stands for, on a mesh of devices like ``device``.

  'scan' and 'loop' stand for themselves. 'auto' is 'loop' on CPU (as fast
  there, and it shows progress); elsewhere 'scan' when the training set
  (``train_bytes``), which a scanned epoch holds on every device, takes at
  most a quarter of the device's memory (its ``bytes_limit``, the same on
  every host of a run, so that all of them choose alike), else 'loop'. A
  device that reports no memory limit is taken to have room.
  """
  if mode != 'auto':
    return mode
  if device.platform == 'cpu':
    return 'loop'
  limit = (device.memory_stats() or {}).get('bytes_limit')
  if limit is None or train_bytes <= _SCAN_MAX_MEMORY_SHARE * limit:
    return 'scan'
  return 'loop'


def check_score_names(config: config_lib.TrainConfig) -> None:
  """Raises a ValueError unless ``select_metric`` and ``history_metrics`` name scores.

  The scores are those `agejax.evaluate.summarize` gives this step config
  and number of classes (`agejax.evaluate.score_names`).
  """
  names = evaluate_lib.score_names(config.step, config.model.num_classes)
  unknown = [
      f'{field} {name!r}'
      for field, wanted in (
          ('select_metric', (config.select_metric,)),
          ('history_metrics', config.history_metrics),
      )
      for name in wanted
      if name not in names
  ]
  if unknown:
    raise ValueError(
        f'{", ".join(unknown)}: not a validation score; choose from {list(names)}.'
    )


def _train_epoch_loop(
    state: steps.TrainState,
    train: Arrays,
    epoch_key: jax.Array,
    config: config_lib.TrainConfig,
    mesh: jax.sharding.Mesh,
    desc: str,
    show_progress: bool,
) -> tuple[steps.TrainState, dict[str, jax.Array]]:
  """One epoch as a Python loop of jitted steps, with a progress bar."""
  perm_key, step_key = steps.epoch_keys(epoch_key)
  indices = np.asarray(
      steps.epoch_indices(perm_key, len(train['image']), config.batch_size)
  )
  totals = None
  bar = tqdm.tqdm(
      total=len(indices), desc=desc, disable=not show_progress, leave=False
  )
  for i, batch in enumerate(batching.train_batches(train, indices)):
    state, sums = steps.train_step(
        state,
        parallel.shard_batch(batch, mesh),
        jax.random.fold_in(step_key, i),
        config=config.step,
    )
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    bar.update()
    if show_progress and (i % 10 == 0 or i == len(indices) - 1):
      host = jax.device_get(totals)
      bar.set_postfix(
          loss=f'{host["loss_sum"] / host["count"]:.3f}',
          acc=f'{host["correct"] / host["count"]:.3f}',
      )
  bar.close()
  return state, totals


def _format_entry(desc: str, entry: Mapping[str, Any], names: tuple[str, ...]) -> str:
  val = ' '.join(f'{k} {entry[f"val_{k}"]:.3f}' for k in names[:4])
  return (
      f'{desc}: train loss {entry["train_loss"]:.3f} acc'
      f' {entry["train_accuracy"]:.3f} | val {val} | {entry["seconds"]:.1f}s'
  )
