"""Box-head outputs -> final detections (static shapes): softmax over classes + background,
class-agnostic deltas decoded on each proposal, per-class candidates above a score
threshold, class-wise NMS, at most `max_detections` per image.

topk_candidates = 0 (the reference: mmdet's multiclass_nms keeps every (box, class) pair
over the threshold): exact class-wise NMS over all R x C pairs. The boxes are
class-agnostic, so one R x R IoU matrix serves every class; each class's greedy NMS runs
over its own score order in tiles of TILE ranks (`classwise_nms_shared_boxes`): memory
R x R + C x TILE x R booleans per image instead of an IoU over R*C candidates.
topk_candidates = K > 0 (earlier): the K highest-scoring pairs, then class-wise NMS. Equal
to the exact result whenever the K pairs keep `max_detections` boxes or hold every pair
over the threshold (docs/protocol.md measures how often that fails).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ezsd_jax.ops import boxes as box_ops
from ezsd_jax.ops.nms import batched_nms

TILE = 32   # ranks per step of the exact class-wise NMS


def classwise_nms_shared_boxes(boxes: jax.Array, scores: jax.Array, valid: jax.Array,
                               iou_threshold: float, max_output: int, tile: int = TILE):
    """Greedy NMS per class over every pair: boxes [R,4] shared by all classes, scores /
    valid [R,C]. Same result as ops.nms.batched_nms over the R*C pairs (flattened r*C + c;
    ties by lower index). Returns (indices [max_output] into the flattened pairs, keep
    [max_output] bool), by descending score."""
    r, c = scores.shape
    over = box_ops.iou_matrix(boxes, boxes) > iou_threshold                 # [R,R]
    valid = valid & ~jnp.isnan(scores)
    neg = jnp.where(valid, -scores, 0.0) + 0.0
    inval = (~valid).astype(jnp.int32)
    rows = jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32)[:, None], (r, c))
    # per class: valid first, score descending, lower box index first
    _, _, order = lax.sort((inval.T, neg.T, rows.T), num_keys=3, is_stable=True)  # [C,R]
    sval = jnp.take_along_axis(valid.T, order, axis=1)                             # [C,R]
    t = min(int(tile), r)
    nb = -(-r // t)
    pad = nb * t - r
    order_p = jnp.pad(order, ((0, 0), (0, pad)))
    sval_p = jnp.pad(sval, ((0, 0), (0, pad)))
    upper = jnp.triu(jnp.ones((t, t), bool), k=1)

    def body(i, state):
        suppressed, keep = state                       # [C,R] by box, [C,nb*t] by rank
        idx = lax.dynamic_slice_in_dim(order_p, i * t, t, axis=1)                # [C,t]
        alive = lax.dynamic_slice_in_dim(sval_p, i * t, t, axis=1)
        alive = alive & ~jnp.take_along_axis(suppressed, idx, axis=1)
        rows_o = over[idx]                                                       # [C,t,R]
        self_over = jnp.take_along_axis(rows_o, idx[:, None, :], axis=2) & upper   # [C,t,t]

        def inner(s):
            x, _ = s
            new = alive & ~jnp.any(self_over & x[:, :, None], axis=1)
            return new, jnp.any(new != x)
        x, _ = lax.while_loop(lambda s: s[1], inner, (alive, jnp.array(True)))
        suppressed = suppressed | jnp.any(rows_o & x[:, :, None], axis=1)
        keep = lax.dynamic_update_slice_in_dim(keep, x, i * t, axis=1)
        return suppressed, keep

    _, keep = lax.fori_loop(0, nb, body, (jnp.zeros((c, r), bool),
                                          jnp.zeros((c, nb * t), bool)))
    kept = jnp.zeros((c, r), bool).at[jnp.arange(c)[:, None], order].set(keep[:, :r])
    s = jnp.where(kept.T, scores, -jnp.inf).reshape(-1)                          # [R*C]
    k = min(int(max_output), r * c)
    top_s, top_i = lax.top_k(s, k)
    ok = top_s > -jnp.inf
    if k < max_output:
        top_i = jnp.pad(top_i, (0, max_output - k))
        ok = jnp.pad(ok, (0, max_output - k))
    return jnp.where(ok, top_i, 0).astype(jnp.int32), ok


def detections(logits: jax.Array, deltas: jax.Array, proposals: jax.Array,
               proposal_valid: jax.Array, image_hw: jax.Array, *, score_threshold: float,
               nms_threshold: float, max_detections: int, topk_candidates: int = 0,
               bbox_reg_weights=(10.0, 10.0, 5.0, 5.0)) -> dict:
    """logits [B,R,C+1] (background last), deltas [B,R,4], proposals [B,R,4].
    Returns boxes [B,D,4] (padded-input pixels), scores [B,D], classes [B,D], valid [B,D]."""
    bsz, r, c1 = logits.shape
    c = c1 - 1
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :c]        # [B,R,C]
    boxes = box_ops.decode(deltas, proposals, bbox_reg_weights)
    boxes = box_ops.clip_boxes(boxes, image_hw[:, None, 0], image_hw[:, None, 1])
    if topk_candidates < 0:
        raise ValueError(f"topk_candidates must be >= 0 (0 = every pair), got "
                         f"{topk_candidates}")

    def exact(p, b, pv):
        wh = b[:, 2:] - b[:, :2]
        ok = (pv & jnp.all(wh > 0, axis=-1))[:, None] & (p > score_threshold)       # [R,C]
        idx, keep = classwise_nms_shared_boxes(b, p, ok, nms_threshold, max_detections)
        s = p.reshape(-1)[idx]
        return (b[idx // c], jnp.where(keep, s, 0.0),
                jnp.where(keep, (idx % c).astype(jnp.int32), -1), keep)

    def capped(p, b, pv):
        k = min(topk_candidates, r * c)
        s = jnp.where(pv[:, None] & (p > score_threshold), p, -1.0).reshape(-1)  # [R*C]
        top_s, top_i = jax.lax.top_k(s, k)
        cls = (top_i % c).astype(jnp.int32)
        bx = b[top_i // c]
        wh = bx[:, 2:] - bx[:, :2]
        v = (top_s >= 0) & jnp.all(wh > 0, axis=-1)
        idx, keep = batched_nms(bx, top_s, cls, nms_threshold, max_detections, v)
        return (bx[idx], jnp.where(keep, top_s[idx], 0.0), jnp.where(keep, cls[idx], -1), keep)

    b, s, cl, v = jax.vmap(exact if topk_candidates == 0 else capped)(probs, boxes,
                                                                        proposal_valid)
    return {"boxes": b, "scores": s, "classes": cl, "valid": v}
