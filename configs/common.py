"""Config blocks shared by every experiment config: mesh, distributed runtime, model, data, training."""
import ml_collections

from ezsd_jax.models.defaults import default_model_config


def base_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.stages = ()
    # Device mesh: ('data', 'model'); -1 = inferred from the device count.
    cfg.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
    # Multi-host: jax.distributed.initialize() when enabled (or EZSD_DISTRIBUTED=1).
    cfg.distributed = ml_collections.ConfigDict(dict(
        enabled=False, coordinator_address="", num_processes=-1, process_id=-1))
    return cfg


def model_config(**overrides) -> ml_collections.ConfigDict:
    """Faster R-CNN / Mask R-CNN R50-FPN: the one set of model defaults
    (ezsd_jax/models/defaults.py), with `overrides`."""
    return default_model_config(**overrides)


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
