"""ISAL active learning for object detection on PASCAL VOC2012 (Faster R-CNN R50-FPN).

    python -m isal_jax.main --config=configs/isal_voc.py --workdir=DIR \
        --config.data.train_ann=voc2012/annotations/instances_train.json \
        --config.data.train_images=voc2012/JPEGImages \
        --config.data.val_ann=voc2012/annotations/instances_val.json \
        --config.data.val_images=voc2012/JPEGImages \
        --config.model.pretrained=/path/to/torchvision_resnet50.safetensors

Protocol (the reference's detection setting): pool = VOC2012 `train` (5717 images),
evaluation on VOC2012 `val` (5823 images); a random initial labeled set (the same per seed
for every strategy), +`budget` images per cycle, Faster R-CNN R50-FPN retrained from
scratch (ImageNet backbone) every cycle with the mmdetection '1x' schedule: 12 epochs of
the labeled set, lr x0.1 after epochs 8 and 11, batch 16, lr 0.02, 500 warmup steps
(at most a quarter of a cycle's steps: 500 labeled images are only 375 steps).
initial/budget/cycles below are our choice (500 / +500 / 10 cycles), not checked against
the paper.

Data: VOC is read as COCO-format JSON converted by the user, e.g. with mmdetection's
tools/dataset_converters/pascal_voc.py (--out-format coco), one file per split:
  * images: id (int), file_name (relative to *_images, e.g. '2008_000008.jpg'), height,
    width; categories: the 20 VOC classes (ids 1..20, any order; names unique);
  * annotations: bbox [x, y, w, h] in pixels (VOC's 1-based xmin/ymin: subtract 1 or
    keep, but the same for both splits), category_id, area = w*h, iscrowd;
  * objects marked `difficult` -> iscrowd=1: training ignores them (ezsd_jax.data.coco
    drops crowd boxes) and pycocotools treats them as ignore regions, which is the closest
    COCOeval gets to VOC's difficult handling.
Metric: COCOeval AP50 (101-point interpolation, every image) as the primary metric, and
COCO AP; this is not the VOC devkit's mAP@0.5 (11-point for 2007, area for 2012), so
absolute numbers differ slightly from the paper's; the curves and savings compare
strategies under one metric.
"""
import ml_collections

import isal_jax.config_schema  # noqa: F401  (registers the ISAL config rules)

from configs import common


def add_isal_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The active-learning, influence and select-CLI fields shared by every detection
    config (isal_voc, isal_coco, isal_det_synthetic)."""
    c.task = "detection"

    c.al = ml_collections.ConfigDict()
    c.al.strategies = ("isal", "random", "least_confidence", "entropy", "coreset")
    c.al.seeds = (0, 1, 2)
    c.al.initial = 500
    c.al.budget = 500
    c.al.cycles = 10
    c.al.plot = True

    c.data.pool_ids_file = ""       # optional JSON id list restricting the pool (train split)

    # Reference set R of v = sum grad L(R) (isal_jax.selection_io.reference_source):
    # 'labeled' | 'heldout' (AL loop) | 'ids_file' (train-split ids) | 'split:val' (the
    # reference code's choice, which LEAKS the evaluation split's labels; the paper
    # configs use it).
    c.reference = ml_collections.ConfigDict(dict(source="labeled", ids_file="",
                                                 heldout_fraction=0.2, heldout_size=0))

    i = c.influence = ml_collections.ConfigDict()
    # Pseudo GT: detections with score >= score_threshold (the reference README: 0.1), at
    # most max_pseudo_boxes per image (<= model.test_max_detections). Images without
    # any are not scored and come after every scored image.
    i.score_threshold = 0.1
    i.max_pseudo_boxes = 100
    # Per-image loss: 'sampled' = the training sampler with a key fixed per image id
    # (loss_seed); 'all' = every non-ignored anchor / candidate RoI, no sampling.
    i.sampling = "sampled"
    i.loss_seed = 0
    # Smooth-L1 beta of the box losses (0 = training's L1, whose gradient is an arbitrary
    # sign on the RoIs a pseudo box was decoded from; see isal_jax/tasks/detection.py).
    i.reg_beta = 0.01
    i.feature_level = 3             # FPN level pooled for core-set features (3 = P5)
    # Parameter subset: the heads' last layers (rpn_cls, rpn_reg, fc_cls, fc_reg), kernels
    # and biases; isal_jax.tasks.detection.REFERENCE_SUBSET = kernels only (the reference).
    i.subset = (r"regex:^(rpn/(objectness|deltas)|"
                r"roi_head/(classifier/cls_score|regressor/bbox_pred))/")
    i.damp = 0.01
    i.scale = 1e4
    # Per-block LiSSA scales: ((key, scale), ...), key = exact path, 'regex:<pattern>' or
    # '*'; blocks no key names use `scale`. () = the scalar `scale` everywhere.
    i.block_scales = ()
    # 'preconditioner': the blocks' scales precondition the damped system of the '*' scale
    # (fixed point: the damped inverse-HVP); 'reference': the ISAL code's recursion.
    i.block_mode = "preconditioner"
    i.depth = 250
    i.repeats = 4
    i.residual_batches = 8
    i.max_residual = 1.0            # LiSSA must converge by its own residual (degenerate.py)
    i.on_unconverged = "stop"       # stop | select (the reference selects anyway)
    # The options of the one scoring path (isal_jax/scoring.py), as for classification:
    i.solver = "lissa"              # lissa | cg
    i.cg_tol = 1e-3
    i.cg_maxiter = 100
    i.damp_mode = "fixed"           # fixed | top_eig (damp*scale = damp_fraction * top)
    i.damp_fraction = 0.1
    i.eig_iters = 0
    i.diversity = "none"            # none | class_balanced (top class of the pseudo boxes)
    i.hvp_order = "shuffled"        # shuffled | sequential (the reference: images in order)
    i.nan_reset = "chain"           # chain | block (the reference: per parameter block)
    i.ref_batch_size = 8
    i.hvp_batch_size = 8
    i.hvp_num_batches = 32          # LiSSA draws its minibatches from this many
    i.pool_batch_size = 16
    i.shard_size = 1024             # pool images per resumable score shard

    # `python -m isal_jax.select` (config.task='detection'): select `budget` images of
    # the train split (or data.pool_ids_file) minus labeled_ids_file, with the detector
    # trained in checkpoint_workdir ('' = --workdir; its ckpt_detector/ as
    # `ezsd_jax.main --stages=train` writes it).
    c.strategy = "isal"             # isal | random | least_confidence | entropy | coreset
    c.budget = 500
    c.seed = 0
    c.checkpoint_workdir = ""
    c.labeled_ids_file = ""         # '' -> <workdir>/labeled_ids.json
    c.init_checkpoint_if_missing = False
    c.allow_degenerate = False      # True: select even from degenerate outputs / LiSSA
    c.init = ml_collections.ConfigDict(dict(num_labeled=500))

    return c


def get_config() -> ml_collections.ConfigDict:
    c = common.base_config()
    c.model = common.model_config(test_score_threshold=0.05)
    c.data = common.data_config(short_side=800, max_side=1333, max_boxes=100)
    # steps = ceil(epochs * num_labeled / batch_size) per cycle (train.steps > 0 fixes it)
    c.train = common.train_config(steps=0, batch_size=16, lr=0.02, warmup_steps=500,
                                  ckpt_every=1000, keep_checkpoints=1)
    c.train.epochs = 12.0
    c.train.min_steps = 0
    c.eval = common.eval_config(batch_size=8)
    return reference_isal_settings(add_isal_fields(c))


def reference_isal_settings(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ISAL reference's detection settings (Faster R-CNN): v over the evaluation split
    (leaks its labels), per-block LiSSA scales rpn_cls, rpn_reg, fc_cls, fc_reg = 1000,
    1000, 5000, 1000 with the reference's recursion, ~1000 steps per chain over up to 1000
    labeled images (8 per HVP minibatch x 125)."""
    c.reference.source = "split:val"
    i = c.influence
    i.block_scales = (("regex:^rpn/objectness/", 1000.0), ("regex:^rpn/deltas/", 1000.0),
                      ("regex:^roi_head/classifier/cls_score/", 5000.0),
                      ("regex:^roi_head/regressor/bbox_pred/", 1000.0))
    i.block_mode = "reference"
    i.depth = 1000
    i.hvp_batch_size = 8
    i.hvp_num_batches = 125
    return c
