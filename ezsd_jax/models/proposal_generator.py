"""RPN outputs -> a fixed number of proposals per image (static shapes, on device).

Per level: top-k anchors by objectness, decode, clip to the image's valid region, drop
boxes smaller than `min_size`; then per-level NMS (levels never suppress each other, as in
detectron2) and the best `post_topk` over all levels. Used by training (under
stop_gradient) and inference.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ezsd_jax.ops import boxes as box_ops
from ezsd_jax.ops.nms import batched_nms


def rpn_proposals(objectness: Sequence[jax.Array], deltas: Sequence[jax.Array],
                  anchors: Sequence[np.ndarray], image_hw: jax.Array, pre_topk: int,
                  post_topk: int, nms_threshold: float, min_size: float = 0.0
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """objectness [B,N_l], deltas [B,N_l,4] and anchors [N_l,4] per level; image_hw [B,2]
    (valid region of each padded image). Returns (boxes [B,post_topk,4],
    scores [B,post_topk] (logits), valid [B,post_topk])."""
    all_boxes, all_scores, all_levels = [], [], []
    for level, (obj, dlt, anc) in enumerate(zip(objectness, deltas, anchors)):
        k = min(pre_topk, obj.shape[1])
        scores, idx = jax.lax.top_k(obj, k)                                   # [B,k]
        d = jnp.take_along_axis(dlt, idx[..., None], axis=1)                  # [B,k,4]
        a = jnp.asarray(anc)[idx]                                             # [B,k,4]
        b = box_ops.decode(d, a)
        b = box_ops.clip_boxes(b, image_hw[:, None, 0], image_hw[:, None, 1])
        all_boxes.append(b)
        all_scores.append(scores)
        all_levels.append(jnp.full(scores.shape, level, jnp.int32))
    boxes = jnp.concatenate(all_boxes, axis=1)
    scores = jnp.concatenate(all_scores, axis=1)
    levels = jnp.concatenate(all_levels, axis=1)
    wh = boxes[..., 2:] - boxes[..., :2]
    valid = jnp.all(wh > min_size, axis=-1) & jnp.all(jnp.isfinite(boxes), axis=-1)
    valid &= jnp.isfinite(scores)
    post = min(post_topk, boxes.shape[1])

    def one(b, s, lv, v):
        idx, keep = batched_nms(b, s, lv, nms_threshold, post, v)
        return b[idx], jnp.where(keep, s[idx], -jnp.inf), keep

    out_boxes, out_scores, out_valid = jax.vmap(one)(boxes, scores, levels, valid)
    return out_boxes, out_scores, out_valid
