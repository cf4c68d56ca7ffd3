"""The zero-shot demo reduced for CI (tests/test_demo_zeroshot.py): the same world, stages
and settings as configs/demo.py with fewer images and steps (the test's bounds were set
on its spread over seeds: benchmarks/demo_spread.py, figures in benchmarks/RESULTS.md).

  python -m ezsd_jax.main --config=configs/demo_ci.py --workdir=/tmp/demo_ci
"""
from configs import demo


def get_config():
    cfg = demo.get_config()
    cfg.synth.update(dict(train_images=256, val_images=96, captions_per_category=100,
                          heldout_per_category=20))
    cfg.clip.pretrain.update(dict(steps=350, ckpt_every=350))
    cfg.clip.renorm_steps = 150
    cfg.train.update(dict(steps=400, ckpt_every=400))
    cfg.report.num_images = 3
    # boxes only: the mask branch costs ~60 % per train step on CPU (RESULTS.md); the
    # Mask R-CNN path is tested by tests/test_mask_rcnn_learns.py and test_ezsd_cli_stages.py
    cfg.model.mask_on = False
    return cfg
