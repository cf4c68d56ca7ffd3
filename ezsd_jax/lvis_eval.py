"""LVIS evaluation (the `lvis` API's federated protocol), implemented here on numpy and
pycocotools' IoU instead of depending on the unmaintained `lvis` package.

Place in the pipeline: ezsd_eval on LVIS (configs/lvis.py) hands its COCO-format detections
here -> AP, AP50, AP75, APs/m/l, APr, APc, APf and AR@max_dets. Why not `lvis`, and the
protocol step by step: docs/code-notes.md.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from ezsd_jax.data.coco import DataError, read_json
from ezsd_jax.data.segmentation import segmentation_rle

IOU_THRS = np.linspace(0.5, 0.95, 10)
REC_THRS = np.linspace(0.0, 1.0, 101)
AREA_RNGS = {"all": (0.0, 1e10), "small": (0.0, 32.0 ** 2), "medium": (32.0 ** 2, 96.0 ** 2),
             "large": (96.0 ** 2, 1e10)}
FREQ_GROUPS = ("r", "c", "f")


def _box_iou(dt: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """xywh [n,4], [m,4] -> IoU [n,m] (pycocotools' box IoU, no crowd)."""
    if len(dt) == 0 or len(gt) == 0:
        return np.zeros((len(dt), len(gt)))
    return np.asarray(mask_utils.iou(dt.astype(np.float64), gt.astype(np.float64),
                                     [0] * len(gt)), np.float64).reshape(len(dt), len(gt))


def limit_per_image(results: Iterable[dict], max_dets: int) -> list[dict]:
    """The `max_dets` highest-scoring detections of each image (all if max_dets < 0)."""
    by_img: dict = defaultdict(list)
    for r in results:
        by_img[r["image_id"]].append(r)
    out = []
    for anns in by_img.values():
        if 0 <= max_dets < len(anns):
            anns = sorted(anns, key=lambda a: a["score"], reverse=True)[:max_dets]
        out.extend(anns)
    return out


def _match(ious: np.ndarray, gt_ignore: np.ndarray, num_dt: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy COCO matching; ious [num_dt, num_gt] with dts by score and gts ignore-last.
    Each detection takes the untaken GT of highest IoU >= threshold (ties: the later GT),
    non-ignored GTs first. Returns matched [T, num_dt] and matched-an-ignored-GT [T, num_dt].
    """
    t = len(IOU_THRS)
    num_gt = len(gt_ignore)
    dt_matched = np.zeros((t, num_dt), bool)
    dt_on_ignored = np.zeros((t, num_dt), bool)
    if num_dt == 0 or num_gt == 0:
        return dt_matched, dt_on_ignored
    gt_ignore = np.asarray(gt_ignore, bool)
    for ti, thr in enumerate(IOU_THRS):
        thr = min(float(thr), 1 - 1e-10)
        taken = np.zeros(num_gt, bool)
        for d in np.flatnonzero((ious >= thr).any(axis=1)):
            ok = ~taken & (ious[d] >= thr)
            if not ok.any():
                continue
            reg = ok & ~gt_ignore
            cand = reg if reg.any() else ok
            vals = np.where(cand, ious[d], -1.0)
            m = num_gt - 1 - int(np.argmax(vals[::-1]))
            dt_matched[ti, d] = True
            dt_on_ignored[ti, d] = gt_ignore[m]
            taken[m] = True
    return dt_matched, dt_on_ignored


def _check_gt(gt: dict, where: str) -> None:
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise DataError(f"{where}: LVIS ground truth needs a list '{key}'")
    for img in gt["images"]:
        for key in ("id", "neg_category_ids", "not_exhaustive_category_ids"):
            if key not in img:
                raise DataError(f"{where}: image {img.get('id')!r} lacks '{key}' (not an "
                                "LVIS-format file; use COCOeval for COCO files)")
    for c in gt["categories"]:
        if c.get("frequency") not in FREQ_GROUPS:
            raise DataError(f"{where}: category {c.get('name')!r} has frequency "
                            f"{c.get('frequency')!r}, expected one of {FREQ_GROUPS}")


def _rle(segm, where: str) -> dict:
    """A result's RLE with bytes counts (pycocotools wants bytes)."""
    if not isinstance(segm, dict) or "counts" not in segm or "size" not in segm:
        raise DataError(f"{where}: segm results need an RLE 'segmentation'")
    c = segm["counts"]
    return {"counts": c.encode("ascii") if isinstance(c, str) else c,
            "size": [int(v) for v in segm["size"]]}


def nonempty_image_ids(gt: dict | str, img_ids: Sequence[int],
                       cat_ids: Sequence[int] | None = None, min_size: int = 32) -> list[int]:
    """The images of `img_ids` that the reference evaluates on LVIS: its test set sets
    eval_filter_empty_gt=True, so mmdet's CocoDataset._filter_imgs drops images without an
    annotation of the evaluated categories (`cat_ids`, default all) and images whose
    shorter side is below min_size; LVISEval then runs on the remaining ids only
    (params.imgIds), so detections on the dropped images never count as false positives
    of their neg_category_ids. Order of `img_ids` kept."""
    if isinstance(gt, str):
        gt = read_json(gt)
    cats = None if cat_ids is None else set(cat_ids)
    with_ann = {a["image_id"] for a in gt["annotations"]
                if cats is None or a["category_id"] in cats}
    size = {im["id"]: min(im["width"], im["height"]) for im in gt["images"]}
    return [i for i in img_ids if i in with_ann and size.get(i, 0) >= min_size]


def lvis_evaluate(gt: dict | str, results: Sequence[dict], max_dets: int = 300,
                  img_ids: Sequence[int] | None = None,
                  cat_ids: Sequence[int] | None = None, iou_type: str = "bbox") -> dict:
    """LVIS evaluation of COCO-format `results` (image_id, category_id, score and bbox xywh
    for iou_type='bbox', RLE 'segmentation' for 'segm') against LVIS ground truth (dict or
    JSON path). img_ids / cat_ids default to all of the ground truth's. Returns {'AP',
    'AP50', 'AP75', 'APs', 'APm', 'APl', 'APr', 'APc', 'APf', f'AR@{max_dets}', 'ARs@..',
    'ARm@..', 'ARl@..'} (-1: nothing to evaluate), plus 'num_categories' evaluated per
    frequency group. With 'segm' the IoU is mask IoU (GT segmentations rasterized at the
    image's height/width, no crowd) and a detection's area is its mask area, as lvis-api's
    LVISEval(iou_type='segm') does; everything else is the same."""
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"lvis_evaluate: iou_type must be 'bbox' or 'segm', got {iou_type!r}")
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


__all__ = ["lvis_evaluate", "nonempty_image_ids", "limit_per_image", "IOU_THRS", "REC_THRS", "AREA_RNGS"]
