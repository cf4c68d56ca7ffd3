"""Box geometry ops shared by the RPN, the RoI head, CLIP proposals and evaluation.

Convention everywhere inside the project: xyxy, absolute float32 pixels of the (padded)
input image, continuous coordinates (no "+1"); COCO xywh only at the data/evaluation edges.
Pure jnp and jittable; details and host use: docs/code-notes.md.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp

# Default clamp on dw/dh in ``decode`` (detectron2's _DEFAULT_SCALE_CLAMP).
DEFAULT_MAX_DWDH = math.log(1000.0 / 16)
# Widths/heights below this are treated as this value inside ``encode`` so that padded
# (zero) boxes give large-but-finite deltas instead of -inf/NaN.
_MIN_SIZE = 1e-6


def xyxy_to_xywh(b: jnp.ndarray) -> jnp.ndarray:
    """[..., 4] (x1, y1, x2, y2) -> (x, y, w, h) (COCO convention, no +1)."""
    b = jnp.asarray(b)
    return jnp.concatenate([b[..., :2], b[..., 2:] - b[..., :2]], axis=-1)


def xywh_to_xyxy(b: jnp.ndarray) -> jnp.ndarray:
    """[..., 4] (x, y, w, h) -> (x1, y1, x2, y2)."""
    b = jnp.asarray(b)
    return jnp.concatenate([b[..., :2], b[..., :2] + b[..., 2:]], axis=-1)


def box_area(b: jnp.ndarray, xp=jnp) -> jnp.ndarray:
    """[..., 4] -> [...]: area, with negative widths/heights (inverted boxes) counted as 0."""
    b = xp.asarray(b)
    w = xp.maximum(b[..., 2] - b[..., 0], 0.0)
    h = xp.maximum(b[..., 3] - b[..., 1], 0.0)
    return w * h


def iou_matrix(a: jnp.ndarray, b: jnp.ndarray, xp=jnp) -> jnp.ndarray:
    """Pairwise IoU: a [..., N, 4], b [..., M, 4] -> [..., N, M].

    Leading axes broadcast. Pairs whose union is 0 (both boxes zero-area) and pairs with a
    zero-area box get IoU 0, never NaN. xp=numpy computes on host in the inputs' dtype.
    """
    a = xp.asarray(a)
    b = xp.asarray(b)
    area_a = box_area(a, xp)[..., :, None]
    area_b = box_area(b, xp)[..., None, :]
    lt = xp.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = xp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = xp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    safe = union > 0
    return xp.where(safe, inter / xp.where(safe, union, 1.0), 0.0)


def clip_boxes(b: jnp.ndarray, height, width) -> jnp.ndarray:
    """Clip x to [0, width] and y to [0, height].

    ``height``/``width`` are python scalars or arrays broadcastable to ``b[..., 0]`` (e.g.
    per-image sizes [B, 1] for boxes [B, R, 4]).
    """
    b = jnp.asarray(b)
    h = jnp.asarray(height, b.dtype)
    w = jnp.asarray(width, b.dtype)
    x1 = jnp.clip(b[..., 0], 0.0, w)
    y1 = jnp.clip(b[..., 1], 0.0, h)
    x2 = jnp.clip(b[..., 2], 0.0, w)
    y2 = jnp.clip(b[..., 3], 0.0, h)
    return jnp.stack([x1, y1, x2, y2], axis=-1)


def _centre_size(b: jnp.ndarray):
    w = b[..., 2] - b[..., 0]
    h = b[..., 3] - b[..., 1]
    cx = b[..., 0] + 0.5 * w
    cy = b[..., 1] + 0.5 * h
    return cx, cy, w, h


def encode(boxes: jnp.ndarray, anchors: jnp.ndarray,
           weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> jnp.ndarray:
    """Regression targets (dx, dy, dw, dh) of ``boxes`` w.r.t. ``anchors`` ([..., 4] each).

    Standard Faster R-CNN / detectron2 Box2BoxTransform parametrization:
    dx = wx (gx - ax) / aw, dy = wy (gy - ay) / ah, dw = ww log(gw / aw), dh = wh log(gh / ah)
    with centres and sizes from widths x2 - x1 (no +1). Sizes are floored at 1e-6 so padded
    zero boxes give finite (huge) deltas rather than NaN; mask them out in the loss.
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    anchors = jnp.asarray(anchors, jnp.float32)
    wx, wy, ww, wh = weights
    gx, gy, gw, gh = _centre_size(boxes)
    ax, ay, aw, ah = _centre_size(anchors)
    aw = jnp.maximum(aw, _MIN_SIZE)
    ah = jnp.maximum(ah, _MIN_SIZE)
    gw = jnp.maximum(gw, _MIN_SIZE)
    gh = jnp.maximum(gh, _MIN_SIZE)
    dx = wx * (gx - ax) / aw
    dy = wy * (gy - ay) / ah
    dw = ww * jnp.log(gw / aw)
    dh = wh * jnp.log(gh / ah)
    return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode(deltas: jnp.ndarray, anchors: jnp.ndarray,
           weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
           max_dwdh: float = DEFAULT_MAX_DWDH) -> jnp.ndarray:
    """Inverse of ``encode``: apply (dx, dy, dw, dh) [..., 4] to ``anchors`` [..., 4].

    dw/dh (after dividing by their weights) are clamped at ``max_dwdh`` before exp, as in
    detectron2. Output in the dtype of ``deltas`` promoted with float32.
    """
    deltas = jnp.asarray(deltas)
    dtype = jnp.promote_types(deltas.dtype, jnp.float32)
    deltas = deltas.astype(dtype)
    anchors = jnp.asarray(anchors, dtype)
    wx, wy, ww, wh = weights
    ax, ay, aw, ah = _centre_size(anchors)
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, max_dwdh)
    dh = jnp.minimum(deltas[..., 3] / wh, max_dwdh)
    cx = dx * aw + ax
    cy = dy * ah + ay
    w = jnp.exp(dw) * aw
    h = jnp.exp(dh) * ah
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def flip_horizontal(b: jnp.ndarray, width) -> jnp.ndarray:
    """Mirror boxes [..., 4] in an image of ``width`` (scalar or broadcastable to b[..., 0]).

    Continuous coordinates: x -> width - x, so [x1, x2] -> [width - x2, width - x1]. Applying
    it twice is the identity.
    """
    b = jnp.asarray(b)
    w = jnp.asarray(width, b.dtype)
    return jnp.stack([w - b[..., 2], b[..., 1], w - b[..., 0], b[..., 3]], axis=-1)
