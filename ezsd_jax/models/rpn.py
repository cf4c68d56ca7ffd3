"""RPN head: FPN levels -> per-anchor objectness logits and box deltas.

Place in the pipeline: FPN [P2..P6] -> RPNHead -> (decode with anchors, NMS: ezsd_jax.ops)
-> proposals -> RoIAlign -> box head. Layers, output order and init: docs/code-notes.md.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class RPNHead(nn.Module):
    """__call__(features [B,H_l,W_l,C] per level) -> (objectness [B,H_l*W_l*A] per level,
    deltas [B,H_l*W_l*A,4] per level)."""
    num_anchors: int = 3
    channels: Optional[int] = None  # conv width; None = input channels
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]
                 ) -> tuple[list[jax.Array], list[jax.Array]]:
        if not features:
            raise ValueError("RPNHead: empty feature list")
        channels = self.channels or features[0].shape[-1]
        a = self.num_anchors
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.normal(0.01),
                  bias_init=nn.initializers.zeros)
        conv = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), name="conv", **kw)
        cls = nn.Conv(a, (1, 1), name="objectness", **kw)
        reg = nn.Conv(4 * a, (1, 1), name="deltas", **kw)
        objectness, deltas = [], []
        for f in features:
            b, h, w, _ = f.shape
            t = nn.relu(conv(f))
            objectness.append(cls(t).astype(jnp.float32).reshape(b, h * w * a))
            deltas.append(reg(t).astype(jnp.float32).reshape(b, h * w * a, 4))
        return objectness, deltas
