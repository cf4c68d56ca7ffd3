"""The EZSD RoI head: region embeddings in CLIP's joint space, classified by cosine
similarity with frozen text embeddings, plus semantic box regression (docs/ezsd-method.md section 3).

Place in the pipeline: RoIAlign -> EZSDRoIHead (detector.make_roi_head, model.roi_head='ezsd').
Class names enter only as `class_embeddings` [K, D] at call time, so the same parameters
serve any vocabulary. Layers, the seesaw background, initialisation and options:
docs/code-notes.md.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ezsd_jax.models.box_head import (BoxRegressor, branch_heads, flatten_rois,
                                     parse_box_head_spec, xavier_fill)
from ezsd_jax.models.config import DetectorConfig
from ezsd_jax.models.losses import seesaw_scores
from ezsd_jax.ops.vectors import l2_normalize


BACKGROUND_INITS = {
    # mmcv XavierInit defaults (gain 1, distribution 'normal'): N(0, 2 / (fan_in + fan_out))
    "xavier": nn.initializers.variance_scaling(1.0, "fan_avg", "normal"),
    "normal": nn.initializers.normal(0.01),
}


@dataclasses.dataclass(frozen=True)
class EZSDHeadConfig:
    embed_dim: int = 512              # CLIP joint-space dim (ViT-B/32: 512)
    semantic_regression: bool = True  # regression input += text embedding of the class
    learned_background: bool = True   # bg logit = temp * w.r (else a fixed 0 logit)
    temperature_init: float = 100.0
    learn_temperature: bool = True
    background_init: str = "xavier"   # 'xavier' (normal, gain 1: the reference) | 'normal'

    @classmethod
    def from_detector(cls, cfg) -> "EZSDHeadConfig":
        """From DetectorConfig.ezsd ((key, value) pairs or a dict); unknown keys -> error."""
        opts = dict(getattr(cfg, "ezsd", ()) or ())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise ValueError(f"config.model.ezsd: unknown options {unknown}; known: "
                             f"{sorted(known)}")
        out = cls(**opts)
        if out.background_init not in BACKGROUND_INITS:
            raise ValueError(f"config.model.ezsd.background_init: {out.background_init!r} "
                             f"is not one of {tuple(BACKGROUND_INITS)}")
        if out.embed_dim < 1 or out.temperature_init <= 0:
            raise ValueError(f"config.model.ezsd: need embed_dim >= 1 and temperature_init "
                             f"> 0, got {out}")
        return out


class EZSDRoIHead(nn.Module):
    """__call__(roi_feats [B,R,S,S,C], reg_classes [B,R] | None, class_embeddings [K,D])
    -> {'logits' [B,R,K+1] (bg last), 'deltas' [B,R,4], 'embedding' [B,R,D]} (float32);
    embed(roi_feats) -> [B,R,D] unit-norm region embeddings."""
    cfg: DetectorConfig

    def setup(self):
        c = self.cfg
        h = EZSDHeadConfig.from_detector(c)
        if c.box_head_spec:
            spec = parse_box_head_spec(c.box_head_spec)
        elif c.box_num_fcs < 1:
            raise ValueError("EZSD head: model.box_num_fcs must be >= 1 (the branches' FCs)")
        else:
            spec = (c.box_num_convs, 0, 0, c.box_num_fcs, 0, c.box_num_fcs)
        self.hcfg = h
        dt = c.jnp_dtype
        self.shared, self.cls_head, self.reg_head = branch_heads(
            spec, c.box_conv_dim, c.box_fc_dim, dt)
        self.embed_proj = nn.Dense(h.embed_dim, dtype=dt, param_dtype=jnp.float32,
                                   kernel_init=xavier_fill, bias_init=nn.initializers.zeros)
        self.seesaw = c.box_cls_loss == "seesaw"
        if self.seesaw and not h.learned_background:
            raise ValueError("model.box_cls_loss='seesaw' needs model.ezsd.learned_background "
                             "(the objectness logits)")
        if h.learned_background:
            self.background = nn.Dense(2 if self.seesaw else 1, use_bias=False, dtype=jnp.float32,
                                       param_dtype=jnp.float32,
                                       kernel_init=BACKGROUND_INITS[h.background_init])
        self.log_temperature = self.param(
            "log_temperature", nn.initializers.constant(math.log(h.temperature_init)), (),
            jnp.float32)
        self.regressor = BoxRegressor(dtype=dt)

    def _embed_from_shared(self, x):
        return l2_normalize(self.embed_proj(flatten_rois(self.cls_head(x))))

    def regression_features(self, shared: jax.Array) -> jax.Array:
        """The regression branch on the shared features: [B,R,fc_dim] (flattened)."""
        return flatten_rois(self.reg_head(shared))

    def embed(self, roi_feats: jax.Array) -> jax.Array:
        """Region embeddings r [B,R,D] (float32, unit norm): the classification branch."""
        return self._embed_from_shared(self.shared(roi_feats))

    def temperature(self) -> jax.Array:
        t = jnp.exp(self.log_temperature)
        return t if self.hcfg.learn_temperature else jax.lax.stop_gradient(t)

    def classify(self, r: jax.Array, class_embeddings: jax.Array) -> jax.Array:
        """r [B,R,D] unit norm, class_embeddings [K,D] -> logits [B,R,K+1] (bg last);
        [B,R,K+2] (classes, object, background) with the seesaw loss."""
        t = jax.lax.stop_gradient(l2_normalize(class_embeddings))
        cos = jnp.einsum("brd,kd->brk", r, t)
        if self.seesaw:   # [B,R,K+2]: objectness logits are not scaled (reference)
            return jnp.concatenate([self.temperature() * cos, self.background(r)], axis=-1)
        if self.hcfg.learned_background:
            bg = self.background(r)
        else:
            bg = jnp.zeros(r.shape[:-1] + (1,), jnp.float32)
        return self.temperature() * jnp.concatenate([cos, bg], axis=-1)

    def __call__(self, roi_feats: jax.Array, reg_classes: Optional[jax.Array] = None,
                 class_embeddings: Optional[jax.Array] = None) -> dict:
        h = self.hcfg
        if class_embeddings is None:
            raise ValueError("EZSD head needs class_embeddings [K, D] (the frozen text "
                             "embeddings; consts['class_embeddings'] in train/eval)")
        if class_embeddings.ndim != 2 or class_embeddings.shape[1] != h.embed_dim:
            raise ValueError(f"EZSD head: class_embeddings must be [K, {h.embed_dim}] "
                             f"(model.ezsd.embed_dim), got {class_embeddings.shape}")
        k = class_embeddings.shape[0]
        if k != self.cfg.num_classes:
            raise ValueError(f"EZSD head: {k} class embeddings but the detector has "
                             f"num_classes={self.cfg.num_classes}")
        x = self.shared(roi_feats)
        r = self._embed_from_shared(x)
        logits = self.classify(r, class_embeddings)
        extra_out = {}
        if self.seesaw:
            extra_out["seesaw_logits"] = logits
            logits = seesaw_scores(logits)
        feat = self.regression_features(x)
        if h.semantic_regression:
            if reg_classes is None:   # test: the predicted (argmax foreground) class
                reg_classes = jnp.argmax(logits[..., :k], axis=-1)
            t = jax.lax.stop_gradient(l2_normalize(class_embeddings))
            cls = jnp.asarray(reg_classes, jnp.int32)
            is_fg = (cls >= 0) & (cls < k)
            extra = jnp.where(is_fg[..., None], t[jnp.clip(cls, 0, k - 1)], 0.0)
            deltas = self.regressor(feat, extra)
        else:
            deltas = self.regressor(feat)
        return {"logits": logits, "deltas": deltas, "embedding": r, **extra_out}
