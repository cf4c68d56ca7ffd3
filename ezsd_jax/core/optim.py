"""Optimizers and schedules for the detector (and anything else trained with SGD here).

Detectron2/mmdet-style: SGD with momentum, linear warm-up from `warmup_factor * lr`, step
decays by `gamma` at given steps, L2 weight decay (added to the gradient), gradient
clipping by global norm; frozen parameters (a boolean mask) get exactly zero updates and
no optimizer state.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax


def warmup_step_schedule(base_lr: float, warmup_steps: int, decay_steps: Sequence[int],
                         gamma: float = 0.1, warmup_factor: float = 0.001) -> optax.Schedule:
    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        alpha = jnp.clip(count / max(warmup_steps, 1), 0.0, 1.0)
        warm = jnp.where(count < warmup_steps, warmup_factor * (1 - alpha) + alpha, 1.0)
        n_decays = sum((count >= s).astype(jnp.float32) for s in decay_steps) \
            if decay_steps else 0.0
        return base_lr * warm * gamma ** n_decays
    return schedule


def sgd(schedule: optax.Schedule, momentum: float = 0.9, weight_decay: float = 1e-4,
        grad_clip: float = 0.0, trainable: Any = None) -> optax.GradientTransformation:
    """SGD(momentum) + L2 weight decay + optional clipping, only on `trainable` leaves."""
    parts = []
    if grad_clip and grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts += [optax.add_decayed_weights(weight_decay),
              optax.sgd(schedule, momentum=momentum)]
    tx = optax.chain(*parts)
    if trainable is None:
        return tx
    labels = jax.tree_util.tree_map(lambda t: "train" if t else "frozen", trainable)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def count_params(tree: Any, mask: Any = None) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    if mask is None:
        return int(sum(x.size for x in leaves))
    return int(sum(x.size for x, m in zip(leaves, jax.tree_util.tree_leaves(mask)) if m))
