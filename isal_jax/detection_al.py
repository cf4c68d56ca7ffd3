"""Detection task for the active-learning loop, and the detection path of the select CLI.

Place in the pipeline: config (configs/isal_det_synthetic.py, isal_voc.py, isal_coco.py) ->
THIS (an isal_jax.loop.ActiveLearningTask; `run_detection_selection` for
`python -m isal_jax.select` with config.task='detection') -> isal_jax.loop.run_experiment.

Per cycle:
  train     ezsd_jax.train.train_detector from scratch on the labeled image ids (a
            CocoDataset of the train split restricted to them), checkpoints in
            <cycle dir>/ckpt_detector (resumable). Steps = train.steps when > 0, else
            ceil(train.epochs * num_labeled / batch_size) (at least train.min_steps): the
            '1x' schedule of the reference is 12 epochs of the labeled set. Warmup is
            capped at a quarter of the steps (500 warmup steps would be a whole short
            cycle).
  evaluate  ezsd_jax.evaluate.evaluate_detector on the val split: COCO AP, AP50, ...
  select    `run_detection_strategy` on the unlabeled ids:
              random            seeded draw
              least_confidence  1 - max detection score of the image (largest first)
              entropy           mean class entropy of the kept detections (largest first)
              coreset           k-center greedy on pooled FPN features (labeled = centers)
              isal              v = sum of labeled per-image gradients (true GT), LiSSA
                                s_test, JVP scores with pseudo GT (isal_jax/tasks/
                                detection.py); unscored images (no pseudo box) come last
            ISAL's s_test and per-shard scores are cached under <dir>/isal_scores with a
            fingerprint of the settings, the checkpoint and the id lists (resumable).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from ezsd_jax.core import sharding
from ezsd_jax.core.io_utils import atomic_savez, atomic_write_json
from ezsd_jax.core.metrics import report
from isal_jax.degenerate import check_lissa
from isal_jax.selection_io import (SelectError, fingerprint, ids_hash, load_cached,
                                   read_id_list, reference_source, score_dir)

STRATEGIES = ("random", "least_confidence", "entropy", "coreset", "isal")


# ----------------------------------------------------------------------------- data

class DetectionData:
    """A COCO-format split (config.data.<split>_ann/_images) addressed by image id."""

    def __init__(self, cfg, split: str, category_names=None):
        from ezsd_jax.train import load_dataset
        self.cfg = cfg
        self.split = split
        self.dataset = load_dataset(cfg.data, split, category_names=category_names)
        self._by_id = {r.image_id: r for r in self.dataset.records}

    @property
    def ids(self) -> np.ndarray:
        return np.asarray([r.image_id for r in self.dataset.records], np.int64)

    @property
    def name(self) -> str:
        return os.path.basename(self.dataset.ann_file)

    def __len__(self) -> int:
        return len(self.dataset.records)

    def check(self, ids, what: str) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        missing = [int(i) for i in ids if int(i) not in self._by_id]
        if missing:
            raise ValueError(f"{what}: {len(missing)} image ids are not in "
                             f"{self.dataset.ann_file} (e.g. {missing[:5]})")
        return ids

    def subset(self, ids, what: str = "ids"):
        """The CocoDataset restricted to `ids`, in that order."""
        ids = self.check(ids, what)
        return dataclasses.replace(self.dataset, records=[self._by_id[int(i)] for i in ids],
                                   _coco=None)

    def batches(self, ids, batch_size: int, what: str = "ids") -> Iterator[dict]:
        """Eval-mode pipeline batches (no flip; last batch padded with valid=False)."""
        from ezsd_jax.train import make_pipeline
        if len(ids) == 0:
            return
        pipe = make_pipeline(self.subset(ids, what), self.cfg, False, int(batch_size))
        try:
            yield from pipe.iter_epoch(0)
        finally:
            pipe.close()


def cycle_config(cfg, seed: int, num_labeled: int) -> ml_collections.ConfigDict:
    """A copy of cfg with train.seed = seed and train.steps resolved for this cycle."""
    c = ml_collections.ConfigDict(cfg.to_dict())
    t = c.train
    if int(t.get("steps", 0)) <= 0:
        epochs = float(t.get("epochs", 0.0))
        if epochs <= 0:
            raise ValueError("config.train: set train.steps > 0 or train.epochs > 0")
        t.steps = max(int(math.ceil(epochs * num_labeled / int(t.batch_size))),
                      int(t.get("min_steps", 1)), 1)
    t.seed = int(seed)
    t.warmup_steps = min(int(t.warmup_steps), int(t.steps) // 4)   # short cycles: <= 1/4
    return c


def detection_task(cfg, model):
    from isal_jax.tasks.detection import DetectionTask
    i = cfg.influence
    if float(i.score_threshold) < float(cfg.model.test_score_threshold):
        raise ValueError(f"config.influence.score_threshold={i.score_threshold} is below "
                         f"config.model.test_score_threshold={cfg.model.test_score_threshold}:"
                         " the detections below the test threshold are never produced")
    return DetectionTask(model, score_threshold=float(i.score_threshold),
                         max_pseudo_boxes=int(i.max_pseudo_boxes), sampling=str(i.sampling),
                         loss_seed=int(i.loss_seed), reg_beta=float(i.reg_beta),
                         feature_level=int(i.feature_level))


def _host_state(state) -> dict:
    return sharding.to_host({"params": state["params"],
                             "batch_stats": state.get("batch_stats", {})})


# ----------------------------------------------------------------------------- ISAL

def detection_isal(cfg, workdir: str, dtask, state: dict, data: DetectionData,
                   labeled: np.ndarray, pool: np.ndarray, fingerprint: str, mesh=None,
                   split_data=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """ISAL scores of `pool` (in its order): (scores float64 with NaN where unscored,
    scored bool, LiSSA info). s_test and score shards are cached in workdir/isal_scores.
    split_data(name) -> DetectionData of split `name` ('val'), for reference 'split:NAME'."""
    from isal_jax import influence as infl
    from isal_jax.tasks import detection as dt
    icfg = cfg.influence
    params, ms = state["params"], dtask.model_state(state)
    subset = infl.make_subset(params, icfg.subset)
    sdir = score_dir(workdir)

    s_path = os.path.join(sdir, "s_test.npz")
    z = load_cached(s_path, fingerprint)
    if z is not None:
        s_test = {k: z[f"s/{k}"] for k in subset.keys}
        info = json.loads(str(z["info"]))
        report(f"resume: loaded s_test from {s_path}")
    else:
        kind, arg = reference_source(cfg.reference)
        ref_data = data
        if kind == "labeled":
            ref_ids = labeled
        elif kind == "ids_file":
            ref_ids = data.check(read_id_list(arg, "config.reference.ids_file"),
                                 "config.reference.ids_file")
        elif kind == "heldout":
            raise SelectError("config.reference.source='heldout' is implemented for "
                              "classification only; for detection use labeled, ids_file or "
                              "split:<name>")
        else:
            if split_data is None:
                raise SelectError(f"config.reference.source={cfg.reference.source!r}: this "
                                  "entry point has no other split to read")
            ref_data = split_data(arg)
            ref_ids = ref_data.ids
        t0 = time.perf_counter()
        order = np.random.default_rng([int(cfg.seed), 1]).permutation(labeled)
        n_hvp = int(icfg.hvp_batch_size) * int(icfg.hvp_num_batches)
        hvp_batches = list(data.batches(order[:n_hvp], icfg.hvp_batch_size, "labeled ids"))
        s_test, info = dt.isal_s_test(
            dtask, params, ms, subset,
            ref_data.batches(ref_ids, icfg.ref_batch_size, "reference"),
            hvp_batches, damp=float(icfg.damp),
            scale=dt.block_scale(icfg.scale, icfg.block_scales), depth=int(icfg.depth),
            block_mode=str(icfg.get("block_mode", "preconditioner")),
            repeats=int(icfg.repeats), seed=int(cfg.seed),
            residual_batches=int(icfg.residual_batches))
        s_test = {k: np.asarray(x) for k, x in s_test.items()}
        info["num_reference"] = int(len(ref_ids))
        info["num_hvp_images"] = int(min(n_hvp, len(labeled)))
        report(f"lissa: {time.perf_counter() - t0:.1f}s  |v|={info['v_norm']:.4g} "
               f"|s|={info['s_norm']:.4g} residual={info['residual']:.3g} "
               f"nan_resets={info['nan_resets_total']}")
        check_lissa(info, s_test, max_residual=float(icfg.get("max_residual", 1.0)),
                    allow=bool(cfg.get("allow_degenerate", False)))
        atomic_savez(s_path, fingerprint=np.asarray(fingerprint),
                     info=np.asarray(json.dumps(info)),
                     **{f"s/{k}": x for k, x in s_test.items()})

    bs = int(icfg.pool_batch_size)
    if mesh is not None:
        sharding.check_batch_divisible(bs, mesh)
    shard = max(int(icfg.shard_size) // bs, 1) * bs
    label_fn = dt.make_label_fn(dtask, ms)
    score_fn = infl.make_score_fn(dtask.loss_fn(ms), subset, None, mesh=mesh)
    scores, scored = [], []
    kill = int(cfg.debug.get("kill_after_shard", -1))
    for i, st in enumerate(range(0, len(pool), shard)):
        ids = pool[st:st + shard]
        path = os.path.join(sdir, f"shard_{i:05d}.npz")
        z = load_cached(path, fingerprint, ids)
        if z is None:
            got, sc, ok = dt.isal_pool_scores(dtask, params, ms, subset, s_test,
                                              data.batches(ids, bs, "pool"), mesh=mesh,
                                              label_fn=label_fn, score_fn=score_fn)
            if not np.array_equal(got, ids):
                raise RuntimeError(f"isal: shard {i} returned other ids than it was given")
            bad = ok & ~np.isfinite(sc)
            if bad.any():
                raise FloatingPointError(f"influence scores are NaN/inf for {int(bad.sum())} "
                                         f"pool images (e.g. ids {ids[bad][:5].tolist()}); "
                                         f"LiSSA residual={info['residual']:.3g}")
            atomic_savez(path, fingerprint=np.asarray(fingerprint), ids=ids, scores=sc,
                         scored=ok)
            z = {"scores": sc, "scored": ok}
            report(f"isal scores: shard {i} ({len(ids)} images, {int(ok.sum())} scored)")
            if kill == i:
                import signal
                os.kill(os.getpid(), signal.SIGKILL)
        scores.append(np.asarray(z["scores"], np.float64))
        scored.append(np.asarray(z["scored"], bool))
    scores = np.concatenate(scores) if scores else np.zeros(0)
    scored = np.concatenate(scored) if scored else np.zeros(0, bool)
    info = {**info, "num_pool": int(len(pool)), "num_unscored": int((~scored).sum())}
    return scores, scored, info


def run_detection_strategy(cfg, workdir: str, dtask, state: dict, data: DetectionData,
                           labeled: np.ndarray, pool: np.ndarray, *, strategy: str,
                           budget: int, seed: int, checkpoint: tuple[str, int], mesh=None,
                           split_data=None):
    """Selects `budget` ids of `pool` with `strategy`. Returns (Selection, info dict)."""
    from isal_jax import strategies as st
    from isal_jax.tasks import detection as dt
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {STRATEGIES} (detection)")
    labeled = np.asarray(labeled, np.int64)
    pool = np.asarray(pool, np.int64)
    if strategy == "random":
        return st.select_random(pool, budget, seed=seed), {}
    bs = int(cfg.influence.pool_batch_size)
    ms = dtask.model_state(state)
    if strategy in ("least_confidence", "entropy", "coreset"):
        infer_fn = dt.make_infer_fn(dtask, ms)
        pred = dt.predict(dtask, state["params"], ms, data.batches(pool, bs, "pool"),
                          mesh=mesh, infer_fn=infer_fn)
        if not np.array_equal(pred.ids, pool):
            raise RuntimeError("predict returned the pool in another order")
        info = {"num_without_pseudo_box": int((pred.num_pseudo == 0).sum())}
        if strategy == "least_confidence":
            return dt.select_by_uncertainty(pool, pred.least_confidence, budget), info
        if strategy == "entropy":
            return dt.select_by_uncertainty(pool, pred.mean_entropy, budget), info
        lab = dt.predict(dtask, state["params"], ms, data.batches(labeled, bs, "labeled"),
                         mesh=mesh, infer_fn=infer_fn)
        return st.select_coreset(pool, budget, features=pred.features,
                                 labeled_features=lab.features, seed=seed), info
    fp = fingerprint({"influence": cfg.influence.to_dict(), "seed": int(seed),
                       "model": cfg.model.to_dict(), "reference": cfg.reference.to_dict(),
                       "checkpoint": list(checkpoint), "data": data.dataset.ann_file,
                       "pool": ids_hash(pool), "labeled": ids_hash(labeled)})
    scfg = ml_collections.ConfigDict({"influence": cfg.influence.to_dict(),
                                      "reference": cfg.reference.to_dict(), "seed": int(seed),
                                      "allow_degenerate": bool(cfg.get("allow_degenerate",
                                                                       False)),
                                      "debug": {"kill_after_shard": int(
                                          cfg.debug.get("kill_after_shard", -1))}})
    scores, scored, info = detection_isal(scfg, workdir, dtask, state, data, labeled, pool,
                                          fp, mesh, split_data=split_data)
    info["fingerprint"] = fp
    return dt.select_isal_detection(pool, scores, scored, budget, seed=seed), info


# ----------------------------------------------------------------------------- AL task

class DetectionALTask:
    """ActiveLearningTask for object detection (Faster R-CNN). `cfg`: the whole config
    (configs/isal_det_synthetic.py): data, model, train, eval, influence, reference, mesh,
    debug, al."""

    primary_metric = "AP50"
    known_strategies = STRATEGIES

    def __init__(self, cfg: ml_collections.ConfigDict):
        from ezsd_jax.models import detector as det
        from ezsd_jax.train import detector_config
        self.cfg = cfg
        self.data = DetectionData(cfg, "train")
        self.eval_data = DetectionData(cfg, "val", category_names=self.data.dataset.cat_names)
        pool_file = cfg.data.get("pool_ids_file", "")
        if pool_file:
            self._pool = np.sort(self.data.check(read_id_list(pool_file,
                                                              "config.data.pool_ids_file"),
                                                 "config.data.pool_ids_file"))
        else:
            self._pool = np.sort(self.data.ids)
        self.model = det.FasterRCNN(detector_config(cfg, self.data.dataset.num_classes))
        self.task = detection_task(cfg, self.model)
        self.mesh = sharding.make_mesh(cfg.mesh)
        sharding.check_batch_divisible(int(cfg.train.batch_size), self.mesh)
        sharding.check_batch_divisible(int(cfg.influence.pool_batch_size), self.mesh)

    def pool_ids(self) -> np.ndarray:
        return self._pool

    def _split_data(self, name: str) -> DetectionData:
        if name == "val":
            return self.eval_data
        if name == "train":
            return self.data
        raise SelectError(f"config.reference.source='split:{name}': detection has the "
                          "splits 'train' and 'val'")

    def train(self, labeled_ids: np.ndarray, seed: int, workdir: str) -> Any:
        from ezsd_jax.train import train_detector
        labeled_ids = np.asarray(labeled_ids, np.int64)
        c = cycle_config(self.cfg, seed, len(labeled_ids))
        dataset = self.data.subset(labeled_ids, "labeled ids")
        _, state = train_detector(c, workdir, dataset, name="detector")
        host = _host_state(state)
        host["checkpoint"] = (os.path.join(os.path.abspath(workdir), "ckpt_detector"),
                              int(c.train.steps))
        return host

    def evaluate(self, state: Any, workdir: str) -> dict[str, float]:
        from ezsd_jax.evaluate import evaluate_detector
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        m = evaluate_detector(self.cfg, workdir, self.model, variables,
                              self.eval_data.dataset, name="eval")
        return {k: float(v) for k, v in m["all"].items()}

    def select(self, strategy: str, state: Any, labeled_ids: np.ndarray,
               unlabeled_ids: np.ndarray, budget: int, seed: int,
               workdir: str) -> tuple[np.ndarray, np.ndarray]:
        sel, info = run_detection_strategy(
            self.cfg, workdir, self.task, state, self.data, labeled_ids, unlabeled_ids,
            strategy=strategy, budget=int(budget), seed=int(seed),
            checkpoint=state.get("checkpoint", ("", -1)), mesh=self.mesh,
            split_data=self._split_data)
        if info:
            atomic_write_json(os.path.join(workdir, f"select_{strategy}_info.json"),
                              {k: v for k, v in info.items() if k != "norm_trace"})
        return sel.ids, sel.scores


def build_task(cfg: ml_collections.ConfigDict, workdir: str) -> DetectionALTask:
    if "synth" in cfg:   # the synthetic set is generated into the workdir once
        from ezsd_jax.data import synthetic_stage
        synthetic_stage.run(cfg, workdir)
    try:
        return DetectionALTask(cfg)
    except ValueError as e:
        raise SelectError(f"config: {e}") from e


# ----------------------------------------------------------------------------- select CLI

def _restore(cfg, workdir: str, model, data: DetectionData, labeled: np.ndarray
             ) -> tuple[dict, int, str]:
    """Latest detector checkpoint in config.checkpoint_workdir ('' -> workdir), or (with
    init_checkpoint_if_missing) a tiny detector trained there on the labeled ids."""
    from ezsd_jax.evaluate import restore_variables
    from ezsd_jax.train import train_detector
    ckwd = os.path.abspath(cfg.checkpoint_workdir or workdir)
    ckdir = os.path.join(ckwd, "ckpt_detector")
    has = os.path.isdir(ckdir) and any(d.isdigit() for d in os.listdir(ckdir))
    if not has:
        if not cfg.init_checkpoint_if_missing:
            raise SelectError(f"config.checkpoint_workdir: no detector checkpoint in {ckdir} "
                              "(train one with `python -m ezsd_jax.main --stages=train`)")
        report(f"no checkpoint in {ckdir}: training the detector on {len(labeled)} labeled "
               "images (init_checkpoint_if_missing=True)")
        c = cycle_config(cfg, int(cfg.seed), len(labeled))
        train_detector(c, ckwd, data.subset(labeled, "labeled ids"), name="detector")
        cfg = c
    else:
        cfg = cycle_config(cfg, int(cfg.seed), len(labeled))
    variables, step = restore_variables(cfg, ckwd, model)
    return _host_state(variables), int(step), ckdir


def run_detection_selection(cfg, workdir: str) -> str:
    """`python -m isal_jax.select` with config.task='detection': writes
    workdir/selection_<strategy>.json ({'selected': [{'id', 'score', 'scored'}], ...})."""
    from ezsd_jax.models import detector as det
    from ezsd_jax.train import detector_config
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if cfg.strategy not in STRATEGIES:
        raise SelectError(f"config.strategy={cfg.strategy!r} is not one of {STRATEGIES}")
    if int(cfg.budget) < 1:
        raise SelectError(f"config.budget must be >= 1, got {cfg.budget}")
    if "synth" in cfg:
        from ezsd_jax.data import synthetic_stage
        synthetic_stage.run(cfg, workdir)
    try:
        data = DetectionData(cfg, "train")
        path = cfg.labeled_ids_file or os.path.join(workdir, "labeled_ids.json")
        if not os.path.exists(path):
            if not cfg.init_checkpoint_if_missing:
                raise SelectError(f"config.labeled_ids_file: {path!r} does not exist")
            n = int(cfg.init.num_labeled)
            ids = np.sort(np.random.default_rng(int(cfg.seed)).choice(data.ids, n,
                                                                      replace=False))
            atomic_write_json(path, [int(i) for i in ids])
            report(f"wrote {n} random labeled ids to {path}")
        labeled = data.check(read_id_list(path, "config.labeled_ids_file"),
                             "config.labeled_ids_file")
        pool = data.ids
        if cfg.data.get("pool_ids_file", ""):
            pool = data.check(read_id_list(cfg.data.pool_ids_file, "config.data.pool_ids_file"),
                              "config.data.pool_ids_file")
        pool = np.setdiff1d(pool, labeled)
        if int(cfg.budget) > len(pool):
            raise SelectError(f"config.budget={cfg.budget} is larger than the pool "
                              f"({len(pool)} unlabeled images)")
        model = det.FasterRCNN(detector_config(cfg, data.dataset.num_classes))
        dtask = detection_task(cfg, model)
        state, step, ckdir = _restore(cfg, workdir, model, data, labeled)
        mesh = sharding.make_mesh(cfg.mesh)
        report(f"{cfg.strategy}: pool {len(pool)}, labeled {len(labeled)}, budget "
               f"{cfg.budget}, checkpoint {ckdir} step {step}")
        t0 = time.perf_counter()
        sel, info = run_detection_strategy(cfg, workdir, dtask, state, data, labeled, pool,
                                           strategy=cfg.strategy, budget=int(cfg.budget),
                                           seed=int(cfg.seed), checkpoint=(ckdir, step),
                                           mesh=mesh, split_data=lambda name: DetectionData(
                                               cfg, name,
                                               category_names=data.dataset.cat_names))
    except ValueError as e:
        if isinstance(e, SelectError):
            raise
        raise SelectError(str(e)) from e
    elapsed = time.perf_counter() - t0
    out = {"strategy": cfg.strategy, "budget": int(cfg.budget), "task": "detection",
           "selected": [{"id": int(i), "score": float(s) if np.isfinite(s) else None,
                         "scored": bool(np.isfinite(s))}
                        for i, s in zip(sel.ids, sel.scores)],
           "settings": {**cfg.to_dict(), "resolved": {
               "workdir": workdir, "checkpoint_dir": ckdir, "checkpoint_step": step,
               "num_labeled": int(len(labeled)), "pool_size": int(len(pool)),
               "jax_devices": jax.device_count()}},
           "info": {k: v for k, v in info.items() if k != "norm_trace"}}
    path = os.path.join(workdir, f"selection_{cfg.strategy}.json")
    atomic_write_json(path, out)
    report(f"{cfg.strategy}: selected {len(sel.ids)} in {elapsed:.1f}s")
    print(path, flush=True)
    return path
