"""CLIP stages for `python -m ezsd_jax.main`: read the config and the workdir, call the
drivers of this package, write their outputs into the workdir, skip work already done.

  renorm      LayerNorm-only re-normalization of the teacher -> <workdir>/clip_renorm/
  proposals   CLIP proposals of every training image -> <workdir>/proposals (resumable)
Inputs, outputs and job splitting: docs/code-notes.md.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import flax
import jax
import numpy as np
from jax.experimental import multihost_utils

from ezsd_jax.core import cli, config_check, sharding
from ezsd_jax.clip.loading import load_clip
from ezsd_jax.clip.proposals import run_proposals
from ezsd_jax.clip.renorm import crop_accuracy, flatten_gt_boxes, run_renorm
from ezsd_jax.clip.store import ProposalStore
from ezsd_jax.clip.text import (RENORM_DIR, load_text_embeddings, text_embeddings,
                              text_embeddings_path)
from ezsd_jax.data.pipeline import DetectionPipeline
from ezsd_jax.data.synthetic_stage import point_data_config
from ezsd_jax.data import splits
from ezsd_jax.core.io_utils import atomic_write_json
from ezsd_jax.train import load_dataset, make_pipeline

log = logging.getLogger(__name__)

PROPOSALS_DIR = "proposals"

PRETRAIN_DIR = "clip_pretrain"   # the demo's toy CLIP (demo/stages.py: clip_pretrain)


def _point_data(cfg, workdir: str) -> None:
    if "synth" in cfg:
        point_data_config(cfg, workdir)


def _is_main() -> bool:
    return jax.process_index() == 0


def split_names(cfg) -> tuple[list[str], list[str], list[str]]:
    """(base, novel, all) names of config.ezsd's split, in the train file's id order."""
    ann = cfg.data.train_ann
    base, novel = splits.zeroshot_names(cfg.ezsd, ann)
    return base, novel, splits.all_names(base, novel, ann)


SCORE_NAMES = config_check.SCORE_NAMES


def scoring_names(cfg) -> list[str]:
    """The names the proposal stage's softmax (scores, confidences, base-class filter) runs
    over, and that renorm writes text embeddings for: config.clip.score_names 'split'
    (base + novel of the split) or 'dataset' (every category of config.data.train_ann in
    id order: the reference's 80 COCO names, of which the 48/17 split uses 65)."""
    mode = cfg.clip.get("score_names", "split")
    if mode not in SCORE_NAMES:
        raise ValueError(f"config.clip.score_names: {mode!r} is not one of {SCORE_NAMES}")
    base, novel, names = split_names(cfg)
    if mode == "split":
        return names
    return splits.category_names(cfg.data.train_ann)


def clip_source(cfg, workdir: str) -> str:
    """The teacher before re-normalization: config.clip.model, else the toy CLIP of the
    clip_pretrain stage in the workdir."""
    src = cfg.clip.get("model", "")
    if src:
        return src
    d = os.path.join(workdir, PRETRAIN_DIR, "model")
    if not os.path.exists(os.path.join(d, "config.json")):
        raise cli.MissingInput(f"config.clip.model is empty and {d} holds no CLIP: run the "
                                "'clip_pretrain' stage first or set config.clip.model")
    return d


def prompt_templates(cfg) -> tuple[str, ...]:
    return tuple(cfg.clip.renorm.get("templates", ("a photo of a {}.",)))


def _crop_kw(cfg, size: int, mean, std) -> dict:
    r = cfg.clip.renorm
    return dict(enlarge=float(r.get("enlarge", 1.2)), out_size=int(size), mean=mean, std=std,
                method=r.get("method", "bicubic"))


def _local_pipeline(dataset, cfg, batch_size: int, train: bool = False):
    """A pipeline over ALL of `dataset` in this process (no per-process split), no flip."""
    d = cfg.data
    return DetectionPipeline(dataset, batch_size=int(batch_size),
                             image_size=tuple(cfg.model.image_size), max_boxes=d.max_boxes,
                             train=train, short_side=d.short_side, max_side=d.max_side,
                             flip_prob=0.0, seed=cfg.train.seed, num_threads=d.num_threads,
                             prefetch=d.prefetch, process_index=0, process_count=1,
                             on_error=d.on_error)


# ----------------------------------------------------------------------------- renorm

RENORM_EPOCH_UNITS = config_check.RENORM_EPOCH_UNITS


def renorm_steps(cfg, num_boxes: int, num_images: int = 0) -> int:
    """config.clip.renorm_steps when > 0, else renorm_epochs passes over the base GT boxes
    at renorm.crops_per_step crops per step (clip.renorm_epoch_unit 'boxes'), or over the
    images at renorm_batch_size images per step with all their boxes ('images': the
    reference's 4 images per step)."""
    steps = int(cfg.clip.get("renorm_steps", 0) or 0)
    if steps > 0:
        return steps
    unit = cfg.clip.get("renorm_epoch_unit", "boxes")
    if unit not in RENORM_EPOCH_UNITS:
        raise ValueError(f"config.clip.renorm_epoch_unit: {unit!r} is not one of "
                         f"{RENORM_EPOCH_UNITS}")
    if unit == "images":
        per, n = renorm_batch_size(cfg), num_images
    else:
        per, n = int(cfg.clip.renorm.get("crops_per_step", 64)), num_boxes
    return max(1, math.ceil(float(cfg.clip.renorm_epochs) * n / per))


def renorm_batch_size(cfg) -> int:
    """Images per renorm step: config.clip.renorm_batch_size, else train.batch_size."""
    return int(cfg.clip.get("renorm_batch_size", 0) or cfg.train.batch_size)


def val_crop_accuracy(cfg, model, params, text_emb: np.ndarray, names, is_base,
                      mean, std, max_images: int | None = None) -> dict:
    """Accuracy of CLIP classifying val GT crops (all names, 1.2x crops as in renorm) over
    the rows of text_emb (`names` order); acc_all / acc_base / acc_novel + counts."""
    dataset = load_dataset(cfg.data, "val", category_names=list(names))
    if max_images:
        dataset = dataclasses.replace(dataset, records=dataset.records[:int(max_images)])
    bs = int(cfg.eval.batch_size)
    pipe = _local_pipeline(dataset, cfg, bs)
    label_map = np.arange(len(names), dtype=np.int32)
    size = int(model.config.vision_config.image_size)
    rng = np.random.default_rng(0)

    def batches():
        for b in pipe:
            yield flatten_gt_boxes(b, bs * cfg.data.max_boxes, label_map, rng)[0]
    try:
        return crop_accuracy(model, params, batches(), text_emb, is_base=is_base,
                             **_crop_kw(cfg, size, mean, std))
    finally:
        pipe.close()


def renorm(cfg, workdir: str) -> dict:
    """Stage 'renorm' (see module docstring). Returns the crop accuracy dict."""


    _point_data(cfg, workdir)
    out = os.path.join(workdir, RENORM_DIR)
    adapted = os.path.join(out, "adapted_clip")
    emb_path = os.path.join(out, "text_embeddings.npz")
    acc_path = os.path.join(out, "crop_accuracy.json")
    base, novel, names = split_names(cfg)
    done = os.path.exists(os.path.join(adapted, "config.json")) and os.path.exists(emb_path)
    if done and os.path.exists(acc_path):
        log.info(f"[renorm] {adapted} exists, skipping")
        with open(acc_path) as f:
            return json.load(f)
    src = clip_source(cfg, workdir)
    model, params, tok, size, mean, std = load_clip(src)
    templates = prompt_templates(cfg)
    # crop accuracy over ALL names on val GT crops, before (first: run_renorm
    # donates the teacher's parameters) and after
    is_base = np.asarray([n in base for n in names])
    max_images = int(cfg.clip.get("accuracy_images", 500) or 0) or None
    before = val_crop_accuracy(cfg, model, params, text_embeddings(model, params, tok, names,
                                                                   templates),
                               names, is_base, mean, std, max_images)
    if not done:
        dataset = load_dataset(cfg.data, "train", category_names=base)
        bs = renorm_batch_size(cfg)
        # class-balanced repeats (LVIS): an epoch is the repeated list, as the reference's
        pipe = make_pipeline(dataset, cfg, True, bs, multiscale=False, repeat_threshold=float(
            cfg.clip.get("renorm_repeat_threshold", 0.0) or 0.0))
        epoch = pipe.epoch_index
        n_boxes = int(sum(len(dataset.records[i].boxes) for i in epoch))
        steps = renorm_steps(cfg, n_boxes, len(epoch))
        log.info(f"[renorm] teacher {src}; {len(epoch)} images, {n_boxes} base boxes per "
                 f"epoch of {len(base)} base names; {steps} steps of {bs} images")
        mesh = sharding.make_mesh(cfg.mesh)
        # run_renorm builds its state from `params` as given: replicate them on the mesh
        # (else the state sits on one device and the data-sharded batch on all of them)
        params = jax.device_put(flax.core.unfreeze(params), sharding.replicated(mesh))
        try:
            run_renorm(model, params, tok, pipe.train_iterator, base, scoring_names(cfg), steps,
                       cfg.clip.renorm, out, class_names=dataset.cat_names, mean=mean,
                       std=std, mesh=mesh)
        finally:
            pipe.close()
    amodel, aparams, _, _, amean, astd = load_clip(adapted)
    enames, emb = load_text_embeddings(emb_path)
    pos = {n: i for i, n in enumerate(enames)}
    after = val_crop_accuracy(cfg, amodel, aparams, emb[[pos[n] for n in names]], names,
                              is_base, amean, astd, max_images)
    acc = {"before": before, "after": after, "teacher": src}
    if _is_main():
        atomic_write_json(acc_path, acc)
    log.info(f"[renorm] val crop accuracy over all {len(names)} names (base / novel): before "
             f"{before['acc_base']:.3f} / {before['acc_novel']:.3f}, after "
             f"{after['acc_base']:.3f} / {after['acc_novel']:.3f}")
    return acc


# ----------------------------------------------------------------------------- proposals

def proposal_shard(cfg) -> tuple[int, int]:
    """(shard index, shard count) of this job: config.clip.proposal_shard 'i/n', or this
    process of all processes when it is ''."""
    parsed = config_check.parse_shard(cfg.clip.get("proposal_shard", ""))
    return parsed or (jax.process_index(), jax.process_count())


def proposal_batch_size(cfg) -> int:
    """Images per proposal step (one process): config.clip.proposal_batch_size, else
    eval.batch_size."""
    return int(cfg.clip.get("proposal_batch_size", 0) or cfg.eval.batch_size)


def generate_proposals(cfg, workdir: str, clip_dir: str, text_path: str, out_dir: str
                       ) -> dict:
    """Proposals of every training image (base GT only loaded) with the CLIP in
    `clip_dir` classifying over `scoring_names` (rows of `text_path`; config.clip.score_names)
    into the ProposalStore `out_dir`. Returns run_proposals' stats (or {'skipped': all})."""
    base, _, _ = split_names(cfg)
    names = scoring_names(cfg)
    dataset = load_dataset(cfg.data, "train", category_names=base)
    cs = int(cfg.clip.proposal_images_per_chunk)
    n = len(dataset.records)
    num_chunks = max(1, -(-n // cs))
    settings = dict(cfg.clip.proposals)
    manifest = {"num_chunks": num_chunks, "chunk_size": cs, "num_images": n,
                "names": names, "base_names": base, "settings": settings,
                "train_ann": os.path.basename(cfg.data.train_ann)}
    store = ProposalStore(out_dir, manifest)
    shard_index, num_shards = proposal_shard(cfg)
    mine = [c for c in range(num_chunks) if c % num_shards == shard_index]
    if set(mine) <= set(store.finished_shards()):
        log.info(f"[proposals] {out_dir}: all {len(mine)} chunks of shard {shard_index}/"
                 f"{num_shards} exist, skipping")
        return {"processed": [], "skipped": mine}
    model, params, _, _, mean, std = load_clip(clip_dir)
    enames, emb = load_text_embeddings(text_path)
    pos = {nm: i for i, nm in enumerate(enames)}
    missing = [nm for nm in names if nm not in pos]
    if missing:
        raise ValueError(f"{text_path}: no text embedding for {missing}")
    emb = emb[[pos[nm] for nm in names]]
    is_base = np.asarray([nm in base for nm in names])
    class_is_base = np.ones(len(dataset.cat_names), bool)   # only base GT is loaded
    bs = proposal_batch_size(cfg)
    log.info(f"[proposals] {n} training images in {num_chunks} chunks of {cs}; shard "
             f"{shard_index}/{num_shards}; CLIP {clip_dir}; {len(names)} names "
             f"({len(base)} base)")

    def load_chunk(c):
        sub = dataclasses.replace(dataset, records=dataset.records[c * cs:(c + 1) * cs])
        pipe = _local_pipeline(sub, cfg, bs)
        try:
            yield from pipe
        finally:
            pipe.close()

    return run_proposals(model, params, emb, is_base, load_chunk, num_chunks, store,
                         dict(settings, mean=mean, std=std), shard_index=shard_index,
                         num_shards=num_shards, class_is_base=class_is_base,
                         workdir=workdir)


def proposals(cfg, workdir: str) -> dict:
    """Stage 'proposals' (see module docstring)."""
    _point_data(cfg, workdir)
    clip_dir = os.path.join(workdir, RENORM_DIR, "adapted_clip")
    if not os.path.exists(os.path.join(clip_dir, "config.json")):
        raise cli.MissingInput(f"{clip_dir} holds no CLIP: run the 'renorm' stage first")
    out = cfg.ezsd.get("proposals_dir", "") or os.path.join(workdir, PROPOSALS_DIR)
    stats = generate_proposals(cfg, workdir, clip_dir, text_embeddings_path(cfg, workdir),
                               out)
    _barrier_if_multiprocess()
    return stats


def _barrier_if_multiprocess() -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("ezsd_clip_proposals")



__all__ = ["renorm", "proposals", "generate_proposals", "clip_source",
           "split_names", "scoring_names", "SCORE_NAMES", "renorm_steps", "renorm_batch_size",
           "RENORM_EPOCH_UNITS", "val_crop_accuracy",
           "PRETRAIN_DIR", "PROPOSALS_DIR", "prompt_templates"]
