"""Every row of docs/protocol.md checked on get_config() of configs/coco.py and
configs/lvis.py (and the detector/head configs they build), so that a later change cannot
drift from the table without a failing test: a deliberate change updates the table and
this test together. Rows about the mask branch are pinned by its own tests."""
import os

import pytest

from configs import coco, lvis
from ezsd_jax.evaluate import REFERENCE_MAX_DETS
from ezsd_jax.models.box_head import parse_box_head_spec
from ezsd_jax.models.config import DetectorConfig

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "protocol.md")


@pytest.fixture(params=["coco", "lvis"])
def cfg(request):
    return {"coco": coco, "lvis": lvis}[request.param].get_config()


def test_detector_rows(cfg):
    m = cfg.model
    DetectorConfig.from_config(m, num_classes=3)          # every field is a real option
    assert tuple(m.strides) == (4, 8, 16, 32, 64) and m.fpn_channels == 256
    assert tuple(m.anchor_sizes) == (32, 64, 128, 256, 512)
    assert tuple(m.anchor_ratios) == (0.5, 1.0, 2.0)
    assert (m.rpn_batch_per_image, m.rpn_positive_fraction, m.rpn_fg_iou, m.rpn_bg_iou) == \
        (256, 0.5, 0.7, 0.3)
    assert m.rpn_nms_threshold == 0.7
    # MaxIoUAssigner min_pos_iou with match_low_quality: RPN 0.3, RoI 0.5
    assert (m.rpn_low_quality_min_iou, m.roi_low_quality_min_iou) == (0.3, 0.5)
    assert m.input_padding == "mean"          # Normalize, then Pad with 0 (= the mean)
    # RPN proposals kept: train 2000 -> 1000, test 1000 -> 1000
    assert (m.rpn_pre_nms_topk_train, m.rpn_post_nms_topk_train) == (2000, 1000)
    assert (m.rpn_pre_nms_topk_test, m.rpn_post_nms_topk_test) == (1000, 1000)
    assert (m.roi_batch_per_image, m.roi_positive_fraction, m.roi_fg_iou) == (512, 0.25, 0.5)
    assert m.roi_output_size == 7 and m.roi_sampling_ratio == 2     # deviates: static
    # box head '301212': 3 shared convs, no shared FC, 1 conv + 2 FC per branch
    assert parse_box_head_spec(m.box_head_spec) == (3, 0, 1, 2, 1, 2)
    assert (m.box_conv_dim, m.box_fc_dim) == (256, 1024)
    assert tuple(m.bbox_reg_weights) == (10.0, 10.0, 5.0, 5.0)   # stds 0.1, 0.1, 0.2, 0.2
    assert m.frozen_stages == 1 and m.roi_head == "ezsd"
    assert (m.test_score_threshold, m.test_nms_threshold, m.test_max_detections) == \
        (0.0, 0.5, 300)
    assert m.test_topk_candidates == 0        # every (box, class) pair reaches the NMS
    assert tuple(m.image_size) == (1344, 1344)                    # deviates: static canvas
    h = m.ezsd
    assert h.temperature_init == 100.0 and h.learn_temperature
    assert h.semantic_regression and h.learned_background and h.embed_dim == 512
    assert h.background_init == "xavier"      # mmcv Xavier(layer='Linear'), normal, gain 1


def test_schedule_and_data_rows(cfg):
    t, d = cfg.train, cfg.data
    assert t.lr == pytest.approx(0.005 * t.batch_size / 4)    # 0.005 per 4 images (2 x 2)
    assert (t.momentum, t.weight_decay, t.grad_clip) == (0.9, 1e-4, 10.0)
    assert (t.warmup_steps, t.warmup_factor, t.gamma) == (500, 0.001, 0.1)
    assert (d.short_side, d.max_side, d.flip_prob) == (800, 1333, 0.5)


def test_distillation_and_clip_rows(cfg):
    e, c = cfg.ezsd.distill, cfg.clip
    assert e.enabled and not e.gt_only
    # the first 200 stored, then 200 draws with replacement at every load, weighted
    assert (e.num_proposals, e.sample) == (200, "replacement")
    assert e.norm_images == 2                 # L1 mean per GPU (2 images), then averaged
    assert c.score_names == "dataset"                           # softmax over 80 / 1203
    r = c.renorm
    assert (r.lr, r.weight_decay, r.grad_clip, r.loss) == (1e-4, 1e-4, 0.1, "sigmoid")
    assert tuple(r.templates) == ("a photo of a {}",)           # no full stop
    assert r.flip_prob == 0.5 and r.enlarge == 1.2
    assert r.crops_per_step == 64 and c.renorm_epoch_unit == "boxes"   # deviates
    p = c.proposals
    assert (p.stride, tuple(p.sizes), tuple(p.ratios)) == (32, (32, 64, 128, 256, 512),
                                                           (0.5, 1.0, 2.0))
    assert (p.nms_iou, p.num_nms, p.gt_iou, p.feature_enlarge) == (0.7, 1000, 0.3, 1.2)


def test_coco_rows():
    c = coco.get_config()
    assert tuple(c.train.decay_fractions) == pytest.approx((8 / 12, 11 / 12))
    assert c.train.steps == 12 * -(-coco.COCO_TRAIN_IMAGES // c.train.batch_size)
    assert c.ezsd.distill.factor == 1.0 and c.ezsd.distill.proposal_slots == 300
    assert (c.clip.proposals.keep, c.clip.proposals.selection, c.clip.proposals.drop_base) \
        == (300, "top", True)
    assert c.ezsd.eval.protocol == "coco" and c.ezsd.split == "coco48_17"
    assert not c.ezsd.eval.filter_empty_gt    # test script: eval_filter_empty_gt=False
    assert tuple(c.ezsd.eval.reference_max_dets) == REFERENCE_MAX_DETS == (100, 300, 1000)
    assert c.clip.renorm_epochs == 12 and c.clip.renorm.text_layernorms
    assert c.clip.renorm_repeat_threshold == 0.0 and not c.clip.renorm.size_weight
    m = c.model
    assert (m.box_cls_loss, m.rpn_reg_loss_weight, m.box_reg_loss_weight) == \
        ("softmax", 1.0, 1.0)
    assert not c.data.short_side_range and c.data.repeat_threshold == 0.0


def test_lvis_rows():
    lv = lvis.get_config()
    t = lv.train
    assert tuple(t.decay_fractions) == pytest.approx((32 / 48, 44 / 48))
    assert t.steps == 0 and t.epochs == 48.0      # 48 epochs of the repeated list
    assert lv.data.repeat_threshold == 1e-3                     # ClassBalancedDataset
    assert tuple(lv.data.short_side_range) == (640, 800)        # 'range' multi-scale
    m = lv.model
    assert (m.box_cls_loss, m.seesaw_p, m.seesaw_q) == ("seesaw", 0.8, 2.0)
    assert (m.rpn_reg_loss_weight, m.box_reg_loss_weight) == (2.0, 2.0)
    assert m.rpn_loss_weight == 1.0 and m.box_loss_weight == 1.0   # classification: 1
    assert (lv.ezsd.distill.factor, lv.ezsd.distill.proposal_slots) == (0.5, 500)
    assert lv.ezsd.eval.protocol == "lvis" and lv.ezsd.split == "lvis"
    assert lv.ezsd.eval.filter_empty_gt       # lvis_bn*.py: eval_filter_empty_gt=True
    assert (lv.clip.proposals.keep, lv.clip.proposals.selection, lv.clip.proposals.drop_base) \
        == (500, "random", False)
    assert lv.clip.renorm_epochs == 18 and not lv.clip.renorm.text_layernorms
    assert lv.clip.renorm_repeat_threshold == 1e-3 and lv.clip.renorm.size_weight
    assert lv.data.max_boxes == 300 and m.test_topk_candidates == 0


def test_table_names_the_sources():
    text = open(DOC).read()
    for needle in ("mask_rcnn_distillation_coco.sh", "mask_rcnn_distillation_lvis.sh",
                   "new_rpn", "class_agnostic=True", "select_fixed_subset=200",
                   "maxDets = [100, 300, 1000]", "cls_finetuner_clip_full_coco.py",
                   "SeesawLoss(p=0.8, q=2.0", "oversample_thr=1e-3", "301212",
                   "replace=True", "min_pos_iou=0.3", "eval_filter_empty_gt=True",
                   "_12e_range_scale", "4.6052", "pad_val"):
        assert needle in text, needle
