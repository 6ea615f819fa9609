"""Train state, and the pure jitted train and eval steps.

Batches are dicts: ``image`` uint8 [B, H, W, C], ``label`` int32 [B], ``mask``
bool [B] (False marks padding), and optionally ``age`` int32 [B] (years; used
for MAE when classes are age ranges). Steps return *sums and counts*, never
batch means, so that totals over an epoch are exact whatever the padding.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from agejax import augment as augment_lib
from agejax import config as config_lib
from agejax import freezing
from agejax import losses
from agejax import metrics

Batch = dict[str, jax.Array]


class TrainState(train_state.TrainState):
  """Flax's train state plus the BatchNorm running statistics."""

  batch_stats: Any


def init_variables(
    rng: jax.Array, model: nn.Module, input_shape: tuple[int, int, int]
) -> dict[str, Any]:
  """Initialises ``{'params', 'batch_stats'}`` for images of ``input_shape``.

  Compiled once per model configuration and input shape in a process (flax
  modules compare and hash by their fields), not on every call: on a 2-core
  CPU compiling the study network's initialisation takes ~2 s.
  """
  variables = _init(rng, model, tuple(input_shape))
  return {'params': variables['params'], 'batch_stats': variables['batch_stats']}


@functools.partial(jax.jit, static_argnames=('model', 'input_shape'))
def _init(
    rng: jax.Array, model: nn.Module, input_shape: tuple[int, ...]
) -> dict[str, Any]:
  return model.init(rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)


def _stage_parts(
    model_config: config_lib.ModelConfig,
    stage: config_lib.StageConfig,
    variables: dict[str, Any],
    earlier_stages: Sequence[config_lib.StageConfig],
) -> tuple[nn.Module, optax.GradientTransformation]:
  """The stage's model (its frozen BatchNorm layers) and optimizer.

  Both depend on the variables' paths only, and are built once per
  configuration in a process: the optimizer is part of the train state's
  tree structure, so a new but equal optimizer would make every jitted step
  compile again for each run of the same configuration.
  """
  return _stage_parts_for(
      model_config,
      freezing.resolve(stage.freeze),
      stage.learning_rate,
      tuple(freezing.resolve(s.freeze) for s in earlier_stages),
      jax.tree.structure(variables['params']),
      jax.tree.structure(variables['batch_stats']),
  )


@functools.cache
def _stage_parts_for(
    model_config: config_lib.ModelConfig,
    freeze: tuple[str, ...],
    learning_rate: float,
    earlier: tuple[tuple[str, ...], ...],
    params_def: Any,
    batch_stats_def: Any,
) -> tuple[nn.Module, optax.GradientTransformation]:
  params, batch_stats = (
      jax.tree.unflatten(d, range(d.num_leaves)) for d in (params_def, batch_stats_def)
  )
  frozen_bn = freezing.frozen_batch_norm_layers(params, batch_stats, freeze)
  tx = freezing.make_optimizer(
      params, freeze, lambda: optax.adam(learning_rate), earlier=earlier
  )
  return model_config.build(frozen_bn), tx


def create_train_state(
    model_config: config_lib.ModelConfig,
    stage: config_lib.StageConfig,
    variables: dict[str, Any],
    earlier_stages: Sequence[config_lib.StageConfig] = (),
) -> TrainState:
  """A fresh train state for ``stage`` (its freezing and learning rate).

  ``earlier_stages`` (the run's stages before ``stage``) give the optimizer
  state its structure (`agejax.freezing.stage_groups`), e.g. to restore a
  checkpoint saved during ``stage``.
  """
  model, tx = _stage_parts(model_config, stage, variables, earlier_stages)
  return TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      tx=tx,
  )


def start_stage(
    state: TrainState,
    model_config: config_lib.ModelConfig,
    stage: config_lib.StageConfig,
    earlier_stages: Sequence[config_lib.StageConfig],
) -> TrainState:
  """Switches ``state`` from the last of ``earlier_stages`` to ``stage``.

  Adam's moments and step count of the leaves that train in both stages carry
  over (`agejax.freezing.carry_opt_state`); leaves that start training get
  their own Adam state from step 0 (`agejax.freezing.stage_groups`).
  ``state.step`` continues.
  """
  if not earlier_stages:
    raise ValueError('start_stage needs the stages before the new one.')
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  model, tx = _stage_parts(model_config, stage, variables, earlier_stages)
  opt_state = freezing.carry_opt_state(state.opt_state, tx.init(state.params))
  return state.replace(apply_fn=model.apply, tx=tx, opt_state=opt_state)


def _images(batch: Batch) -> jax.Array:
  return batch['image'].astype(jnp.float32) / 255.0


def _eval_logits(state: TrainState, batch: Batch) -> jax.Array:
  """Logits in inference mode: BatchNorm on its running statistics, no dropout."""
  return state.apply_fn(
      {'params': state.params, 'batch_stats': state.batch_stats},
      _images(batch),
      train=False,
  )


def _train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    config: config_lib.StepConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
  aug_rng, dropout_rng = jax.random.split(rng)
  images = _images(batch)
  if not config.augment.is_identity:
    images = augment_lib.augment_batch(aug_rng, images, config.augment)
  labels = batch['label']
  mask = batch['mask'].astype(jnp.float32)
  class_weights = (
      None
      if config.class_weights is None
      else jnp.asarray(config.class_weights, jnp.float32)
  )

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats},
        images,
        train=True,
        rngs={'dropout': dropout_rng},
        mutable=['batch_stats'],
    )
    per_example = losses.softmax_cross_entropy(
        logits,
        labels,
        label_smoothing=config.label_smoothing,
        class_weights=class_weights,
    )
    loss_sum = jnp.sum(per_example * mask)
    return loss_sum / jnp.maximum(jnp.sum(mask), 1.0), (
        loss_sum,
        logits,
        updates,
    )

  grads, (loss_sum, logits, updates) = jax.grad(loss_fn, has_aux=True)(
      state.params
  )
  state = state.apply_gradients(grads=grads, batch_stats=updates['batch_stats'])
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
  return state, {'loss_sum': loss_sum, 'correct': correct, 'count': jnp.sum(mask)}


@functools.partial(
    jax.jit, static_argnames=('config',), donate_argnames=('state',)
)
def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    config: config_lib.StepConfig = config_lib.StepConfig(),
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a full batch.

  Augmentation and dropout are keyed by ``rng``; the caller derives it from
  the run's seed, epoch and step, so a run is reproducible and resumable.

  ``state`` is donated (its buffers are reused for the new state): its arrays,
  and those of the variables it was created from, cannot be used after the
  call. Copy them first (``jax.tree.map(jnp.copy, variables)``) to keep them.

  Returns:
    The new state, and ``loss_sum``, ``correct`` and ``count`` over the
    batch's unmasked examples.
  """
  return _train_step(state, batch, rng, config)


def epoch_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Splits an epoch's key into (shuffle key, step key); step i uses
  ``jax.random.fold_in(step_key, i)``."""
  perm_key, step_key = jax.random.split(key)
  return perm_key, step_key


def epoch_indices(key: jax.Array, n: int, batch_size: int) -> jax.Array:
  """A shuffled [steps, batch_size] index matrix; the remainder is dropped."""
  steps = n // batch_size
  if steps == 0:
    raise ValueError(
        f'Training set of {n} examples is smaller than one batch of {batch_size}.'
    )
  perm = jax.random.permutation(key, n)
  return perm[: steps * batch_size].reshape(steps, batch_size)


@functools.partial(
    jax.jit,
    static_argnames=('config', 'batch_size', 'batch_sharding'),
    donate_argnames=('state',),
)
def train_epoch(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    batch_size: int,
    config: config_lib.StepConfig = config_lib.StepConfig(),
    batch_sharding: jax.sharding.Sharding | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One whole epoch as a single compiled program (a `lax.scan` over batches).

  ``images`` and ``labels`` are the whole training set, already on device.
  Shuffling and the per-step keys come from `epoch_keys`, as in the per-step
  loop, so both modes train identically. ``state`` is donated, as in
  `train_step`.
  """
  perm_key, step_key = epoch_keys(key)
  indices = epoch_indices(perm_key, images.shape[0], batch_size)

  def body(state, xs):
    step, idx = xs
    batch = {
        'image': images[idx],
        'label': labels[idx],
        'mask': jnp.ones((batch_size,), bool),
    }
    if batch_sharding is not None:
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return _train_step(state, batch, jax.random.fold_in(step_key, step), config)

  steps = jnp.arange(indices.shape[0])
  state, per_step = jax.lax.scan(body, state, (steps, indices))
  return state, jax.tree.map(jnp.sum, per_step)


@functools.partial(jax.jit, static_argnames=('config',))
def eval_step(
    state: TrainState,
    batch: Batch,
    *,
    config: config_lib.StepConfig = config_lib.StepConfig(),
) -> dict[str, jax.Array]:
  """Sums over a (possibly padded) batch, for exact epoch totals.

  Returns ``loss_sum`` (plain cross-entropy: no label smoothing, no class
  weights, so that validation losses compare across runs whatever they trained
  with; the training loss is on another scale when they are set), ``count``,
  the ``confusion`` matrix (rows true, columns predicted) and absolute errors
  in years summed for three decodings of the predicted distribution:
  ``abs_err_argmax``, ``abs_err_expected`` (DEX) and ``abs_err_median``. The
  true age is ``batch['age']`` when present, else the
  value of the true class.
  """
  logits = _eval_logits(state, batch)
  num_classes = logits.shape[-1]
  labels = batch['label']
  mask = batch['mask']
  probs = jax.nn.softmax(logits)
  values = _class_values(config, num_classes)
  true_age = (
      batch['age'].astype(jnp.float32) if 'age' in batch else values[labels]
  )
  preds = metrics.decode_argmax(logits)
  decoded = {
      'argmax': values[preds],
      'expected': metrics.decode_expected(probs, values),
      'median': values[metrics.decode_median(probs)],
  }
  per_example_loss = losses.softmax_cross_entropy(logits, labels)
  out = {
      'loss_sum': jnp.sum(jnp.where(mask, per_example_loss, 0.0)),
      'count': metrics.valid_count(labels, mask),
      'confusion': metrics.confusion_matrix(labels, preds, num_classes, mask),
  }
  for name, age in decoded.items():
    out[f'abs_err_{name}'] = metrics.abs_error_sum(true_age, age, mask)
  return out


@functools.partial(jax.jit, static_argnames=('config',))
def predict_step(
    state: TrainState,
    batch: Batch,
    *,
    config: config_lib.StepConfig = config_lib.StepConfig(),
) -> dict[str, jax.Array]:
  """Per-example predictions of a batch (padding included; drop it by ``mask``).

  Returns ``pred``, the argmax class (int32 ``[B]``), and ``expected``, the
  expected class value of the predicted distribution (DEX; years for age
  classes, range values for ``config.class_values``), float32 ``[B]``.
  """
  logits = _eval_logits(state, batch)
  values = _class_values(config, logits.shape[-1])
  return {
      'pred': metrics.decode_argmax(logits),
      'expected': metrics.decode_expected(jax.nn.softmax(logits), values),
  }


def _class_values(config: config_lib.StepConfig, num_classes: int) -> jax.Array:
  """The value of each class: ``config.class_values``, else the class index."""
  if config.class_values is None:
    return jnp.arange(num_classes, dtype=jnp.float32)
  return jnp.asarray(config.class_values, jnp.float32)
