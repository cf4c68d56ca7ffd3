"""The reference behaviours of docs/protocol.md that a config value alone cannot show,
pinned on small generated inputs: the distillation proposals drawn with replacement, the
per-GPU L1 mean, low-quality matches from min_pos_iou (mmdet's MaxIoUAssigner, transcribed),
the padded canvas at 0 after normalization, class-wise NMS over every (box, class) pair,
the background embedding's Xavier init and the LVIS evaluation's empty-image filter."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ezsd_jax.ezsd import distill
from ezsd_jax.lvis_eval import lvis_evaluate, nonempty_image_ids
from ezsd_jax.models import detector as det
from ezsd_jax.models import postprocess
from ezsd_jax.ops.matching import match_boxes
from ezsd_jax.ops.nms import batched_nms


# ----------------------------------------------------------------- distillation proposals

def test_replacement_sampling_duplicates_and_changes_per_step():
    s, num = 300, 200
    mask = np.ones((4, s), bool)
    mask[1, 50:] = False                          # an image with 50 stored proposals
    mask[2] = False                               # and one with none
    idx = np.asarray(distill.sample_slots(jax.random.PRNGKey(0), jnp.asarray(mask), num,
                                          "replacement"))
    assert idx.shape == (4, num)
    # only the first `num` stored are drawn from (select_fixed_subset), all valid
    assert idx[0].max() < num and idx[1].max() < 50
    assert all(mask[i, idx[i]].all() for i in (0, 1, 3))
    # with replacement: distinct draws ~ n (1 - (1 - 1/n)^n) (0.634 n at n = 200)
    for row, n in ((idx[0], num), (idx[3], num), (idx[1], 50)):
        want = n * (1 - (1 - 1 / n) ** num)
        assert abs(len(np.unique(row)) - want) < 4 * np.sqrt(want * 0.25), (len(np.unique(row)), want)
    assert not mask[2, idx[2]].any()              # nothing valid: every draw is masked
    # deterministic from the step key, new at every step
    again = np.asarray(distill.sample_slots(jax.random.PRNGKey(0), jnp.asarray(mask), num,
                                            "replacement"))
    other = np.asarray(distill.sample_slots(jax.random.PRNGKey(1), jnp.asarray(mask), num,
                                            "replacement"))
    np.testing.assert_array_equal(idx, again)
    assert (idx[0] != other[0]).mean() > 0.9


def test_select_entries_replacement_keeps_gt_and_weights_duplicates():
    b, slots, gt, d = 2, 6, 2, 3
    batch = {"distill_boxes": jnp.arange(b * (slots + gt) * 4, dtype=jnp.float32).reshape(
                 b, slots + gt, 4),
             "distill_emb": jnp.ones((b, slots + gt, d), jnp.float16),
             "distill_weight": jnp.arange(1, b * (slots + gt) + 1, dtype=jnp.float32).reshape(
                 b, slots + gt),
             "distill_mask": jnp.ones((b, slots + gt), bool)}
    sel = distill.select_entries(jax.random.PRNGKey(3), batch, slots, 4, "replacement")
    assert sel["boxes"].shape == (b, 4 + gt, 4)
    np.testing.assert_array_equal(sel["boxes"][:, 4:], batch["distill_boxes"][:, slots:])
    w = np.asarray(sel["weight"][:, :4])
    assert set(w[0].tolist()) <= {1.0, 2.0, 3.0, 4.0}        # from the first 4 slots only
    # per-image weights normalized to mean 1 over the kept entries, duplicates included
    nw = np.asarray(distill.normalize_weights(sel["weight"], sel["mask"]))
    np.testing.assert_allclose(nw.mean(-1), 1.0, rtol=1e-6)


def _reference_l1_per_gpu(r, t, w, m, group, d):
    """mmdet L1Loss(reduction='mean') on each GPU's images (a mean over its entries x D),
    x D, then the mean over GPUs (DDP averages the gradients)."""
    out = []
    for g in range(0, len(r), group):
        sel = m[g:g + group]
        rr, tt, ww = r[g:g + group][sel], t[g:g + group][sel], w[g:g + group][sel]
        out.append((np.abs(rr - tt) * ww[:, None]).mean() * d if len(rr) else 0.0)
    return float(np.mean(out))


def test_distill_loss_per_group_mean_matches_reference(rng):
    b, p, d = 8, 12, 5
    r = rng.normal(size=(b, p, d)).astype(np.float32)
    t = rng.normal(size=(b, p, d)).astype(np.float32)
    w = rng.uniform(0.2, 2.0, (b, p)).astype(np.float32)
    m = np.ones((b, p), bool)
    m[0, 2:] = False                   # images with very different entry counts
    m[5, 7:] = False
    m[6:8] = False                     # a group without entries contributes 0
    args = [jnp.asarray(x) for x in (r, t, w, m)]
    got = float(distill.distill_loss_terms(*args, factor=1.0, norm_images=2)["loss_distill"])
    np.testing.assert_allclose(got, _reference_l1_per_gpu(r, t, w, m, 2, d), rtol=1e-5)
    # one mean over the batch is another number when the counts differ
    whole = float(distill.distill_loss_terms(*args, factor=1.0)["loss_distill"])
    np.testing.assert_allclose(whole, _reference_l1_per_gpu(r, t, w, m, b, d), rtol=1e-5)
    assert abs(whole - got) > 1e-3
    with pytest.raises(ValueError, match="norm_images"):
        distill.distill_loss_terms(*args, norm_images=3)


# ----------------------------------------------------------------- low-quality matches

def _mmdet_max_iou_assign(iou_gt_by_box, pos, neg, min_pos, low_quality=True):
    """mmdet MaxIoUAssigner.assign (gt_max_assign_all=True), transcribed on numpy:
    overlaps [M gt, N boxes] -> assigned_gt_inds [N] (0 background, -1 ignore, i+1)."""
    overlaps = iou_gt_by_box
    m, n = overlaps.shape
    assigned = np.full(n, -1)
    max_ov, argmax_ov = overlaps.max(0), overlaps.argmax(0)
    gt_max = overlaps.max(1)
    assigned[(max_ov >= 0) & (max_ov < neg)] = 0
    p = max_ov >= pos
    assigned[p] = argmax_ov[p] + 1
    if low_quality:
        for i in range(m):
            if gt_max[i] >= min_pos:
                assigned[overlaps[i] == gt_max[i]] = i + 1
    return assigned


@pytest.mark.parametrize("pos,neg,min_pos", [(0.7, 0.3, 0.3), (0.5, 0.5, 0.5)])
def test_low_quality_matches_follow_mmdet(rng, pos, neg, min_pos):
    n, m = 30, 4
    fn = jax.jit(lambda iou, gv: match_boxes(iou, gv, pos, neg, low_quality_min_iou=min_pos,
                                             reassign_low_quality=True))
    for _ in range(20):
        k = int(rng.integers(1, m + 1))                          # valid GT columns
        iou = np.round(rng.uniform(0, 0.9, (n, m)) ** 2, 2).astype(np.float32)  # ties happen
        ref = _mmdet_max_iou_assign(iou[:, :k].T, pos, neg, min_pos)
        mg, lab = fn(jnp.asarray(iou), jnp.arange(m) < k)
        mg, lab = np.asarray(mg), np.asarray(lab)
        np.testing.assert_array_equal(lab, np.where(ref > 0, 1, np.where(ref == 0, 0, -1)))
        np.testing.assert_array_equal(mg[ref > 0], ref[ref > 0] - 1)


def test_low_quality_promotion_stops_below_min_pos_iou():
    # GT 0's best anchor has IoU 0.29, GT 1's 0.31: only GT 1 promotes (min_pos_iou 0.3)
    iou = jnp.asarray([[0.29, 0.0], [0.0, 0.31], [0.1, 0.1]], jnp.float32)
    _, lab = match_boxes(iou, jnp.ones(2, bool), 0.7, 0.3, low_quality_min_iou=0.3)
    np.testing.assert_array_equal(lab, [0, 1, 0])
    _, lab = match_boxes(iou, jnp.ones(2, bool), 0.7, 0.3, low_quality_min_iou=0.0)
    np.testing.assert_array_equal(lab, [1, 1, 0])           # earlier: any IoU > 0
    # an anchor that is GT 1's best is matched to GT 1 even if GT 0 overlaps it more
    iou = jnp.asarray([[0.8, 0.75], [0.85, 0.1]], jnp.float32)
    mg, lab = match_boxes(iou, jnp.ones(2, bool), 0.7, 0.3, low_quality_min_iou=0.3,
                          reassign_low_quality=True)
    np.testing.assert_array_equal(mg, [1, 0])
    # padded rows take no part: a padded row's high IoU does not hide the valid best row
    iou = jnp.asarray([[0.4], [0.9]], jnp.float32)
    _, lab = match_boxes(iou, jnp.ones(1, bool), 0.95, 0.3, low_quality_min_iou=0.3,
                         pred_valid=jnp.asarray([True, False]))
    assert int(lab[0]) == 1


# ----------------------------------------------------------------- padding

def test_padded_pixels_are_zero_after_normalization(rng):
    img = rng.integers(0, 256, (2, 16, 24, 3)).astype(np.uint8)
    hw = np.array([[10, 24], [16, 7]], np.int32)
    for i, (h, w) in enumerate(hw):
        img[i, h:] = 0
        img[i, :, w:] = 0
    x = np.asarray(det.normalize_images(jnp.asarray(img), jnp.asarray(hw), "mean"))
    want = (img.astype(np.float32) - det.PIXEL_MEAN) / det.PIXEL_STD
    for i, (h, w) in enumerate(hw):
        np.testing.assert_allclose(x[i, :h, :w], want[i, :h, :w], rtol=1e-6)
        assert (x[i, h:] == 0).all() and (x[i, :, w:] == 0).all()
    black = np.asarray(det.normalize_images(jnp.asarray(img), jnp.asarray(hw), "black"))
    np.testing.assert_allclose(black[1, 0, -1], -det.PIXEL_MEAN / det.PIXEL_STD, rtol=1e-6)


# ----------------------------------------------------------------- candidates before NMS

@pytest.mark.parametrize("r,c,mx,tile", [(37, 4, 60, 8), (20, 3, 70, 32)])
def test_exact_classwise_nms_equals_nms_over_every_pair(rng, r, c, mx, tile):
    exact = jax.jit(lambda b, s, v: postprocess.classwise_nms_shared_boxes(
        b, s, v, 0.5, mx, tile=tile))
    every = jax.jit(lambda b, s, cl, v: batched_nms(b, s, cl, 0.5, mx, v))
    for _ in range(4):
        xy = rng.uniform(0, 50, (r, 2))
        b = np.concatenate([xy, xy + rng.uniform(2, 30, (r, 2))], 1).astype(np.float32)
        s = rng.uniform(0, 1, (r, c)).astype(np.float32)
        s[rng.uniform(size=(r, c)) < 0.1] = 0.5                  # score ties
        v = rng.uniform(size=(r, c)) < 0.9
        i1, k1 = exact(jnp.asarray(b), jnp.asarray(s), jnp.asarray(v))
        i2, k2 = every(jnp.asarray(np.repeat(b, c, 0)), jnp.asarray(s.reshape(-1)),
                       jnp.asarray(np.tile(np.arange(c), r)), jnp.asarray(v.reshape(-1)))
        np.testing.assert_array_equal(k1, k2)
        np.testing.assert_array_equal(np.asarray(i1)[np.asarray(k1)],
                                      np.asarray(i2)[np.asarray(k2)])


def test_no_cap_keeps_a_high_scoring_rare_class_candidate():
    """30 near-copies of one box score high for class 0 (NMS keeps one of them); a rare
    class-2 box scores just below them. A cap of 30 candidates fills up with the class-0
    copies and never sees it; without a cap it is the second detection."""
    r, c = 32, 3
    boxes = np.tile(np.array([[10.0, 10.0, 40.0, 40.0]], np.float32), (r, 1))
    boxes[:30] += np.linspace(0, 1, 30, dtype=np.float32)[:, None]
    boxes[30] = [60.0, 60.0, 90.0, 90.0]
    boxes[31] = [0.0, 60.0, 20.0, 90.0]
    logits = np.full((1, r, c + 1), -4.0, np.float32)
    logits[0, :30, 0] = np.linspace(6.0, 5.0, 30)
    logits[0, 30, 2] = 4.5                                     # the rare class
    deltas = np.zeros((1, r, 4), np.float32)
    args = (jnp.asarray(logits), jnp.asarray(deltas), jnp.asarray(boxes[None]),
            jnp.ones((1, r), bool), jnp.asarray([[128.0, 128.0]]))
    run = jax.jit(postprocess.detections, static_argnames=(
        "score_threshold", "nms_threshold", "max_detections", "topk_candidates"))
    kw = dict(score_threshold=0.0, nms_threshold=0.5, max_detections=5)
    exact = run(*args, topk_candidates=0, **kw)
    capped = run(*args, topk_candidates=30, **kw)
    assert int(exact["classes"][0, 1]) == 2 and bool(exact["valid"][0, 1])
    got = np.asarray(capped["classes"][0])[np.asarray(capped["valid"][0])]
    assert 2 not in got.tolist()


# ----------------------------------------------------------------- background init

def test_background_embedding_xavier_normal_init():
    from ezsd_jax.models.ezsd_head import BACKGROUND_INITS
    d = 4096
    k = np.asarray(BACKGROUND_INITS["xavier"](jax.random.PRNGKey(0), (d, 1), jnp.float32))
    np.testing.assert_allclose(k.std(), np.sqrt(2.0 / (d + 1)), rtol=0.05)
    assert np.abs(k).max() > 3 * np.sqrt(2.0 / (d + 1))        # normal, not truncated
    k = np.asarray(BACKGROUND_INITS["normal"](jax.random.PRNGKey(0), (d, 1), jnp.float32))
    np.testing.assert_allclose(k.std(), 0.01, rtol=0.05)


# ----------------------------------------------------------------- LVIS evaluation filter

def _lvis_gt():
    imgs = [{"id": i, "width": 100, "height": 100 if i != 4 else 20,
             "neg_category_ids": [1] if i == 2 else [], "not_exhaustive_category_ids": []}
            for i in (1, 2, 3, 4)]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30],
             "area": 900.0},
            {"id": 2, "image_id": 3, "category_id": 2, "bbox": [5, 5, 20, 20], "area": 400.0},
            {"id": 3, "image_id": 4, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25.0}]
    cats = [{"id": 1, "name": "a", "frequency": "r"}, {"id": 2, "name": "b", "frequency": "f"}]
    return {"images": imgs, "annotations": anns, "categories": cats}


def test_lvis_eval_filter_drops_images_without_annotations():
    gt = _lvis_gt()
    # image 2 has no annotation, image 4 is under 32 px; cat filter: only category 2 -> 3
    assert nonempty_image_ids(gt, [4, 3, 2, 1]) == [3, 1]
    assert nonempty_image_ids(gt, [1, 2, 3, 4], cat_ids=[2]) == [3]
    # a high-scoring detection on image 2 (category 1 is in its neg_category_ids) is a
    # false positive when image 2 is evaluated, and does not count once it is filtered
    res = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.5},
           {"image_id": 2, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9}]
    every = lvis_evaluate(gt, res, img_ids=[1, 2, 3], cat_ids=[1])
    kept = lvis_evaluate(gt, res, img_ids=nonempty_image_ids(gt, [1, 2, 3], [1]),
                         cat_ids=[1])
    assert kept["AP"] == pytest.approx(1.0) and every["AP"] < 0.6
