"""Static-shape greedy non-maximum suppression (RPN proposals, CLIP proposals, inference).

Tiled inside ``lax.while_loop``, with a result identical to plain greedy NMS (torchvision
semantics); jittable with static N / ``max_output`` / ``tile_size``, vmap-able over a batch.
The tiled algorithm: docs/code-notes.md.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ezsd_jax.ops.boxes import iou_matrix

DEFAULT_TILE = 512


def _sort_order(scores: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    """Indices sorting valid boxes by score desc (ties: lower index first), invalid last."""
    n = scores.shape[0]
    neg = jnp.where(valid, -scores, 0.0) + 0.0     # "+ 0.0" maps -0.0 to 0.0
    inval = (~valid).astype(jnp.int32)
    iota = jnp.arange(n, dtype=jnp.int32)
    _, _, order = lax.sort((inval, neg, iota), num_keys=3, is_stable=True)
    return order


def _nms_core(boxes, scores, iou_threshold, max_output, valid, classes, tile_size):
    boxes = lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
    scores = lax.stop_gradient(jnp.asarray(scores, jnp.float32))
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"nms: boxes must be [N, 4], got {boxes.shape}")
    n = boxes.shape[0]
    if scores.shape != (n,):
        raise ValueError(f"nms: scores must be [{n}], got {scores.shape}")
    max_output = int(max_output)
    if max_output < 0:
        raise ValueError(f"nms: max_output must be >= 0, got {max_output}")
    if n == 0 or max_output == 0:
        return (jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool))
    if valid is None:
        valid = jnp.ones((n,), bool)
    valid = jnp.asarray(valid, bool) & ~jnp.isnan(scores)

    order = _sort_order(scores, valid)
    t = min(int(tile_size), n)
    nb = -(-n // t)
    npad = nb * t - n
    sb = jnp.pad(boxes[order], ((0, npad), (0, 0)))
    sv = jnp.pad(valid[order], (0, npad))
    if classes is not None:
        classes = jnp.asarray(classes, jnp.int32)
        sc = jnp.pad(classes[order], (0, npad), constant_values=-1)
    order_p = jnp.pad(order, (0, npad))

    sv_tiles = sv.reshape(nb, t)
    upper = jnp.triu(jnp.ones((t, t), bool), k=1)   # [i, j]: i earlier than j

    def tile_body(state):
        i, keep, count = state
        start = i * t
        bi = lax.dynamic_slice_in_dim(sb, start, t, axis=0)             # [t, 4]
        vi = lax.dynamic_index_in_dim(sv_tiles, i, keepdims=False)      # [t]
        over = iou_matrix(bi, sb) > iou_threshold                      # [t, Np]
        if classes is not None:
            ci = lax.dynamic_slice_in_dim(sc, start, t, axis=0)
            over = over & (ci[:, None] == sc[None, :])
        # keep is only set for earlier tiles, so this is suppression by earlier kept boxes
        suppressed = jnp.any(over & keep.reshape(1, -1), axis=1)
        alive = vi & ~suppressed
        self_over = lax.dynamic_slice_in_dim(over, start, t, axis=1) & upper  # [t, t]

        def inner_cond(s):
            return s[1]

        def inner_body(s):
            x, _ = s
            new = alive & ~jnp.any(self_over & x[:, None], axis=0)
            return new, jnp.any(new != x)

        x, _ = lax.while_loop(inner_cond, inner_body, (alive, jnp.array(True)))
        keep = lax.dynamic_update_index_in_dim(keep, x, i, axis=0)
        return i + 1, keep, count + jnp.sum(x, dtype=jnp.int32)

    def tile_cond(state):
        i, _, count = state
        # invalid boxes sort last: stop at the first tile that starts with an invalid box
        first_valid = sv_tiles[jnp.minimum(i, nb - 1), 0]
        return (i < nb) & (count < max_output) & first_valid

    init = (jnp.array(0, jnp.int32), jnp.zeros((nb, t), bool), jnp.array(0, jnp.int32))
    _, keep, count = lax.while_loop(tile_cond, tile_body, init)

    keep = keep.reshape(-1)
    (pos,) = jnp.nonzero(keep, size=max_output, fill_value=0)
    keep_valid = jnp.arange(max_output) < count
    indices = jnp.where(keep_valid, order_p[pos], 0).astype(jnp.int32)
    return indices, keep_valid


def nms(boxes: jnp.ndarray, scores: jnp.ndarray, iou_threshold: float, max_output: int,
        valid: jnp.ndarray | None = None, *, tile_size: int = DEFAULT_TILE):
    """Greedy class-agnostic NMS with static output size.

    Args:
      boxes: [N, 4] xyxy. scores: [N]. valid: optional [N] bool (invalid boxes and NaN
        scores are never kept and never suppress anything).
      iou_threshold: a box is suppressed by a kept higher-scored box when IoU > threshold.
      max_output: static number of output slots.
      tile_size: static tile length of the blocked algorithm.
    Returns:
      indices [max_output] int32 into the input (kept boxes by descending score; padding
      slots hold 0) and keep_valid [max_output] bool.
    """
    return _nms_core(boxes, scores, iou_threshold, max_output, valid, None, tile_size)


def batched_nms(boxes: jnp.ndarray, scores: jnp.ndarray, classes: jnp.ndarray,
                iou_threshold: float, max_output: int, valid: jnp.ndarray | None = None,
                *, tile_size: int = DEFAULT_TILE):
    """Class-wise NMS: like ``nms`` but boxes of different ``classes`` [N] int32 never
    suppress each other. Done exactly by masking the IoU matrix with class equality (no
    coordinate offsets, so no float precision loss); the output is the union over
    classes, ordered by descending score, truncated to ``max_output``.
    """
    return _nms_core(boxes, scores, iou_threshold, max_output, valid, classes, tile_size)


__all__ = ["nms", "batched_nms", "DEFAULT_TILE"]
