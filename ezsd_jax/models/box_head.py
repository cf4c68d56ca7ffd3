"""Second-stage box head: RoI features [B,R,7,7,C] -> region features -> logits / deltas.

Place in the pipeline: RoIAlign (ezsd_jax.ops) -> BoxHead -> LinearClassifier (plain Faster
R-CNN) or the EZSD cosine classifier (built in the detector) and BoxRegressor. Logits have
num_classes + 1 columns, BACKGROUND LAST (project-wide). Layers, init and the branched heads
of mmdet ("301212"): docs/code-notes.md.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

msra_fill = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
xavier_fill = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


class BoxHead(nn.Module):
    """__call__(roi_feats [B,R,S,S,C]) -> [B,R,fc_dim] (or [B,R,S,S,conv_dim] if num_fcs=0)."""
    num_convs: int = 0
    conv_dim: int = 256
    num_fcs: int = 2
    fc_dim: int = 1024
    norm: Optional[str] = None  # None or 'gn' (GroupNorm, 32 groups) after each conv
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:2]
        if x.ndim == 5:
            x = x.reshape((-1,) + x.shape[2:])
            for i in range(self.num_convs):
                x = nn.Conv(self.conv_dim, (3, 3), padding=((1, 1), (1, 1)),
                            use_bias=self.norm is None, dtype=self.dtype,
                            param_dtype=jnp.float32, kernel_init=msra_fill,
                            bias_init=nn.initializers.zeros, name=f"conv_{i}")(x)
                if self.norm == "gn":
                    x = nn.GroupNorm(num_groups=32, dtype=self.dtype,
                                     param_dtype=jnp.float32, name=f"conv_{i}_gn")(x)
                elif self.norm is not None:
                    raise ValueError(f"BoxHead.norm: unknown norm {self.norm!r}")
                x = nn.relu(x)
            if self.num_fcs == 0:
                return x.reshape(lead + x.shape[1:])
            x = x.reshape(lead + (-1,))
        elif x.ndim == 3:
            if self.num_convs:
                raise ValueError(
                    f"BoxHead with num_convs={self.num_convs} needs [B,R,S,S,C], got {x.shape}")
        else:
            raise ValueError(f"BoxHead expects [B,R,S,S,C] or [B,R,D], got {x.shape}")
        for i in range(self.num_fcs):
            x = nn.Dense(self.fc_dim, dtype=self.dtype, param_dtype=jnp.float32,
                         kernel_init=xavier_fill, bias_init=nn.initializers.zeros,
                         name=f"fc_{i}")(x)
            x = nn.relu(x)
        return x


BOX_HEAD_SPEC_FIELDS = ("num_shared_convs", "num_shared_fcs", "num_cls_convs", "num_cls_fcs",
                        "num_reg_convs", "num_reg_fcs")


def parse_box_head_spec(spec) -> tuple[int, ...]:
    """mmdet's six-digit head name ('301212') or six ints -> the counts of
    BOX_HEAD_SPEC_FIELDS. As mmdet: branch convs need num_shared_fcs == 0, and each branch
    must end in features (some layer somewhere)."""
    if isinstance(spec, str):
        if len(spec) != 6 or not spec.isdigit():
            raise ValueError(f"model.box_head_spec: need six digits ({', '.join(BOX_HEAD_SPEC_FIELDS)}"
                             f"), e.g. '301212'; got {spec!r}")
        out = tuple(int(ch) for ch in spec)
    else:
        out = tuple(int(v) for v in spec)
        if len(out) != 6 or min(out) < 0:
            raise ValueError(f"model.box_head_spec: need six counts >= 0, got {spec!r}")
    if (out[2] or out[4]) and out[1]:
        raise ValueError(f"model.box_head_spec {spec!r}: branch convs need num_shared_fcs=0 "
                         "(mmdet ConvFCBBoxHead)")
    if not sum(out):
        raise ValueError(f"model.box_head_spec {spec!r}: the head has no layer")
    return out


def branch_heads(spec: Sequence[int], conv_dim: int, fc_dim: int, dtype: Dtype,
                 norm: Optional[str] = None, named: bool = False
                 ) -> tuple["BoxHead", "BoxHead", "BoxHead"]:
    """(shared, cls_head, reg_head) BoxHeads of a parsed spec. In a parent's setup assign
    them to attributes of those names; in a compact method pass named=True."""
    sc, sf, cc, cf, rc, rf = spec
    names = ("shared", "cls_head", "reg_head") if named else (None,) * 3
    return tuple(BoxHead(num_convs=nc, conv_dim=conv_dim, num_fcs=nf, fc_dim=fc_dim,
                         norm=norm, dtype=dtype, **({"name": n} if n else {}))
                 for (nc, nf), n in zip(((sc, sf), (cc, cf), (rc, rf)), names))


def flatten_rois(x: jax.Array) -> jax.Array:
    """[B,R,...] -> [B,R,D] (H, W, C order; a branch that ends without FCs)."""
    return x.reshape(x.shape[:2] + (-1,))


class LinearClassifier(nn.Module):
    """__call__(x [B,R,D]) -> logits [B,R,num_classes+1], background = last column."""
    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        logits = nn.Dense(self.num_classes + 1, dtype=self.dtype, param_dtype=jnp.float32,
                          kernel_init=nn.initializers.normal(0.01),
                          bias_init=nn.initializers.zeros, name="cls_score")(x)
        return logits.astype(jnp.float32)


class BoxRegressor(nn.Module):
    """Class-agnostic box deltas: __call__(x [B,R,D], extra [B,R,E] | None) -> [B,R,4].

    `extra` (EZSD semantic regression: the 512-d text embedding of the assigned / predicted
    class, zeros for background) is concatenated to x before the Linear(D+E -> 4).
    """
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, extra: Optional[jax.Array] = None) -> jax.Array:
        if extra is not None:
            if extra.shape[:-1] != x.shape[:-1]:
                raise ValueError(f"BoxRegressor: extra {extra.shape} does not match x "
                                 f"{x.shape} in the leading dims")
            x = jnp.concatenate([x.astype(self.dtype), extra.astype(self.dtype)], axis=-1)
        deltas = nn.Dense(4, dtype=self.dtype, param_dtype=jnp.float32,
                          kernel_init=nn.initializers.normal(0.001),
                          bias_init=nn.initializers.zeros, name="bbox_pred")(x)
        return deltas.astype(jnp.float32)
