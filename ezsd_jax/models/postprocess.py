"""Box-head outputs -> final detections (static shapes): softmax over classes + background,
class-agnostic deltas decoded on each proposal, per-class candidates above a score
threshold, the top `topk_candidates`, class-wise NMS, at most `max_detections` per image.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ezsd_jax.ops import boxes as box_ops
from ezsd_jax.ops.nms import batched_nms


def detections(logits: jax.Array, deltas: jax.Array, proposals: jax.Array,
               proposal_valid: jax.Array, image_hw: jax.Array, *, score_threshold: float,
               nms_threshold: float, max_detections: int, topk_candidates: int,
               bbox_reg_weights=(10.0, 10.0, 5.0, 5.0)) -> dict:
    """logits [B,R,C+1] (background last), deltas [B,R,4], proposals [B,R,4].
    Returns boxes [B,D,4] (padded-input pixels), scores [B,D], classes [B,D], valid [B,D]."""
    bsz, r, c1 = logits.shape
    c = c1 - 1
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :c]        # [B,R,C]
    boxes = box_ops.decode(deltas, proposals, bbox_reg_weights)
    boxes = box_ops.clip_boxes(boxes, image_hw[:, None, 0], image_hw[:, None, 1])
    k = min(topk_candidates, r * c)

    def one(p, b, pv):
        s = jnp.where(pv[:, None] & (p > score_threshold), p, -1.0).reshape(-1)  # [R*C]
        top_s, top_i = jax.lax.top_k(s, k)
        cls = (top_i % c).astype(jnp.int32)
        bx = b[top_i // c]
        wh = bx[:, 2:] - bx[:, :2]
        v = (top_s >= 0) & jnp.all(wh > 0, axis=-1)
        idx, keep = batched_nms(bx, top_s, cls, nms_threshold, max_detections, v)
        return (bx[idx], jnp.where(keep, top_s[idx], 0.0), jnp.where(keep, cls[idx], -1), keep)

    b, s, cl, v = jax.vmap(one)(probs, boxes, proposal_valid)
    return {"boxes": b, "scores": s, "classes": cl, "valid": v}
