"""Instance masks for Mask R-CNN on the device: mask targets of the sampled positive
RoIs, test-time pasting into the image, and RLE results (host).

Training: `crop_mask_targets` on the sampled positives (GT masks arrive as box crops from
data/segmentation.py); inference: `paste_masks` at the final detections, then `encode_masks`
to COCO RLE. Reference semantics and how they are reproduced: docs/code-notes.md.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ezsd_jax.ops.roi_align import bilinear_axis_weights

CROP_SCALE = 255.0   # GT mask box crops are uint8 coverage 0..255 (data/segmentation.py)


# ------------------------------------------------------------------ device: mask targets

def mask_targets(masks: jax.Array, valid: jax.Array, rois: jax.Array, gt_index: jax.Array,
                 positive: jax.Array, size: int = 28, sampling_ratio: int = 2,
                 binarize: bool = True, roi_scale: jax.Array | float = 1.0
                 ) -> tuple[jax.Array, jax.Array]:
    """Mask R-CNN targets of one image's sampled RoIs.

    masks [M, H, W] (bool/uint8, padded, `valid` [M]); rois [R, 4] xyxy, divided by
    `roi_scale` (a scalar, may be traced) into the masks' pixel frame: RoIs of the resized
    network input crop masks kept at the original resolution with roi_scale = the image's
    resize factor (flip the mask stack with the image); gt_index [R] matched GT slot per
    RoI; positive [R]. Returns targets [R, size,
    size] float32 (RoIAlign of the matched binary mask at the RoI clipped to [0, W] x
    [0, H], aligned, `sampling_ratio`**2 samples per bin, then >= 0.5 when `binarize`;
    0 where not counted) and weight [R] float32 (1 for a positive RoI with a valid GT).
    Jittable; vmap it over the batch. The masks stay uint8: the gather reads 4 neighbours
    per sample from the flattened stack and casts after the gather."""
    m, h, w = masks.shape
    gt_index, weight = _target_index_weight(m, valid, gt_index, positive, size,
                                            sampling_ratio)
    rois = rois.astype(jnp.float32) / jnp.asarray(roi_scale, jnp.float32)
    x1 = jnp.clip(rois[:, 0], 0.0, w) - 0.5
    y1 = jnp.clip(rois[:, 1], 0.0, h) - 0.5
    x2 = jnp.clip(rois[:, 2], 0.0, w) - 0.5
    y2 = jnp.clip(rois[:, 3], 0.0, h) - 0.5
    t = _roi_sample(masks, gt_index, x1, y1, x2, y2, size, sampling_ratio)
    if binarize:
        t = (t >= 0.5).astype(jnp.float32)
    return t * weight[:, None, None], weight


def _target_index_weight(m, valid, gt_index, positive, size, sampling_ratio):
    if m < 1:
        raise ValueError("mask targets: the mask stack needs at least one (padded) slot")
    if int(sampling_ratio) < 1 or int(size) < 1:
        raise ValueError(f"mask targets: size and sampling_ratio must be >= 1, got {size}, "
                         f"{sampling_ratio}")
    gt_index = jnp.clip(jnp.asarray(gt_index, jnp.int32), 0, m - 1)
    weight = (jnp.asarray(positive, bool) & jnp.asarray(valid, bool)[gt_index]
              ).astype(jnp.float32)
    return gt_index, weight


def _roi_sample(masks, gt_index, x1, y1, x2, y2, size, sampling_ratio):
    """RoIAlign (bilinear, `sampling_ratio`**2 samples per bin averaged) of masks
    [M, h, w] (any dtype, read by gather) at [x1, x2] x [y1, y2] [R] (continuous pixel
    coordinates, pixel centres at integers) of slot gt_index [R] -> float32 [R, size, size]."""
    m, h, w = masks.shape
    g = int(sampling_ratio)
    k = jnp.arange(size * g)
    pos = (k // g).astype(jnp.float32) + ((k % g).astype(jnp.float32) + 0.5) / g
    ys = y1[:, None] + pos * ((y2 - y1) / size)[:, None]           # [R, S]
    xs = x1[:, None] + pos * ((x2 - x1) / size)[:, None]
    r = x1.shape[0]
    iy, wy = bilinear_axis_weights(ys, jnp.full((r,), h, jnp.int32))       # [R, S, 2]
    ix, wx = bilinear_axis_weights(xs, jnp.full((r,), w, jnp.int32))
    idx = (gt_index[:, None, None, None, None] * (h * w)
           + iy[:, :, :, None, None] * w + ix[:, None, None, :, :])  # [R, S, 2, S, 2]
    vals = jnp.take(jnp.asarray(masks).reshape(-1), idx, mode="clip").astype(jnp.float32)
    vals = vals * (wy[:, :, :, None, None] * wx[:, None, None, :, :])
    return vals.reshape(r, size, 2 * g, size, 2 * g).sum(axis=(2, 4)) / float(g * g)


# ------------------------------------------------------------------ device: from box crops

def crop_mask_targets(crops: jax.Array, crop_boxes: jax.Array, valid: jax.Array,
                      rois: jax.Array, gt_index: jax.Array, positive: jax.Array,
                      image_hw: jax.Array, size: int = 28, sampling_ratio: int = 2,
                      binarize: bool = True) -> tuple[jax.Array, jax.Array]:
    """`mask_targets` from box crops (`box_crops`): crops [M, S, S] uint8 of the GT masks
    at crop_boxes [M, 4] (the GT boxes, pixels of the network input, like rois [R, 4]).
    RoIs are clipped to image_hw [2] (the mask extent, as the reference clips them to
    the image) and mapped into the matched GT's crop frame (u = (x - bx1) * S / bw) and RoIAligned
    there; the crop gets a zero border so that the RoI's parts outside the GT box read 0,
    as the full-image mask would. Same returns as `mask_targets`. Jittable; vmap it."""
    m, s = crops.shape[0], crops.shape[-1]
    gt_index, weight = _target_index_weight(m, valid, gt_index, positive, size,
                                            sampling_ratio)
    b = crop_boxes.astype(jnp.float32)[gt_index]                      # [R, 4]
    sx = s / jnp.maximum(b[:, 2] - b[:, 0], 1e-6)
    sy = s / jnp.maximum(b[:, 3] - b[:, 1], 1e-6)
    hw = jnp.asarray(image_hw, jnp.float32)
    rois = jnp.clip(rois.astype(jnp.float32), 0.0, jnp.stack([hw[1], hw[0]] * 2))
    # +1: the zero border; -0.5: aligned RoIAlign (pixel centres at integers)
    x1 = (rois[:, 0] - b[:, 0]) * sx + 0.5
    x2 = (rois[:, 2] - b[:, 0]) * sx + 0.5
    y1 = (rois[:, 1] - b[:, 1]) * sy + 0.5
    y2 = (rois[:, 3] - b[:, 1]) * sy + 0.5
    padded = jnp.pad(jnp.asarray(crops), ((0, 0), (1, 1), (1, 1)))
    t = _roi_sample(padded, gt_index, x1, y1, x2, y2, size, sampling_ratio) / CROP_SCALE
    if binarize:
        t = (t >= 0.5).astype(jnp.float32)
    return t * weight[:, None, None], weight


# ------------------------------------------------------------------ device: pasting

def _paste_weights(lo: jax.Array, hi: jax.Array, n_out: int, m: int) -> jax.Array:
    """[N, n_out, m] bilinear weights of grid_sample(align_corners=False, zero padding)
    along one axis: output pixel centres (i + 0.5) of the box extent [lo, hi]."""
    centres = jnp.arange(n_out, dtype=jnp.float32) + 0.5
    g = (centres[None, :] - lo[:, None]) / (hi - lo)[:, None] * 2.0 - 1.0
    g = jnp.where(jnp.isfinite(g), g, 0.0)          # the reference zeroes inf (empty box)
    s = ((g + 1.0) * m - 1.0) * 0.5                  # source coordinate in mask pixels
    s0 = jnp.floor(s)
    f = s - s0
    j = jnp.arange(m, dtype=jnp.float32)
    return ((j == s0[..., None]) * (1.0 - f)[..., None]
            + (j == (s0 + 1.0)[..., None]) * f[..., None])


def paste_masks(probs: jax.Array, boxes: jax.Array, height: int, width: int,
                threshold: float | None = 0.5, batch_size: int = 16) -> jax.Array:
    """Paste mask probabilities [N, m, m] at boxes [N, 4] (xyxy, pixels of the target
    image) into [N, height, width]: bool (>= threshold) or float32 if threshold is None.
    height/width are static (use the padded canvas and crop per image on the host);
    `batch_size` detections are pasted at a time to bound the float intermediate."""
    n, m = probs.shape[0], probs.shape[-1]
    boxes = boxes.astype(jnp.float32)

    def one(args):
        p, b = args
        wy = _paste_weights(b[None, 1], b[None, 3], height, m)[0]     # [H, m]
        wx = _paste_weights(b[None, 0], b[None, 2], width, m)[0]      # [W, m]
        out = wy @ p.astype(jnp.float32) @ wx.T
        return out if threshold is None else out >= threshold

    if n == 0:
        return jnp.zeros((0, height, width), jnp.float32 if threshold is None else bool)
    return jax.lax.map(one, (probs, boxes), batch_size=min(int(batch_size), n))


# ------------------------------------------------------------------ host: RLE results

def encode_masks(masks: np.ndarray) -> list[dict]:
    """Bitmaps [N, h, w] -> COCO compressed RLEs (pycocotools.mask.encode) with str counts,
    ready for a JSON results file."""
    from pycocotools import mask as mask_utils
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"encode_masks: expected [N, h, w], got {masks.shape}")
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


__all__ = ["mask_targets", "crop_mask_targets", "paste_masks", "encode_masks", "CROP_SCALE"]
