"""The one home of the detector's defaults: `config.model` of every config starts from
`default_model_config()` (configs/common.py) and `DetectorConfig` is built from a config
over it (config.model.ezsd, the EZSD head's options, defaults in models/ezsd_head.py). JAX-free, so loading a config file imports no JAX; the enums of its fields are in
core/config_check.py."""
import ml_collections


def default_model_config(**overrides) -> ml_collections.ConfigDict:
    """Faster R-CNN / Mask R-CNN R50-FPN, the reference's values (docs/protocol.md)."""
    m = ml_collections.ConfigDict(dict(
        image_size=(1024, 1024),     # padded input H, W (multiples of 64)
        dtype="bfloat16",            # compute dtype; params stay float32
        # backbone: ResNet-50 (torchvision-format ImageNet weights in `pretrained`:
        # .safetensors/.npz/.pth; "" = random init), FPN
        stage_sizes=(3, 4, 6, 3), width=64, bottleneck=True, frozen_stages=1,
        pretrained="", fpn_channels=256,
        # anchors / RPN
        strides=(4, 8, 16, 32, 64), anchor_sizes=(32, 64, 128, 256, 512),
        anchor_ratios=(0.5, 1.0, 2.0),
        rpn_pre_nms_topk_train=2000, rpn_post_nms_topk_train=2000,
        rpn_pre_nms_topk_test=1000, rpn_post_nms_topk_test=1000, rpn_nms_threshold=0.7,
        rpn_batch_per_image=256, rpn_positive_fraction=0.5, rpn_fg_iou=0.7, rpn_bg_iou=0.3,
        rpn_loss_weight=1.0,
        # low-quality matches: a GT's best anchors / RoI candidates become positive when
        # that IoU is >= this (mmdet min_pos_iou: RPN 0.3, RoI 0.5); < 0 = none
        # (ops/matching.py)
        rpn_low_quality_min_iou=0.3, roi_low_quality_min_iou=0.5,
        # the padded canvas after normalization: 'mean' = 0 (mmdet:
        # Normalize, then Pad with 0, i.e. the mean pixel) | 'black' = normalized uint8 0
        input_padding="mean",
        # RoI head: 'standard' | 'ezsd'
        roi_head="standard", roi_batch_per_image=512, roi_positive_fraction=0.25,
        roi_fg_iou=0.5, roi_output_size=7, roi_sampling_ratio=2,
        box_num_convs=0, box_conv_dim=256, box_num_fcs=2, box_fc_dim=1024,
        # mmdet ConvFCBBoxHead counts as six digits ('301212',
        # models/box_head.parse_box_head_spec); '' = the layout of box_num_convs /
        # box_num_fcs (EZSD: shared convs, box_num_fcs FCs per branch; standard: one stack)
        box_head_spec="",
        bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), box_loss_weight=1.0,
        # weights of the REGRESSION terms alone (the reference's loss_bbox.loss_weight)
        rpn_reg_loss_weight=1.0, box_reg_loss_weight=1.0,
        # RoI classification loss: 'softmax' (CE) | 'seesaw' (mmdet
        # SeesawLoss; EZSD head only: K class logits + a 2-way objectness)
        box_cls_loss="softmax", seesaw_p=0.8, seesaw_q=2.0,
        # Mask R-CNN branch (models/mask_head.py; off = Faster R-CNN): RoIAlign size (the
        # head doubles it), class-agnostic (1, the reference), static positives per image
        # (512 x 0.25), the batch's GT box crops (data/segmentation.py)
        mask_on=False, mask_roi_size=14, mask_num_convs=4, mask_conv_dim=256,
        mask_num_classes=1, mask_loss_weight=1.0, mask_max_positives=128,
        mask_crop_size=56, mask_sampling_ratio=2,
        # inference; test_topk_candidates: (box, class) pairs kept for class-wise NMS, 0 =
        # every pair over the score threshold (the reference; exact, models/postprocess.py),
        # K > 0 = the K highest-scoring pairs (a cap)
        test_score_threshold=0.05, test_nms_threshold=0.5, test_max_detections=100,
        test_topk_candidates=0,
    ))
    m.update(overrides)
    return m


# Fields added after runs were first written, with the behaviour those runs were trained
# with: a stored config (a workdir's config.json, a bundle's) that lacks one of them gets
# this value, not today's default (a run padded black must be served padded black).
EARLIER_BEHAVIOUR = {"input_padding": "black", "rpn_low_quality_min_iou": 0.0,
                     "roi_low_quality_min_iou": 0.0}


def stored_model_config(model: dict) -> dict:
    """config.model as a stored run wrote it, completed with EARLIER_BEHAVIOUR."""
    return {**EARLIER_BEHAVIOUR, **model}
