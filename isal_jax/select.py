"""Standalone selection step: `python -m isal_jax.select --config=... --workdir=DIR`
(installed: `isal-select`).

Place in the pipeline: (trained checkpoint, labeled ids, pool) -> THIS ->
workdir/selection_<strategy>.json, the list the annotators (or the AL loop) read.
A config with task='detection' (configs/isal_voc.py, ...) is handed to
isal_jax.detection_al.run_detection_selection (a detector checkpoint, COCO-format pool).

Steps: load the pool dataset and the labeled ids -> restore the orbax checkpoint
{'params', 'batch_stats'} (optionally train a tiny one for demos) -> run the strategy:
  * baselines: softmax probabilities / penultimate features over the pool (and labeled set);
  * isal: v = sum of reference gradients, s_test by LiSSA (saved once to
    workdir/isal_scores/s_test.npz), then JVP scores shard by shard into
    workdir/isal_scores/shard_XXXXX.npz (atomic). A killed run resumes from its last
    finished shard; every file carries a fingerprint of the settings, the checkpoint and
    the id lists, and files with another fingerprint are recomputed, never mixed in.
Writes the selection atomically (tmp + os.replace) and prints its path.
Single host (one process, any number of local devices on the mesh's 'data' axis); the
influence engine itself takes any mesh, but this script feeds every process the same pool.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from absl import flags

from ezsd_jax.core import cli
from ezsd_jax.core.io_utils import atomic_write_json
from ezsd_jax.core.metrics import report
from isal_jax import config_schema
from isal_jax.degenerate import check_model_outputs
from isal_jax.selection_io import (SelectError, fingerprint, ids_hash, read_id_list,
                                   reference_source)

FLAGS = flags.FLAGS
if "config" not in FLAGS:   # another entry point (isal_jax.main) may have defined them
    cli.define_flags()   # --config (e.g. configs/isal_demo.py), --workdir


def _no_ids(batches):
    """Host batches without their 'id' (int64 ids stay on the host; the device needs none)."""
    for b in batches:
        yield {k: v for k, v in b.items() if k != "id"}


# ----------------------------------------------------------------------------- setup

def model_from_config(cfg):
    """config.model -> the linen classifier (isal_jax.models.get_model)."""
    from isal_jax.models import get_model
    m = cfg.model
    kw = {"mlp": {"features": m.features}, "cnn": {"channels": m.channels},
          "resnet18": {"widths": m.widths}}.get(m.name, {})
    try:
        return get_model(m.name, num_classes=m.num_classes, dtype=m.dtype, **kw)
    except ValueError as e:
        raise SelectError(f"config.model: {e}") from e


def _validate(cfg) -> None:
    from isal_jax.strategies import STRATEGIES
    if cfg.strategy not in STRATEGIES:
        raise SelectError(f"config.strategy={cfg.strategy!r} is not one of {sorted(STRATEGIES)}")
    if int(cfg.budget) < 1:
        raise SelectError(f"config.budget must be >= 1, got {cfg.budget}")
    validate_influence(cfg)
    if reference_source(cfg.reference)[0] == "heldout":
        raise SelectError("config.reference.source='heldout' needs a model trained without "
                          "the held-out ids, which only the AL loop (isal_jax.main) trains; "
                          "here hold ids out of your training yourself and pass them with "
                          "reference.source=ids_file")


def validate_influence(cfg) -> None:
    """config.influence / config.reference, before any work (the select CLI and the AL
    loop's classification task)."""
    inf = cfg.influence
    for k in ("depth", "repeats", "ref_batch_size", "hvp_batch_size", "pool_batch_size",
              "shard_size"):
        if int(inf[k]) < 1:
            raise SelectError(f"config.influence.{k} must be >= 1, got {inf[k]}")
    if not (0 <= inf.damp < 1):
        raise SelectError(f"config.influence.damp must be in [0, 1), got {inf.damp}")
    if not inf.scale > 0:
        raise SelectError(f"config.influence.scale must be > 0, got {inf.scale}")
    reference_source(cfg.reference)
    for path, allowed in config_schema.ENUMS.items():
        field = path.split(".", 1)[1] if path.startswith("influence.") else None
        if field and field in inf and inf[field] not in allowed:
            raise SelectError(f"config.influence.{field}={inf[field]!r} is not one of "
                              f"{allowed}")
    if not float(inf.get("max_residual", 1.0)) > 0:
        raise SelectError(f"config.influence.max_residual must be > 0, got "
                          f"{inf.max_residual}")


def _labeled_ids(cfg, workdir, data) -> tuple[np.ndarray, str]:
    path = cfg.labeled_ids_file or os.path.join(workdir, "labeled_ids.json")
    if not os.path.exists(path):
        # random demo ids only into the default path; a given path that is missing is a typo
        if cfg.labeled_ids_file or not cfg.init_checkpoint_if_missing:
            raise SelectError(f"config.labeled_ids_file: {path!r} does not exist (a JSON list "
                              "of labeled ids is needed)")
        n = int(cfg.init.num_labeled)
        if not 0 < n < len(data):
            raise SelectError(f"config.init.num_labeled={n} must be in (0, {len(data)})")
        ids = np.sort(np.random.default_rng(cfg.seed).choice(data.ids, n, replace=False))
        atomic_write_json(path, [int(i) for i in ids])
        report(f"wrote {n} random labeled ids to {path}")
    ids = read_id_list(path, "config.labeled_ids_file")
    if len(ids) == 0:
        raise SelectError(f"config.labeled_ids_file: {path!r} is empty")
    try:
        data.positions(ids, what=f"config.labeled_ids_file {path!r}")
    except ValueError as e:
        raise SelectError(str(e)) from e
    return ids, path


def _pool_ids(cfg, data, labeled) -> np.ndarray:
    if cfg.pool.ids_file:
        ids = read_id_list(cfg.pool.ids_file, "config.pool.ids_file")
        try:
            data.positions(ids, what=f"config.pool.ids_file {cfg.pool.ids_file!r}")
        except ValueError as e:
            raise SelectError(str(e)) from e
    else:
        ids = data.ids
    pool = np.setdiff1d(np.asarray(ids, np.int64), labeled)   # sorted, unique
    if len(pool) < len(ids):
        logging.info("pool: %d labeled ids removed from the pool", len(ids) - len(pool))
    if int(cfg.budget) > len(pool):
        raise SelectError(f"config.budget={cfg.budget} is larger than the pool "
                          f"({len(pool)} unlabeled samples in {data.name}/{data.split})")
    return pool


def _restore_state(cfg, workdir, task, data, labeled) -> tuple[dict, int, str]:
    import jax
    from ezsd_jax.core.checkpoint import CheckpointError, Checkpointer
    from isal_jax.tasks import save_classifier_checkpoint, train_tiny_classifier
    ckdir = os.path.abspath(cfg.checkpoint_dir or os.path.join(workdir, "model"))
    target = task.init(jax.random.PRNGKey(cfg.seed), data.image_shape)
    steps = []
    if os.path.isdir(ckdir):
        ck = Checkpointer(ckdir, read_only=True)
        steps = ck.all_steps()
        ck.close()
    if not steps:
        # A demo model is trained only into the default <workdir>/model and only when asked
        # for; a checkpoint_dir the user gave that holds nothing is a mistake to report.
        if cfg.checkpoint_dir or not cfg.init_checkpoint_if_missing:
            what = ("does not exist" if not os.path.exists(ckdir)
                    else "holds no checkpoint")
            raise SelectError(f"config.checkpoint_dir: {ckdir!r} {what} (write one with "
                              "ezsd_jax.core.checkpoint.Checkpointer holding {'params', "
                              "'batch_stats'}; a demo model is trained only with "
                              "checkpoint_dir='' and init_checkpoint_if_missing=True)")
        report(f"no checkpoint in {ckdir}: training a tiny {cfg.model.name} on "
               f"{len(labeled)} labeled samples (init_checkpoint_if_missing=True)")
        b = data.get(labeled)
        state = train_tiny_classifier(task, b["image"], b["label"], steps=cfg.init.train_steps,
                                      batch_size=cfg.init.batch_size, lr=cfg.init.lr,
                                      seed=cfg.seed)
        save_classifier_checkpoint(ckdir, state, step=0)
        steps = [0]
    step = max(steps) if cfg.checkpoint_step < 0 else int(cfg.checkpoint_step)
    if step not in steps:
        raise SelectError(f"config.checkpoint_step={step} not in {ckdir!r} (has {steps})")
    ck = Checkpointer(ckdir, read_only=True)
    try:
        state = ck.restore(step, target)
    except CheckpointError as e:
        raise SelectError(f"config.checkpoint_dir: {e}\n(the checkpoint does not match "
                          f"config.model = {cfg.model.to_dict()})") from e
    finally:
        ck.close()
    return state, step, ckdir


def run_strategy(cfg, workdir: str, task, state, data, labeled: np.ndarray, pool: np.ndarray,
                 checkpoint: tuple[str, int], reference_ids=None):
    """Runs `cfg.strategy` (budget `cfg.budget`, seed `cfg.seed`) on `pool` for a restored
    `state` {'params', 'batch_stats'}. Returns (Selection, lissa_info ({} for baselines),
    isal fingerprint or None). `checkpoint` = (dir, step) of `state`, part of the ISAL
    fingerprint (score shards of another model are never reused). `labeled`: the ids
    `state` was trained on (ISAL's HVP set); `reference_ids`: the held-out ids of
    reference.source='heldout'. Shared by this script and the active-learning loop
    (isal_jax/classification_al.py)."""
    from isal_jax import strategies
    fn = strategies.get_strategy(cfg.strategy)
    bs = int(cfg.influence.pool_batch_size)
    ms = task.model_state(state)
    if cfg.strategy == "random":
        return fn(pool, cfg.budget, seed=cfg.seed), {}, None
    allow = bool(cfg.get("allow_degenerate", False))
    if cfg.strategy in ("entropy", "margin", "least_confidence"):
        probs, _ = task.predict(state["params"], ms, data.batches(pool, bs))
        check_model_outputs(probs, "softmax probabilities", allow=allow)
        return _strategy(fn, pool, cfg, probs=probs), {}, None
    if cfg.strategy == "coreset":
        _, feats = task.predict(state["params"], ms, data.batches(pool, bs))
        _, lab_feats = task.predict(state["params"], ms, data.batches(labeled, bs))
        check_model_outputs(feats, "penultimate features (pool)", allow=allow)
        check_model_outputs(lab_feats, "penultimate features (labeled set)", allow=allow)
        return _strategy(fn, pool, cfg, features=feats, labeled_features=lab_feats), {}, None
    from ezsd_jax.core.sharding import check_batch_divisible, make_mesh
    from isal_jax.scoring import isal_select
    from isal_jax.tasks.classification import ClassificationInfluence
    ckdir, step = checkpoint
    settings = {"influence": cfg.influence.to_dict(), "seed": cfg.seed,
                "model": cfg.model.to_dict(), "reference": cfg.reference.to_dict(),
                "checkpoint": [ckdir, step], "pool": [data.name, data.split, ids_hash(pool)],
                "labeled": ids_hash(labeled)}
    if reference_ids is not None:
        settings["reference_ids"] = ids_hash(reference_ids)
    fp = fingerprint(settings)
    mesh = make_mesh(cfg.mesh)
    try:
        check_batch_divisible(bs, mesh)
    except ValueError as e:
        raise SelectError(f"config.influence.pool_batch_size: {e}") from e
    src = ClassificationInfluence(
        task, state, data, lambda name: _split_loader(cfg, data, name),
        fused=bool(cfg.influence.get("fused", True)),
        need_groups=str(cfg.influence.get("diversity", "none")) == "class_balanced",
        mesh=mesh)
    sel, info = isal_select(cfg, workdir, src, labeled, pool, fp, heldout=reference_ids)
    return sel, info, fp


def _split_loader(cfg, data, name: str):
    """The split `name` of the pool's data set (reference.source='split:NAME')."""
    from isal_jax.data import load_dataset, loader_options
    pool_cfg = cfg.get("pool") or {}
    return load_dataset(pool_cfg.get("dataset", data.name), name,
                        pool_cfg.get("data_dir", "") or None, loader_options(pool_cfg))


def _strategy(fn, pool, cfg, **inputs):
    try:
        return fn(pool, cfg.budget, seed=cfg.seed, **inputs)
    except ValueError as e:      # e.g. NaN inputs that allow_degenerate let through
        raise SelectError(f"config.strategy={cfg.strategy!r}: {e}") from e


# ----------------------------------------------------------------------------- main

def run_selection(cfg, workdir: str) -> str:
    """Runs the configured strategy and writes workdir/selection_<strategy>.json; returns
    its path. Raises SelectError on bad input."""
    import jax
    from isal_jax.data import load_dataset, loader_options
    from isal_jax.tasks import ClassificationTask

    if cfg.get("task", "classification") == "detection":   # e.g. configs/isal_voc.py
        from isal_jax.detection_al import run_detection_selection
        try:
            return run_detection_selection(cfg, workdir)
        except ValueError as e:   # its SelectError is not __main__'s when run as a script
            raise SelectError(str(e)) from e
    _validate(cfg)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    try:
        data = load_dataset(cfg.pool.dataset, cfg.pool.split, cfg.pool.data_dir or None,
                            loader_options(cfg.pool))
    except (ValueError, FileNotFoundError) as e:
        raise SelectError(f"config.pool: {e}") from e
    if data.num_classes != cfg.model.num_classes:
        raise SelectError(f"config.model.num_classes={cfg.model.num_classes} but "
                          f"{data.name} has {data.num_classes} classes")
    task = ClassificationTask(model_from_config(cfg),
                              pseudo_label=cfg.influence.pseudo_label, topk=cfg.influence.topk)
    labeled, labeled_path = _labeled_ids(cfg, workdir, data)
    pool = _pool_ids(cfg, data, labeled)
    state, step, ckdir = _restore_state(cfg, workdir, task, data, labeled)
    resolved = {"workdir": workdir, "checkpoint_dir": ckdir, "checkpoint_step": step,
                "labeled_ids_file": os.path.abspath(labeled_path), "num_labeled": len(labeled),
                "pool_size": len(pool), "jax_devices": jax.device_count()}
    report(f"{cfg.strategy}: pool {len(pool)} ({data.name}/{data.split}), labeled "
           f"{len(labeled)}, budget {cfg.budget}, checkpoint {ckdir} step {step}")

    t0 = time.perf_counter()
    sel, lissa_info, fp = run_strategy(cfg, workdir, task, state, data, labeled, pool,
                                       checkpoint=(ckdir, step))
    if fp is not None:
        resolved["fingerprint"] = fp
    elapsed = time.perf_counter() - t0

    out = {"strategy": cfg.strategy, "budget": int(cfg.budget),
           "selected": [{"id": int(i), "score": float(s)} for i, s in zip(sel.ids, sel.scores)],
           "settings": {**cfg.to_dict(), "resolved": resolved},
           "lissa": lissa_info}
    path = os.path.join(workdir, f"selection_{cfg.strategy}.json")
    atomic_write_json(path, out)
    report(f"{cfg.strategy}: selected {len(sel.ids)} in {elapsed:.1f}s")
    print(path, flush=True)      # the result: the last stdout line is the selection's path
    return path


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = cli.get_config()
    workdir = cli.prepare_workdir(FLAGS.workdir)
    run_selection(cfg, workdir)   # SelectError / CheckpointError: one line via cli.run


def run():
    """The `isal-select` console script."""
    cli.run(main, extra_user_errors=(SelectError,), doc=__doc__)


if __name__ == "__main__":
    run()
