"""Instance masks for Mask R-CNN: COCO segmentations -> bitmaps (host), mask targets of
the sampled positive RoIs (device), test-time pasting into the image (device) and RLE
results (host).

Place in the pipeline: the data loader decodes each training image's annotations with
`instance_masks` (crowd regions dropped, as the reference does); the RoI head calls
`mask_targets` on the positives it sampled; inference calls `paste_masks` on the mask head's
probabilities at the final detections, and the evaluator turns the pasted bitmaps into COCO
RLE with `encode_masks`.

Reference semantics (mmdetection 2.x as used by EZAD, branch new_rpn of dragonlzm/mmdetection):
  - decoding (LoadAnnotations._poly2mask): polygons -> frPyObjects + merge, uncompressed RLE
    -> frPyObjects, compressed RLE used as is, then maskUtils.decode at the image's (h, w);
    crowd annotations (CocoDataset._parse_ann_info) go to gt_bboxes_ignore, their masks are
    dropped, and with ignore_iof_thr=-1 the ignore boxes are unused: crowd regions play no
    part in training. The reference silently accepts malformed input (a 4-number polygon is
    even read as a box by pycocotools); here it is a one-line DataError naming the annotation.
  - targets (mask_target_single + BitmapMasks.crop_and_resize): RoIs clipped to the mask
    extent, RoIAlign of the binary GT mask at the RoI (spatial scale 1, aligned=True,
    output 28), then binarized with >= 0.5. The reference's sampling_ratio=0 (adaptive,
    ceil(roi_size / 28) samples per bin) is not a static shape; `sampling_ratio` here is a
    fixed count per bin axis (tests measure the agreement with the adaptive rule).
  - pasting (FCNMaskHead._do_paste_mask): F.grid_sample(bilinear, zero padding,
    align_corners=False) of the 28x28 probabilities at pixel centres (x + 0.5) normalised
    to the box extent, then >= 0.5 (mask_thr_binary). grid_sample with a separable grid is
    separable, so each paste is two small matrix products: rows [H, 28] @ mask @ [28, W].
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ezsd_jax.data.coco import DataError
from ezsd_jax.ops.roi_align import bilinear_axis_weights


# ------------------------------------------------------------------ host: COCO -> bitmaps

def _rle_counts_from_string(s: str, where: str) -> list[int]:
    """Counts of a compressed COCO RLE string (maskApi.c rleFrString), checked for truncation."""
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise DataError(f"{where}: compressed RLE counts are truncated")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise DataError(f"{where}: compressed RLE counts has an invalid character "
                                f"{s[p]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _check_counts(counts: Sequence[int], height: int, width: int, where: str) -> None:
    if len(counts) == 0:
        raise DataError(f"{where}: empty RLE (no counts)")
    if any(c < 0 for c in counts):
        raise DataError(f"{where}: RLE has negative counts")
    total = int(sum(counts))
    if total != height * width:
        raise DataError(f"{where}: RLE counts sum to {total}, the image has "
                        f"{height}x{width}={height * width} pixels (mask of the wrong size)")


def segmentation_rle(segm: Any, height: int, width: int, where: str) -> dict:
    """One annotation's 'segmentation' (polygon list, uncompressed RLE or compressed RLE) ->
    a compressed RLE of size [height, width] (pycocotools.mask). Malformed input raises a
    one-line DataError that starts with `where` (e.g. "file.json: annotation 17")."""
    from pycocotools import mask as mask_utils
    if isinstance(segm, list):
        if not segm:
            raise DataError(f"{where}: segmentation is an empty polygon list")
        polys = []
        for k, poly in enumerate(segm):
            if not isinstance(poly, (list, tuple)) or not all(
                    isinstance(v, numbers.Real) and not isinstance(v, bool) for v in poly):
                raise DataError(f"{where}: polygon {k} is not a list of numbers")
            if len(poly) % 2 or len(poly) < 6:
                raise DataError(f"{where}: polygon {k} has {len(poly)} coordinates (needs an "
                                "even number >= 6: x1, y1, x2, y2, x3, y3, ...)")
            if not all(math.isfinite(v) for v in poly):
                raise DataError(f"{where}: polygon {k} has a non-finite coordinate")
            polys.append([float(v) for v in poly])
        return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    if not isinstance(segm, dict) or "counts" not in segm or "size" not in segm:
        raise DataError(f"{where}: segmentation must be a polygon list or an RLE dict with "
                        f"'counts' and 'size', got {type(segm).__name__}")
    size = segm["size"]
    if not isinstance(size, (list, tuple)) or [int(v) for v in size] != [height, width]:
        raise DataError(f"{where}: RLE size {size!r} differs from the image's "
                        f"[{height}, {width}] (mask of the wrong size)")
    counts = segm["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool)
                   for c in counts):
            raise DataError(f"{where}: uncompressed RLE counts must be integers")
        _check_counts(counts, height, width, where)
        return mask_utils.frPyObjects(
            {"counts": [int(c) for c in counts], "size": [height, width]}, height, width)
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if not isinstance(counts, str):
        raise DataError(f"{where}: RLE counts must be a list or a string, got "
                        f"{type(counts).__name__}")
    _check_counts(_rle_counts_from_string(counts, where), height, width, where)
    return {"counts": counts.encode("ascii"), "size": [height, width]}


def annotation_mask(ann: dict, height: int, width: int, where: str) -> np.ndarray:
    """uint8 [height, width] bitmap of one COCO annotation (any segmentation format)."""
    from pycocotools import mask as mask_utils
    if "segmentation" not in ann:
        raise DataError(f"{where}: annotation has no 'segmentation'")
    rle = segmentation_rle(ann["segmentation"], height, width, where)
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def instance_masks(anns: Sequence[dict], height: int, width: int,
                   where: str) -> tuple[np.ndarray, np.ndarray]:
    """Training masks of one image: uint8 [M, height, width] for the annotations that are
    not crowd, in order, and keep [len(anns)] bool (False for iscrowd=1, which the
    reference drops from training together with its box). `where` names the file; the
    errors add the annotation id."""
    keep = np.asarray([not ann.get("iscrowd", 0) for ann in anns], bool)
    masks = [annotation_mask(ann, height, width, f"{where}: annotation {ann.get('id')!r}")
             for ann, k in zip(anns, keep) if k]
    out = np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)
    return out, keep


def pad_instances(masks: np.ndarray, max_instances: int) -> tuple[np.ndarray, np.ndarray]:
    """[M, H, W] -> ([max_instances, H, W] uint8, valid [max_instances] bool) for a static
    device shape; more than max_instances masks is an error (the caller sizes the slots)."""
    m = masks.shape[0]
    if m > max_instances:
        raise DataError(f"{m} instance masks but only {max_instances} slots")
    out = np.zeros((max_instances,) + masks.shape[1:], np.uint8)
    out[:m] = masks
    return out, np.arange(max_instances) < m


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
    g = int(sampling_ratio)
    if m < 1:
        raise ValueError("mask_targets: the mask stack needs at least one (padded) slot")
    if g < 1 or int(size) < 1:
        raise ValueError(f"mask_targets: size and sampling_ratio must be >= 1, got {size}, "
                         f"{sampling_ratio}")
    gt_index = jnp.clip(jnp.asarray(gt_index, jnp.int32), 0, m - 1)
    weight = (jnp.asarray(positive, bool) & jnp.asarray(valid, bool)[gt_index]
              ).astype(jnp.float32)
    rois = rois.astype(jnp.float32) / jnp.asarray(roi_scale, jnp.float32)
    x1 = jnp.clip(rois[:, 0], 0.0, w) - 0.5
    y1 = jnp.clip(rois[:, 1], 0.0, h) - 0.5
    x2 = jnp.clip(rois[:, 2], 0.0, w) - 0.5
    y2 = jnp.clip(rois[:, 3], 0.0, h) - 0.5
    k = jnp.arange(size * g)
    pos = (k // g).astype(jnp.float32) + ((k % g).astype(jnp.float32) + 0.5) / g
    ys = y1[:, None] + pos * ((y2 - y1) / size)[:, None]           # [R, S]
    xs = x1[:, None] + pos * ((x2 - x1) / size)[:, None]
    r = rois.shape[0]
    iy, wy = bilinear_axis_weights(ys, jnp.full((r,), h, jnp.int32))       # [R, S, 2]
    ix, wx = bilinear_axis_weights(xs, jnp.full((r,), w, jnp.int32))
    idx = (gt_index[:, None, None, None, None] * (h * w)
           + iy[:, :, :, None, None] * w + ix[:, None, None, :, :])  # [R, S, 2, S, 2]
    vals = jnp.take(jnp.asarray(masks).reshape(-1), idx, mode="clip").astype(jnp.float32)
    vals = vals * (wy[:, :, :, None, None] * wx[:, None, None, :, :])
    t = vals.reshape(r, size, 2 * g, size, 2 * g).sum(axis=(2, 4)) / float(g * g)
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


__all__ = ["segmentation_rle", "annotation_mask", "instance_masks", "pad_instances",
           "mask_targets", "paste_masks", "encode_masks"]
