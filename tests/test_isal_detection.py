"""ISAL detection adapter on a tiny Faster R-CNN (64x64 flat-background images, random
init): JVP pool scores equal explicit per-image gradient dot products; the per-image loss
(and the fixed assignment) of image i does not depend on the other images of the batch;
images without pseudo boxes are reported as unscored and ranked last; the box-loss
gradient is continuous at the pseudo boxes (smooth L1); 'all' sampling; the parameter
subset and per-block scales."""
import functools

import jax
import numpy as np
import pytest

from configs import isal_det_synthetic
from ezsd_jax.models import detector as det
from isal_jax import influence as infl
from isal_jax.scoring import select_scored
from isal_jax.tasks import detection as dt

pytestmark = pytest.mark.slow  # JVP/grad compiles of the detector

B = 4


def _image(rng, h=64, w=64):
    """A flat background with 1-2 flat coloured rectangles (flat regions give near-tied
    objectness logits: the case where a loss with in-graph top-k / sampling is unstable)."""
    img = np.empty((h, w, 3), np.uint8)
    img[:] = rng.integers(0, 80, 3)
    for _ in range(rng.integers(1, 3)):
        x0, y0 = rng.integers(0, 36, 2)
        bw, bh = rng.integers(14, 28, 2)
        img[y0:y0 + bh, x0:x0 + bw] = rng.integers(100, 255, 3)
    return img


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    cfg = isal_det_synthetic.get_config()
    model = det.FasterRCNN(det.DetectorConfig.from_config(cfg.model, num_classes=3))
    variables = det.init_variables(model, jax.random.key(0))
    # Perturb the classifier so that detection scores differ between images.
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    cls = params["roi_head"]["classifier"]["cls_score"]
    cls["kernel"] = cls["kernel"] + rng.normal(0, 0.05, cls["kernel"].shape).astype(np.float32)
    ms = {"batch_stats": variables["batch_stats"]}
    task = dt.DetectionTask(model, score_threshold=0.1, max_pseudo_boxes=8)
    hw = np.array([[64, 64], [56, 64], [64, 48], [64, 64]], np.int32)
    images = np.stack([_image(rng) for _ in range(B)])
    for i, (h, w) in enumerate(hw):       # zero padding outside the valid region
        images[i, h:], images[i, :, w:] = 0, 0
    batch = {"image": images,
             "boxes": np.zeros((B, 4, 4), np.float32), "classes": np.zeros((B, 4), np.int32),
             "box_mask": np.zeros((B, 4), bool),
             "image_id": np.array([11, 12, 13, 14], np.int32), "image_hw": hw,
             "valid": np.ones(B, bool)}
    infer_fn = dt.make_infer_fn(task, ms)
    out = jax.device_get(infer_fn(params, batch))
    label_fn = dt.make_label_fn(task, ms)

    def label(b, thr=0.1):
        new = jax.device_get(label_fn(params, b, np.float32(thr)))
        new.pop("num_pseudo")
        return {**b, **new}
    pb = label(batch)
    subset = infl.make_subset(params, cfg.influence.subset)
    key = jax.random.key(7)
    s_test = {k: np.asarray(jax.random.normal(jax.random.fold_in(key, i), x.shape))
              for i, (k, x) in enumerate(subset.take(params).items())}
    score_fn = infl.make_score_fn(task.loss_fn(ms), subset)
    return dict(cfg=cfg, model=model, params=params, ms=ms, task=task, batch=batch, out=out,
                pb=pb, label=label, subset=subset, s_test=s_test, infer_fn=infer_fn,
                label_fn=label_fn, score_fn=score_fn)


def test_subset_is_the_heads_last_layers(setup):
    assert setup["subset"].keys == (
        "roi_head/classifier/cls_score/bias", "roi_head/classifier/cls_score/kernel",
        "roi_head/regressor/bbox_pred/bias", "roi_head/regressor/bbox_pred/kernel",
        "rpn/deltas/bias", "rpn/deltas/kernel", "rpn/objectness/bias",
        "rpn/objectness/kernel")
    scale = dt.block_scale(1e4, (("regex:^rpn/", 50.0),))
    assert scale == {"regex:^rpn/": 50.0, "*": 1e4}
    assert dt.block_scale(3.0) == 3.0
    t = infl._scale_tree(scale, setup["subset"].take(setup["params"]))
    assert t["rpn/deltas/kernel"] == 50.0 and t["roi_head/classifier/cls_score/bias"] == 1e4
    # the reference's subset: the same layers' kernels, no biases
    ref = infl.make_subset(setup["params"], dt.REFERENCE_SUBSET)
    assert ref.keys == tuple(k for k in setup["subset"].keys if k.endswith("/kernel"))


def test_pseudo_targets_and_predictions(setup):
    out, pb, task = setup["out"], setup["pb"], setup["task"]
    keep = out["valid"] & (out["scores"] >= task.score_threshold)
    n = np.minimum(keep.sum(1), task.max_pseudo_boxes)
    assert (n > 0).all()
    np.testing.assert_array_equal(pb["box_mask"].sum(1), n)
    for i in range(B):   # the kept boxes are the top-scoring detections, classes follow
        top = np.argsort(-np.where(keep[i], out["scores"][i], -1), kind="stable")[:n[i]]
        np.testing.assert_allclose(np.sort(pb["boxes"][i][:n[i]], 0),
                                   np.sort(out["boxes"][i][top], 0))
    assert np.all(out["entropy"][out["valid"]] > 0)
    assert np.all(out["entropy"] <= np.log(4) + 1e-5)
    assert set(dt.ASSIGN_KEYS) <= set(pb) and pb["mask"].all()
    assert (pb["rpn_valid"].sum(1) == setup["cfg"].model.rpn_batch_per_image).all()
    assert pb["rpn_pos"].any(1).all() and pb["fg"].any(1).all()
    # predict: valid rows only, least confidence / entropy / features per image
    batch = dict(setup["batch"], valid=np.array([True, True, True, False]))
    pred = dt.predict(task, setup["params"], setup["ms"], [batch], infer_fn=setup["infer_fn"])
    np.testing.assert_array_equal(pred.ids, [11, 12, 13])
    np.testing.assert_allclose(pred.max_score, np.where(out["valid"], out["scores"], 0)
                               .max(1)[:3], rtol=1e-6)
    assert pred.features.shape == (3, setup["cfg"].model.fpn_channels)
    assert np.all(pred.mean_entropy > 0)


def test_per_image_loss_is_independent_of_the_other_images(setup):
    task, params, ms, pb, label = (setup[k] for k in ("task", "params", "ms", "pb", "label"))
    loss = jax.jit(task.loss_fn(ms))
    base = np.asarray(loss(params, pb))
    assert base.shape == (B,) and np.all(np.isfinite(base)) and np.all(base > 0)
    # change image 1, drop image 3 (padding row), relabel: the others keep their pseudo GT,
    # their assignment and their loss
    other = {k: np.array(v) for k, v in setup["batch"].items()}
    other["image"][1] = np.random.default_rng(5).integers(0, 255, (64, 64, 3))
    other["valid"][3] = False
    ob = label(other)
    for k in ("boxes", "box_mask") + dt.ASSIGN_KEYS:
        np.testing.assert_array_equal(ob[k][[0, 2]], pb[k][[0, 2]], err_msg=k)
    new = np.asarray(loss(params, ob))
    np.testing.assert_allclose(new[[0, 2]], base[[0, 2]], rtol=1e-5, atol=1e-6)
    assert abs(new[1] - base[1]) > 1e-4
    assert new[3] == 0.0 and not ob["mask"][3]
    # the same image at another batch position (same image id -> same sample) -> the same
    # assignment and loss
    perm = [2, 0, 3, 1]
    moved = label({k: np.asarray(v)[perm] for k, v in setup["batch"].items()})
    for k in dt.ASSIGN_KEYS:
        np.testing.assert_array_equal(moved[k], pb[k][perm], err_msg=k)
    np.testing.assert_allclose(np.asarray(loss(params, moved)), base[perm], rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(KeyError, match="assign"):
        task.loss(params, ms, setup["batch"])


def test_jvp_scores_equal_explicit_gradient_dots(setup):
    task, params, ms, pb = setup["task"], setup["params"], setup["ms"], setup["pb"]
    loss_fn = task.loss_fn(ms)
    jvp = infl.pool_scores(loss_fn, params, setup["subset"], setup["s_test"], [pb],
                           score_fn=setup["score_fn"])
    explicit = infl.explicit_scores(loss_fn, params, setup["subset"], setup["s_test"], pb,
                                    method="vmap")
    assert np.abs(explicit).max() > 1e-3
    np.testing.assert_allclose(jvp, explicit, rtol=2e-4, atol=1e-5 * np.abs(explicit).max())
    # the adapter's pool path (label_pool: pseudo GT + assignment, then the engine)
    ids, sc, scored, groups = dt.isal_pool_scores(
        task, params, ms, setup["subset"], setup["s_test"], [setup["batch"]],
        label_fn=setup["label_fn"], score_fn=setup["score_fn"])
    np.testing.assert_array_equal(ids, [11, 12, 13, 14])
    np.testing.assert_array_equal(groups, setup["pb"]["classes"][:, 0])
    assert scored.all()
    np.testing.assert_allclose(sc, jvp, rtol=1e-6)


def test_images_without_pseudo_boxes_are_unscored_and_ranked_last(setup):
    out, params, ms = setup["out"], setup["params"], setup["ms"]
    best = np.where(out["valid"], out["scores"], 0).max(1)
    assert len(np.unique(best)) == B
    thr = float(np.sort(best)[1] + np.sort(best)[2]) / 2       # two images keep no box
    task = dt.DetectionTask(setup["model"], score_threshold=thr, max_pseudo_boxes=8)
    ids, sc, scored, groups = dt.isal_pool_scores(
        task, params, ms, setup["subset"], setup["s_test"], [setup["batch"]],
        label_fn=setup["label_fn"], score_fn=setup["score_fn"])
    np.testing.assert_array_equal(scored, best >= thr)
    assert np.isnan(sc[~scored]).all() and np.isfinite(sc[scored]).all()
    ref = infl.pool_scores(task.loss_fn(ms), params, setup["subset"], setup["s_test"],
                           [setup["pb"]], score_fn=setup["score_fn"])
    # a scored image's score does not depend on the threshold (its boxes all pass it)
    full = best >= thr
    for i in np.flatnonzero(full):
        if (out["scores"][i][out["valid"][i]] >= thr).all():
            np.testing.assert_allclose(sc[i], ref[i], rtol=1e-6)
    sel = select_scored(ids, B, sc, scored, groups, seed=0)
    assert set(sel.ids[:2]) == set(ids[scored]) and set(sel.ids[2:]) == set(ids[~scored])
    assert np.all(np.diff(sel.scores[:2]) >= 0) and np.isnan(sel.scores[2:]).all()
    sel1 = select_scored(ids, 1, sc, scored, groups, seed=0)
    assert sel1.ids[0] == ids[scored][np.argmin(sc[scored])]
    # nothing kept at all: every image unscored, selection falls back to the seeded order
    none = dt.DetectionTask(setup["model"], score_threshold=1.0, max_pseudo_boxes=8)
    _, sc0, scored0, g0 = dt.isal_pool_scores(
        none, params, ms, setup["subset"], setup["s_test"], [setup["batch"]],
        label_fn=setup["label_fn"], score_fn=setup["score_fn"])
    assert not scored0.any() and np.isnan(sc0).all()
    assert len(select_scored(ids, 3, sc0, scored0, g0, seed=0).ids) == 3


def test_sampling_all_is_deterministic_and_per_image(setup):
    """sampling='all' (every non-ignored anchor / candidate RoI, no sampler): the assignment
    keeps every anchor that is not ignored, follows the image when the batch is permuted,
    and the loss is finite."""
    task = dt.DetectionTask(setup["model"], sampling="all", max_pseudo_boxes=8)
    params, batch = setup["params"], setup["batch"]
    f = jax.jit(lambda p, b: task.label_pool(p, setup["ms"], b))
    a = jax.device_get(f(params, batch))
    n_anchors = sum(len(x) for x in task.cfg.anchors())
    assert a["rpn_idx"].shape == (B, n_anchors)
    assert (a["rpn_valid"].sum(1) > setup["cfg"].model.rpn_batch_per_image).all()
    np.testing.assert_array_equal(a["boxes"], setup["pb"]["boxes"])    # same pseudo GT
    perm = [3, 2, 0, 1]
    moved = jax.device_get(f(params, {k: v[perm] for k, v in batch.items()}))
    for k in dt.ASSIGN_KEYS:
        np.testing.assert_array_equal(moved[k], a[k][perm], err_msg=k)
    loss = np.asarray(jax.jit(task.loss_fn(setup["ms"]))(params, {**batch, **a}))
    assert np.all(np.isfinite(loss)) and np.all(loss > 0)
    with pytest.raises(ValueError, match="sampling"):
        dt.DetectionTask(setup["model"], sampling="random")


def test_box_loss_gradient_is_continuous_at_the_pseudo_boxes(setup):
    """A pseudo box is decoded from the model's own deltas, so on its RoI the regression
    residual is 0 up to rounding. With plain L1 (reg_beta=0) the gradient there is the sign
    of that rounding error; the default smooth L1 makes it ~0 (continuous)."""
    import flax.linen as nn
    params, ms, pb, model = setup["params"], setup["ms"], setup["pb"], setup["model"]
    img = pb["image"][:1]
    rois = pb["rois"][:1]
    deltas = nn.apply(lambda m: m.head(m.roi_features(m.features(img), rois))["deltas"],
                      model)({"params": params, **ms})
    one = {k: np.asarray(v)[:1] for k, v in pb.items()}
    assert one["fg"].any()

    @functools.partial(jax.jit, static_argnums=0)
    def _grad(task, eps):
        b = dict(one, box_target=deltas + eps)
        g = jax.grad(lambda p: task.loss_terms(p, ms, b)["box_reg"][0])(params)
        return g["roi_head"]["regressor"]["bbox_pred"]["kernel"]

    def grad_at(task, eps):
        return np.asarray(_grad(task, np.float32(eps)))

    l1 = dt.DetectionTask(model, max_pseudo_boxes=8, reg_beta=0.0)
    up, down = grad_at(l1, 1e-6), grad_at(l1, -1e-6)
    np.testing.assert_allclose(up, -down, rtol=1e-5, atol=1e-8)    # the sign flips
    assert np.abs(up).max() > 1e-3
    smooth = dt.DetectionTask(model, max_pseudo_boxes=8)           # reg_beta=0.01
    jump = np.abs(grad_at(smooth, 1e-6) - grad_at(smooth, -1e-6)).max()
    assert jump < 1e-3 * np.abs(up).max()                          # ~ 2 * 1e-6 / beta
