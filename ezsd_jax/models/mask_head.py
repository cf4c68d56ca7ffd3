"""Mask R-CNN mask branch: the FCN mask head and its loss.

Place in the pipeline: 14x14 RoIAlign of the positive RoIs (training) or of the final
detections (test) -> MaskHead -> 28x28 logits -> `mask_loss` against ops.masks targets, or
sigmoid and ops.masks.paste_masks at test. Class-agnostic (one channel) like the reference;
layers, init and torch weight layout: docs/code-notes.md.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ezsd_jax.models.box_head import msra_fill

Dtype = Any


class MaskHead(nn.Module):
    """__call__(roi_feats [..., S, S, C]) -> logits [..., 2S, 2S, num_classes] (float32)."""
    num_classes: int = 1        # 1 = class-agnostic (the reference)
    num_convs: int = 4
    conv_dim: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim < 3:
            raise ValueError(f"MaskHead expects [..., S, S, C], got {x.shape}")
        lead = x.shape[:-3]
        x = x.reshape((-1,) + x.shape[-3:])
        for i in range(self.num_convs):
            x = nn.Conv(self.conv_dim, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                        param_dtype=jnp.float32, kernel_init=msra_fill,
                        bias_init=nn.initializers.zeros, name=f"conv_{i}")(x)
            x = nn.relu(x)
        x = nn.ConvTranspose(self.conv_dim, (2, 2), strides=(2, 2), padding="VALID",
                             dtype=self.dtype, param_dtype=jnp.float32,
                             kernel_init=msra_fill, bias_init=nn.initializers.zeros,
                             name="deconv")(x)
        x = nn.relu(x)
        x = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=msra_fill, bias_init=nn.initializers.zeros,
                    name="logits")(x)
        x = x.astype(jnp.float32)
        return x.reshape(lead + x.shape[1:])


def select_channel(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """[..., M, M, K] logits -> [..., M, M]: channel 0 when K == 1 (class-agnostic, every
    category incl. novel ones), else the channel of `labels` [...] (clipped to [0, K))."""
    k = logits.shape[-1]
    if k == 1:
        return logits[..., 0]
    idx = jnp.clip(labels.astype(jnp.int32), 0, k - 1)
    return jnp.take_along_axis(logits, idx[..., None, None, None], axis=-1)[..., 0]


def mask_loss(logits: jax.Array, targets: jax.Array, labels: jax.Array,
              weight: jax.Array) -> jax.Array:
    """mmdetection's mask loss: per-pixel binary cross-entropy with logits on the selected
    channel, mean over the pixels of the counted RoIs (weight [...] 1/0: positive RoIs with
    a valid GT; padding and negatives 0). logits [..., M, M, K], targets [..., M, M]. The
    reference takes the mean over the positives of a GPU's images; this is the mean over
    all counted RoIs of the batch. No counted RoI -> 0."""
    x = select_channel(logits, labels).astype(jnp.float32)
    t = targets.astype(jnp.float32)
    bce = jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
    w = weight.astype(jnp.float32)
    per_roi = bce.sum(axis=(-2, -1))
    pixels = float(x.shape[-1] * x.shape[-2])
    return (per_roi * w).sum() / jnp.maximum(w.sum() * pixels, 1.0)


__all__ = ["MaskHead", "mask_loss", "select_channel"]
