"""Classification models for ISAL (Flax linen): a small MLP, a small CNN, CIFAR ResNet-18.

Place in the pipeline: the classification task adapter (isal_jax/tasks/classification.py)
wraps these; the influence engine only ever sees `loss_fn(params, batch)`.

Every model is called as `model.apply(variables, x, train=False, return_features=False)`
and returns logits [B, num_classes] (or `(logits, features)` with `return_features=True`,
features = the penultimate activations used by the core-set baseline). BatchNorm uses its
running averages when `train=False` (inference mode: per-sample losses are independent).
`dtype` is the compute dtype (params stay float32).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


class MLP(nn.Module):
    """Flatten -> [Dense -> relu] * len(features) -> Dense(num_classes)."""
    num_classes: int = 10
    features: Sequence[int] = (64,)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        x = x.reshape((x.shape[0], -1)).astype(self.dtype)
        for f in self.features:
            x = nn.relu(nn.Dense(f, dtype=self.dtype)(x))
        logits = nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
        return (logits, x.astype(jnp.float32)) if return_features else logits


class SmallCNN(nn.Module):
    """[3x3 conv -> (BN) -> relu -> 2x2 avg pool] per channel entry -> global mean -> Dense."""
    num_classes: int = 10
    channels: Sequence[int] = (16, 32)
    use_bn: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        x = x.astype(self.dtype)
        for c in self.channels:
            x = nn.Conv(c, (3, 3), padding="SAME", use_bias=not self.use_bn, dtype=self.dtype)(x)
            if self.use_bn:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 dtype=self.dtype)(x)
            x = nn.relu(x)
            if min(x.shape[1:3]) >= 2:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        feats = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=self.dtype)(feats).astype(jnp.float32)
        return (logits, feats.astype(jnp.float32)) if return_features else logits


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs, BN, identity or 1x1-conv+BN shortcut)."""
    filters: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9,  # noqa: E731
                                    epsilon=1e-5, dtype=self.dtype)
        y = nn.Conv(self.filters, (3, 3), (self.strides, self.strides), padding=((1, 1), (1, 1)),
                    use_bias=False, dtype=self.dtype)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.filters, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    dtype=self.dtype)(y)
        y = norm()(y)
        if self.strides != 1 or x.shape[-1] != self.filters:
            x = nn.Conv(self.filters, (1, 1), (self.strides, self.strides), use_bias=False,
                        dtype=self.dtype)(x)
            x = norm()(x)
        return nn.relu(x + y)


class CifarResNet18(nn.Module):
    """ResNet-18, CIFAR variant: 3x3 stride-1 stem, no max-pool, stages `widths`
    (64/128/256/512, strides 1/2/2/2, two basic blocks each), global average pool, FC."""
    num_classes: int = 10
    widths: Sequence[int] = (64, 128, 256, 512)
    blocks: Sequence[int] = (2, 2, 2, 2)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        x = x.astype(self.dtype)
        x = nn.Conv(self.widths[0], (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    dtype=self.dtype)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 dtype=self.dtype)(x))
        for i, (w, n) in enumerate(zip(self.widths, self.blocks)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                x = BasicBlock(w, strides=stride, dtype=self.dtype)(x, train)
        feats = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=self.dtype)(feats).astype(jnp.float32)
        return (logits, feats.astype(jnp.float32)) if return_features else logits


def get_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Model by config name: 'mlp' | 'cnn' | 'resnet18'. kwargs go to the module
    (e.g. features=(64,), channels=(16, 32), widths=(16, 32, 64, 128), dtype=jnp.bfloat16)."""
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    for k in ("features", "channels", "widths", "blocks"):
        if k in kwargs:
            kwargs[k] = tuple(int(v) for v in kwargs[k])
    table = {"mlp": MLP, "cnn": SmallCNN, "resnet18": CifarResNet18}
    if name not in table:
        raise ValueError(f"model.name={name!r} is not one of {sorted(table)}")
    try:
        return table[name](num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ValueError(f"model {name!r}: bad model option(s) {sorted(kwargs)}: {e}") from e
