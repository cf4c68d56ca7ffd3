"""The jitted hot steps of an ISAL config for the deviceless AOT check (ezsd_jax.aot finds
this registry through its config kind; isal_jax may import ezsd_jax, never the reverse):
the classifier / detector train step and the influence engine's programs (reference
gradient, the HVP of every LiSSA / CG step, the per-sample JVP scores; for detection also
the pool's pseudo-labelling pass), with abstract parameters at the config's real shapes.
"""
from __future__ import annotations

import jax
import numpy as np

from ezsd_jax.core.aot.program import Program, StepSpec, abstract, from_spec, per_chip
from ezsd_jax.detector_programs import detector_train_spec, num_classes
from ezsd_jax.core import sharding
from ezsd_jax.core.tree_paths import key_name

# input shape of the named classification sets (isal_jax.data)
IMAGE_SHAPES = {"cifar10": (32, 32, 3), "digits": (8, 8, 1)}


def _image_shape(cfg) -> tuple[int, ...]:
    name = cfg.data.dataset
    if name not in IMAGE_SHAPES:
        raise ValueError(f"config.data.dataset={name!r}: the AOT check knows the input shape "
                         f"of {sorted(IMAGE_SHAPES)} only")
    return IMAGE_SHAPES[name]


def _engine_specs(cfg, mesh, task, state_fn, batch_fn, loss_fn, pseudo_fn) -> list[StepSpec]:
    """ref_grad / hvp / score of the influence engine. state_fn(m) -> abstract
    {'params', 'batch_stats'}; batch_fn(m, B, pool) -> abstract engine batch of B rows
    (pool: with what the score needs); loss_fn(ms) / pseudo_fn(ms) from the task."""
    from isal_jax import influence as infl
    i = cfg.influence

    def spec(name, field, fn_name):
        def build(m, b):
            B = b * int(m.shape["data"])
            st = state_fn(m)
            params = st["params"]
            ms = {"batch_stats": st["batch_stats"]} if st["batch_stats"] else {}
            subset = infl.make_subset(params, i.subset)
            rep = sharding.replicated(m)
            vec = abstract(subset.take(params), rep)
            lf = infl.as_pytree_fn(loss_fn(ms))
            prog = infl.PROGRAMS[fn_name]
            if fn_name == "ref_grad":
                args = (lf, subset, params, batch_fn(m, B, False))
            elif fn_name == "hvp":
                args = (lf, subset, params, vec, batch_fn(m, B, False))
            else:
                args = (lf, infl.as_pytree_fn(pseudo_fn(ms)), subset, "jvp", params, vec,
                        batch_fn(m, B, True))
            return Program(prog, args, items=B)
        bs = int(i[field])
        return StepSpec("select", name, f"influence.{field}", per_chip(bs, mesh,
                        f"influence.{field}"), build)

    return [spec("ref_grad", "ref_batch_size", "ref_grad"),
            spec("hvp", "hvp_batch_size", "hvp"),
            spec("score", "pool_batch_size", "score")]


def classification_specs(cfg, mesh) -> list[StepSpec]:
    from isal_jax.classification_al import make_train_step
    from isal_jax.models import get_model
    from isal_jax.tasks import ClassificationTask

    shape = _image_shape(cfg)
    m_ = cfg.model
    kw = {"mlp": {"features": m_.features}, "cnn": {"channels": m_.channels},
          "resnet18": {"widths": m_.widths}}.get(m_.name, {})
    model = get_model(m_.name, num_classes=m_.num_classes, dtype=m_.dtype, **kw)
    task = ClassificationTask(model, pseudo_label=cfg.influence.pseudo_label,
                              topk=cfg.influence.topk)

    def variables(m):
        v = jax.eval_shape(lambda k: task.init(k, shape), jax.random.PRNGKey(0))
        return abstract(v, sharding.replicated(m))

    def batch(m, B, pool):
        spec = {"image": ((B, *shape), np.float32), "mask": ((B,), bool)}
        if not pool:
            spec["label"] = ((B,), np.int32)
        return from_spec(spec, sharding.data_sharding(m))

    def train_build(m, b):
        B = b * int(m.shape["data"])
        fn, tx = make_train_step(model, cfg.train, m, [1])
        v = jax.eval_shape(lambda k: task.init(k, shape), jax.random.PRNGKey(0))
        st = jax.eval_shape(lambda v: {**v, "opt_state": tx.init(v["params"])}, v)
        st = abstract(st, sharding.replicated(m))
        bt = from_spec({"image": ((B, *shape), np.float32), "label": ((B,), np.int32)},
                       sharding.data_sharding(m))
        return Program(fn, (st, bt), donate=(0,), items=B)

    fused = bool(cfg.influence.get("fused", True))
    specs = [StepSpec("train", "train_step", "train.batch_size",
                      per_chip(int(cfg.train.batch_size), mesh, "train.batch_size"),
                      train_build)]
    specs += _engine_specs(
        cfg, mesh, task, variables, batch, task.loss_fn,
        (lambda ms: None) if fused else task.pseudo_label_fn)
    if fused:   # the score's loss labels itself (one forward)
        specs[-1] = _engine_specs(cfg, mesh, task, variables, batch,
                                  task.self_labeled_loss_fn, lambda ms: None)[-1]
    return specs


def detection_specs(cfg, mesh, num_classes_given: int | None = None) -> list[StepSpec]:
    from ezsd_jax.data.pipeline import batch_spec
    from ezsd_jax.models import detector as det
    from ezsd_jax.train import detector_config
    from isal_jax.tasks.detection import DetectionTask

    k = num_classes(cfg, num_classes_given)
    model = det.FasterRCNN(detector_config(cfg, k))
    i = cfg.influence
    # the fields detection_al.detection_task reads (kept in step with it)
    task = DetectionTask(model, score_threshold=float(i.score_threshold),
                         max_pseudo_boxes=int(i.max_pseudo_boxes), sampling=str(i.sampling),
                         loss_seed=int(i.loss_seed), reg_beta=float(i.reg_beta),
                         feature_level=int(i.feature_level))
    size = tuple(cfg.model.image_size)

    def variables(m):
        v = jax.eval_shape(lambda key: det.init_variables(model, key, 1), jax.random.key(0))
        return abstract({"params": v["params"], "batch_stats": v.get("batch_stats", {})},
                        sharding.replicated(m))

    def raw_batch(m, B):
        spec = batch_spec(B, size, cfg.data.max_boxes)
        spec["mask"] = ((B,), bool)
        return from_spec(spec, sharding.data_sharding(m))

    def frozen_stats(st):
        """The detector's (frozen BatchNorm) statistics at their init values (mean 0,
        variance 1, counts 0): the task's jitted functions close over them as constants,
        as they close over the real ones. A zero variance would make a step that runs
        them (benchmarks/smoke_full_size.py) divide by ~0 and return NaNs."""
        def init_value(path, a):
            return (np.ones if key_name(path[-1]) == "var" else np.zeros)(a.shape, a.dtype)
        return {"batch_stats": jax.tree_util.tree_map_with_path(init_value,
                                                                st["batch_stats"])}

    def batch(m, B, pool):
        """The engine's batch: pipeline arrays + the fixed assignment (its shapes from
        jax.eval_shape of the task's labelling pass)."""
        st, raw = variables(m), raw_batch(m, B)
        new = jax.eval_shape(lambda p, ms, b: task.label_pool(p, ms, b), st["params"],
                             {"batch_stats": st["batch_stats"]}, raw)
        new.pop("num_pseudo")
        return {**raw, **abstract(new, sharding.data_sharding(m))}

    def label_build(m, b):
        from isal_jax.tasks.detection import make_label_fn
        B = b * int(m.shape["data"])
        st = variables(m)
        fn = make_label_fn(task, frozen_stats(st))
        thr = jax.ShapeDtypeStruct((), np.float32, sharding=sharding.replicated(m))
        return Program(fn, (st["params"], raw_batch(m, B), thr), items=B)

    specs = [detector_train_spec(cfg, mesh, "train", k, {})]
    specs.append(StepSpec("select", "label_pool", "influence.pool_batch_size",
                          per_chip(int(i.pool_batch_size), mesh, "influence.pool_batch_size"),
                          label_build))
    specs += _engine_specs(cfg, mesh, task, variables, batch, task.loss_fn, lambda ms: None)
    return specs


def step_specs(cfg, mesh, num_classes_given: int | None = None) -> list[StepSpec]:
    if cfg.get("task", "classification") == "detection":
        return detection_specs(cfg, mesh, num_classes_given)
    return classification_specs(cfg, mesh)
