"""Config blocks shared by every experiment config: mesh, distributed runtime, debug hooks."""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.stages = ()
    # Device mesh: ('data', 'model'); -1 = inferred from the device count.
    cfg.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
    # Multi-host: jax.distributed.initialize() when enabled (or EZSD_DISTRIBUTED=1).
    cfg.distributed = ml_collections.ConfigDict(dict(
        enabled=False, coordinator_address="", num_processes=-1, process_id=-1))
    # Fault injection for resume tests: SIGKILL after this step (-1: never).
    cfg.debug = ml_collections.ConfigDict(dict(kill_at_step=-1, kill_during_save=False))
    return cfg


def model_config(**overrides) -> ml_collections.ConfigDict:
    """Faster R-CNN R50-FPN (fields of ezsd_jax.models.detector.DetectorConfig)."""
    m = ml_collections.ConfigDict(dict(
        image_size=(1024, 1024), dtype="bfloat16",
        stage_sizes=(3, 4, 6, 3), width=64, bottleneck=True, frozen_stages=1,
        fpn_channels=256,
        # torchvision-format ImageNet ResNet-50 (.safetensors/.npz/.pth); "" = random init
        pretrained="",
        strides=(4, 8, 16, 32, 64), anchor_sizes=(32, 64, 128, 256, 512),
        anchor_ratios=(0.5, 1.0, 2.0),
        rpn_pre_nms_topk_train=2000, rpn_post_nms_topk_train=2000,
        rpn_pre_nms_topk_test=1000, rpn_post_nms_topk_test=1000, rpn_nms_threshold=0.7,
        rpn_batch_per_image=256, rpn_positive_fraction=0.5, rpn_fg_iou=0.7, rpn_bg_iou=0.3,
        rpn_loss_weight=1.0,
        # low-quality matches from this IoU (mmdet min_pos_iou; < 0: none)
        rpn_low_quality_min_iou=0.3, roi_low_quality_min_iou=0.5,
        input_padding="mean",       # padded canvas = 0 after normalization | 'black'
        roi_head="standard", roi_batch_per_image=512, roi_positive_fraction=0.25,
        roi_fg_iou=0.5, roi_output_size=7, roi_sampling_ratio=2,
        box_num_convs=0, box_conv_dim=256, box_num_fcs=2, box_fc_dim=1024,
        bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), box_loss_weight=1.0,
        rpn_reg_loss_weight=1.0, box_reg_loss_weight=1.0, box_cls_loss="softmax",
        seesaw_p=0.8, seesaw_q=2.0, box_head_spec="",
        # Mask R-CNN branch (off = Faster R-CNN; docs/protocol.md, masks)
        mask_on=False, mask_roi_size=14, mask_num_convs=4, mask_conv_dim=256,
        mask_num_classes=1, mask_loss_weight=1.0, mask_max_positives=128,
        mask_crop_size=56, mask_sampling_ratio=2,
        test_score_threshold=0.05, test_nms_threshold=0.5, test_max_detections=100,
        test_topk_candidates=0,     # 0 = every (box, class) pair (exact) | K = a cap
    ))
    m.update(overrides)
    return m


def tiny_model_config(image_size=(128, 128), **overrides) -> ml_collections.ConfigDict:
    """A small detector for CPU tests and the demo (same code, smaller widths/counts)."""
    m = model_config(
        image_size=image_size, dtype="float32", stage_sizes=(1, 1, 1, 1), width=16,
        bottleneck=False, frozen_stages=-1, fpn_channels=32,
        anchor_sizes=(16, 32, 64, 128, 256),
        rpn_pre_nms_topk_train=256, rpn_post_nms_topk_train=128,
        rpn_pre_nms_topk_test=256, rpn_post_nms_topk_test=100,
        rpn_batch_per_image=64, roi_batch_per_image=64, box_conv_dim=32, box_fc_dim=128,
        mask_roi_size=7, mask_num_convs=2, mask_conv_dim=32, mask_max_positives=16,
        mask_crop_size=28, test_score_threshold=0.0)
    m.update(overrides)
    return m


def data_config(**overrides) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict(dict(
        train_ann="", train_images="", val_ann="", val_images="",
        category_names=(),          # () = every category in the annotation file
        short_side=800, max_side=1333, max_boxes=100, flip_prob=0.5,
        short_side_range=(),        # (lo, hi): train short side uniform in lo..hi ('range')
        repeat_threshold=0.0,       # > 0: class-balanced repeat-factor sampling (t)
        num_threads=8, prefetch=2,
        on_error="raise",           # 'raise' | 'skip' (counted) for bad annotations/images
        # 'coco': the *_ann JSON + *_images files; 'tfds': a prepared TensorFlow Datasets
        # builder (coco/2017, lvis) in tfds_data_dir (data/tfds_source.py); evaluation still
        # reads val_ann (the annotation JSON) when given
        source="coco", tfds_name="", tfds_data_dir="", tfds_train_split="train",
        tfds_val_split="validation",
    ))
    d.update(overrides)
    return d


def train_config(**overrides) -> ml_collections.ConfigDict:
    """SGD schedule (mmdet 1x for batch 16: lr 0.02; EZSD uses 0.005 per batch 4)."""
    t = ml_collections.ConfigDict(dict(
        seed=0, batch_size=16, steps=90000, lr=0.02, momentum=0.9, weight_decay=1e-4,
        warmup_steps=500, warmup_factor=0.001, decay_fractions=(8 / 12, 11 / 12), gamma=0.1,
        grad_clip=10.0, ckpt_every=2000, keep_checkpoints=3, log_every=50,
        sharding_rules=(),
    ))
    t.update(overrides)
    return t


def eval_config(**overrides) -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict(dict(batch_size=8))
    e.update(overrides)
    return e
