"""ResNet backbone (torchvision v1.5 layout) with frozen batch norm: image -> C2..C5.

Place in the pipeline: normalized image [B,H,W,3] -> ResNet -> {'C2'..'C5'} -> FPN -> RPN /
RoIAlign -> box head. ImageNet weights come from torchvision via `models.pretrained`.
Layout, variable tree and freezing: docs/code-notes.md.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ezsd_jax.core.tree_paths import path_names

Dtype = Any

# torchvision's ResNet init: kaiming normal, fan_out, ReLU gain.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

NORM_NAME_RE = re.compile(r"^(stem_bn|bn\d+|downsample_bn)$")
STAGE_NAME_RE = re.compile(r"^layer(\d+)_\d+$")
STEM_NAMES = ("stem_conv", "stem_bn")


class FrozenBatchNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * scale + bias with fixed statistics.

    `scale`/`bias` live in 'params' (so torchvision weights load there) but are wrapped in
    stop_gradient: they never train. `mean`/`var` live in 'batch_stats'. The affine form is
    folded in float32 and applied in `dtype`.
    """
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = jax.lax.stop_gradient(scale)
        bias = jax.lax.stop_gradient(bias)
        mul = scale * jax.lax.rsqrt(var.value + self.eps)
        add = bias - mean.value * mul
        return x.astype(self.dtype) * mul.astype(self.dtype) + add.astype(self.dtype)


def _conv(features: int, k: int, stride: int, dtype: Dtype, name: str) -> nn.Conv:
    pad = (k - 1) // 2  # torchvision: 7x7 pad 3, 3x3 pad 1, 1x1 pad 0
    return nn.Conv(features, (k, k), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                   param_dtype=jnp.float32, kernel_init=conv_init, name=name)


def _add_shortcut(x: jax.Array, y: jax.Array, out_ch: int, stride: int, dtype) -> jax.Array:
    """relu(y + shortcut(x)); the shortcut is a 1x1/stride conv + BN when the shape changes
    (called inside a block's compact __call__: its modules belong to that block)."""
    if stride != 1 or x.shape[-1] != out_ch:
        x = _conv(out_ch, 1, stride, dtype, "downsample_conv")(x)
        x = FrozenBatchNorm(dtype=dtype, name="downsample_bn")(x)
    return nn.relu(y + x.astype(dtype))


class BasicBlock(nn.Module):
    """torchvision BasicBlock (expansion 1): 3x3/s -> BN -> ReLU -> 3x3 -> BN (+ shortcut)."""
    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_ch = self.planes * self.expansion
        y = _conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)
        y = nn.relu(FrozenBatchNorm(dtype=self.dtype, name="bn1")(y))
        y = _conv(self.planes, 3, 1, self.dtype, "conv2")(y)
        y = FrozenBatchNorm(dtype=self.dtype, name="bn2")(y)
        return _add_shortcut(x, y, out_ch, self.stride, self.dtype)


class Bottleneck(nn.Module):
    """torchvision Bottleneck v1.5 (expansion 4): 1x1 -> 3x3/s -> 1x1, BN after each."""
    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_ch = self.planes * self.expansion
        y = _conv(self.planes, 1, 1, self.dtype, "conv1")(x)
        y = nn.relu(FrozenBatchNorm(dtype=self.dtype, name="bn1")(y))
        y = _conv(self.planes, 3, self.stride, self.dtype, "conv2")(y)
        y = nn.relu(FrozenBatchNorm(dtype=self.dtype, name="bn2")(y))
        y = _conv(out_ch, 1, 1, self.dtype, "conv3")(y)
        y = FrozenBatchNorm(dtype=self.dtype, name="bn3")(y)
        return _add_shortcut(x, y, out_ch, self.stride, self.dtype)


class ResNet(nn.Module):
    """ResNet feature extractor returning {'C2','C3','C4','C5'} (NHWC, strides 4..32).

    stage_sizes: blocks per stage ((3,4,6,3) = ResNet-50 with bottleneck=True; (2,2,2,2)
      with bottleneck=False = ResNet-18). width: stem width, stage i width width*2**i.
    frozen_stages: -1 = no stop_gradient; 0 = stop after the stem; k = after stage k. It
      only cuts the backward pass; use `trainable_mask` for the optimizer.
    dtype: compute dtype (e.g. bfloat16); parameters are always float32.
    """
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    width: int = 64
    bottleneck: bool = True
    dtype: Dtype = jnp.float32
    frozen_stages: int = -1

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"ResNet expects images [B,H,W,3], got shape {x.shape}")
        x = x.astype(self.dtype)
        x = _conv(self.width, 7, 2, self.dtype, "stem_conv")(x)
        x = nn.relu(FrozenBatchNorm(dtype=self.dtype, name="stem_bn")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        if self.frozen_stages == 0:
            x = jax.lax.stop_gradient(x)
        block_cls = Bottleneck if self.bottleneck else BasicBlock
        feats = {}
        for i, n_blocks in enumerate(self.stage_sizes):
            for b in range(n_blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                x = block_cls(self.width * 2 ** i, stride, dtype=self.dtype,
                              name=f"layer{i + 1}_{b}")(x)
            if i + 1 == self.frozen_stages:
                x = jax.lax.stop_gradient(x)
            feats[f"C{i + 2}"] = x
        return feats


def is_frozen_path(names: Sequence[str], frozen_stages: int = 1) -> bool:
    """True if a variable with these path component names is frozen (see trainable_mask)."""
    for n in names:
        if NORM_NAME_RE.match(n):
            return True
        if frozen_stages >= 0 and n in STEM_NAMES:
            return True
        m = STAGE_NAME_RE.match(n)
        if m and int(m.group(1)) <= frozen_stages:
            return True
    return False


def trainable_mask(params: Any, frozen_stages: int = 1) -> Any:
    """Pytree of bools (same structure as `params`): True = trained by the optimizer.

    False for every frozen-BN parameter (any path component named 'stem_bn', 'bn<k>' or
    'downsample_bn'), for the stem ('stem_conv', 'stem_bn') when frozen_stages >= 0, and
    for every block 'layer<s>_<b>' with s <= frozen_stages (frozen_stages=1: stem + first
    stage, the reference setting; -1: only the norms). Matching is on path component
    names, so `params` may be the ResNet's params or any tree that contains them (e.g. a
    detector's params with the backbone under 'backbone'); the other modules of
    `ezsd_jax.models` use names that never match these patterns, and come out True.
    """
    return jax.tree_util.tree_map_with_path(
        lambda p, _: not is_frozen_path(path_names(p), frozen_stages), params)
