"""Orbax checkpoints of a run: the latest (to resume) and the best (to use).

A run directory holds two `orbax.checkpoint.CheckpointManager` folders:

- ``latest/``: the full train state (params, BatchNorm statistics, optimizer
  state, step) and the run's progress (stage, epoch, history), saved after
  every epoch so a killed run resumes where it stopped. The epoch before is
  kept too: a run whose newest checkpoint cannot be read (on Google Drive, a
  copy cut off by a Colab disconnect) resumes from that one instead
  (`agejax.train`), after `RunCheckpoints.set_aside_latest` renames the
  damaged folder, which keeps its files.
- ``best/``: the variables (params and BatchNorm statistics) of the epoch with
  the best validation metric, with the model config and metrics as JSON. This
  is what transfer (`load_variables`) and evaluation read. The two best
  epochs before it are kept too, so that dropping the best epochs a run did
  not finish (`RunCheckpoints.delete_best`: one, or two when it resumes from
  the epoch before an unreadable latest checkpoint) leaves the one its
  progress records.

Both restore against abstract targets built from the config, so shapes and
shardings are checked and arrays land where the caller wants them. Orbax
writes each checkpoint to a temporary folder and renames it when complete, so
an interrupted save never replaces a good checkpoint.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

LATEST = 'latest'
BEST = 'best'


class CheckpointError(ValueError):
  """A checkpoint is missing or does not fit the model it is restored into."""


class UnreadableCheckpointError(CheckpointError):
  """A checkpoint's files are incomplete or damaged: Orbax could not read them."""


def _manager(
    directory: pathlib.Path, arrays: str, json: str, keep: int = 1
) -> ocp.CheckpointManager:
  """A manager of checkpoints of two items: a pytree of arrays, and JSON.

  Naming the handlers lets a fresh manager read a checkpoint's metadata
  before restoring it.
  """
  return ocp.CheckpointManager(
      directory.absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_handlers={
          arrays: ocp.StandardCheckpointHandler(),
          json: ocp.JsonCheckpointHandler(),
      },
  )


class RunCheckpoints:
  """The ``latest`` and ``best`` checkpoint managers of one run directory."""

  def __init__(self, directory: str | pathlib.Path):
    directory = pathlib.Path(directory)
    self.directory = directory
    self._latest = _manager(directory / LATEST, 'state', 'progress', keep=2)
    self._best = _manager(directory / BEST, 'variables', 'meta', keep=3)

  def save_latest(self, epoch: int, state: Any, progress: dict[str, Any]) -> None:
    saved = self._latest.save(
        epoch,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            progress=ocp.args.JsonSave(progress),
        ),
    )
    _check_saved(saved, self._latest, epoch, self.directory / LATEST)

  def save_best(self, epoch: int, variables: Any, meta: dict[str, Any]) -> None:
    """Saves the best variables and returns once they are on disk.

    Synchronous, unlike `save_latest`: the latest checkpoint that follows
    records this epoch as the best, and a run killed between the two saves
    must not resume with a best score whose variables were never written.
    It first waits for the previous epoch's latest save, so that at most
    one best epoch (this one) can be ahead of the latest checkpoint.
    """
    self._latest.wait_until_finished()
    saved = self._best.save(
        epoch,
        args=ocp.args.Composite(
            variables=ocp.args.StandardSave(variables),
            meta=ocp.args.JsonSave(meta),
        ),
    )
    _check_saved(saved, self._best, epoch, self.directory / BEST)
    self._best.wait_until_finished()

  def best_epoch(self) -> int | None:
    """The epoch of the saved best checkpoint, or None if there is none."""
    return self._best.latest_step()

  def best_epochs(self) -> list[int]:
    """Every epoch held in ``best/`` (the best one and the two best before it)."""
    return sorted(self._best.all_steps())

  def best_meta(self, epoch: int) -> dict[str, Any]:
    """The JSON metadata saved with the best checkpoint of ``epoch``."""
    return _restore_json(self._best, epoch, 'meta', self.directory / BEST)

  def delete_best(self, epoch: int) -> None:
    """Deletes the best checkpoint of ``epoch``."""
    self._best.delete(epoch)

  def latest_epochs(self) -> list[int]:
    """The epochs held in ``latest/``, newest first (at most two)."""
    return sorted(self._latest.all_steps(), reverse=True)

  def latest_progress(self, epoch: int | None = None) -> dict[str, Any] | None:
    """The progress JSON of ``epoch``'s latest checkpoint (default: the newest).

    None for a new run (no latest checkpoint, no ``epoch`` given).
    """
    if epoch is None:
      epoch = self._latest.latest_step()
      if epoch is None:
        return None
    return _restore_json(self._latest, epoch, 'progress', self.directory / LATEST)

  def restore_latest(self, abstract_state: Any, epoch: int | None = None) -> Any:
    """Restores ``epoch``'s train state (default: the newest) into ``abstract_state``."""
    if epoch is None:
      epoch = self._latest.latest_step()
      if epoch is None:
        raise CheckpointError(
            f'No checkpoint to resume in {self.directory / LATEST}.'
        )
    return _restore(
        self._latest, epoch, 'state', abstract_state, self.directory / LATEST
    )

  def set_aside_latest(self, epoch: int) -> pathlib.Path:
    """Renames ``latest/<epoch>`` to ``latest/<epoch>.unreadable`` and returns it.

    For a checkpoint that cannot be read: the run resumes from the one
    before and saves ``epoch`` again, which Orbax would refuse while the
    folder holds it. Its files stay (``-2``, ``-3``... if the name is taken),
    for the user to inspect or delete; Orbax ignores folders not named as
    a step. In a multi-host run every process calls this, and process 0
    renames the folder on the storage they share, as Orbax deletes there.
    """
    self._latest.wait_until_finished()
    folder = self.directory / LATEST / str(epoch)
    aside = folder.with_name(f'{epoch}.unreadable')
    n = 1
    while aside.exists():
      n += 1
      aside = folder.with_name(f'{epoch}.unreadable-{n}')
    _sync_processes(f'agejax: set aside {folder}, name chosen')
    if jax.process_index() == 0:
      folder.rename(aside)
    _sync_processes(f'agejax: set aside {folder}, renamed')
    self._latest.reload()
    return aside

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()


def _sync_processes(name: str) -> None:
  """Waits until every process of a multi-host run gets here; no-op in one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _check_saved(
    saved: bool, manager: ocp.CheckpointManager, epoch: int, where: pathlib.Path
) -> None:
  """Raises if Orbax skipped a save, as it does for a step not above the last."""
  if not saved:
    raise CheckpointError(
        f'Could not save epoch {epoch} in {where}: it already holds epoch'
        f' {manager.latest_step()}, from another run. Move that folder aside, or'
        ' choose a new run directory.'
    )


def _unreadable(
    where: pathlib.Path, step: int, e: Exception
) -> UnreadableCheckpointError:
  """The error for checkpoint files that Orbax or TensorStore failed to read."""
  return UnreadableCheckpointError(
      f'Checkpoint {where}/{step} could not be read ({type(e).__name__}: {e}):'
      ' it is incomplete or damaged. Rerun the training that wrote it, in a new'
      f' run directory or after moving {where.parent} aside.'
  )


def _restore_json(
    manager: ocp.CheckpointManager, step: int, item: str, where: pathlib.Path
) -> Any:
  """The JSON ``item`` of checkpoint ``step``; CheckpointError if it cannot be read."""
  try:
    return manager.restore(
        step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})
    )[item]
  except Exception as e:  # Orbax and TensorStore raise many types here.
    raise _unreadable(where, step, e) from e


def has_latest(directory: str | pathlib.Path) -> bool:
  """Whether a run's checkpoint ``directory`` holds a latest checkpoint to resume.

  Reads the folder names only (`RunCheckpoints` would create the folders).
  """
  latest = pathlib.Path(directory) / LATEST
  return latest.is_dir() and any(p.name.isdigit() for p in latest.iterdir())


def _key_name(key: Any) -> str:
  """One step of a pytree path as Orbax names it (dict key, attribute, index)."""
  for attribute in ('key', 'name', 'idx'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _arrays_by_path(tree: Any) -> dict[str, str]:
  """``'params.block1/conv1.kernel'`` -> ``'(3, 3, 1, 32) float32'``, per array leaf."""
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape')
  )[0]
  return {
      '.'.join(_key_name(k) for k in path): (
          f'{tuple(leaf.shape)} {np.dtype(leaf.dtype).name}'
      )
      for path, leaf in leaves
  }


def _misfits(saved: Any, abstract: Any) -> list[str]:
  """How the saved tree of array metadata differs from the target's leaves."""
  have, want = _arrays_by_path(saved), _arrays_by_path(abstract)
  missing = sorted(want.keys() - have.keys())
  unexpected = sorted(have.keys() - want.keys())
  arrays = [
      f'{path}: {have[path]} in checkpoint, {want[path]} expected'
      for path in sorted(want.keys() & have.keys())
      if have[path] != want[path]
  ]
  listed = lambda paths: ', '.join(paths[:5]) + (
      f' and {len(paths) - 5} more' if len(paths) > 5 else ''
  )
  return (
      [f'missing from checkpoint: {listed(missing)}'] * bool(missing)
      + [f'not in model: {listed(unexpected)}'] * bool(unexpected)
      + arrays[:5]
  )


def _restore(
    manager: ocp.CheckpointManager,
    step: int,
    item: str,
    abstract: Any,
    where: pathlib.Path,
) -> Any:
  """Restores ``item`` of ``step`` into ``abstract`` after checking it fits.

  The check reads only the checkpoint's metadata: restoring into a tree of
  other paths, shapes or dtypes would fail, pad or cast halfway through
  reading arrays. Leaves of ``abstract`` without a sharding land on this
  process's first device: Orbax would otherwise use the sharding saved with
  the checkpoint, which names the devices of the machine that wrote it, and
  refuse a checkpoint written on more devices (a TPU v2-8's FER weights
  transferred on a CPU).
  """
  abstract = _placed(abstract)
  try:
    saved = manager.item_metadata(step)[item]
    if saved is None:  # What Orbax returns when the item's _METADATA is gone.
      raise FileNotFoundError(f'no metadata for {item!r}')
    misfits = _misfits(getattr(saved, 'tree', saved), abstract)
  except Exception as e:  # Orbax and TensorStore raise many types here.
    raise _unreadable(where, step, e) from e
  if misfits:
    raise CheckpointError(
        f'Checkpoint {where}/{step} does not fit the model being restored'
        f' into: {"; ".join(misfits)}. Use a checkpoint written with the same'
        ' model config, or a fresh run directory.'
    )
  try:
    restored = manager.restore(
        step,
        args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}),
    )
  except Exception as e:  # Orbax and TensorStore raise many types here.
    raise _unreadable(where, step, e) from e
  return restored[item]


def _placed(abstract: Any) -> Any:
  """``abstract`` with every leaf that has no sharding put on the first local device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda leaf: leaf
      if leaf.sharding is not None
      else jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
      abstract,
  )


def best_dir(path: str | pathlib.Path) -> pathlib.Path:
  """Finds the ``best/`` folder of a run directory (or accepts it directly)."""
  path = pathlib.Path(path)
  for candidate in (path / 'checkpoints' / BEST, path / BEST, path):
    if candidate.is_dir() and any(
        p.name.isdigit() and (p / 'meta').is_dir() for p in candidate.iterdir()
    ):
      return candidate
  raise CheckpointError(
      f'No agejax checkpoint under {path}: expected a run directory holding'
      f' checkpoints/{BEST}/<epoch>/ (written by experiments.pretrain_fer or'
      ' experiments.finetune). Check the path, or train the model first.'
  )


def load_meta(path: str | pathlib.Path) -> dict[str, Any]:
  """The JSON metadata (model config, metrics) of a run's best checkpoint.

  ``best/`` is written only when an epoch improves, so its latest step is the
  best one (as in `load_variables`).
  """
  directory = best_dir(path)
  manager = _manager(directory, 'variables', 'meta')
  step = manager.latest_step()
  try:
    return _restore_json(manager, step, 'meta', directory)
  finally:
    manager.close()


def load_variables(
    path: str | pathlib.Path, abstract_fn: Callable[[dict[str, Any]], Any]
) -> tuple[Any, dict[str, Any]]:
  """Restores the best variables of a run, and their metadata.

  Args:
    path: A run directory, or its ``checkpoints/best`` folder.
    abstract_fn: Builds the abstract target (`jax.ShapeDtypeStruct` leaves,
      optionally with shardings; without, on the first local device) from the
      checkpoint's metadata, typically by `jax.eval_shape` of the model's init
      for ``meta['model']``.
  """
  directory = best_dir(path)
  meta = load_meta(directory)
  manager = _manager(directory, 'variables', 'meta')
  step = manager.latest_step()
  try:
    variables = _restore(manager, step, 'variables', abstract_fn(meta), directory)
  finally:
    manager.close()
  return variables, meta


def abstract_like(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
  """`jax.ShapeDtypeStruct`s of ``tree``, placed with ``sharding`` if given."""
  return jax.tree.map(
      # jnp.shape/result_type also accept Python scalars, e.g. the int step of
      # a fresh `TrainState.create`.
      lambda x: jax.ShapeDtypeStruct(
          jax.numpy.shape(x), jax.numpy.result_type(x), sharding=sharding
      ),
      tree,
  )
