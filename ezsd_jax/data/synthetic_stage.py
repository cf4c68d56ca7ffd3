"""Stage "synth_data": writes a synthetic COCO-format train/val set (data/synthetic.py)
into the workdir and points config.data at it. Skips the work when the files exist."""
from __future__ import annotations

import logging
import os

import jax
from jax.experimental import multihost_utils

from ezsd_jax.data.synthetic import SyntheticSpec, default_categories, write_coco_dataset

log = logging.getLogger(__name__)


def spec_from_config(s) -> SyntheticSpec:
    return SyntheticSpec(
        categories=default_categories(s.num_categories),
        image_hw_range=tuple(tuple(r) for r in s.image_hw_range),
        objects_per_image=tuple(s.objects_per_image), object_size=tuple(s.object_size),
        clutter=s.clutter)


def coco_layout(root: str) -> dict:
    """The COCO-style layout of a generated set under `root` (annotations/ + images)."""
    return {"train_ann": os.path.join(root, "annotations", "instances_train.json"),
            "train_images": os.path.join(root, "train"),
            "val_ann": os.path.join(root, "annotations", "instances_val.json"),
            "val_images": os.path.join(root, "val"), "root": root}


def dataset_paths(cfg, workdir: str) -> dict:
    """coco_layout of config.synth.out_dir ('' = <workdir>/synthetic)."""
    return coco_layout(cfg.synth.out_dir or os.path.join(workdir, "synthetic"))


def point_data_config(cfg, workdir: str) -> None:
    """Fills config.data's empty paths with the synthetic set's (later stages read them)."""
    p = dataset_paths(cfg, workdir)
    with cfg.unlocked() if hasattr(cfg, "unlocked") else _null():
        for k in ("train_ann", "train_images", "val_ann", "val_images"):
            if not cfg.data[k]:
                cfg.data[k] = p[k]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def run(cfg, workdir: str) -> dict:
    """Multi-process: process 0 writes first while the others wait at a barrier; they then
    skip the files where the workdir is shared and write their own (identical, seeded)
    copy where each host has its own disk. Without the barrier every process would
    rewrite the same images in place while another may already be reading them."""
    later = jax.process_index() > 0
    if later:
        _barrier()
    s = cfg.synth
    p = dataset_paths(cfg, workdir)
    spec = spec_from_config(s)
    for split, n in (("train", s.train_images), ("val", s.val_images)):
        ann = p[f"{split}_ann"]
        if os.path.exists(ann):
            log.info(f"[synth_data] {ann} exists, skipping")
            continue
        write_coco_dataset(p["root"], spec, n, seed=s.seed, split=split)
        log.info(f"[synth_data] wrote {n} {split} images to {p['root']}")
    if not later and jax.process_count() > 1:
        _barrier()
    point_data_config(cfg, workdir)
    return p


def _barrier() -> None:
    multihost_utils.sync_global_devices("ezsd_synth_data")
