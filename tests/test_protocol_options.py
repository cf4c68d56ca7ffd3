"""Protocol options outside the model: the proposal stage's vocabulary
(clip.score_names: the split's names or every name of the train file, as the reference's
80-name softmax on COCO 48/17) and COCO evaluation at the reference's maxDets
(100, 300, 1000) next to the standard (1, 10, 100), checked with pycocotools' own counts."""
import json

import ml_collections
import numpy as np
import pytest
from pycocotools.coco import COCO

from ezsd_jax.clip.stages import scoring_names
from ezsd_jax.evaluate import REFERENCE_MAX_DETS, coco_eval


def _cfg(tmp_path, mode):
    cats = [{"id": i, "name": n} for i, n in [(7, "g"), (1, "a"), (3, "c"), (2, "b"), (5, "e")]]
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    return ml_collections.ConfigDict(dict(
        data=dict(train_ann=str(ann)),
        ezsd=dict(split="names", base_names=("c", "a"), novel_names=("e",)),
        clip=dict(score_names=mode)))


def test_scoring_names_split_or_whole_file(tmp_path):
    assert scoring_names(_cfg(tmp_path, "split")) == ["a", "c", "e"]       # id order
    assert scoring_names(_cfg(tmp_path, "dataset")) == ["a", "b", "c", "e", "g"]
    with pytest.raises(ValueError, match="score_names"):
        scoring_names(_cfg(tmp_path, "all"))


def _gt(n):
    """One 1000x1000 image, one category, n GT boxes on a grid."""
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 400.0,
             "bbox": [40.0 * (i % 25), 40.0 * (i // 25), 20.0, 20.0]} for i in range(n)]
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "width": 1000, "height": 1000}], "annotations": anns,
                    "categories": [{"id": 1, "name": "x"}]}
    coco.createIndex()
    return coco, anns


def test_reference_max_dets_count_beyond_100_per_category(rng):
    coco, anns = _gt(200)
    # 200 perfect detections with random scores: at maxDets 100 only half can match
    res = [{"image_id": 1, "category_id": 1, "bbox": a["bbox"], "score": float(s)}
           for a, s in zip(anns, rng.uniform(0.1, 1.0, len(anns)))]
    std = coco_eval(coco, res, [1])
    ref = coco_eval(coco, res, [1], max_dets=REFERENCE_MAX_DETS)
    # AP is read at 100 in both; AP50 at maxDets[2]: 100 -> half the GT, 1000 -> all
    assert std["AP"] == pytest.approx(ref["AP"], abs=1e-6)
    assert ref["AP50"] == pytest.approx(1.0, abs=1e-6)
    assert 0.3 < std["AP50"] < 0.7
    np.testing.assert_allclose(std["AP"], std["AP50"], atol=1e-6)   # perfect boxes
    with pytest.raises(ValueError, match="max_dets"):
        coco_eval(coco, res, [1], max_dets=(10, 300, 1000))


def test_renorm_steps_per_box_or_per_image():
    from ezsd_jax.clip.stages import renorm_steps

    def cfg(**clip):
        c = dict(renorm_steps=0, renorm_epochs=12, renorm=dict(crops_per_step=64))
        c.update(clip)
        return ml_collections.ConfigDict(dict(clip=c, train=dict(batch_size=16)))
    assert renorm_steps(cfg(), num_boxes=1000, num_images=130) == 188          # 12000 / 64
    # the reference: 4 images per step with all their boxes, 12 epochs of the images
    assert renorm_steps(cfg(renorm_epoch_unit="images", renorm_batch_size=4), 1000, 130) == 390
    assert renorm_steps(cfg(renorm_epoch_unit="images"), 1000, 130) == 98      # train batch
    assert renorm_steps(cfg(renorm_steps=7, renorm_epoch_unit="images"), 1000, 130) == 7
    with pytest.raises(ValueError, match="renorm_epoch_unit"):
        renorm_steps(cfg(renorm_epoch_unit="crops"), 1000, 130)


def _np_size_weights(boxes, img_h, img_w):
    """EZAD ClipEncoderHead.loss, use_size_weight=True, transcribed."""
    img_factor = np.sqrt(img_h * img_w)
    bbox_factor = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    weight = np.exp(-(bbox_factor / img_factor))
    return weight * (boxes.shape[0] / weight.sum())


def test_renorm_size_weights_match_reference_and_weight_the_loss(rng):
    import jax.numpy as jnp
    from ezsd_jax.clip.renorm import classification_loss, flatten_gt_boxes, size_weights
    b, m = 2, 6
    xy = rng.uniform(0, 60, (b, m, 2))
    wh = rng.uniform(2, 60, (b, m, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    hw = np.array([[100, 120], [90, 64]], np.int32)
    mask = np.ones((b, m), bool)
    mask[1, 4:] = False
    classes = rng.integers(0, 3, (b, m))
    label_map = np.array([0, -1, 1])              # class 1 is not a base class
    batch = {"image": np.zeros((b, 128, 128, 3), np.uint8), "boxes": boxes,
             "classes": classes, "box_mask": mask, "image_hw": hw}
    sb, st = flatten_gt_boxes(batch, 16, label_map, np.random.default_rng(0), size_weight=True)
    assert st["dropped"] == 0 and sb["mask"].sum() == st["available"]
    for i in range(b):
        sel = mask[i] & (label_map[classes[i]] >= 0)
        want = _np_size_weights(boxes[i, sel].astype(np.float64), *hw[i])
        got = sb["weight"][sb["mask"] & (sb["box_image"] == i)]
        np.testing.assert_allclose(got, want, rtol=1e-5)
        np.testing.assert_allclose(size_weights(boxes[i, sel], hw[i]), want, rtol=1e-5)
    assert "weight" not in flatten_gt_boxes(batch, 16, label_map, np.random.default_rng(0))[0]
    # weighted loss = sum(w * per-crop loss) / number of valid crops
    k, c = 16, 3
    logits = rng.normal(size=(k, c)).astype(np.float32)
    labels = rng.integers(0, c, k)
    valid, w = sb["mask"], sb["weight"]
    per = -np.log(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))[np.arange(k), labels]
    got = float(classification_loss(jnp.asarray(logits), jnp.asarray(labels),
                                    jnp.asarray(valid), "softmax", jnp.asarray(w)))
    np.testing.assert_allclose(got, (per * w * valid).sum() / valid.sum(), rtol=1e-5)
