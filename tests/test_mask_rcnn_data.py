"""The Mask R-CNN data path: generated sets' exact segmentations (polygon and RLE), the
batch's box crops -> mask targets vs a straightforward numpy crop-and-resize of the
rasterized mask, masks following the resize and the flip through the pipeline, and the
loader's one-line errors for bad segmentations (file and annotation named)."""
import json

import jax
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from ezsd_jax.data import synthetic as S
from ezsd_jax.data.coco import DataError, load_coco
from ezsd_jax.data.pipeline import DetectionPipeline
from ezsd_jax.data.segmentation import annotation_mask, box_crops, exact_segmentation
from ezsd_jax.data.transforms import boxes_to_original
from ezsd_jax.ops.masks import crop_mask_targets
from helpers import MASK_H as H, MASK_W as W, np_mask_targets, rand_polygon, uncompressed_rle

jcrop = jax.jit(crop_mask_targets, static_argnames=("size", "sampling_ratio", "binarize"))


def _tight_boxes(masks):
    b = np.stack([mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m))) for m in masks])
    b[:, 2:] += b[:, :2]
    return b.astype(np.float32)


def test_exact_segmentation_decodes_to_the_drawn_pixels(rng):
    for _ in range(4):
        mask = rng.random((int(rng.integers(3, 20)), int(rng.integers(3, 20)))) < 0.5
        mask[0, 0] = True
        hw, origin = (30, 34), (int(rng.integers(0, 10)), int(rng.integers(0, 14)))
        full = np.zeros(hw, np.uint8)
        full[origin[0]:origin[0] + mask.shape[0], origin[1]:origin[1] + mask.shape[1]] = mask
        for kind in ("polygon", "rle"):
            seg = exact_segmentation(mask, origin, hw, kind)
            assert isinstance(seg, list if kind == "polygon" else dict)
            json.dumps(seg)
            assert np.array_equal(annotation_mask({"segmentation": seg}, *hw, "x"), full)


def test_crop_targets_match_numpy_crop_and_resize(rng):
    """Targets from the batch's 56x56 box crops vs RoIAlign of the full rasterized mask
    (polygons, uncompressed and compressed RLE; random RoIs, some leaving the GT box or
    the image): >= 99% of the binary target pixels agree (two resamplings vs one)."""
    agree = []
    for trial in range(4):
        segs = [[rand_polygon(rng)] for _ in range(3)]
        gts = np.stack([annotation_mask({"segmentation": s}, H, W, "g") for s in segs])
        segs[1] = uncompressed_rle(gts[1])
        segs[2] = mask_utils.encode(np.asfortranarray(gts[2]))
        gts = np.stack([annotation_mask({"segmentation": s}, H, W, "g") for s in segs])
        boxes = _tight_boxes(gts)
        crops = box_crops(gts, boxes, 56)
        r = 8
        x1, y1 = rng.uniform(-6, W - 10, r), rng.uniform(-6, H - 10, r)
        rois = np.stack([x1, y1, x1 + rng.uniform(3, 40, r), y1 + rng.uniform(3, 36, r)],
                        1).astype(np.float32)
        gi, pos = rng.integers(0, 3, r), rng.random(r) < 0.9
        valid = np.ones(3, bool)
        got, wt = jcrop(crops, boxes, valid, rois, gi, pos, np.array([H, W]))
        ref = (np_mask_targets(gts, rois, gi, 2) >= 0.5) * pos[:, None, None]
        assert np.array_equal(np.asarray(wt), pos.astype(np.float32))
        agree.append(float((np.asarray(got) == ref).mean()))
    assert np.mean(agree) >= 0.99 and min(agree) >= 0.97, agree


def _synthetic(tmp_path, n=3):
    spec = S.SyntheticSpec(S.default_categories(3), image_hw_range=((40, 60), (44, 64)),
                           objects_per_image=(2, 4), object_size=(12, 30))
    ann = S.write_coco_dataset(str(tmp_path), spec, n, seed=1)
    return ann, load_coco(ann, str(tmp_path / "train"), with_masks=True)


def test_pipeline_masks_follow_the_resize_and_the_flip(tmp_path):
    """Each GT's target at its own box, from the batch (resized x~1.6, flipped), equals
    the mirrored target of the original full-resolution mask at the original box."""
    ann, ds = _synthetic(tmp_path)
    data = json.load(open(ann))
    kinds = {type(a["segmentation"]).__name__ for a in data["annotations"]}
    assert kinds == {"list", "dict"}          # polygons and RLE in one set
    for flip in (0.0, 1.0):
        pipe = DetectionPipeline(ds, batch_size=3, image_size=(128, 128), max_boxes=4,
                                 train=True, short_side=80, max_side=128, flip_prob=flip,
                                 num_threads=1, process_index=0, process_count=1,
                                 mask_size=28)
        batch = next(pipe.train_iterator())
        pipe.close()
        assert batch["gt_masks"].shape == (3, 4, 28, 28) and batch["gt_masks"].dtype == np.uint8
        assert bool(batch["flipped"].all()) == bool(flip)
        by_id = {r.image_id: r for r in ds.records}
        for b in range(3):
            rec = by_id[int(batch["image_id"][b])]
            full = np.stack([annotation_mask({"segmentation": s}, rec.height, rec.width, "g")
                             for s in rec.segmentations])
            n = int(batch["box_mask"][b].sum())
            assert n == len(rec.boxes) and n >= 2
            boxes = batch["boxes"][b, :n]
            got, _ = jcrop(batch["gt_masks"][b, :n], boxes, np.ones(n, bool), boxes,
                           np.arange(n), np.ones(n, bool), batch["image_hw"][b])
            info = {"scale": float(batch["scale"][b]), "flipped": bool(batch["flipped"][b]),
                    "resized_hw": tuple(batch["image_hw"][b])}
            orig = boxes_to_original(boxes, info)
            ref = _np_targets_at(full, orig) >= 0.5
            if info["flipped"]:
                ref = ref[:, :, ::-1]
            assert float((np.asarray(got) == ref).mean()) >= 0.97


def _np_targets_at(full, boxes):
    from test_ops_roi_align import np_roi_align
    return np.stack([np_roi_align(full[i][:, :, None].astype(np.float64),
                                  boxes[i:i + 1].astype(np.float64), 1.0, 28, 2)[0, ..., 0]
                     for i in range(len(boxes))])


@pytest.mark.parametrize("segmentation,message", [
    ([[1, 1, 5, 1]], "polygon 0 has 4 coordinates"),
    ({"counts": [], "size": [40, 44]}, "empty RLE"),
    ({"counts": "", "size": [40, 44]}, "empty RLE"),
    ({"counts": [10, 5], "size": [8, 9]}, "wrong size"),
    ("oops", "polygon list or an RLE dict"),
])
def test_loader_names_the_file_and_the_annotation(tmp_path, segmentation, message):
    ann, _ = _synthetic(tmp_path, n=1)
    data = json.load(open(ann))
    data["images"][0].update(height=40, width=44)
    for a in data["annotations"]:
        a["bbox"] = [1, 1, 10, 10]
        a["segmentation"] = [[1, 1, 11, 1, 11, 11, 1, 11]]
    bad_id = data["annotations"][-1]["id"]
    data["annotations"][-1]["segmentation"] = segmentation
    # a crowd region with a broken mask: dropped from training, never decoded
    data["annotations"].insert(0, dict(data["annotations"][0], id=999, iscrowd=1,
                                       segmentation={"counts": [], "size": [1, 1]}))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    kw = dict(check_files=False)
    load_coco(str(path), str(tmp_path / "train"), **kw)      # boxes only: masks unread
    with pytest.raises(DataError) as e:
        load_coco(str(path), str(tmp_path / "train"), with_masks=True, **kw)
    msg = str(e.value)
    assert str(path) in msg and f"annotation id={bad_id}" in msg and message in msg, msg
    assert "\n" not in msg
    ds = load_coco(str(path), str(tmp_path / "train"), with_masks=True, on_error="skip", **kw)
    assert ds.skipped["bad_segmentation"] == 1 and ds.skipped["crowd"] == 1
    assert len(ds.records) == 0      # the image of the bad annotation is dropped whole


def test_box_crops_are_exact_area_fractions(rng):
    """A crop at integer pixel boxes whose size divides the crop size is the bitmap
    repeated; a cell a quarter covered reads a quarter."""
    m = (rng.random((1, 10, 12)) < 0.5).astype(np.uint8)
    c = box_crops(m, np.array([[2, 3, 9, 10]]), 14)[0]
    assert np.array_equal(c, np.kron(m[0, 3:10, 2:9], np.ones((2, 2), np.uint8)) * 255)
    one = np.zeros((1, 4, 4), np.uint8)
    one[0, 0, 0] = 1
    assert box_crops(one, np.array([[0, 0, 2, 2]]), 1)[0, 0, 0] == 64


def test_configs_pin_the_mask_rows_of_the_protocol_table():
    """docs/protocol.md, mask rows marked 'same': Mask R-CNN in coco.py and lvis.py with
    the reference's FCNMaskHead (4 x 3x3 convs of 256, 14 -> 28, class-agnostic), mask
    loss weight 1, all 128 positives of 512 x 0.25; the shared default stays off."""
    from configs import coco, common, lvis
    for mod in (coco, lvis):
        m = mod.get_config().model
        assert m.mask_on and m.mask_num_classes == 1
        assert (m.mask_roi_size, m.mask_num_convs, m.mask_conv_dim) == (14, 4, 256)
        assert m.mask_loss_weight == 1.0
        assert m.mask_max_positives == m.roi_batch_per_image * m.roi_positive_fraction
    assert not common.model_config().mask_on


def test_report_tints_masks_and_adds_the_mask_ap_table():
    from ezsd_jax.demo import report
    full = np.zeros((30, 30), np.uint8)
    full[14:19, 5:10] = 1
    rle = mask_utils.encode(np.asfortranarray(full))
    rle["counts"] = rle["counts"].decode("ascii")
    dets = [{"bbox": [4, 14, 8, 5], "score": 0.9, "category_id": 1, "segmentation": rle}]
    arr = np.asarray(report.draw_detections(np.zeros((30, 30, 3), np.uint8), dets, {1: "a"},
                                            set(), scale=1, score_threshold=0.3))
    tint = np.round(0.45 * np.asarray(report.BASE_COLOUR, np.float32))
    assert np.array_equal(arr[17, 8], tint) and not arr[25, 25].any()
    s = {g: {"AP50": 0.5, "mask_AP50": 0.25} for g in ("base", "novel", "all")}
    assert "novel mask AP50" in report.main_tables(s, None, None)
    assert "mask AP50" not in report.main_tables({"all": {"AP50": 0.5}}, None, None)


def test_demo_world_rewrites_splits_written_without_masks(tmp_path):
    """Annotation files of the boxes-only world still load; demo_data rewrites them with
    exact segmentations (polygons and RLE) instead of skipping them."""
    import os
    from configs import demo
    from ezsd_jax.demo import world
    spec = world.spec_from_config(demo.world_config())
    p = world.detection_paths(str(tmp_path))
    for k in ("captions_train", "captions_heldout"):      # present: not rewritten here
        os.makedirs(os.path.dirname(p[k]), exist_ok=True)
        open(p[k], "wb").close()
    world.write_world(str(tmp_path), spec, train_images=1, val_images=1,
                      captions_per_category=1, heldout_per_category=1, log=lambda m: None)
    data = json.load(open(p["train_ann"]))
    assert data["annotations"] and all("segmentation" in a for a in data["annotations"])
    for a in data["annotations"]:
        a.pop("segmentation")
    with open(p["train_ann"], "w") as f:
        json.dump(data, f)
    load_coco(p["train_ann"], p["train_images"], check_files=False)   # old files load
    logs = []
    world.write_world(str(tmp_path), spec, train_images=1, val_images=1,
                      captions_per_category=1, heldout_per_category=1, log=logs.append)
    assert any("wrote 1 train" in m for m in logs) and any("val" in m and "skipping" in m
                                                            for m in logs)
    ds = load_coco(p["train_ann"], p["train_images"], with_masks=True)
    assert sum(len(r.segmentations) for r in ds.records) == len(data["annotations"])
