"""The detector's jitted train step and eval forward as AOT programs (abstract state from
jax.eval_shape of the init, abstract batches of the pipeline's layout), for the deviceless
compile check: ezsd_jax/aot and the ISAL detection task's steps (isal_jax/aot_steps.py)."""
from __future__ import annotations

import jax

from ezsd_jax.core import sharding
from ezsd_jax.core.aot.program import Program, StepSpec, abstract, from_spec, per_chip


def num_classes(cfg, given: int | None = None) -> int:
    """Classes of a plain detector: `given` (--num_classes), else config.data.category_names'
    count, else COCO's 80 (the check reads no annotation file)."""
    names = cfg.data.get("category_names", ()) or ()
    return int(given or len(names) or 80)


def _train_state(cfg, model, mesh, consts):
    from ezsd_jax import train
    init, state_sh, tx, sched = train.init_train_state(model, cfg, mesh, jax.random.key(0),
                                                       consts)
    state = abstract(jax.eval_shape(init, jax.random.key(0)), state_sh)
    return state, state_sh, tx, sched


def detector_train_spec(cfg, mesh, stage: str, num_classes: int, consts: dict,
                        extra_spec: dict | None = None, extra_loss_fn=None) -> StepSpec:
    from ezsd_jax import train
    from ezsd_jax.data.pipeline import batch_spec
    from ezsd_jax.models import detector as det

    def build(m, b):
        B = b * int(m.shape["data"])
        model = det.FasterRCNN(train.detector_config(cfg, num_classes))
        state, state_sh, tx, sched = _train_state(cfg, model, m, consts)
        step = train.make_train_step(model, tx, m, state_sh, cfg.train.seed, extra_loss_fn,
                                     sched)
        mask = cfg.model.get("mask_crop_size", 0) if train.masks_on(cfg) else 0
        batch = from_spec(batch_spec(B, tuple(cfg.model.image_size), cfg.data.max_boxes, mask,
                                     extra_spec), sharding.data_sharding(m))
        c = abstract(consts, sharding.replicated(m))
        return Program(step, (state, batch, c), donate=(0,), items=B)

    return StepSpec(stage, "train_step", "train.batch_size",
                    per_chip(cfg.train.batch_size, mesh, "train.batch_size"), build)


def detector_infer_spec(cfg, mesh, stage: str, num_classes: int, consts: dict) -> StepSpec:
    """The eval forward; a Mask R-CNN pastes its masks on a canvas of data.max_side
    (rounded up to 8) square: at least any image's original size."""
    from ezsd_jax import evaluate, train
    from ezsd_jax.data.pipeline import batch_spec
    from ezsd_jax.models import detector as det

    side = -(-int(cfg.data.max_side) // 8) * 8

    def build(m, b):
        B = b * int(m.shape["data"])
        model = det.FasterRCNN(train.detector_config(cfg, num_classes))
        state, state_sh, _, _ = _train_state(cfg, model, m, consts)
        stats = {k: v for k, v in state["batch_stats"].items() if k != det.SEESAW_COUNTS}
        variables = {"params": state["params"], "batch_stats": stats}
        var_sh = jax.tree_util.tree_map(lambda a: a.sharding, variables)
        fn = evaluate.infer_program(model, var_sh, m, (side, side) if model.cfg.mask_on
                                    else None)
        batch = from_spec(batch_spec(B, tuple(cfg.model.image_size), cfg.data.max_boxes),
                          sharding.data_sharding(m))
        c = abstract(consts, sharding.replicated(m))
        return Program(fn, (variables, batch, c), items=B)

    return StepSpec(stage, "infer", "eval.batch_size",
                    per_chip(cfg.eval.batch_size, mesh, "eval.batch_size"), build)
