"""Frozen configuration dataclasses for models, steps, stages and runs.

The library takes these as arguments and never reads flags; the programs in
``experiments/`` build them from absl flags. All are hashable, so a
`StepConfig` can be a static argument of a jitted step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from agejax import augment as augment_lib
from agejax import model as model_lib

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The CNN's shape; defaults are the study's final age model."""

  num_classes: int = 100
  conv_filters: tuple[tuple[int, ...], ...] = model_lib.STUDY_CONV_FILTERS
  dense_units: tuple[int, ...] = model_lib.AGE_DENSE_UNITS
  conv_dropout: float = 0.25
  dense_dropout: float = 0.5
  bn_momentum: float = 0.99
  conv_impl: str = 'auto'
  dtype: str = 'float32'
  image_size: int = 48
  channels: int = 1

  def __post_init__(self):
    if self.dtype not in _DTYPES:
      raise ValueError(f'dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}')

  @property
  def input_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)

  def build(self, frozen_bn: tuple[str, ...] = ()) -> model_lib.CNN:
    return model_lib.CNN(
        num_classes=self.num_classes,
        conv_filters=self.conv_filters,
        dense_units=self.dense_units,
        conv_dropout=self.conv_dropout,
        dense_dropout=self.dense_dropout,
        bn_momentum=self.bn_momentum,
        frozen_bn=frozen_bn,
        conv_impl=self.conv_impl,
        dtype=_DTYPES[self.dtype],
    )


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
  """Inverse of ``dataclasses.asdict`` after a JSON round trip (lists -> tuples)."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = set(d) - fields
  if unknown:
    raise ValueError(f'Unknown ModelConfig fields {sorted(unknown)} in {d}.')
  d = dict(d)
  if 'conv_filters' in d:
    d['conv_filters'] = tuple(tuple(f) for f in d['conv_filters'])
  if 'dense_units' in d:
    d['dense_units'] = tuple(d['dense_units'])
  return ModelConfig(**d)


def fer_model_config(**overrides: Any) -> ModelConfig:
  """The study's FER2013 network: head (512, 256) -> 7 emotions."""
  return ModelConfig(
      **{'num_classes': 7, 'dense_units': model_lib.FER_DENSE_UNITS, **overrides}
  )


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What a train or eval step computes, beyond the model.

  Attributes:
    label_smoothing: Softmax cross-entropy label smoothing.
    class_weights: Per-class loss weights (e.g. from
      `agejax.data.balance.class_weights`), or None for uniform.
    augment: On-device augmentation applied in the train step.
    class_values: The age (years) each class stands for, used for MAE and
      expected-value decoding; None means class ``i`` is ``i`` years.
    ordinal: Whether the classes are ordered values (ages, age ranges). Only
      then are MAE, CS(k) and the tolerance-adjusted scores reported: for
      nominal classes such as FER's emotions a distance between class indices
      means nothing.
  """

  label_smoothing: float = 0.0
  class_weights: tuple[float, ...] | None = None
  augment: augment_lib.AugmentConfig = augment_lib.AugmentConfig()
  class_values: tuple[float, ...] | None = None
  ordinal: bool = True


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One fine-tuning stage: its epochs, Adam learning rate and freezing."""

  name: str
  epochs: int
  learning_rate: float
  freeze: str | tuple[str, ...] = 'none'


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything `agejax.train.train_and_evaluate` needs besides the data.

  Attributes:
    model: The network.
    stages: Stages run in order; the optimizer state carries across them
      (`agejax.freezing.stage_groups`: layers that keep training keep their
      Adam moments, newly unfrozen ones start fresh). A Keras ``compile``
      between stages would reset every moment instead.
    step: Loss, augmentation and metric settings.
    batch_size: Global training batch size (split across devices).
    eval_batch_size: Global evaluation batch size; the last batch is padded
      and masked.
    seed: Seeds initialisation, shuffling, dropout and augmentation.
    init_from: A FER (or any agejax) checkpoint directory to transfer from,
      or None to train from random initialisation.
    dont_load: Parameter-path regexes never copied on transfer.
    select_metric: Validation metric that picks the best checkpoint.
    select_mode: 'max' or 'min' for ``select_metric``.
    epoch_mode: 'scan' runs an epoch as one compiled program, the training
      set held on every device; 'loop' calls a jitted step per batch with a
      progress bar; 'auto' picks loop on CPU (as fast there, and it shows
      progress) and, on accelerators, scan when the training set takes at
      most a quarter of a device's memory (`agejax.train.resolve_epoch_mode`).
    history_metrics: Validation scores logged each epoch and kept in the
      run's history (see `agejax.evaluate.summarize` for the names).
  """

  model: ModelConfig = ModelConfig()
  stages: tuple[StageConfig, ...] = (
      StageConfig('stage1', epochs=10, learning_rate=1e-4, freeze='paper'),
      StageConfig('stage2', epochs=10, learning_rate=1e-5, freeze='none'),
  )
  step: StepConfig = StepConfig()
  batch_size: int = 64
  eval_batch_size: int = 256
  seed: int = 0
  init_from: str | None = None
  dont_load: tuple[str, ...] = ()
  select_metric: str = 'accuracy'
  select_mode: str = 'max'
  epoch_mode: str = 'auto'
  history_metrics: tuple[str, ...] = (
      'loss', 'accuracy', 'mae', 'mae_expected', 'cs@1', 'cs@2', 'cs@3',
      'macro_f1', 'weighted_f1',
  )

  def __post_init__(self):
    if not self.stages:
      raise ValueError('TrainConfig needs at least one stage.')
    if self.select_mode not in ('max', 'min'):
      raise ValueError(f"select_mode must be 'max' or 'min', got {self.select_mode!r}")
    if self.epoch_mode not in ('scan', 'loop', 'auto'):
      raise ValueError(
          f"epoch_mode must be 'scan', 'loop' or 'auto', got {self.epoch_mode!r}"
      )
