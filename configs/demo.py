"""The built-in zero-shot demo: EZSD end to end on CPU in minutes, in a synthetic world.

  make demo            = python -m ezsd_jax.main --config=configs/demo.py --workdir=workdir/demo
  make demo-ablation   = the same + --config.ablation.enabled=True (4 more detectors)

Measured on 2 CPU cores (2026-12-02, benchmarks/RESULTS.md): 3 min 5 s with masks and
predict. Seed 0: box AP50 novel 0.377, base 0.944; mask AP50 novel 0.290. The figures
vary with the seeds and across machines (README: mean and range over 3 seeds).

No real CLIP weights or COCO exist offline, and a random CLIP knows nothing about novel
categories, so the demo builds a small world where the teacher really learned every
category from captions and the detector never saw a box of the novel ones
(ezsd_jax/demo/world.py): 6 base + 3 novel coloured shapes.

Stages: demo_data (detection scenes + clean caption images) -> clip_pretrain (toy CLIP,
contrastive, on the captions of ALL categories) -> renorm (LayerNorm-only, base GT crops
of the detection scenes) -> proposals (CLIP proposals of the training scenes) ->
ezsd_train (base boxes only + distillation) -> ezsd_eval (generalized: one classifier
over base + novel names) -> ablation (no-op unless enabled) -> demo_report (tables in
report.md, detections.png). Each stage skips work already in the workdir.

The world block is `config.synth` so that ezsd_jax.main points config.data at
<workdir>/synthetic (data/synthetic_stage.point_data_config) for every stage, also when
one runs alone (--stages=ezsd_eval).

Scaled down from the reference (docs/ezsd-method.md) for CPU, each choice measured on this demo:
  - 128x128 scenes, the tiny ResNet-FPN detector, 400 steps of batch 8 (novel AP50 falls
    with longer training: 600 steps gave 0.35-0.39 vs 0.41-0.50 at 400; unannotated novel
    objects are trained as background);
  - a 64-d toy CLIP on 32-px crops (2 layers, patch 8), 600 contrastive steps;
  - re-normalization: softmax cross-entropy (the reference's sigmoid BCE left this toy
    CLIP worse than before: val base crop accuracy 0.74 vs 0.93 with softmax), lr 3e-3,
    300 steps of 48 crops (the reference's 1e-4 / 12 epochs are for ViT-B/32 on COCO);
  - proposals on a stride-16 grid of square boxes 16..64 px (ratio 1 only: tall/wide
    anchors, zero-padded to squares, were confidently classified as thin novel shapes),
    NMS to 100, 30 kept per image, 20 sampled per step;
  - distillation loss factor 0.25 (see below).
"""
import ml_collections

from configs import common
from configs.coco import clip_config, ezsd_config, ezsd_head_config

BASE = ("red circle", "green square", "blue triangle", "yellow star", "magenta cross",
        "cyan ring")
NOVEL = ("orange diamond", "purple hexagon", "white pentagon")
EMBED_DIM = 64


def world_config(**overrides) -> ml_collections.ConfigDict:
    """config.synth: the demo world (fields of demo/world.WorldSpec + sizes)."""
    w = ml_collections.ConfigDict(dict(
        out_dir="",                   # "" = <workdir>/synthetic
        seed=0, base=BASE, novel=NOVEL,
        train_images=320, val_images=200,
        captions_per_category=200, heldout_per_category=40,
        image_size=128, objects_per_image=(2, 5), object_size=(18, 44), clutter=6,
        novel_weight_train=0.5,       # novel objects appear, unannotated, in train scenes
        contrast=(0.35, 0.6), brightness=(-45.0, -15.0), colour_cast=20.0, noise=8.0,
        caption_size=32, caption_render=64, caption_object_frac=(0.4, 0.9),
        caption_background=(40, 250), caption_templates=("a photo of a {}.",),
        caption_empty_frac=0.1))
    w.update(overrides)
    return w


def get_config():
    cfg = common.base_config()
    cfg.stages = ("demo_data", "clip_pretrain", "renorm", "proposals", "ezsd_train",
                  "ezsd_eval", "ablation", "demo_report")
    cfg.synth = world_config()
    cfg.data = common.data_config(short_side=128, max_side=128, max_boxes=8, flip_prob=0.5,
                                  num_threads=2)
    # Mask R-CNN as the reference (the world's shapes have exact masks). Measured on the
    # tiny detector's train step at 128 px, batch 8 (benchmarks/bench_train_step.py, cpu-2c
    # under load ~11): 419 ms -> 668 ms per step, compile 43 s -> 48 s.
    cfg.model = common.tiny_model_config(
        image_size=(128, 128), roi_head="ezsd", box_num_convs=0,
        test_max_detections=100, mask_on=True)
    # background embedding N(0, 0.01), not the reference's Xavier normal: with the demo's
    # 64-d embeddings and temperature 100 the Xavier-initialized background logit has a
    # random spread of 100 * sqrt(2 / 65) = 17.5 (6.2 at 512-d). Reduced demo, seed 0, base
    # / novel AP50 (benchmarks/RESULTS.md, "Protocol defaults"): 150 steps Xavier 0.03 /
    # 0.02 vs N(0, 0.01) 0.29 / 0.17; 400 steps Xavier 0.85 / 0.33 vs 0.85 / 0.45
    cfg.model.ezsd = ezsd_head_config(embed_dim=EMBED_DIM, background_init="normal")
    cfg.ezsd = ezsd_config(split="names", base_names=BASE, novel_names=NOVEL)
    # distillation loss factor 0.25 (reference: 1 for COCO). Measured on this demo (novel /
    # base AP50, 400 steps): 1.0 -> 0.41 / 0.83, 0.5 -> 0.41 / 0.90, 0.25 -> 0.50 / 0.89
    # (0.51 / 0.94 with another seed), 0.1 -> 0.35 / 0.89.
    cfg.ezsd.distill.update(dict(proposal_slots=30, num_proposals=20, max_gt=8,
                                 factor=0.25))
    cfg.clip = clip_config(model="")  # "" = the toy CLIP of stage clip_pretrain
    cfg.clip.captions = ""            # "" = <synth root>/captions
    cfg.clip.pretrain = ml_collections.ConfigDict(dict(
        hidden=64, layers=2, heads=2, image_size=32, patch=8, projection_dim=EMBED_DIM,
        max_text_len=16, steps=600, batch_size=128, lr=1e-3, weight_decay=1e-2,
        warmup_steps=50, grad_clip=1.0, flip_prob=0.5, seed=0, ckpt_every=300, keep=1,
        log_every=50))
    cfg.clip.renorm.update(dict(lr=3e-3, loss="softmax", crops_per_step=48, ckpt_every=300,
                                log_every=50))
    cfg.clip.renorm_steps = 300       # > 0 overrides renorm_epochs
    cfg.clip.renorm_batch_size = 16
    cfg.clip.accuracy_images = 0      # val images for the crop accuracy (0: all)
    cfg.clip.proposals.update(dict(stride=16, sizes=(16, 24, 32, 48, 64), ratios=(1.0,),
                                   offset=0.5, num_nms=100, keep=30, chunk=192))
    cfg.clip.proposal_images_per_chunk = 64
    cfg.clip.proposal_batch_size = 16
    cfg.clip.proposal_shard = ""      # "i/n"; "" = one job per process
    cfg.train = common.train_config(batch_size=8, steps=400, lr=0.02, warmup_steps=50,
                                    ckpt_every=200, log_every=25)
    cfg.eval = common.eval_config(batch_size=16)
    cfg.ablation = ml_collections.ConfigDict(dict(
        enabled=False,
        variants=("no_renorm", "no_proposals", "no_semantic_regression",
                  "no_distillation")))
    cfg.report = ml_collections.ConfigDict(dict(num_images=6, columns=3,
                                                score_threshold=0.3, max_detections=10))
    return cfg
