"""Class-balanced repeat-factor sampling (LVIS; Gupta et al. 2019), as mmdetection's
ClassBalancedDataset implements it. Place in the pipeline: train.make_pipeline computes
the per-image repeat counts from the loaded records when config.data.repeat_threshold > 0;
the DetectionPipeline's train stream then permutes the repeated index list each epoch
(seeded by (seed, epoch)), so the order is a pure function of the seed and the stream
position: a resumed run sees exactly what an uninterrupted one sees.

  f(c) = fraction of the training images that hold category c
  r(c) = max(1, sqrt(t / f(c)))
  r(I) = max over the categories c in image I of r(c)   (1 for an image without any)
  image I appears ceil(r(I)) times per epoch            (mmdet; detectron2 rounds at random)
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
