"""Anchor layouts: FPN anchors for the RPN and the layout of the dense sliding candidates
of CLIP proposals (clip/proposals.sliding_candidates clips and masks it on device).

Pure numpy at trace time, np.float32 xyxy boxes in input-image pixels, in detectron2's
DefaultAnchorGenerator convention (centres, sizes, order: docs/code-notes.md).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def cell_anchors(sizes: Sequence[float], ratios: Sequence[float]) -> np.ndarray:
    """[A, 4] anchors centred on (0, 0); sizes outer, ratios inner; ratio = h / w."""
    out = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in ratios:
            if ratio <= 0 or size <= 0:
                raise ValueError(f"anchors: sizes and ratios must be > 0, got size={size} "
                                 f"ratio={ratio}")
            w = math.sqrt(area / float(ratio))
            h = float(ratio) * w
            out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return np.asarray(out, np.float64).reshape(-1, 4)


def anchor_grid(feature_hw: tuple[int, int], stride: int, sizes: Sequence[float],
                ratios: Sequence[float], offset: float = 0.0) -> np.ndarray:
    """Anchors of one feature map: [H * W * A, 4] float32, order (y, x, a).

    ``offset`` is the centre offset in units of ``stride`` (0.0: detectron2/torchvision
    default; 0.5 would put centres on cell centres).
    """
    fh, fw = int(feature_hw[0]), int(feature_hw[1])
    if fh < 0 or fw < 0 or stride <= 0:
        raise ValueError(f"anchor_grid: bad feature_hw={feature_hw} or stride={stride}")
    base = cell_anchors(sizes, ratios)                                   # [A, 4]
    xs = (np.arange(fw, dtype=np.float64) + offset) * stride
    ys = (np.arange(fh, dtype=np.float64) + offset) * stride
    yy, xx = np.meshgrid(ys, xs, indexing="ij")                           # [H, W]
    shifts = np.stack([xx, yy, xx, yy], axis=-1).reshape(-1, 1, 4)         # [HW, 1, 4]
    return (shifts + base[None]).reshape(-1, 4).astype(np.float32)


def fpn_anchors(image_hw: tuple[int, int], strides: Sequence[int] = (4, 8, 16, 32, 64),
                sizes: Sequence[float] = (32, 64, 128, 256, 512),
                ratios: Sequence[float] = (0.5, 1.0, 2.0),
                offset: float = 0.0) -> list[np.ndarray]:
    """Per-level anchors for FPN levels: list of [ceil(H/s) * ceil(W/s) * len(ratios), 4].

    One size per level (``sizes[l]`` at ``strides[l]``). Not clipped (detectron2 default).
    """
    if len(strides) != len(sizes):
        raise ValueError(f"fpn_anchors: {len(strides)} strides but {len(sizes)} sizes")
    h, w = int(image_hw[0]), int(image_hw[1])
    return [anchor_grid((math.ceil(h / s), math.ceil(w / s)), s, [size], ratios, offset)
            for s, size in zip(strides, sizes)]
