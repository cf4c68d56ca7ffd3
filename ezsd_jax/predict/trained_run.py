"""A trained EZSD run on disk, read back for inference: its resolved config, its split's
names, its adapted CLIP text tower, and host params moved to one device. Shared by
detector_api.Detector (a workdir) and bundle.py (an exported bundle).
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from ezsd_jax.core import cli
from ezsd_jax.clip.loading import ClipLoadError, load_clip
from ezsd_jax.data import splits
from ezsd_jax.models.defaults import stored_model_config


def read_config(path: str):
    """The run's resolved config (config.json, written by ezsd_jax.main) as a ConfigDict;
    model fields it predates get the behaviour it was trained with (models/defaults.py)."""
    if not os.path.exists(path):
        raise cli.MissingInput(f"{path} does not exist (a workdir of ezsd_jax.main or a "
                               "bundle of `python -m ezsd_jax.predict export`)")
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise cli.MissingInput(f"{path}: not valid JSON ({e})") from None
    if isinstance(d.get("model"), dict):   # fields the run predates: its behaviour then
        d["model"] = stored_model_config(d["model"])
    return ml_collections.ConfigDict(d)


def planned_steps(cfg, workdir: str, name: str) -> int | None:
    """The number of steps the training of ckpt_<name> runs to: what the training loop
    recorded (metrics/<name>.steps.json), else config.train.steps when > 0, else None."""
    path = os.path.join(workdir, "metrics", f"{name}.steps.json")
    try:
        with open(path) as f:
            return int(json.load(f)["num_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    steps = int(cfg.get("train", {}).get("steps", 0) or 0)
    return steps if steps > 0 else None


def split_names(cfg) -> tuple[list[str], list[str]]:
    """(base, novel) of the run's zero-shot split (config.ezsd), val file's order."""
    ann = cfg.data.get("val_ann", "")
    if cfg.ezsd.split == "names" and not (ann and os.path.exists(ann)):
        return list(cfg.ezsd.base_names), list(cfg.ezsd.novel_names)
    if not (ann and os.path.exists(ann)):
        raise cli.MissingInput(f"config.data.val_ann {ann!r} does not exist: needed for the "
                               f"names of split {cfg.ezsd.split!r}")
    return splits.zeroshot_names(cfg.ezsd, ann)


def to_device(tree):
    """Host arrays -> one device (predict runs each batch whole on the first device)."""
    dev = jax.devices()[0]
    return jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x), dev), tree)


def load_text_tower(clip_dir: str):
    """(model, params, tokenizer) of the adapted CLIP in `clip_dir` (clip/loading.load_clip)."""
    if not os.path.exists(os.path.join(clip_dir, "config.json")):
        raise cli.MissingInput(f"{clip_dir} holds no CLIP (run the renorm stage first)")
    try:
        model, params, tok, *_ = load_clip(clip_dir)
    except ClipLoadError as e:
        raise cli.MissingInput(str(e)) from None
    return model, params, tok


__all__ = ["read_config", "planned_steps", "split_names", "to_device", "load_text_tower"]
