"""Class-balanced repeat-factor sampling (LVIS; Gupta et al. 2019), as mmdetection's
ClassBalancedDataset implements it: per-image repeat counts for the train stream when
config.data.repeat_threshold > 0 (train.make_pipeline). The rule and the resumable epoch
order: docs/code-notes.md.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def repeat_factors(classes_per_image: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """r(I) float64 [N] from each image's class ids (any ints; repeats are counted once)."""
    if not threshold > 0:
        raise ValueError(f"repeat-factor threshold must be > 0, got {threshold}")
    n = len(classes_per_image)
    sets = [set(np.asarray(c).reshape(-1).tolist()) for c in classes_per_image]
    freq: dict = {}
    for s in sets:
        for c in s:
            freq[c] = freq.get(c, 0) + 1
    cat_r = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in freq.items()}
    return np.asarray([max((cat_r[c] for c in s), default=1.0) for s in sets], np.float64)


def repeat_index(factors: np.ndarray) -> np.ndarray:
    """Record indices of one epoch, image i repeated ceil(r_i) times (int64, in order)."""
    counts = np.ceil(np.asarray(factors, np.float64)).astype(np.int64)
    return np.repeat(np.arange(len(counts)), np.maximum(counts, 1))


__all__ = ["repeat_factors", "repeat_index"]
