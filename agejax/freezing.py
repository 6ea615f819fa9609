"""Freezing layers by parameter-path patterns, and the optimizer that obeys it.

A parameter's path is its keys joined by ``/``, e.g. ``block2/conv1/kernel``
or ``head/bn1/scale``. A freezing spec is a named preset or a sequence of
regular expressions; a parameter is frozen when any pattern *fully* matches
its path (big_vision's convention). Frozen leaves get `optax.set_to_zero` under
`optax.partition`, and frozen BatchNorm layers additionally run in inference
mode (see `frozen_batch_norm_layers`), as they do in Keras.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import optax

FROZEN = 'frozen'
TRAINABLE = 'trainable'

# Presets name the study's freezing choices for the default three-block CNN.
PRESETS: Mapping[str, tuple[str, ...]] = {
    'none': (),
    # The study's final choice: block 1, plus the first conv of block 2 and its
    # BatchNorm (93,120 parameters).
    'paper': (r'block1/.*', r'block2/(conv1|bn1)/.*'),
    # Only the last convolutional block and the head train.
    'last_block_only': (r'block[12]/.*',),
    # Every convolutional block is frozen; the dense head and logits train.
    'head_only': (r'block\d+/.*',),
}

FreezeSpec = str | Sequence[str]


def path_str(path: tuple[Any, ...]) -> str:
  """Joins a `jax.tree_util` key path into ``'block1/conv1/kernel'``."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def resolve(spec: FreezeSpec) -> tuple[str, ...]:
  """Turns a preset name or a sequence of regexes into a tuple of regexes."""
  if isinstance(spec, str):
    if spec not in PRESETS:
      raise ValueError(
          f'Unknown freezing preset {spec!r}; choose one of {sorted(PRESETS)}'
          ' or pass a sequence of parameter-path regexes.'
      )
    return PRESETS[spec]
  patterns = tuple(spec)
  for pattern in patterns:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f'Invalid freezing pattern {pattern!r}: {e}') from e
  return patterns


def param_labels(params: Any, spec: FreezeSpec) -> Any:
  """Labels each leaf of ``params`` FROZEN or TRAINABLE.

  Raises:
    ValueError: if a pattern matches no parameter, which is almost always a
      typo that would otherwise silently train everything.
  """
  patterns = resolve(spec)
  used = set()

  def label(path, _):
    name = path_str(path)
    hits = [p for p in patterns if re.fullmatch(p, name)]
    used.update(hits)
    return FROZEN if hits else TRAINABLE

  labels = jax.tree_util.tree_map_with_path(label, params)
  unused = [p for p in patterns if p not in used]
  if unused:
    names = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    raise ValueError(
        f'Freezing patterns {unused} match no parameter. Parameter paths look'
        f' like {names[:4]}.'
    )
  return labels


def frozen_batch_norm_layers(
    params: Any, batch_stats: Any, spec: FreezeSpec
) -> tuple[str, ...]:
  """Paths of the BatchNorm layers whose scale and bias are all frozen.

  These layers must run in inference mode (`agejax.model.CNN.frozen_bn`), so
  that their running statistics are used and stay unchanged, as in Keras. A
  layer with only one of scale and bias frozen is not among them: it runs in
  training mode, normalising by batch statistics and updating its running
  ones.
  """
  labels = param_labels(params, spec)
  status = {
      path_str(p): l for p, l in jax.tree_util.tree_leaves_with_path(labels)
  }
  layers = {
      path_str(p[:-1])
      for p, _ in jax.tree_util.tree_leaves_with_path(batch_stats)
  }
  frozen = []
  for layer in layers:
    own = [l for name, l in status.items() if name.startswith(layer + '/')]
    if own and all(l == FROZEN for l in own):
      frozen.append(layer)
  return tuple(sorted(frozen))


def count_params(params: Any, spec: FreezeSpec = 'none') -> dict[str, int]:
  """Counts frozen and trainable parameters (BatchNorm statistics excluded)."""
  labels = param_labels(params, spec)
  counts = {FROZEN: 0, TRAINABLE: 0}
  for leaf, lab in zip(
      jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(labels)
  ):
    counts[lab] += int(leaf.size)
  return counts


def stage_groups(
    params: Any, spec: FreezeSpec, earlier: Sequence[FreezeSpec] = ()
) -> Any:
  """Labels each leaf with its optimizer group in a stage that follows ``earlier``.

  FROZEN, or the trainable group named after the stage since which the leaf
  has trained without a break: TRAINABLE for the first stage,
  ``'trainable_since_stage<j>'`` for stage j > 0. Each group gets its own
  optimizer state, so a layer that starts training in a later stage starts
  Adam from step 0 (with its bias correction), while the layers that keep
  training keep their moments and step count.
  """
  history = [param_labels(params, s) for s in (*earlier, spec)]

  def group(*labels):
    if labels[-1] == FROZEN:
      return FROZEN
    since = len(labels) - 1
    while since > 0 and labels[since - 1] == TRAINABLE:
      since -= 1
    return TRAINABLE if since == 0 else f'{TRAINABLE}_since_stage{since}'

  return jax.tree_util.tree_map(group, *history)


def make_optimizer(
    params: Any,
    spec: FreezeSpec,
    make_base: Callable[[], optax.GradientTransformation],
    earlier: Sequence[FreezeSpec] = (),
) -> optax.GradientTransformation:
  """Wraps ``make_base()`` so that it only updates the trainable leaves.

  Frozen leaves get `optax.set_to_zero`, which keeps no state and lets XLA
  drop their weight gradients from the compiled step. ``earlier`` are the
  freezing specs of the run's earlier stages: each group of `stage_groups`
  gets its own ``make_base()``.
  """
  labels = stage_groups(params, spec, earlier)
  groups = sorted(set(jax.tree_util.tree_leaves(labels)) - {FROZEN})
  transforms = {g: make_base() for g in groups}
  return optax.partition(
      {**transforms, FROZEN: optax.set_to_zero()}, labels
  )


def carry_opt_state(old_state: Any, new_state: Any) -> Any:
  """Copies into ``new_state`` every leaf of ``old_state`` at the same path.

  When a new stage changes the freezing or the learning rate, its optimizer is
  built afresh; Adam's moments and step count of the groups that train in
  both stages carry over (`stage_groups` keeps their labels, hence their
  paths), and a group that starts training starts from zero.
  """
  old = {
      jax.tree_util.keystr(p): v
      for p, v in jax.tree_util.tree_leaves_with_path(old_state)
  }

  def pick(path, new):
    prev = old.get(jax.tree_util.keystr(path))
    if prev is not None and getattr(prev, 'shape', None) == getattr(
        new, 'shape', None
    ):
      return prev
    return new

  return jax.tree_util.tree_map_with_path(pick, new_state)
