"""Transfer: start a model from another model's weights, layer by layer.

Like big_vision's ``merge_params``: every leaf of the new model whose path and
shape match a leaf of the loaded weights is copied; the rest keep their fresh
initialisation. A report says what was loaded, re-initialised on request
(``dont_load``), missing from the checkpoint, shape-mismatched, or present in
the checkpoint but unused (unexpected), so that nothing happens silently.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import numpy as np

from agejax import freezing


@dataclasses.dataclass(frozen=True)
class TransferReport:
  """Paths (``params/block1/conv1/kernel``) by what transfer did with them."""

  loaded: tuple[str, ...]
  not_loaded: tuple[str, ...]
  missing: tuple[str, ...]
  mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
  unexpected: tuple[str, ...]
  loaded_size: int
  total_size: int

  def format(self) -> str:
    """A human-readable summary, one line per path that was not loaded."""
    lines = [
        f'Transfer: loaded {len(self.loaded)} arrays'
        f' ({self.loaded_size:,} of {self.total_size:,} values,'
        f' {100 * self.loaded_size / max(self.total_size, 1):.1f}%).'
    ]
    lines += [f'  re-initialised (dont_load): {p}' for p in self.not_loaded]
    lines += [f'  re-initialised (not in checkpoint): {p}' for p in self.missing]
    lines += [
        f'  re-initialised (shape {src} in checkpoint, {dst} in model): {p}'
        for p, src, dst in self.mismatched
    ]
    lines += [f'  unused from checkpoint: {p}' for p in self.unexpected]
    return '\n'.join(lines)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _flat(tree: Any) -> dict[str, Any]:
  return {
      freezing.path_str(p): v
      for p, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def merge_params(
    loaded: Any, init: Any, dont_load: Sequence[str] = ()
) -> tuple[Any, TransferReport]:
  """Returns ``init`` with every matching leaf replaced by ``loaded``'s.

  Args:
    loaded: Variables from a checkpoint, e.g. ``{'params', 'batch_stats'}``.
    init: Freshly initialised variables of the new model, same layout.
    dont_load: Regexes of paths (as in the report) that keep their fresh
      initialisation even when the checkpoint has them.

  Raises:
    ValueError: if a ``dont_load`` pattern matches nothing, or if no leaf at
      all could be loaded (the checkpoint is not of a compatible model).
  """
  source = _flat(loaded)
  used_patterns = set()
  report = {k: [] for k in ('loaded', 'not_loaded', 'missing', 'mismatched')}
  loaded_size = total_size = 0

  def pick(path, fresh):
    nonlocal loaded_size, total_size
    name = freezing.path_str(path)
    total_size += int(np.size(fresh))
    hits = [p for p in dont_load if re.fullmatch(p, name)]
    used_patterns.update(hits)
    if hits:
      report['not_loaded'].append(name)
      return fresh
    if name not in source:
      report['missing'].append(name)
      return fresh
    value = source[name]
    if np.shape(value) != np.shape(fresh):
      report['mismatched'].append(
          (name, tuple(np.shape(value)), tuple(np.shape(fresh)))
      )
      return fresh
    report['loaded'].append(name)
    loaded_size += int(np.size(fresh))
    return jax.numpy.asarray(value, dtype=fresh.dtype)

  merged = jax.tree_util.tree_map_with_path(pick, init)
  unused = [p for p in dont_load if p not in used_patterns]
  if unused:
    paths = sorted(_flat(init))
    raise ValueError(
        f'dont_load patterns {unused} match no parameter path; paths start'
        f' with the collection, e.g. {paths[:: max(1, len(paths) // 3)][:4]}.'
    )
  if not report['loaded']:
    raise ValueError(
        'No array of the checkpoint matches the model by path and shape;'
        f' checkpoint paths look like {sorted(source)[:4]}, model paths like'
        f' {sorted(_flat(init))[:4]}.'
    )
  target = _flat(init)
  result = TransferReport(
      loaded=tuple(report['loaded']),
      not_loaded=tuple(report['not_loaded']),
      missing=tuple(report['missing']),
      mismatched=tuple(report['mismatched']),
      unexpected=tuple(sorted(set(source) - set(target))),
      loaded_size=loaded_size,
      total_size=total_size,
  )
  return merged, result
