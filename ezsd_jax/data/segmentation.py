"""Instance masks on the host: COCO segmentations (polygons, uncompressed / compressed
RLE) -> validated RLEs and bitmaps, and the fixed-size box crops that training batches
carry (one [S, S] crop per GT box, whatever the image size).

Used by coco.load_coco (validation) and the host pipeline (crops); the device turns the
crops into targets (ops.masks.crop_mask_targets). Detail: docs/code-notes.md.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np

from ezsd_jax.core.errors import DataError
from ezsd_jax.ops.masks import CROP_SCALE


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


# ------------------------------------------------------------------ host: box crops



def box_crops(masks: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Host: full-image bitmaps [n, H, W] -> each mask cropped to its box [n, 4] (xyxy,
    the same pixels) and resized to uint8 [n, size, size] coverage (0..CROP_SCALE): crop
    pixel (i, j) is the exact fraction of box cell (i, j) that the bitmap covers (area
    average, the bitmap read as a piecewise-constant function). The batch carries these
    instead of full-image masks: their size does not grow with the image, and nothing is
    lost outside the box, where a GT mask is zero (its box is its tight bound or larger).
    Resizing or flipping the image moves the box, not the crop (flip the crop with it)."""
    masks = np.asarray(masks)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    n, H, W = masks.shape
    out = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        x1, y1, x2, y2 = boxes[i]
        ay, ylo = _cell_overlaps(y1, y2, size, H)
        ax, xlo = _cell_overlaps(x1, x2, size, W)
        win = masks[i, ylo:ylo + ay.shape[1], xlo:xlo + ax.shape[1]].astype(np.float64)
        cov = ay @ win @ ax.T
        out[i] = np.clip(np.round(cov * CROP_SCALE), 0, CROP_SCALE).astype(np.uint8)
    return out


def _cell_overlaps(lo: float, hi: float, size: int, extent: int):
    """[size, k] fraction of each of `size` equal cells of [lo, hi] covered by pixels
    [p, p + 1), p = first .. first + k - 1 (the pixels the interval touches, in range)."""
    first = int(np.clip(np.floor(lo), 0, extent - 1))
    last = int(np.clip(np.ceil(hi), first + 1, extent))
    edges = lo + (hi - lo) * np.arange(size + 1) / size
    p = np.arange(first, last, dtype=np.float64)
    inter = (np.minimum(edges[1:, None], p[None, :] + 1.0)
             - np.maximum(edges[:-1, None], p[None, :]))
    return np.maximum(inter, 0.0) / max((hi - lo) / size, 1e-12), first


# ------------------------------------------------------------------ host: generated sets

def exact_segmentation(mask: np.ndarray, origin: tuple[int, int], hw: tuple[int, int],
                       kind: str) -> list | dict:
    """COCO 'segmentation' of a drawn bool `mask` [mh, mw] placed at origin (y0, x0) of
    an image of size hw, decoding to exactly these pixels: kind 'polygon' -> one
    rectangle polygon per horizontal run of pixels (pycocotools rasterizes an
    axis-aligned integer rectangle exactly), 'rle' -> compressed RLE (str counts)."""
    from pycocotools import mask as mask_utils
    y0, x0 = origin
    mask = np.asarray(mask, bool)
    if kind == "rle":
        full = np.zeros(tuple(int(v) for v in hw), np.uint8)
        full[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]] = mask
        rle = mask_utils.encode(np.asfortranarray(full))
        return {"counts": rle["counts"].decode("ascii"), "size": [int(v) for v in hw]}
    if kind != "polygon":
        raise ValueError(f"exact_segmentation: kind must be 'polygon' or 'rle', got {kind!r}")
    polys = []
    for r in range(mask.shape[0]):
        row = np.r_[False, mask[r], False].astype(np.int8)
        starts, ends = np.flatnonzero(np.diff(row) == 1), np.flatnonzero(np.diff(row) == -1)
        y = y0 + r
        for a, b in zip(starts, ends):
            xa, xb = x0 + int(a), x0 + int(b)
            polys.append([xa, y, xb, y, xb, y + 1, xa, y + 1])
    return polys


__all__ = ["exact_segmentation", "segmentation_rle", "annotation_mask", "instance_masks",
           "pad_instances", "box_crops"]
