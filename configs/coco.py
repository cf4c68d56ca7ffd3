"""EZSD on COCO 48/17 (generalized zero-shot detection), the reference protocol for real
runs on GPU/TPU: stages renorm -> proposals -> ezsd_train -> ezsd_eval.

  python -m ezsd_jax.main --config=configs/coco.py --workdir=/ckpt/ezsd_coco \
      --config.coco_root=/data/coco --config.model.pretrained=/weights/resnet50.safetensors \
      --config.clip.model=/weights/clip-vit-base-patch32

Mask R-CNN (model.mask_on, as the reference: bbox and segm AP). Every value is compared
with the authors' runs, item by item, in docs/protocol.md (the reference's file and value,
ours, same / deviates and why); this docstring does not repeat it. The protocol's own
options here: box head '301212', train proposals 2000 -> 1000, 300 detections per image,
distillation on the FIRST 200 stored proposals, proposal softmax over the 80 names of
train2017, renorm prompt "a photo of a {}", and COCO AP reported at the standard maxDets
1/10/100 and at the reference's 100/300/1000.
"""
import ml_collections

from configs import common

COCO_TRAIN_IMAGES = 118287   # train2017; all kept (docs/protocol.md)


def ezsd_head_config(**overrides) -> ml_collections.ConfigDict:
    """config.model.ezsd: options of the EZSD RoI head (models/ezsd_head.EZSDHeadConfig)."""
    h = ml_collections.ConfigDict(dict(
        embed_dim=512,              # CLIP ViT-B/32 joint space
        semantic_regression=True,   # ablation: False -> plain class-agnostic regressor
        learned_background=True,    # ablation: False -> background logit fixed at 0
        temperature_init=100.0, learn_temperature=True,
        background_init="xavier"))  # 'xavier' (the reference's mmcv init) | 'normal' (0.01)
    h.update(overrides)
    return h


def ezsd_config(**overrides) -> ml_collections.ConfigDict:
    """config.ezsd: zero-shot split, stage inputs, distillation and evaluation options."""
    e = ml_collections.ConfigDict(dict(
        split="coco48_17",          # 'coco48_17' | 'lvis' | 'names' (base_names/novel_names)
        base_names=(), novel_names=(),
        text_embeddings="",         # "" = <workdir>/clip_renorm/text_embeddings.npz
        proposals_dir="",           # "" = <workdir>/proposals
        distill=ml_collections.ConfigDict(dict(
            enabled=True,           # ablation: False -> no distillation (base-only training)
            factor=1.0,             # loss = mean |r - t| x 512 x factor
            proposal_slots=300,     # stored proposals read per image (all of them)
            num_proposals=200,      # sampled per image and step from the slots
            sample="replacement",   # the reference: draws with replacement from the first
                                    # num_proposals, every step | 'random' | 'first'
            norm_images=2,          # loss mean per group of 2 images (one reference GPU),
                                    # averaged over the groups | 0: one mean over the batch
            max_gt=100,             # base GT slots per image
            gt_only=False,          # ablation: distill base GT boxes only
            min_size=1.0,           # boxes smaller than this (input px) are dropped
            on_missing="raise")),   # image without stored proposals: 'raise' | 'empty'
        eval=ml_collections.ConfigDict(dict(
            protocol="coco", force=False,
            # LVIS: evaluate only images with an annotation (the reference's
            # eval_filter_empty_gt=True; lvis_eval.nonempty_image_ids)
            filter_empty_gt=False,
            reference_max_dets=())),  # e.g. (100, 300, 1000): COCO AP also at these
    ))
    e.update(overrides)
    return e


def clip_config(**overrides) -> ml_collections.ConfigDict:
    """config.clip: teacher, re-normalization and proposal settings (docs/ezsd-method.md sections 1-2)."""
    c = ml_collections.ConfigDict(dict(
        model="openai/clip-vit-base-patch32",   # or a local directory (offline)
        score_names="split",        # proposals' softmax over 'split' | 'dataset' names
        renorm_epochs=12,
        renorm_epoch_unit="boxes",  # epochs of base boxes at crops_per_step | 'images'
        renorm_repeat_threshold=0.0,  # > 0: class-balanced repeats in renorm (LVIS)
        renorm=ml_collections.ConfigDict(dict(
            lr=1e-4, weight_decay=1e-4, grad_clip=0.1, text_layernorms=True,
            loss="sigmoid", templates=("a photo of a {}.",), enlarge=1.2, size_weight=False,
            crops_per_step=64, flip_prob=0.5, seed=0, ckpt_every=1000, keep=3,
            log_every=50, method="bicubic")),
        proposals=ml_collections.ConfigDict(dict(
            stride=32, sizes=(32, 64, 128, 256, 512), ratios=(0.5, 1.0, 2.0),
            nms_iou=0.7, num_nms=1000, gt_iou=0.3, keep=300, feature_enlarge=1.2,
            drop_base=True,         # drop candidates whose CLIP argmax is a base name
            selection="top",        # 'top' by score | 'random' (LVIS), seeded per image
            seed=0, method="bicubic", chunk=256)),
        proposal_images_per_chunk=64,
        # images per proposal step (one chip per process): 16 needs 30.4 GiB of HBM, more
        # than a v5e's 16; 8 needs 14.9 GiB (python -m ezsd_jax.aot, benchmarks/RESULTS.md)
        proposal_batch_size=8,
    ))
    c.update(overrides)
    return c


def reference_schedule(train_images: int, epochs: int, decay_epochs, batch: int = 16
                       ) -> ml_collections.ConfigDict:
    """config.train of the reference (docs/ezsd-method.md section 3): SGD momentum 0.9, wd 1e-4, lr 0.005
    per 4 images scaled linearly, 500-step linear warm-up, x0.1 at `decay_epochs`, grad
    clip 10."""
    steps_per_epoch = -(-int(train_images) // batch)
    return common.train_config(
        batch_size=batch, steps=epochs * steps_per_epoch, lr=0.005 * batch / 4,
        momentum=0.9, weight_decay=1e-4, warmup_steps=500, warmup_factor=0.001,
        decay_fractions=tuple(e / epochs for e in decay_epochs), gamma=0.1, grad_clip=10.0,
        ckpt_every=2000, log_every=50)


def get_config():
    cfg = common.base_config()
    cfg.stages = ("renorm", "proposals", "ezsd_train", "ezsd_eval")
    cfg.coco_root = "/data/coco"
    root = cfg.get_ref("coco_root")
    cfg.data = common.data_config(
        train_ann=root + "/annotations/instances_train2017.json",
        train_images=root + "/train2017",
        val_ann=root + "/annotations/instances_val2017.json",
        val_images=root + "/val2017",
        short_side=800, max_side=1333, max_boxes=100, flip_prob=0.5, num_threads=16)
    cfg.model = common.model_config(
        image_size=(1344, 1344), dtype="bfloat16", roi_head="ezsd", mask_on=True,
        box_head_spec="301212", box_conv_dim=256, box_fc_dim=1024,
        rpn_pre_nms_topk_train=2000, rpn_post_nms_topk_train=1000,
        rpn_pre_nms_topk_test=1000, rpn_post_nms_topk_test=1000,
        test_score_threshold=0.0, test_nms_threshold=0.5, test_max_detections=300)
    cfg.model.ezsd = ezsd_head_config()
    cfg.ezsd = ezsd_config()
    cfg.ezsd.eval.reference_max_dets = (100, 300, 1000)
    cfg.clip = clip_config(score_names="dataset")
    cfg.clip.renorm.templates = ("a photo of a {}",)
    cfg.train = reference_schedule(COCO_TRAIN_IMAGES, epochs=12, decay_epochs=(8, 11))
    cfg.eval = common.eval_config(batch_size=16)
    return cfg
