"""RoIAlign (single map and multi-level FPN) for the detector's box and mask heads.

Exact torchvision / detectron2 ``ROIAlign`` semantics with a fixed ``sampling_ratio``,
computed as separable bilinear gathers. Semantics and implementation: docs/code-notes.md.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from ezsd_jax.ops.boxes import box_area


def bilinear_axis_weights(c: jnp.ndarray, size: jnp.ndarray):
    """torchvision bilinear along one axis.

    c: [R, S] sample coordinates, size: [R] map extent (int). Returns low/high integer
    indices [R, S, 2] and weights [R, S, 2] (zero outside [-1, size]).
    """
    size = size[:, None]
    sizef = size.astype(c.dtype)
    inside = (c >= -1.0) & (c <= sizef)
    c = jnp.maximum(c, 0.0)
    low = jnp.floor(c).astype(jnp.int32)
    at_end = low >= size - 1
    low = jnp.where(at_end, size - 1, low)
    high = jnp.where(at_end, size - 1, low + 1)
    c = jnp.where(at_end, low.astype(c.dtype), c)
    frac = c - low.astype(c.dtype)
    w = jnp.stack([1.0 - frac, frac], axis=-1) * inside[..., None].astype(c.dtype)
    return jnp.stack([low, high], axis=-1), w


def _roi_align_flat(flat, boxes, scale, height, width, offset, output_size,
                    sampling_ratio, aligned):
    """flat [P, C]; boxes [R, 4]; per-box scale [R] f32, height/width/offset [R] int32."""
    out, g = output_size, sampling_ratio
    boxes = boxes.astype(jnp.float32)
    shift = 0.5 if aligned else 0.0
    x1 = boxes[:, 0] * scale - shift
    y1 = boxes[:, 1] * scale - shift
    x2 = boxes[:, 2] * scale - shift
    y2 = boxes[:, 3] * scale - shift
    rw = x2 - x1
    rh = y2 - y1
    if not aligned:
        rw = jnp.maximum(rw, 1.0)
        rh = jnp.maximum(rh, 1.0)
    bin_w = rw / out
    bin_h = rh / out
    k = jnp.arange(out * g)
    pb = (k // g).astype(jnp.float32)          # bin index of each sample
    sub = (k % g).astype(jnp.float32) + 0.5    # sample index inside the bin (+0.5)
    ys = y1[:, None] + pb * bin_h[:, None] + sub * bin_h[:, None] / g     # [R, out*g]
    xs = x1[:, None] + pb * bin_w[:, None] + sub * bin_w[:, None] / g
    iy, wy = bilinear_axis_weights(ys, height)          # [R, S, 2]
    ix, wx = bilinear_axis_weights(xs, width)
    idx = (offset[:, None, None, None, None]
           + iy[:, :, :, None, None] * width[:, None, None, None, None]
           + ix[:, None, None, :, :])                                    # [R, S, 2, S, 2]
    w = wy[:, :, :, None, None] * wx[:, None, None, :, :]
    vals = jnp.take(flat, idx, axis=0, mode="clip").astype(jnp.float32)  # [R,S,2,S,2,C]
    vals = vals * w[..., None]
    r = boxes.shape[0]
    vals = vals.reshape(r, out, g * 2, out, g * 2, flat.shape[-1])
    res = vals.sum(axis=(2, 4)) / float(max(g * g, 1))
    return res.astype(flat.dtype)


def _check(output_size, sampling_ratio):
    if int(output_size) < 1:
        raise ValueError(f"roi_align: output_size must be >= 1, got {output_size}")
    if int(sampling_ratio) < 1:
        raise ValueError("roi_align: sampling_ratio must be a static int >= 1 (adaptive "
                         f"sampling_ratio <= 0 is not static-shape), got {sampling_ratio}")


def roi_align(feature: jnp.ndarray, boxes: jnp.ndarray, spatial_scale: float,
              output_size: int = 7, sampling_ratio: int = 2,
              aligned: bool = True) -> jnp.ndarray:
    """RoIAlign on one map: feature [H, W, C], boxes [R, 4] in input-image pixels
    -> [R, output_size, output_size, C] (dtype of ``feature``; accumulation in f32)."""
    _check(output_size, sampling_ratio)
    h, w, c = feature.shape
    r = boxes.shape[0]
    flat = feature.reshape(h * w, c)
    scale = jnp.full((r,), spatial_scale, jnp.float32)
    hh = jnp.full((r,), h, jnp.int32)
    ww = jnp.full((r,), w, jnp.int32)
    off = jnp.zeros((r,), jnp.int32)
    return _roi_align_flat(flat, boxes, scale, hh, ww, off, int(output_size),
                           int(sampling_ratio), aligned)


def assign_levels(boxes: jnp.ndarray, num_levels: int, min_level: int,
                  canonical_level: int = 4, canonical_size: float = 224.0) -> jnp.ndarray:
    """FPN level index in [0, num_levels) per box [..., 4] (detectron2 rule):
    floor(canonical_level + log2(sqrt(area) / canonical_size + 1e-8)) - min_level, clamped."""
    size = jnp.sqrt(box_area(boxes).astype(jnp.float32))
    lvl = jnp.floor(canonical_level + jnp.log2(size / canonical_size + 1e-8))
    lvl = jnp.clip(lvl, min_level, min_level + num_levels - 1) - min_level
    return lvl.astype(jnp.int32)


def multilevel_roi_align(features: Sequence[jnp.ndarray], boxes: jnp.ndarray,
                         strides: Sequence[int] = (4, 8, 16, 32), output_size: int = 7,
                         sampling_ratio: int = 2, aligned: bool = True,
                         canonical_level: int = 4,
                         canonical_size: float = 224.0) -> jnp.ndarray:
    """Multi-level RoIAlign: features[l] [B, H_l, W_l, C] at ``strides[l]`` (consecutive
    powers of two), boxes [B, R, 4] in input pixels -> [B, R, out, out, C].

    Each box is pooled from level ``assign_levels`` (stride 2**k for level k, clamped to
    the given strides) with spatial_scale 1/stride. Padded/zero boxes go to the finest
    level and return finite values (mask them downstream).
    """
    _check(output_size, sampling_ratio)
    strides = [int(s) for s in strides]
    if len(features) != len(strides):
        raise ValueError(f"multilevel_roi_align: {len(features)} feature maps but "
                         f"{len(strides)} strides")
    min_level = int(round(math.log2(strides[0])))
    for i, s in enumerate(strides):
        if s != 2 ** (min_level + i):
            raise ValueError(f"multilevel_roi_align: strides must be consecutive powers "
                             f"of two, got {strides}")
    b = boxes.shape[0]
    c = features[0].shape[-1]
    hs, ws, offs, flats = [], [], [], []
    total = 0
    for f in features:
        if f.ndim != 4 or f.shape[0] != b or f.shape[-1] != c:
            raise ValueError(f"multilevel_roi_align: features must be [B={b}, H, W, C={c}],"
                             f" got {f.shape}")
        hs.append(f.shape[1])
        ws.append(f.shape[2])
        offs.append(total)
        total += f.shape[1] * f.shape[2]
        flats.append(f.reshape(b, -1, c))
    flat = jnp.concatenate(flats, axis=1)                       # [B, P, C]
    lvl = assign_levels(boxes, len(strides), min_level, canonical_level, canonical_size)
    scale = jnp.asarray([1.0 / s for s in strides], jnp.float32)[lvl]
    hh = jnp.asarray(hs, jnp.int32)[lvl]
    ww = jnp.asarray(ws, jnp.int32)[lvl]
    off = jnp.asarray(offs, jnp.int32)[lvl]
    fn = lambda fl, bx, sc, h, w, o: _roi_align_flat(  # noqa: E731
        fl, bx, sc, h, w, o, int(output_size), int(sampling_ratio), aligned)
    return jax.vmap(fn)(flat, boxes, scale, hh, ww, off)
