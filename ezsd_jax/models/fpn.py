"""Feature pyramid network: backbone {'C2'..'C5'} -> [P2, P3, P4, P5, P6] (strides 4..64).

Place in the pipeline: ResNet -> FPN -> RPN (all five levels) and RoIAlign (P2..P5).
Lateral / top-down layout, nearest upsampling and init: docs/code-notes.md.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

xavier_fill = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def _nearest_axis(x: jax.Array, axis: int, n_out: int) -> jax.Array:
    n_in = x.shape[axis]
    if n_out == n_in:
        return x
    if n_out in (2 * n_in, 2 * n_in - 1):
        y = jnp.repeat(x, 2, axis=axis)
        return jax.lax.slice_in_dim(y, 0, n_out, axis=axis)
    idx = np.floor(np.arange(n_out) * (n_in / n_out)).astype(np.int32)
    return jnp.take(x, np.minimum(idx, n_in - 1), axis=axis)


def upsample_nearest(x: jax.Array, height: int, width: int) -> jax.Array:
    """Nearest resize of [B,H,W,C] to [B,height,width,C] (torch 'nearest' index rule)."""
    return _nearest_axis(_nearest_axis(x, 1, height), 2, width)


class FPN(nn.Module):
    """FPN neck. __call__(feats {'C2'..'C5'}) -> [P2, P3, P4, P5, P6], each [B,H_l,W_l,C]."""
    out_channels: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: dict[str, jax.Array]) -> list[jax.Array]:
        missing = [k for k in ("C2", "C3", "C4", "C5") if k not in feats]
        if missing:
            raise KeyError(f"FPN: backbone features {missing} missing (got {list(feats)})")

        def conv(k: int, name: str) -> nn.Conv:
            pad = (k - 1) // 2
            return nn.Conv(self.out_channels, (k, k), padding=((pad, pad), (pad, pad)),
                           dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=xavier_fill, bias_init=nn.initializers.zeros,
                           name=name)

        outs: dict[int, jax.Array] = {}
        prev = None
        for level in (5, 4, 3, 2):
            lat = conv(1, f"lateral_{level}")(feats[f"C{level}"])
            if prev is not None:
                lat = lat + upsample_nearest(prev, lat.shape[1], lat.shape[2])
            prev = lat
            outs[level] = conv(3, f"output_{level}")(lat)
        p6 = outs[5][:, ::2, ::2]
        return [outs[2], outs[3], outs[4], outs[5], p6]
