"""Detector training stage ("train"): data pipeline -> jitted, sharded train step -> the
shared training loop (checkpoints, resume, metrics, progress).

The step is one XLA program: forward (backbone, RPN, proposal sampling, RoI head), losses,
gradients, SGD update; the batch is split over the mesh's 'data' axis, the train state is
replicated (or sharded by `config.train.sharding_rules`) and donated. Methods add loss
terms through `extra_loss_fn` (EZSD distillation) and constants through `consts`
(text embeddings), without a second copy of the step.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from ezsd_jax.core import optim, sharding, train_loop
from ezsd_jax.data.coco import CocoDataset, load_coco
from ezsd_jax.data.pipeline import DetectionPipeline
from ezsd_jax.data.sampling import repeat_factors
from ezsd_jax.models import detector as det
from ezsd_jax.models.pretrained import load_state_dict, torchvision_to_flax
from ezsd_jax.models.resnet import trainable_mask

log = logging.getLogger(__name__)


def load_dataset(dcfg: ml_collections.ConfigDict, split: str,
                 category_names=None, with_masks: bool = False) -> CocoDataset:
    """config.data's `split` annotations (COCO JSON + image files, or a tfds builder:
    data.source='tfds', data/tfds_source.py); with_masks (a Mask R-CNN's training set)
    also validates and keeps every annotation's segmentation."""
    ann, images = dcfg[f"{split}_ann"], dcfg[f"{split}_images"]
    names = category_names if category_names is not None else (
        list(dcfg.category_names) if dcfg.get("category_names") else None)
    if dcfg.get("source", "coco") == "tfds":
        from ezsd_jax.data.tfds_source import load_tfds
        return load_tfds(dcfg, split, names, with_masks=with_masks)
    if not ann or not os.path.exists(ann):
        raise FileNotFoundError(f"config.data.{split}_ann: annotation file {ann!r} not found")
    return load_coco(ann, images, category_names=names, on_error=dcfg.on_error,
                     num_threads=dcfg.num_threads, with_masks=with_masks)


def make_pipeline(dataset: CocoDataset, cfg, train: bool, batch_size: int,
                  extra_fn: Callable | None = None, repeat_threshold: float | None = None,
                  multiscale: bool = True, masks: bool = False) -> DetectionPipeline:
    """The pipeline of config.data. Training samples with repeat factors when
    `repeat_threshold` (default data.repeat_threshold) is > 0 and draws the short side from
    data.short_side_range when `multiscale` (the CLIP stages pass False: the reference's
    CLIP runs use one scale); masks: batches carry the GT masks' box crops
    (config.model.mask_crop_size; the detector's training set, loaded with_masks)."""
    d = cfg.data
    pc = jax.process_count()
    if batch_size % pc:
        raise ValueError(f"batch size {batch_size} not divisible by {pc} processes")
    thr = float(d.get("repeat_threshold", 0.0) if repeat_threshold is None
                else repeat_threshold) or 0.0
    factors = None
    if train and thr > 0:   # class-balanced repeat-factor sampling (LVIS)
        factors = repeat_factors([r.classes for r in dataset.records], thr)
        log.info(f"repeat-factor sampling t={thr}: {len(factors)} images -> "
                 f"{int(np.ceil(factors).sum())} per epoch")
    scale_range = (tuple(d.get("short_side_range", ()) or ()) or None) if multiscale else None
    return DetectionPipeline(
        dataset, batch_size=batch_size // pc, image_size=tuple(cfg.model.image_size),
        max_boxes=d.max_boxes, train=train, short_side=d.short_side, max_side=d.max_side,
        flip_prob=d.flip_prob if train else 0.0, seed=cfg.train.seed,
        num_threads=d.num_threads, prefetch=d.prefetch, extra_fn=extra_fn,
        on_error=d.on_error, repeat_factors=factors, short_side_range=scale_range,
        mask_size=cfg.model.get("mask_crop_size", 0) if masks else 0)


def masks_on(cfg) -> bool:
    """Whether config.model trains / runs the Mask R-CNN branch."""
    return bool(cfg.model.get("mask_on", False))


def detector_config(cfg, num_classes: int) -> det.DetectorConfig:
    return det.DetectorConfig.from_config(cfg.model, num_classes=num_classes)


def load_pretrained_backbone(variables: dict, path: str, dcfg: det.DetectorConfig) -> dict:
    conv = torchvision_to_flax(load_state_dict(path), stage_sizes=dcfg.stage_sizes,
                               bottleneck=dcfg.bottleneck)
    params = dict(variables["params"])
    stats = dict(variables.get("batch_stats", {}))
    params["backbone"] = conv["params"]
    stats["backbone"] = conv["batch_stats"]
    log.info(f"loaded pretrained backbone from {path}")
    return {**variables, "params": params, "batch_stats": stats}


def make_optimizer(cfg, params, steps: int):
    t = cfg.train
    mask = trainable_mask(params, cfg.model.frozen_stages)
    decay = [int(f * steps) for f in t.decay_fractions]
    sched = optim.warmup_step_schedule(t.lr, t.warmup_steps, decay, t.gamma, t.warmup_factor)
    tx = optim.sgd(sched, t.momentum, t.weight_decay, t.grad_clip, trainable=mask)
    return tx, mask, sched


def train_steps(t: ml_collections.ConfigDict, pipe: DetectionPipeline) -> int:
    """config.train.steps when > 0, else train.epochs passes of the pipeline's epoch (with
    repeat-factor sampling: of the repeated list, as mmdetection counts epochs)."""
    if int(t.steps) > 0:
        return int(t.steps)
    epochs = float(t.get("epochs", 0) or 0)
    if epochs <= 0:
        raise ValueError("config.train: set train.steps > 0 or train.epochs > 0")
    return max(1, math.ceil(epochs * pipe.steps_per_epoch))


def init_train_state(model: det.FasterRCNN, cfg, mesh, key, consts: dict,
                     init_fn: Callable[[dict], dict] | None = None, steps: int | None = None):
    """Train state {'params','batch_stats','opt_state','step'} placed with its shardings
    (`steps` sets the lr schedule's length; default config.train.steps)."""
    tx, mask, sched = make_optimizer(cfg, _abstract_params(model, consts),
                                     int(steps or max(1, cfg.train.steps)))

    def init(k):
        v = det.init_variables(model, k, 1, consts.get("class_embeddings"))
        if init_fn is not None:
            v = init_fn(v)
        return {"params": v["params"], "batch_stats": v.get("batch_stats", {}),
                "opt_state": tx.init(v["params"]), "step": jnp.zeros((), jnp.int32)}

    abstract = jax.eval_shape(init, key)
    rules = [(r, P(*s)) for r, s in cfg.train.get("sharding_rules", ())]
    state_sh = sharding.param_shardings(mesh, abstract, rules)
    n_train = optim.count_params(abstract["params"], mask)
    n_all = optim.count_params(abstract["params"])
    log.info(f"detector: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trained")
    return init, state_sh, tx, sched


def _abstract_params(model, consts):
    return jax.eval_shape(lambda k: det.init_variables(model, k, 1,
                                                       consts.get("class_embeddings")),
                          jax.random.key(0))["params"]


def make_train_step(model: det.FasterRCNN, tx, mesh, state_sh, seed: int,
                    extra_loss_fn=None, sched=None):
    data_sh = sharding.data_sharding(mesh)
    rep = sharding.replicated(mesh)

    def step(state, batch, consts):
        key = jax.random.fold_in(jax.random.key(seed), state["step"])

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state["batch_stats"]}
            return det.forward_train(model, variables, batch, key,
                                     consts.get("class_embeddings"), extra_loss_fn)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree_util.tree_map(lambda p, u: p + u, state["params"], updates)
        metrics = dict(metrics)
        stats = state["batch_stats"]
        if det.SEESAW_COUNTS in metrics:   # the seesaw loss's running counts
            stats = {**stats, det.SEESAW_COUNTS: metrics.pop(det.SEESAW_COUNTS)}
        metrics["grad_norm"] = optim_global_norm(grads)
        if sched is not None:
            metrics["lr"] = sched(state["step"])
        new = {"params": params, "batch_stats": stats,
               "opt_state": opt_state, "step": state["step"] + 1}
        return new, metrics

    return jax.jit(step, in_shardings=(state_sh, data_sh, rep), out_shardings=(state_sh, rep),
                   donate_argnums=(0,))


def optim_global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                        for x in jax.tree_util.tree_leaves(tree)))


def initial_state(model: det.FasterRCNN, cfg, mesh, consts: dict, init_fn=None,
                  steps: int | None = None):
    """-> (state, state shardings, tx, schedule): a fresh train state (seed
    config.train.seed) on `mesh`. config.model.pretrained (a torchvision-format ResNet
    file) replaces the backbone's weights and BN statistics; `init_fn` may edit the
    variables after that."""
    key = jax.random.key(cfg.train.seed)
    pretrained = cfg.model.get("pretrained", "")
    dcfg = model.cfg

    def full_init(v):
        if pretrained:
            v = load_pretrained_backbone(v, pretrained, dcfg)
        return init_fn(v) if init_fn is not None else v

    init, state_sh, tx, sched = init_train_state(model, cfg, mesh, key, consts, full_init,
                                                 steps)
    if pretrained:  # host-side file loading cannot run under jit: init eagerly, then place
        state = jax.device_put(init(key), state_sh)
    else:
        state = jax.jit(init, out_shardings=state_sh)(key)
    return state, state_sh, tx, sched


def train_detector(cfg, workdir: str, dataset: CocoDataset, consts: dict | None = None,
                   extra_loss_fn=None, extra_fn=None, init_fn=None, name: str = "detector"):
    """Trains the detector on `dataset`; returns (model, final state)."""
    consts = consts or {}
    t = cfg.train
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch_divisible(t.batch_size, mesh)
    dcfg = detector_config(cfg, dataset.num_classes)
    model = det.FasterRCNN(dcfg)
    pipe = make_pipeline(dataset, cfg, True, t.batch_size, extra_fn, masks=dcfg.mask_on)
    steps = train_steps(t, pipe)
    try:
        state, state_sh, tx, sched = initial_state(model, cfg, mesh, consts, init_fn, steps)
        step_fn = make_train_step(model, tx, mesh, state_sh, t.seed, extra_loss_fn, sched)
        consts_dev = jax.device_put(consts, sharding.replicated(mesh))
        log.info(f"[{name}] {len(dataset.records)} images, {dataset.num_classes} classes, "
                 f"{pipe.steps_per_epoch} steps/epoch, {steps} steps")
        state, _ = train_loop.fit(
            state=state, step_fn=lambda s, b: step_fn(s, b, consts_dev),
            batches=pipe.train_iterator, num_steps=steps, workdir=workdir, name=name,
            mesh=mesh, ckpt_every=t.ckpt_every, keep=t.keep_checkpoints,
            log_every=t.log_every, items_per_step=t.batch_size, unit="img")
    finally:
        pipe.close()
    return model, state


def run(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    """Stage "train": the plain Faster R-CNN on config.data (train split)."""
    dataset = load_dataset(cfg.data, "train", with_masks=masks_on(cfg))
    train_detector(cfg, workdir, dataset)
