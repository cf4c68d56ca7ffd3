"""Mask evaluation on random sets: LVIS mask AP vs pycocotools COCOeval(segm) where the two
protocols coincide (every absent category verified negative, < 100 detections per image),
and the segm results."""
import copy

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ezsd_jax.data.coco import DataError
from ezsd_jax.lvis_eval import lvis_evaluate
from ezsd_jax.evaluate import coco_eval
from ezsd_jax.segm_eval import lvis_segm_evaluate, segm_results
from helpers import rand_polygon


def _rle_str(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": r["counts"].decode(), "size": list(r["size"])}


def _mask_world(rng, n_img=6, n_cat=4):
    cats = [{"id": c, "name": f"c{c}", "frequency": "rcff"[c - 1]} for c in range(1, n_cat + 1)]
    images, anns, results = [], [], []
    for i in range(1, n_img + 1):
        h, w = int(rng.integers(60, 130)), int(rng.integers(60, 130))
        present = set()
        for _ in range(int(rng.integers(1, 4))):
            c = int(rng.integers(1, n_cat + 1))
            present.add(c)
            poly = rand_polygon(rng, h, w)
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
            m = mask_utils.decode(rle)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c,
                         "segmentation": [poly], "area": float(mask_utils.area(rle)),
                         "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": 0})
            # a shifted copy (true positive at some IoU) and a random blob (false positive)
            dy, dx = rng.integers(-4, 5, 2)
            results.append({"image_id": i, "category_id": c, "score": float(rng.random()),
                            "segmentation": _rle_str(np.roll(m, (dy, dx), (0, 1)))})
            blob = np.zeros((h, w), np.uint8)
            y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
            blob[y:y + int(rng.integers(4, 12)), x:x + int(rng.integers(4, 40))] = 1
            results.append({"image_id": i, "category_id": int(rng.integers(1, n_cat + 1)),
                            "score": float(rng.random()), "segmentation": _rle_str(blob)})
        images.append({"id": i, "height": h, "width": w,
                       "neg_category_ids": [c for c in range(1, n_cat + 1) if c not in present],
                       "not_exhaustive_category_ids": []})
    return {"images": images, "annotations": anns, "categories": cats}, results


def test_lvis_mask_ap_equals_cocoeval_segm(rng):
    gt, results = _mask_world(rng)
    coco = COCO()   # COCOeval rewrites its GT segmentations in place: give it a copy
    coco.dataset = {**copy.deepcopy(gt), "categories": [{"id": c["id"], "name": c["name"]}
                                                        for c in gt["categories"]]}
    coco.createIndex()
    ref = coco_eval(coco, results, [im["id"] for im in gt["images"]], iou_type="segm")
    assert 0.1 < ref["AP"] < 0.95 and ref["AP50"] > ref["AP75"]
    ours = lvis_segm_evaluate(gt, results)
    for k, k_ref in [("AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75"), ("APs", "APs"),
                     ("APm", "APm"), ("APl", "APl"), ("AR@300", "AR100"), ("ARs@300", "ARs"),
                     ("ARm@300", "ARm")]:
        assert max(ours[k], 0.0) == pytest.approx(ref[k_ref], abs=1e-9), k
    # GT given as RLE instead of polygons: the same numbers
    gt_rle = {**gt, "annotations": [
        {**a, "segmentation": _rle_str(mask_utils.decode(mask_utils.merge(
            mask_utils.frPyObjects(a["segmentation"], im["height"], im["width"]))))}
        for a in gt["annotations"] for im in gt["images"] if im["id"] == a["image_id"]]}
    assert lvis_segm_evaluate(gt_rle, results)["AP"] == pytest.approx(ours["AP"], abs=1e-12)
    # mask IoU, not box IoU: the same detections scored with their boxes differ
    boxed = [{**r, "bbox": mask_utils.toBbox(
        {"counts": r["segmentation"]["counts"].encode(), "size": r["segmentation"]["size"]}
    ).tolist()} for r in results]
    assert lvis_evaluate(gt, boxed)["AP"] != pytest.approx(ours["AP"], abs=1e-3)


def test_segm_results_crop_and_errors():
    canvas = np.zeros((2, 40, 50), bool)
    canvas[0, 5:10, 5:20] = True
    canvas[1, 30:, 40:] = True           # outside the 25x35 image: cropped away
    res = segm_results(3, canvas, (25, 35), [7, 8], [0.9, 0.1234567])
    assert [r["category_id"] for r in res] == [7, 8] and res[1]["score"] == 0.12346
    back = [mask_utils.decode({"counts": r["segmentation"]["counts"].encode(),
                               "size": r["segmentation"]["size"]}) for r in res]
    assert back[0].shape == (25, 35) and back[0].sum() == 75 and back[1].sum() == 0
    with pytest.raises(ValueError, match="smaller"):
        segm_results(3, canvas, (45, 35), [7, 8], [0.9, 0.1])
    gt, results = _mask_world(np.random.default_rng(1), n_img=2)
    with pytest.raises(DataError, match="RLE 'segmentation'"):
        lvis_segm_evaluate(gt, [{**results[0], "segmentation": None}])
    gt["annotations"][0]["segmentation"] = [[1, 2, 3]]
    with pytest.raises(DataError, match="annotation 1: polygon 0 has 3 coordinates"):
        lvis_segm_evaluate(gt, results)
