"""Instance-segmentation evaluation: pasted detection masks -> COCO RLE results ->
COCOeval `segm` (COCO 48/17) or LVIS mask AP (the `lvis` API's federated protocol with
mask IoU).

Place in the pipeline: the eval stage pastes the mask head's output at the final boxes
(ezsd_jax.ops.masks.paste_masks) on a padded canvas; `segm_results` crops each image's
masks to its original size and encodes them; `coco_segm_eval` / `lvis_segm_evaluate` score
them. Box evaluation stays in ezsd_jax.evaluate.coco_eval and ezsd_jax.ezsd.lvis_eval.

LVIS with masks differs from LVIS with boxes in exactly two places (lvis-api LVISEval with
iou_type='segm', LVISResults): the IoU is mask IoU (pycocotools maskUtils.iou of the
results' RLEs and the GT segmentations converted at the image's height/width, no crowd),
and a detection's area is its mask area (maskUtils.area), where boxes use w * h. The GT
area is the annotation's 'area' field in both. `lvis_evaluate_iou` is that loop with the
IoU type as a parameter, on the matching and checks of ezsd_jax.ezsd.lvis_eval.
"""
from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from typing import Sequence

import numpy as np

from ezsd_jax.data.coco import DataError, read_json
from ezsd_jax.evaluate import COCO_STAT_NAMES
from ezsd_jax.ezsd.lvis_eval import (AREA_RNGS, FREQ_GROUPS, IOU_THRS, REC_THRS, _box_iou,
                                     _check_gt, _match, limit_per_image)
from ezsd_jax.ops.masks import encode_masks, segmentation_rle


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


def coco_segm_eval(coco_gt, results: list[dict], img_ids: Sequence[int],
                   cat_ids: Sequence[int] | None = None, verbose: bool = False) -> dict:
    """COCOeval segm on `img_ids` (and `cat_ids`), maxDets 1/10/100 as coco_eval; GT crowd
    regions are COCOeval's ignore regions. Empty results -> all zeros."""
    from pycocotools.cocoeval import COCOeval
    if cat_ids is not None:
        results = [r for r in results if r["category_id"] in set(cat_ids)]
    if not results:
        return {k: 0.0 for k in COCO_STAT_NAMES}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ev = COCOeval(coco_gt, coco_gt.loadRes(results), "segm")
        ev.params.imgIds = list(img_ids)
        if cat_ids is not None:
            ev.params.catIds = list(cat_ids)
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if verbose:
        print(buf.getvalue(), flush=True)
    return {k: float(max(v, 0.0)) for k, v in zip(COCO_STAT_NAMES, ev.stats)}


def _rle(segm, where: str) -> dict:
    """A result's RLE with bytes counts (pycocotools wants bytes)."""
    if not isinstance(segm, dict) or "counts" not in segm or "size" not in segm:
        raise DataError(f"{where}: segm results need an RLE 'segmentation'")
    c = segm["counts"]
    return {"counts": c.encode("ascii") if isinstance(c, str) else c,
            "size": [int(v) for v in segm["size"]]}


def lvis_evaluate_iou(gt: dict | str, results: Sequence[dict], iou_type: str = "segm",
                      max_dets: int = 300, img_ids: Sequence[int] | None = None,
                      cat_ids: Sequence[int] | None = None) -> dict:
    """LVIS evaluation of COCO-format results with box ('bbox': xywh) or mask ('segm': RLE
    'segmentation') IoU. Same metrics and rules as ezsd_jax.ezsd.lvis_eval.lvis_evaluate
    (equal to it for 'bbox', tested); see the module docstring for what 'segm' changes."""
    from pycocotools import mask as mask_utils
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"lvis_evaluate_iou: iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    where = gt if isinstance(gt, str) else "<LVIS ground truth>"
    if isinstance(gt, str):
        gt = read_json(gt)
    _check_gt(gt, where)
    imgs = {im["id"]: im for im in gt["images"]}
    img_ids = sorted(set(imgs) if img_ids is None else set(img_ids))
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    cat_ids = [c["id"] for c in cats] if cat_ids is None else sorted(set(cat_ids))
    freq = {c["id"]: c["frequency"] for c in cats}
    unknown = [c for c in cat_ids if c not in freq]
    if unknown:
        raise DataError(f"{where}: category ids {unknown[:10]} not in the ground truth")
    img_set, cat_set = set(img_ids), set(cat_ids)

    gts: dict = defaultdict(list)
    pos: dict = defaultdict(set)
    for a in gt["annotations"]:
        if a["image_id"] in img_set and a["category_id"] in cat_set:
            gts[a["image_id"], a["category_id"]].append(a)
            pos[a["image_id"]].add(a["category_id"])
    bad = [r["image_id"] for r in results if r["image_id"] not in imgs]
    if bad:
        raise DataError(f"results: image ids {sorted(set(bad))[:10]} are not in {where}")
    dts: dict = defaultdict(list)
    neg = {i: set(imgs[i]["neg_category_ids"]) for i in img_ids}
    nel = {i: set(imgs[i]["not_exhaustive_category_ids"]) for i in img_ids}
    for r in limit_per_image(results, max_dets):
        i, c = r["image_id"], r["category_id"]
        if i not in img_set or c not in cat_set:
            continue
        if c in neg[i] or c in pos[i]:
            dts[i, c].append(r)

    def gt_rle(a):
        im = imgs[a["image_id"]]
        return segmentation_rle(a["segmentation"], int(im["height"]), int(im["width"]),
                                f"{where}: annotation {a.get('id')!r}")

    areas = list(AREA_RNGS.values())
    acc: dict = defaultdict(lambda: {"scores": [], "tp": [], "ig": [], "num_gt": 0})
    for c in cat_ids:
        for i in img_ids:
            g, d = gts.get((i, c), []), dts.get((i, c), [])
            if not g and not d:
                continue
            d_order = np.argsort([-x["score"] for x in d], kind="mergesort")
            d = [d[k] for k in d_order]
            if iou_type == "bbox":
                d_box = np.asarray([x["bbox"] for x in d], np.float64).reshape(-1, 4)
                g_box = np.asarray([x["bbox"] for x in g], np.float64).reshape(-1, 4)
                ious_all = _box_iou(d_box, g_box)
                d_area = d_box[:, 2] * d_box[:, 3]
            else:
                d_rle = [_rle(x.get("segmentation"), f"results: image {i}") for x in d]
                g_rle = [gt_rle(x) for x in g]
                ious_all = (np.asarray(mask_utils.iou(d_rle, g_rle, [0] * len(g_rle)),
                                       np.float64).reshape(len(d), len(g))
                            if d and g else np.zeros((len(d), len(g))))
                d_area = np.asarray([mask_utils.area(x) for x in d_rle], np.float64)
            g_area = np.asarray([x.get("area", x["bbox"][2] * x["bbox"][3]) for x in g],
                                np.float64)
            g_flag = np.asarray([bool(x.get("ignore", 0)) for x in g], bool)
            scores = np.asarray([x["score"] for x in d], np.float64)
            for ai, (lo, hi) in enumerate(areas):
                g_ig = g_flag | (g_area < lo) | (g_area > hi)
                g_order = np.argsort(g_ig.astype(np.int64), kind="mergesort")
                g_ig = g_ig[g_order]
                matched, on_ig = _match(ious_all[:, g_order], g_ig, len(d))
                out_rng = (d_area < lo) | (d_area > hi) | (c in nel[i])
                ignore = on_ig | (~matched & out_rng[None, :])
                e = acc[c, ai]
                e["scores"].append(scores)
                e["tp"].append(matched)
                e["ig"].append(ignore)
                e["num_gt"] += int((~g_ig).sum())

    t, r_, k, a_ = len(IOU_THRS), len(REC_THRS), len(cat_ids), len(areas)
    precision = -np.ones((t, r_, k, a_))
    recall = -np.ones((t, k, a_))
    for ci, c in enumerate(cat_ids):
        for ai in range(a_):
            e = acc.get((c, ai))
            if e is None or e["num_gt"] == 0:
                continue
            scores = np.concatenate(e["scores"])
            order = np.argsort(-scores, kind="mergesort")
            tp_m = np.concatenate(e["tp"], axis=1)[:, order]
            ig = np.concatenate(e["ig"], axis=1)[:, order]
            tps = np.cumsum(tp_m & ~ig, axis=1).astype(np.float64)
            fps = np.cumsum(~tp_m & ~ig, axis=1).astype(np.float64)
            for ti in range(t):
                tp, fp = tps[ti], fps[ti]
                rc = tp / e["num_gt"]
                recall[ti, ci, ai] = rc[-1] if len(tp) else 0.0
                pr = tp / (fp + tp + np.spacing(1))
                pr = np.maximum.accumulate(pr[::-1])[::-1] if len(pr) else pr
                inds = np.searchsorted(rc, REC_THRS, side="left")
                q = np.zeros(r_)
                ok = inds < len(pr)
                q[ok] = pr[inds[ok]]
                precision[ti, :, ci, ai] = q

    def mean(x):
        x = x[x > -1]
        return float(np.mean(x)) if x.size else -1.0

    groups = {g: [ci for ci, c in enumerate(cat_ids) if freq[c] == g] for g in FREQ_GROUPS}
    t50 = int(np.argmin(np.abs(IOU_THRS - 0.5)))
    t75 = int(np.argmin(np.abs(IOU_THRS - 0.75)))
    out = {"AP": mean(precision[..., 0]), "AP50": mean(precision[t50, :, :, 0]),
           "AP75": mean(precision[t75, :, :, 0]), "APs": mean(precision[..., 1]),
           "APm": mean(precision[..., 2]), "APl": mean(precision[..., 3])}
    for g in FREQ_GROUPS:
        out[f"AP{g}"] = mean(precision[:, :, groups[g], 0])
    out[f"AR@{max_dets}"] = mean(recall[..., 0])
    for ai, name in ((1, "s"), (2, "m"), (3, "l")):
        out[f"AR{name}@{max_dets}"] = mean(recall[..., ai])
    evaluated = (precision[0, 0, :, 0] > -1)
    out["num_categories"] = {g: int(evaluated[groups[g]].sum()) for g in FREQ_GROUPS}
    return out


def lvis_segm_evaluate(gt: dict | str, results: Sequence[dict], max_dets: int = 300,
                       img_ids: Sequence[int] | None = None,
                       cat_ids: Sequence[int] | None = None) -> dict:
    """LVIS mask AP (AP, APr, APc, APf, ...) of RLE results; see lvis_evaluate_iou."""
    return lvis_evaluate_iou(gt, results, "segm", max_dets, img_ids, cat_ids)


__all__ = ["segm_results", "coco_segm_eval", "lvis_evaluate_iou", "lvis_segm_evaluate"]
