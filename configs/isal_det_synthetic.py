"""ISAL active learning for detection on the generated synthetic shapes set (CPU, minutes).

    python -m isal_jax.main --config=configs/isal_det_synthetic.py --workdir=DIR
    python -m isal_jax.select --config=configs/isal_det_synthetic.py --workdir=DIR \
        --config.init_checkpoint_if_missing=True

The set is written into <workdir>/synthetic once (ezsd_jax.data.synthetic_stage): 64x64
images with 1-2 shapes of 3 categories; pool = its 96 train images, evaluation on 32 val
images. A tiny Faster R-CNN (same code as R50-FPN, small widths) retrained from scratch each
cycle; initial 16 labels, +16 per cycle, 2 cycles, isal vs random, one seed. The same code
path as configs/isal_voc.py / isal_coco.py, shrunk to a CPU.
"""
import ml_collections

from configs import common, isal_voc


def get_config() -> ml_collections.ConfigDict:
    c = common.base_config()
    c.synth = ml_collections.ConfigDict(dict(
        out_dir="",               # "" = <workdir>/synthetic
        num_categories=3, train_images=96, val_images=32, seed=0,
        image_hw_range=((48, 64), (48, 64)), objects_per_image=(1, 2),
        object_size=(14, 36), clutter=0,
    ))
    c.model = common.tiny_model_config(
        image_size=(64, 64), anchor_sizes=(8, 16, 32, 64, 128),
        rpn_pre_nms_topk_train=128, rpn_post_nms_topk_train=64, rpn_pre_nms_topk_test=128,
        rpn_post_nms_topk_test=64, rpn_batch_per_image=64, roi_batch_per_image=32,
        test_max_detections=100, test_topk_candidates=128, test_score_threshold=0.05)
    # test_max_detections stays 100: ezsd_jax.evaluate.coco_eval passes it as COCOeval's
    # largest maxDets, and pycocotools' summary AP (stats[0]) looks for maxDets=100.
    c.data = common.data_config(short_side=64, max_side=64, max_boxes=4, num_threads=2)
    c.train = common.train_config(batch_size=8, steps=150, lr=0.02, warmup_steps=30,
                                  ckpt_every=1000, keep_checkpoints=1, log_every=50)
    c.train.epochs = 0.0
    c.train.min_steps = 1
    c.eval = common.eval_config(batch_size=8)
    add = isal_voc.add_isal_fields(c)
    add.al.strategies = ("isal", "random")
    add.al.seeds = (0,)
    add.al.initial = 16
    add.al.budget = 16
    add.al.cycles = 2
    i = add.influence
    i.max_pseudo_boxes = 8
    i.depth = 20
    i.repeats = 2
    i.residual_batches = 2
    i.ref_batch_size = 8
    i.hvp_batch_size = 8
    i.hvp_num_batches = 2
    i.pool_batch_size = 8
    i.shard_size = 32
    add.budget = 16
    add.init.num_labeled = 16
    add.init_checkpoint_if_missing = False
    return add
