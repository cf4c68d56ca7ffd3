"""Instance-segmentation evaluation: pasted detection masks -> COCO RLE results ->
COCOeval `segm` (COCO 48/17) or LVIS mask AP.

Place in the pipeline: the eval stage pastes masks on a padded canvas; `segm_results` crops
and encodes them; evaluate.coco_eval(iou_type='segm') / `lvis_segm_evaluate` score them.
How LVIS mask AP differs from box AP: docs/code-notes.md.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ezsd_jax.lvis_eval import lvis_evaluate
from ezsd_jax.ops.masks import encode_masks


def segm_results(image_id: int, masks: np.ndarray, orig_hw: Sequence[int],
                 category_ids: Sequence[int], scores: Sequence[float]) -> list[dict]:
    """One image's pasted masks [N, Hc, Wc] (canvas >= the original size) -> COCO segm
    results {image_id, category_id, segmentation (RLE, str counts), score}, cropped to the
    original (h, w)."""
    h, w = (int(v) for v in orig_hw)
    masks = np.asarray(masks)
    if masks.shape[1] < h or masks.shape[2] < w:
        raise ValueError(f"segm_results: canvas {masks.shape[1:]} is smaller than the image "
                         f"({h}, {w})")
    rles = encode_masks(masks[:, :h, :w])
    return [{"image_id": int(image_id), "category_id": int(c), "segmentation": r,
             "score": round(float(s), 5)} for r, c, s in zip(rles, category_ids, scores)]


def lvis_segm_evaluate(gt: dict | str, results: Sequence[dict], max_dets: int = 300,
                       img_ids: Sequence[int] | None = None,
                       cat_ids: Sequence[int] | None = None) -> dict:
    """LVIS mask AP (AP, APr, APc, APf, ...) of RLE results: lvis_evaluate with mask IoU."""
    return lvis_evaluate(gt, results, max_dets, img_ids, cat_ids, iou_type="segm")


__all__ = ["segm_results", "lvis_segm_evaluate"]
