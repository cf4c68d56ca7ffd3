"""The jitted hot steps of an EZSD / detector config's stages, as StepSpecs: each builds the
project's own step function (train.make_train_step, evaluate.infer_program,
clip.renorm.jitted_train_step, clip.proposals.make_proposal_fn) with abstract arguments
(parameters from jax.eval_shape of the init) at the config's real shapes.
"""
from __future__ import annotations

import jax
import numpy as np

from ezsd_jax.core.aot.program import Program, StepSpec, abstract, from_spec, per_chip
from ezsd_jax.detector_programs import detector_infer_spec, detector_train_spec, num_classes
from ezsd_jax.core import sharding


def _class_embeddings(k: int, cfg) -> dict:
    return {"class_embeddings": np.zeros((k, int(cfg.model.ezsd.embed_dim)), np.float32)}


# vocabulary of the toy CLIP's tokenizer stand-in (the real one depends on the captions)
TOY_VOCAB = 1024


def _clip(cfg):
    """(model, abstract params) of the config's teacher: config.clip.model's architecture,
    or the clip_pretrain stage's toy CLIP (config.clip.pretrain) when it is ''."""
    from ezsd_jax.clip.loading import abstract_clip, clip_config_of
    if cfg.clip.get("model", ""):
        return abstract_clip(clip_config_of(cfg.clip.model))
    from ezsd_jax.clip.pretrain import pretrain_config
    from ezsd_jax.clip.toy import tiny_clip_config
    c = pretrain_config(cfg.clip.get("pretrain"))
    return abstract_clip(tiny_clip_config(
        TOY_VOCAB, hidden=int(c["hidden"]), layers=int(c["layers"]), heads=int(c["heads"]),
        image_size=int(c["image_size"]), patch=int(c["patch"]),
        projection_dim=int(c["projection_dim"]), max_text_len=int(c["max_text_len"])))


def renorm_spec(cfg, mesh) -> StepSpec:
    """The CLIP re-normalization step: crops of renorm_batch_size images, crops_per_step
    GT crops split over the data axis, the base-name prompts through the text tower."""
    from ezsd_jax.clip import renorm
    from ezsd_jax.clip.stages import renorm_batch_size
    from ezsd_jax.data.splits import split_sizes

    c = renorm.settings(cfg.clip.renorm)
    n_base = split_sizes(cfg.ezsd)[0]

    def build(m, b):
        n = int(m.shape["data"])
        B, K = b * n, int(c["crops_per_step"])
        model, params = _clip(cfg)
        L = int(model.config.text_config.max_position_embeddings)
        T = len(tuple(c["templates"]))
        ids = np.zeros((n_base * T, L), np.int32)
        text_emb = None if c["text_layernorms"] else np.zeros(
            (n_base, int(model.config.projection_dim)), np.float32)
        step, tx = renorm.jitted_train_step(model, params, c, ids, ids, text_emb, n)
        state = abstract(jax.eval_shape(lambda p: renorm.init_state(p, tx), params),
                         sharding.replicated(m))
        H, W = tuple(cfg.model.image_size)
        spec = {"image": ((B, H, W, 3), np.uint8), "image_hw": ((B, 2), np.int32),
                "boxes": ((K, 4), np.float32), "box_image": ((K,), np.int32),
                "labels": ((K,), np.int32), "mask": ((K,), bool)}
        if c["size_weight"]:
            spec["weight"] = ((K,), np.float32)
        batch = from_spec(spec, sharding.data_sharding(m))
        return Program(step, (state, batch), donate=(0,), items=K)

    bs = renorm_batch_size(cfg)
    return StepSpec("renorm", "train_step", "clip.renorm_batch_size (else train.batch_size)",
                    per_chip(bs, mesh, "clip.renorm_batch_size"), build)


def proposals_spec(cfg, mesh) -> StepSpec:
    """The proposal step (sliding-window candidates -> CLIP scores -> NMS -> 1.2x crop
    embeddings, plus the teacher's GT-box embeddings), one chip per process as the stage
    runs it."""
    from ezsd_jax.clip.proposals import make_proposal_fn
    from ezsd_jax.clip.stages import proposal_batch_size
    from ezsd_jax.data.splits import split_sizes

    n_base, n_split, n_dataset = split_sizes(cfg.ezsd)
    n_names = n_dataset if cfg.clip.get("score_names", "split") == "dataset" else n_split

    def build(m, b):
        model, params = _clip(cfg)
        d = int(model.config.projection_dim)
        is_base = np.arange(n_names) < n_base
        fn = make_proposal_fn(model, np.zeros((n_names, d), np.float32), is_base,
                              **dict(cfg.clip.proposals))
        rep = sharding.replicated(m)
        H, W = tuple(cfg.model.image_size)
        G = int(cfg.data.max_boxes)
        spec = {"images": ((b, H, W, 3), np.uint8), "image_hw": ((b, 2), np.int32),
                "gt_boxes": ((b, G, 4), np.float32), "gt_valid": ((b, G), bool),
                "scale": ((b,), np.float32), "image_seed": ((b,), np.int32)}
        a = from_spec(spec, rep)
        p = abstract(params, rep)
        return Program(fn, (p, a["images"], a["image_hw"], a["gt_boxes"], a["gt_valid"],
                            a["scale"], a["image_seed"]), items=b)

    return StepSpec("proposals", "propose", "clip.proposal_batch_size (else eval.batch_size)",
                    proposal_batch_size(cfg), build, per_process=True)


def toy_spec(cfg, mesh) -> StepSpec:
    """The toy stage's sharded MLP step (its first kernel split over 'model' by rule)."""
    from ezsd_jax import toy
    t = cfg.toy

    def build(m, b):
        B = b * int(m.shape["data"])
        model, tx, _, state, state_sh = toy.state_layout(t, m)
        step = toy.make_step(model, tx, m, state_sh)
        batch = from_spec({"x": ((B, int(t.in_dim)), np.float32),
                           "y": ((B, int(t.out_dim)), np.float32)}, sharding.data_sharding(m))
        return Program(step, (abstract(state, state_sh), batch), donate=(0,), items=B)

    return StepSpec("toy", "train_step", "toy.batch_size",
                    per_chip(int(t.batch_size), mesh, "toy.batch_size"), build)


def step_specs(cfg, mesh, num_classes_given: int | None = None) -> list[StepSpec]:
    """Every jitted hot step of the config's stages (config.stages), in stage order."""
    from ezsd_jax.data.splits import split_sizes
    out = []
    for stage in cfg.stages:
        if stage == "toy":
            out.append(toy_spec(cfg, mesh))
        elif stage == "train":
            out.append(detector_train_spec(cfg, mesh, stage, num_classes(cfg, num_classes_given), {}))
        elif stage == "eval":
            out.append(detector_infer_spec(cfg, mesh, stage, num_classes(cfg, num_classes_given), {}))
        elif stage == "renorm":
            out.append(renorm_spec(cfg, mesh))
        elif stage == "proposals":
            out.append(proposals_spec(cfg, mesh))
        elif stage == "ezsd_train":
            from ezsd_jax.ezsd.stages import distill_batch_spec, distill_loss
            n_base = split_sizes(cfg.ezsd)[0]
            dc = cfg.ezsd.distill
            d = int(cfg.model.ezsd.embed_dim)
            out.append(detector_train_spec(
                cfg, mesh, stage, n_base, _class_embeddings(n_base, cfg),
                distill_batch_spec(dc, d) if dc.enabled else None,
                distill_loss(dc) if dc.enabled else None))
        elif stage == "ezsd_eval":
            n_all = split_sizes(cfg.ezsd)[1]
            out.append(detector_infer_spec(cfg, mesh, stage, n_all,
                                           _class_embeddings(n_all, cfg)))
    return out
