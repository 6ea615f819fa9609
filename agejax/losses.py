"""Classification losses for age estimation.

Per-example losses are returned unreduced so the caller chooses the reduction
(``masked_mean`` for padded batches). All functions are pure and jittable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
    class_weights: jax.Array | None = None,
) -> jax.Array:
  """Per-example softmax cross-entropy with optional smoothing and class weights.

  With targets ``t`` (one-hot of integer labels, or the given ``[B, C]``
  one-hot / soft labels) the loss of example ``b`` is

      ``w_b * -sum_c t'_bc * log_softmax(logits)_bc``,
      ``t' = (1 - label_smoothing) * t + label_smoothing / C``

  (the optax / Keras smoothing convention). The weight ``w_b`` is
  ``class_weights[labels_b]`` for integer labels and ``t_b @ class_weights``
  (the unsmoothed target's expected class weight) for ``[B, C]`` labels; it
  is 1 without ``class_weights``. The per-example weighting matches Keras'
  ``class_weight``: averaging the result over examples divides by the
  number of examples, not by the sum of weights.

  Integer labels outside ``[0, C)`` give a zero loss, with or without
  smoothing; this cannot be checked under ``jit``, so callers must pass
  valid labels (or mask such examples out).

  Args:
    logits: ``[B, C]`` unnormalised scores.
    labels: ``[B]`` integer class indices, or ``[B, C]`` targets whose rows
      sum to 1 (detected by ``ndim``).
    label_smoothing: Python float in ``[0, 1)``.
    class_weights: Optional ``[C]`` per-class weights.

  Returns:
    ``[B]`` per-example losses in the dtype of ``logits``.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim != 2:
    raise ValueError(f"logits must have shape [B, C], got {logits.shape}.")
  batch, num_classes = logits.shape
  if labels.ndim == 1:
    if labels.shape != (batch,):
      raise ValueError(f"integer labels must have shape ({batch},), got {labels.shape}.")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f"[B] labels must be integer class indices, got {labels.dtype}.")
    targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
  elif labels.ndim == 2:
    if labels.shape != logits.shape:
      raise ValueError(
          f"[B, C] labels must match logits shape {logits.shape}, got {labels.shape}."
      )
    targets = labels.astype(logits.dtype)
  else:
    raise ValueError(f"labels must have shape [B] or [B, C], got {labels.shape}.")
  if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}.")

  smoothed = (1.0 - label_smoothing) * targets + label_smoothing / num_classes
  loss = -jnp.sum(smoothed * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  if labels.ndim == 1:
    loss = jnp.where((labels >= 0) & (labels < num_classes), loss, 0)
  if class_weights is None:
    return loss
  class_weights = jnp.asarray(class_weights, dtype=logits.dtype)
  if class_weights.shape != (num_classes,):
    raise ValueError(
        f"class_weights must have shape ({num_classes},), got {class_weights.shape}."
    )
  # Not ``targets @ class_weights``: a matmul would round the weights on TPU and GPU.
  return loss * jnp.sum(targets * class_weights, axis=-1)


def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean of ``values`` over the examples where ``mask`` is set.

  Computes ``sum(values * mask) / sum(mask)`` with ``mask`` cast to the
  float dtype of ``values`` (a float mask acts as per-example weights), so a
  padded batch averages over its real examples only. An all-zero mask gives
  0 rather than NaN, keeping gradients finite on an empty batch. Masked-out
  entries are excluded with ``where``, so NaN/inf padding cannot leak in.

  Args:
    values: ``[B]`` per-example values (e.g. losses).
    mask: Optional ``[B]`` bool or float mask; ``None`` means all ones.

  Returns:
    Scalar mean.
  """
  values = jnp.asarray(values)
  if values.ndim != 1:
    raise ValueError(f"values must have shape [B], got {values.shape}.")
  if mask is None:
    return jnp.mean(values)
  mask = jnp.asarray(mask)
  if mask.shape != values.shape:
    raise ValueError(f"mask must have shape {values.shape}, got {mask.shape}.")
  mask = mask.astype(values.dtype)
  total = jnp.sum(mask)
  weighted = jnp.where(mask != 0, values * mask, 0)
  return jnp.sum(weighted) / jnp.where(total > 0, total, 1)
