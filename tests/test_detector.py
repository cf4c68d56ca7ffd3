"""Detector assembly: forward/backward on a tiny model, targets, post-processing, mapping
detections back to original COCO coordinates, COCOeval sanity."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from ezsd_jax import evaluate
from ezsd_jax.models import detector as det
from ezsd_jax.models import losses, postprocess


def _cfg(**kw):
    m = common.tiny_model_config(image_size=(128, 128), **kw)
    return det.DetectorConfig.from_config(m, num_classes=3)


def _batch(rng, b=2, h=128, w=128, m=4):
    boxes = np.zeros((b, m, 4), np.float32)
    mask = np.zeros((b, m), bool)
    for i in range(b):
        for j in range(rng.integers(1, m + 1)):
            x0, y0 = rng.uniform(0, 80, 2)
            bw, bh = rng.uniform(16, 45, 2)
            boxes[i, j] = [x0, y0, x0 + bw, y0 + bh]
            mask[i, j] = True
    return {"image": rng.integers(0, 255, (b, h, w, 3)).astype(np.uint8),
            "boxes": boxes, "classes": rng.integers(0, 3, (b, m)).astype(np.int32),
            "box_mask": mask, "valid": np.ones(b, bool),
            "image_hw": np.full((b, 2), [h, w], np.int32)}


@pytest.mark.slow  # > 20 CPU-s: in make test, not make test-fast
def test_forward_train_finite_losses_and_grads(rng):
    cfg = _cfg()
    model = det.FasterRCNN(cfg)
    variables = det.init_variables(model, jax.random.key(0))
    batch = _batch(rng)

    def loss_fn(p):
        return det.forward_train(model, {**variables, "params": p}, batch, jax.random.key(1))

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables["params"])
    for k in ("rpn_cls", "rpn_box", "box_cls", "box_reg"):
        assert np.isfinite(float(metrics[k])) and float(metrics[k]) >= 0
    # untrained classifier ~ uniform over 3 classes + background
    assert abs(float(metrics["box_cls"]) - np.log(4)) < 0.2
    assert float(metrics["rpn_num_pos"]) > 0
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert np.abs(grads["roi_head"]["classifier"]["cls_score"]["kernel"]).sum() > 0


@pytest.mark.slow  # two train-step compiles of the detector
def test_padding_image_contributes_nothing(rng):
    """An image marked valid=False (last-batch padding) must not change any loss."""
    model = det.FasterRCNN(_cfg())
    variables = det.init_variables(model, jax.random.key(0))
    batch = _batch(rng, b=2)
    batch["valid"][1] = False
    other = {k: v.copy() for k, v in batch.items()}
    other["image"][1] = 255 - other["image"][1]
    other["boxes"][1] = other["boxes"][1][::-1]
    f = jax.jit(lambda b: det.forward_train(model, variables, b, jax.random.key(3))[1])
    a, b = f(batch), f(other)
    for k in ("rpn_cls", "rpn_box", "box_cls", "box_reg"):
        np.testing.assert_allclose(float(a[k]), float(b[k]), rtol=1e-5, atol=1e-6)
    batch["valid"][1] = True  # sanity: when valid, image 1 does change the loss
    assert abs(float(f(batch)["rpn_cls"]) - float(a["rpn_cls"])) > 1e-6


def test_sample_rois_gt_are_foreground_with_zero_target():
    gt = jnp.array([[[10., 10., 50., 60.], [60., 20., 100., 90.], [0, 0, 0, 0]]])
    gm = jnp.array([[True, True, False]])
    gc = jnp.array([[2, 0, 0]], jnp.int32)
    props = jnp.zeros((1, 8, 4))
    pv = jnp.zeros((1, 8), bool)
    t = losses.sample_rois(jax.random.key(0), props, pv, gt, gc, gm, num_classes=3,
                           batch_per_image=16, positive_fraction=0.5)
    fg = np.asarray(t["fg"][0])
    assert fg.sum() == 2  # exactly the two valid GT boxes (proposals are invalid)
    np.testing.assert_allclose(np.asarray(t["box_target"][0])[fg], 0, atol=1e-5)
    assert sorted(np.asarray(t["cls_target"][0])[fg].tolist()) == [0, 2]
    # invalid candidates are never sampled as background either
    assert np.asarray(t["roi_valid"][0]).sum() == 2


def test_postprocess_picks_class_and_decodes(rng):
    r, c = 6, 3
    props = np.tile(np.array([[10., 10., 40., 50.]], np.float32), (r, 1))
    props[1:] += rng.uniform(60, 70, (r - 1, 1)).astype(np.float32)
    logits = np.full((1, r, c + 1), -10.0, np.float32)
    logits[0, :, c] = 10.0            # background everywhere ...
    logits[0, 0, 1] = 10.0            # ... but proposal 0 is class 1 at p ~ 0.5
    deltas = np.zeros((1, r, 4), np.float32)
    deltas[0, 0] = [1.0, 0.0, 0.0, 0.0]  # dx=1 with weight 10 -> shift by 0.1 * width
    out = postprocess.detections(
        jnp.asarray(logits), jnp.asarray(deltas), jnp.asarray(props[None]),
        jnp.ones((1, r), bool), jnp.array([[128., 128.]]), score_threshold=0.05,
        nms_threshold=0.5, max_detections=5, topk_candidates=16)
    v = np.asarray(out["valid"][0])
    assert v.sum() == 1
    i = int(np.argmax(v))
    assert int(out["classes"][0, i]) == 1
    np.testing.assert_allclose(float(out["scores"][0, i]), 0.5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(out["boxes"][0, i]), [13., 10., 43., 50.], atol=1e-4)


def test_to_coco_results_maps_back_to_original():
    det_ = {"boxes": np.array([[[20., 10., 60., 50.], [0, 0, 0, 0]]], np.float32),
            "scores": np.array([[0.9, 0.0]], np.float32),
            "classes": np.array([[1, -1]], np.int32), "valid": np.array([[True, False]])}
    meta = {"image_id": np.array([7]), "scale": np.array([2.0], np.float32),
            "orig_hw": np.array([[40, 100]]), "flipped": np.array([False]),
            "valid": np.array([True])}
    res = evaluate.to_coco_results(det_, meta, cat_ids=[5, 9])
    assert res == [{"image_id": 7, "category_id": 9, "bbox": [10.0, 5.0, 20.0, 20.0],
                    "score": 0.9}]
    meta["valid"] = np.array([False])
    assert evaluate.to_coco_results(det_, meta, [5, 9]) == []


def test_coco_eval_perfect_and_empty(tmp_path):
    from pycocotools.coco import COCO
    gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"},
                     {"id": 2, "width": 100, "height": 100, "file_name": "b.png"}],
          "categories": [{"id": 3, "name": "x"}, {"id": 4, "name": "y"}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 30],
               "area": 900, "iscrowd": 0},
              {"id": 2, "image_id": 2, "category_id": 4, "bbox": [50, 40, 20, 30],
               "area": 600, "iscrowd": 0}]}
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(gt))
    coco = COCO(str(p))
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"],
                "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]]
    m = evaluate.coco_eval(coco, perfect, [1, 2])
    assert m["AP50"] == pytest.approx(1.0) and m["AP"] == pytest.approx(1.0)
    wrong = [dict(r, category_id=7 - r["category_id"]) for r in perfect]  # swap classes
    assert evaluate.coco_eval(coco, wrong, [1, 2])["AP50"] == pytest.approx(0.0)
    assert evaluate.coco_eval(coco, [], [1, 2])["AP50"] == 0.0
    only3 = evaluate.coco_eval(coco, perfect, [1, 2], cat_ids=[3])
    assert only3["AP50"] == pytest.approx(1.0)

    # the standard protocol: the 100 best detections per image count, AP read at 100
    def with_decoys(n):
        decoys = [{"image_id": r["image_id"], "category_id": r["category_id"],
                   "bbox": [90 + k % 5, 90 + k // 5, 5, 5], "score": 0.95}
                  for r in perfect for k in range(n)]
        return decoys + perfect
    m99 = evaluate.coco_eval(coco, with_decoys(99), [1, 2])
    assert m99["AP50"] > 0.005 and m99["AP"] > 0.005 and m99["AR100"] == pytest.approx(1.0)
    assert evaluate.coco_eval(coco, with_decoys(100), [1, 2])["AR100"] == 0.0


@pytest.mark.slow
def test_pretrained_backbone_from_config_and_bf16_train_step(rng, tmp_path):
    """config.model.pretrained = a torchvision-format .safetensors written by the
    project's converter: the train state that train_detector starts from
    (train.initial_state) holds its backbone weights and BN statistics exactly, float32.
    Then model.dtype='bfloat16': one jitted train step (forward, backward, SGD update) on
    the 8-device mesh gives finite losses and gradient norm; parameters and optimizer
    state stay float32 and move; frozen BN statistics stay the file's."""
    from configs import synthetic_detection
    from ezsd_jax.core import sharding
    from ezsd_jax import train
    from ezsd_jax.models.resnet import ResNet
    from ezsd_jax.models.pretrained import flax_to_torchvision, save_state_dict

    cfg = synthetic_detection.get_config()
    cfg.model.dtype = "bfloat16"
    model = det.FasterRCNN(train.detector_config(cfg, 3))
    c = model.cfg
    # a "pretrained" backbone: a ResNet of the detector's shape with random weights and BN
    # statistics, written in torchvision format by the project's converter
    net = ResNet(c.stage_sizes, c.width, c.bottleneck)
    v = jax.jit(net.init)(jax.random.key(7), jnp.zeros((1, 64, 64, 3)))
    noise = np.random.default_rng(7)
    want = jax.tree_util.tree_map(
        lambda x: (np.asarray(x) + noise.uniform(0.1, 0.5, x.shape)).astype(np.float32),
        {"params": v["params"], "batch_stats": v["batch_stats"]})
    cfg.model.pretrained = str(tmp_path / "resnet.safetensors")
    save_state_dict(flax_to_torchvision(want, c.stage_sizes, c.bottleneck),
                    cfg.model.pretrained)
    assert model.cfg.jnp_dtype == jnp.bfloat16
    mesh = sharding.make_mesh(cfg.mesh)
    state, state_sh, tx, sched = train.initial_state(model, cfg, mesh, {})
    before = jax.device_get(state)
    got = {"params": before["params"]["backbone"],
           "batch_stats": before["batch_stats"]["backbone"]}
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(a, b)

    step = train.make_train_step(model, tx, mesh, state_sh, 0, None, sched)
    state, metrics = step(state, _batch(rng, b=8), {})
    metrics = jax.device_get(metrics)
    for k in ("loss", "rpn_cls", "rpn_box", "box_cls", "box_reg", "grad_norm"):
        assert np.isfinite(float(metrics[k])), k
    assert float(metrics["loss"]) > 0 and float(metrics["grad_norm"]) > 0
    after = jax.device_get(state)
    leaves = jax.tree_util.tree_leaves(after["params"])
    assert all(x.dtype == np.float32 for x in leaves)
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(after["opt_state"])
               if np.issubdtype(x.dtype, np.floating))
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree_util.tree_leaves(before["params"]), leaves))
    for a, b in zip(jax.tree_util.tree_leaves(want["batch_stats"]),
                    jax.tree_util.tree_leaves(after["batch_stats"]["backbone"])):
        np.testing.assert_array_equal(a, b)
