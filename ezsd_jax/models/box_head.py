"""Second-stage box head: RoI features [B,R,7,7,C] -> region features -> logits / deltas.

Place in the pipeline: RoIAlign (ezsd_jax.ops) -> BoxHead -> LinearClassifier (plain Faster
R-CNN) or the EZSD cosine classifier (built in the detector) and BoxRegressor.

BoxHead = `num_convs` 3x3 convs (+ReLU, optional GroupNorm) then flatten (order H, W, C:
NHWC, unlike torch's C, H, W; only matters when importing torch box-head weights) and
`num_fcs` FCs with ReLU after each. Init as detectron2: convs c2_msra_fill (kaiming normal,
fan_out), FCs c2_xavier_fill (U(+-sqrt(3/fan_in))), biases 0.

The EZSD head ("4 shared convs, separate branches") is three BoxHeads:
    shared = BoxHead(num_convs=4, num_fcs=0, name='shared')(roi)   # [B,R,7,7,256]
    cls_feat = BoxHead(num_convs=0, num_fcs=2, name='cls_head')(shared)   # [B,R,1024]
    reg_feat = BoxHead(num_convs=0, num_fcs=2, name='reg_head')(shared)   # [B,R,1024]
    deltas = BoxRegressor()(reg_feat, extra=text_emb_of_class)           # [B,R,4]
(num_fcs=0 returns the conv features unflattened; a BoxHead with num_convs=0 also accepts
already flattened [B,R,D] input.)

Class convention (project-wide): logits have num_classes + 1 columns and BACKGROUND IS THE
LAST INDEX (num_classes). Classifier and regressor outputs are float32.
"""
from __future__ import annotations

from typing import Any, Optional

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
