"""predict's detections.json is a standard COCO results file: with --coco_gt=FILE it
takes the ground truth's image ids (by file name) and category ids (by name), and
pycocotools' COCO(FILE).loadRes reads it (boxes xywh, compressed-RLE masks, scores) and
COCOeval evaluates it, boxes and masks; names or files the ground truth lacks are one line
and status 2 (tested on the pure mapping). The detector is a tiny random Mask R-CNN bundle (tests/tiny_detector.py):
this checks the file format, not accuracy."""
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ezsd_jax.data import synthetic as S
from tiny_detector import make_bundle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _predict(args, env):
    return subprocess.run([sys.executable, "-m", "ezsd_jax.predict", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow        # ~30 CPU-s: a Mask R-CNN bundle, predict in a subprocess
def test_detections_load_with_pycocotools_loadres(tmp_path, optimized_env):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    spec = S.SyntheticSpec(S.default_categories(3), image_hw_range=((48, 64), (48, 64)),
                           objects_per_image=(1, 2), object_size=(16, 30))
    gt_file = S.write_coco_dataset(str(tmp_path / "data"), spec, 3, seed=1, split="val")
    gt = json.load(open(gt_file))
    # ids the predict index would not produce: the ground truth's must be used
    new_id = {im["id"]: 100 + 7 * k for k, im in enumerate(gt["images"])}
    for im in gt["images"]:
        im["id"] = new_id[im["id"]]
    for a in gt["annotations"]:
        a["image_id"], a["category_id"] = new_id[a["image_id"]], a["category_id"] + 10
    for c in gt["categories"]:
        c["id"] += 10
    gt_file = str(tmp_path / "gt.json")
    json.dump(gt, open(gt_file, "w"))
    names = [c["name"] for c in gt["categories"]]
    bundle = make_bundle(str(tmp_path / "bundle"), names, mask_on=True)
    out = tmp_path / "pred"
    p = _predict([f"--workdir={bundle}", f"--images={tmp_path / 'data' / 'val'}",
                  f"--names={','.join(names[::-1])}", f"--coco_gt={gt_file}",
                  f"--out={out}", "--overlays=false", "--score_threshold=0"], optimized_env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    dets = json.load(open(out / "detections.json"))
    assert dets and {"bbox", "score", "segmentation", "image_id", "category_id"} <= set(dets[0])
    by_name = {c["name"]: c["id"] for c in gt["categories"]}
    by_file = {im["file_name"]: im["id"] for im in gt["images"]}
    for d in dets:
        assert d["category_id"] == by_name[d["category_name"]]
        assert d["image_id"] == by_file[os.path.basename(d["file_name"])]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(gt_file)
        res = coco.loadRes(str(out / "detections.json"))
        for iou_type in ("bbox", "segm"):
            ev = COCOeval(coco, res, iou_type)
            ev.evaluate(), ev.accumulate(), ev.summarize()
            assert np.isfinite(ev.stats[0]) and ev.stats[0] >= 0
    assert sorted(res.getImgIds()) == sorted(by_file.values())
    ann = res.loadAnns(res.getAnnIds())[0]
    h = next(im["height"] for im in gt["images"] if im["id"] == ann["image_id"])
    assert ann["area"] > 0 and res.annToMask(ann).shape[0] == h



def test_coco_gt_ids_match_by_file_name_and_category_name(tmp_path):
    from ezsd_jax.predict.outputs import coco_gt_ids
    gt = {"images": [{"id": 5, "file_name": "a/x.jpg"}, {"id": 9, "file_name": "y.png"}],
          "categories": [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}]}
    path = str(tmp_path / "gt.json")
    json.dump(gt, open(path, "w"))
    assert coco_gt_ids(path, ["/p/y.png", "x.jpg"], ["dog", "cat"]) == \
        ([9, 5], {"dog": 1, "cat": 3})
    with pytest.raises(ValueError, match=r"no category named \['zebra'\]"):
        coco_gt_ids(path, ["y.png"], ["zebra"])
    with pytest.raises(ValueError, match="1 image file.*'z.png'"):
        coco_gt_ids(path, ["y.png", "z.png"], ["dog"])
    json.dump({"annotations": []}, open(path, "w"))
    with pytest.raises(ValueError, match="not a COCO annotation file"):
        coco_gt_ids(path, ["y.png"], ["dog"])
