"""Tests for ezsd_jax.ops.masks on random polygons and RLEs (rasterized by pycocotools):
decoding and its errors, mask targets vs a numpy crop-and-resize (the roi_align port of
test_ops_roi_align applied to the rasterized polygon), pasting vs a numpy port of
torch's grid_sample, and the RLE round trip."""
import jax
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from ezsd_jax.data.coco import DataError
from ezsd_jax.data.segmentation import annotation_mask, instance_masks, pad_instances
from ezsd_jax.ops.masks import encode_masks, mask_targets, paste_masks
from helpers import np_mask_targets, rand_polygon, uncompressed_rle

H, W = 48, 64
# one compiled function per static variant, shared by the tests (compiles dominate here)
jtargets = jax.jit(mask_targets, static_argnames=("size", "sampling_ratio", "binarize"))
jpaste = jax.jit(paste_masks, static_argnames=("height", "width", "threshold", "batch_size"))


def test_decode_formats_agree(rng):
    polys = [rand_polygon(rng), rand_polygon(rng)]
    ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, H, W)))
    assert ref.sum() > 50
    m_poly = annotation_mask({"segmentation": polys}, H, W, "a")
    assert np.array_equal(m_poly, ref)
    unc = uncompressed_rle(ref)
    assert sum(unc["counts"]) == H * W
    assert np.array_equal(annotation_mask({"segmentation": unc}, H, W, "a"), ref)
    comp = mask_utils.encode(np.asfortranarray(ref))
    for counts in (comp["counts"], comp["counts"].decode()):
        seg = {"counts": counts, "size": [H, W]}
        assert np.array_equal(annotation_mask({"segmentation": seg}, H, W, "a"), ref)
    # random blobs through compressed RLE (long runs -> multi-char counts)
    blob = (rng.random((H, W)) < 0.3).astype(np.uint8)
    blob[:, :20] = 1
    seg = {"counts": mask_utils.encode(np.asfortranarray(blob))["counts"].decode(),
           "size": [H, W]}
    assert np.array_equal(annotation_mask({"segmentation": seg}, H, W, "a"), blob)


@pytest.mark.parametrize("segm, msg", [
    ([[1, 2, 3, 4, 5, 6, 7]], "7 coordinates"),
    ([[1, 2, 3, 4]], "4 coordinates"),
    ([], "empty polygon"),
    ([[1, 2, "x", 4, 5, 6]], "not a list of numbers"),
    ({"counts": [], "size": [H, W]}, "empty RLE"),
    ({"counts": "", "size": [H, W]}, "empty RLE"),
    ({"counts": [10, 5], "size": [H, W]}, "sum to 15"),
    ({"counts": [H * W], "size": [H, W + 1]}, "wrong size"),
    ({"counts": "0", "size": [H, W]}, "sum to 0"),
    ({"counts": "1o", "size": [H, W]}, "truncated"),
    ("polygon", "polygon list or an RLE"),
])
def test_decode_errors_name_the_annotation(segm, msg):
    with pytest.raises(DataError, match=msg) as e:
        instance_masks([{"id": 7, "segmentation": [[0, 0, 5, 0, 5, 5]]},
                        {"id": 17, "segmentation": segm}], H, W, "val.json")
    assert str(e.value).startswith("val.json: annotation 17:")
    assert "\n" not in str(e.value)


def test_crowd_dropped_and_padding(rng):
    crowd = mask_utils.encode(np.asfortranarray(np.ones((H, W), np.uint8)))
    anns = [{"id": 1, "segmentation": [rand_polygon(rng)]},
            {"id": 2, "iscrowd": 1, "segmentation": {"counts": crowd["counts"], "size": [H, W]}},
            {"id": 3, "iscrowd": 0, "segmentation": [rand_polygon(rng)]}]
    masks, keep = instance_masks(anns, H, W, "f")
    assert keep.tolist() == [True, False, True] and masks.shape == (2, H, W)
    assert masks.dtype == np.uint8 and masks.max() == 1
    padded, valid = pad_instances(masks, 4)
    assert padded.shape == (4, H, W) and valid.tolist() == [True, True, False, False]
    assert np.array_equal(padded[:2], masks) and padded[2:].sum() == 0
    with pytest.raises(DataError, match="slots"):
        pad_instances(masks, 1)


def _world(rng, m=3, r=6):
    gts = np.stack([annotation_mask({"segmentation": [rand_polygon(rng)]}, H, W, "g")
                    for _ in range(m)])
    x1 = rng.uniform(-8, W - 10, r)
    y1 = rng.uniform(-8, H - 10, r)
    rois = np.stack([x1, y1, x1 + rng.uniform(3, 40, r), y1 + rng.uniform(3, 36, r)], 1)
    return gts, rois.astype(np.float32), rng.integers(0, m, r), rng.random(r) < 0.8


def test_mask_targets_match_numpy_crop_and_resize(rng):
    gts, rois, _, _ = _world(rng)
    gi, pos = np.array([0, 1, 2, 0, 1, 2]), np.array([1, 1, 1, 1, 1, 0], bool)
    valid = np.array([True, True, False])
    soft, wt = jtargets(gts, valid, rois, gi, pos, binarize=False)
    ref = np_mask_targets(gts, rois, gi, 2)
    w_ref = (pos & valid[gi]).astype(np.float32)
    assert np.array_equal(np.asarray(wt), w_ref) and w_ref.tolist() == [1, 1, 0, 1, 1, 0]
    np.testing.assert_allclose(np.asarray(soft), ref * w_ref[:, None, None], atol=1e-5)
    hard, _ = jtargets(gts.astype(bool), valid, rois, gi, pos)
    assert set(np.unique(np.asarray(hard)).tolist()) <= {0.0, 1.0}
    # away from the 0.5 boundary the binarized targets equal the thresholded reference
    sure = np.abs(ref - 0.5) > 1e-4
    assert np.array_equal(np.asarray(hard)[sure], ((ref >= 0.5) * w_ref[:, None, None])[sure])


def test_mask_targets_fixed_vs_adaptive_sampling(rng):
    """The reference samples ceil(roi/28) points per bin (sampling_ratio=0); 2 fixed
    samples per bin give the same binary targets on >= 98% of the pixels here."""
    gts, rois, gi, _ = _world(rng)
    pos = np.ones(len(gi), bool)
    # RoIs of a 2.5x resized input, masks at the original resolution
    ours, _ = jtargets(gts, np.ones(3, bool), rois * 2.5, gi, pos, roi_scale=2.5)
    adaptive = np_mask_targets(gts, rois, gi, 0) >= 0.5
    agree = float((np.asarray(ours).astype(bool) == adaptive).mean())
    assert agree >= 0.98, agree


def np_grid_sample_paste(p, box, h, w):
    """torch F.grid_sample(bilinear, zeros, align_corners=False) of p [m, m] at the grid of
    mmdet's _do_paste_mask, pixel by pixel."""
    m = p.shape[0]
    x0, y0, x1, y1 = [float(v) for v in box]
    out = np.zeros((h, w))
    for yy in range(h):
        gy = (yy + 0.5 - y0) / (y1 - y0) * 2 - 1
        iy = ((gy + 1) * m - 1) / 2
        for xx in range(w):
            gx = (xx + 0.5 - x0) / (x1 - x0) * 2 - 1
            ix = ((gx + 1) * m - 1) / 2
            fy, fx = int(np.floor(iy)), int(np.floor(ix))
            acc = 0.0
            for cy, wy in ((fy, 1 - (iy - fy)), (fy + 1, iy - fy)):
                for cx, wx in ((fx, 1 - (ix - fx)), (fx + 1, ix - fx)):
                    if 0 <= cy < m and 0 <= cx < m:
                        acc += wy * wx * p[cy, cx]
            out[yy, xx] = acc
    return out


def test_paste_matches_grid_sample_and_rle_round_trip(rng):
    n, h, w, m = 3, 20, 26, 7
    probs = rng.random((n, m, m)).astype(np.float32)
    boxes = np.array([[2.3, 1.7, 15.2, 12.9], [-4.0, 5.5, 9.0, 30.0], [10.0, 3.0, 25.6, 9.1]],
                     np.float32)
    soft = np.asarray(jpaste(probs, boxes, height=h, width=w, threshold=None, batch_size=2))
    ref = np.stack([np_grid_sample_paste(probs[i], boxes[i], h, w) for i in range(n)])
    np.testing.assert_allclose(soft, ref, atol=1e-5)
    hard = np.asarray(jpaste(probs, boxes, height=h, width=w, batch_size=2))
    assert hard.dtype == bool and np.array_equal(hard, soft >= 0.5)
    assert hard[:, :, :].sum() > 0 and not hard[0, 15:, :].any()   # nothing below box 0
    rles = encode_masks(hard)
    assert all(isinstance(r["counts"], str) for r in rles)
    back = mask_utils.decode([{"counts": r["counts"].encode(), "size": r["size"]} for r in rles])
    assert np.array_equal(back.transpose(2, 0, 1).astype(bool), hard)
    assert encode_masks(np.zeros((0, h, w), bool)) == []


def test_target_then_paste_recovers_the_polygon(rng):
    """Crop a rasterized polygon to its box (targets) and paste it back there: the two
    conventions agree, so the pasted mask overlaps the original well."""
    gts, _, _, _ = _world(rng)
    gt = gts[0]
    x, y, bw, bh = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(gt)))
    box = np.tile(np.array([[x, y, x + bw, y + bh]], np.float32), (6, 1))
    t, _ = jtargets(gts, np.ones(3, bool), box, np.zeros(6, int), np.ones(6, bool))
    pasted = np.asarray(jpaste(t[:3], box[:3], height=H, width=W, batch_size=2))[0]
    enc = encode_masks(np.stack([pasted, gt.astype(bool)]))
    iou = mask_utils.iou([enc[0]], [enc[1]], [0])[0, 0]
    assert iou > 0.9, iou
