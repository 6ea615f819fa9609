"""Where a run's numbers go: JSON files, JSON lines, TensorBoard events and
per-example predictions; and where each session of a run ran (`environment`).

In a multi-host run every host computes the same numbers; only process 0
writes them (`is_writer`), so hosts sharing a run directory do not race.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import pathlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from tensorboardX import SummaryWriter


def is_writer() -> bool:
  """Whether this process writes the run's files: process 0 of the run."""
  return jax.process_index() == 0


def write_json(path: str | pathlib.Path, obj: Any) -> None:
  """Writes JSON atomically: readers see the old file or the new, never half."""
  if not is_writer():
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=_plain))
  tmp.replace(path)


def write_run_record(
    path: str | pathlib.Path, record: Mapping[str, Any], identity: Sequence[str]
) -> None:
  """Writes ``record`` as JSON at ``path``, refusing to replace a different one.

  For a run directory's record of its inputs (e.g. which data it used): a
  resumed or re-evaluated run must use the same inputs. The file already at
  ``path``, if any, must agree with ``record`` on the top-level keys of
  ``identity`` (other keys, such as where the files were read from, may
  change); otherwise it is left as it is and ValueError names the keys.
  Every key of ``identity`` is written, absent ones as null, so a key missing
  from the saved file means that its writer did not record that input yet;
  such keys are not compared.
  """
  path = pathlib.Path(path)
  record = {**{k: None for k in identity}, **record}
  if path.exists():
    try:
      saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise ValueError(f'{path} is unreadable ({e}); move it away to start afresh.') from e
    new = json.loads(json.dumps({k: record[k] for k in identity}, default=_plain))
    differ = [k for k in identity if k in saved and saved[k] != new[k]]
    if differ:
      raise ValueError(f'{path} records other inputs ({", ".join(differ)} differ).')
  write_json(path, record)


def write_predictions(
    path: str | pathlib.Path,
    arrays: Mapping[str, np.ndarray],
    predictions: Mapping[str, np.ndarray],
) -> None:
  """Writes per-example predictions beside the split's own per-example fields.

  Saves, atomically as a compressed ``.npz``, every one-dimensional array of
  ``arrays`` (``label``, and for UTKFace ``age``, ``gender``, ``race``,
  ``file_name``, ``hash``; not the images) and every array of
  ``predictions``, which must have one row per example.
  """
  path = pathlib.Path(path)
  n = len(arrays['label'])
  bad = {k: len(v) for k, v in predictions.items() if len(v) != n}
  if bad:
    raise ValueError(f'{path}: predictions {bad} do not match the {n} examples of the split.')
  if not is_writer():
    return
  fields = {k: np.asarray(v) for k, v in arrays.items() if np.ndim(v) == 1}
  fields.update({k: np.asarray(v) for k, v in predictions.items()})
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  with open(tmp, 'wb') as f:
    np.savez_compressed(f, **fields)
  tmp.replace(path)


def write_history(path: str | pathlib.Path, history: Sequence[Mapping[str, Any]]) -> None:
  """Rewrites the run's JSON-lines history, one line per epoch, atomically.

  Rewriting the whole (small) file from the checkpointed history keeps it
  consistent with the checkpoint after a resume.
  """
  if not is_writer():
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(
      ''.join(json.dumps(h, sort_keys=True, default=_plain) + '\n' for h in history)
  )
  tmp.replace(path)


# The libraries whose versions decide what a run computes.
_VERSIONED = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint')


def environment(mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Where this process computes: backend, devices, matmul precision, versions.

  The same run can train on a TPU, lose its runtime and finish on a CPU, and
  float32 products differ between them unless ``jax_default_matmul_precision``
  is set: JAX's default computes them in bfloat16 passes on TPUs and in
  TensorFloat-32 on recent NVIDIA GPUs, in float32 on CPUs. So a run records
  this once per session (`append_json_line`) and reports all of them.
  """
  kinds = sorted({d.device_kind for d in mesh.devices.flat})
  versions = {}
  for name in _VERSIONED:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return {
      'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'backend': mesh.devices.flat[0].platform,
      'device_kind': ', '.join(kinds),
      'devices': int(mesh.devices.size),
      'processes': jax.process_count(),
      'matmul_precision': str(jax.config.jax_default_matmul_precision or 'default'),
      'versions': versions,
  }


def append_json_line(path: str | pathlib.Path, obj: Mapping[str, Any]) -> None:
  """Appends ``obj`` as one JSON line: earlier lines are never rewritten."""
  if not is_writer():
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'a') as f:
    f.write(json.dumps(obj, sort_keys=True, default=_plain) + '\n')


def read_json_lines(path: str | pathlib.Path) -> list[Any]:
  """The JSON lines of ``path`` (none if it is missing), skipping any cut short.

  A line is cut short when a process dies while appending it, or when a
  synced copy (Google Drive) was interrupted; the lines before it stand.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return []
  lines = []
  for line in path.read_text().splitlines():
    try:
      lines.append(json.loads(line))
    except ValueError:
      continue
  return lines


def _plain(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f'{type(x).__name__} is not JSON serialisable')


class TensorBoardWriter:
  """Scalars to TensorBoard event files (tensorboardX; no TensorFlow).

  A no-op on every process but the writer (`is_writer`).
  """

  def __init__(self, logdir: str | pathlib.Path):
    self._writer = SummaryWriter(str(logdir)) if is_writer() else None

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    """Writes the numeric entries of ``values`` at ``step``; skips the rest."""
    if self._writer is None:
      return
    for name, value in values.items():
      if isinstance(value, (int, float, np.number)):
        self._writer.add_scalar(name, float(value), step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
