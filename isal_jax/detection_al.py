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
import math
import os
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from ezsd_jax.core import sharding
from ezsd_jax.core.io_utils import atomic_write_json
from ezsd_jax.core.metrics import report
from isal_jax.selection_io import (SelectError, fingerprint, heldout_split, ids_hash,
                                   read_id_list, reference_source)

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


@dataclasses.dataclass(frozen=True)
class SelectionRequest:
    """One selection: `budget` ids of `pool` by `strategy` (seeded), for the model trained on
    `labeled` and saved at `checkpoint` (dir, step); `heldout`: the held-out ids of
    reference.source='heldout' (the model was trained without them)."""
    strategy: str
    budget: int
    seed: int
    labeled: np.ndarray
    pool: np.ndarray
    checkpoint: tuple[str, int]
    heldout: np.ndarray | None = None


def run_detection_strategy(cfg, workdir: str, dtask, state: dict, data: DetectionData,
                           req: SelectionRequest, *, mesh=None, split_data=None):
    """Runs the request on the detector `state`. Returns (Selection, info dict)."""
    from isal_jax import strategies as st
    from isal_jax.tasks import detection as dt
    strategy, budget, seed, heldout = req.strategy, int(req.budget), int(req.seed), req.heldout
    labeled, pool, checkpoint = req.labeled, req.pool, req.checkpoint
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
    from isal_jax.scoring import isal_select
    fp = fingerprint({"influence": cfg.influence.to_dict(), "seed": int(seed),
                      "model": cfg.model.to_dict(), "reference": cfg.reference.to_dict(),
                      "checkpoint": list(checkpoint), "data": data.dataset.ann_file,
                      "pool": ids_hash(pool), "labeled": ids_hash(labeled),
                      "heldout": ids_hash(heldout) if heldout is not None else None})
    icfg = cfg.influence
    scale = dt.block_scale(icfg.scale, icfg.get("block_scales", ()))
    scfg = ml_collections.ConfigDict({"influence": icfg.to_dict(), "budget": int(budget),
                                      "reference": cfg.reference.to_dict(), "seed": int(seed),
                                      "allow_degenerate": bool(cfg.get("allow_degenerate",
                                                                       False))})
    src = dt.DetectionInfluence(dtask, state, data, split_data, mesh=mesh,
                                scale=scale if isinstance(scale, dict) else None)
    return isal_select(scfg, workdir, src, labeled, pool, fp, heldout=heldout)


# ----------------------------------------------------------------------------- AL task

class DetectionALTask:
    """ActiveLearningTask for object detection (Faster R-CNN). `cfg`: the whole config
    (configs/isal_det_synthetic.py): data, model, train, eval, influence, reference, mesh,
    al."""

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
        held = None
        if strategy == "isal" and reference_source(self.cfg.reference)[0] == "heldout":
            # As for classification: the pool is scored by a detector trained without a
            # seeded held-out part of the labeled set, whose gradient is v.
            labeled_ids, held = heldout_split(labeled_ids, seed, self.cfg.reference)
            state = self.train(labeled_ids, seed, os.path.join(workdir, "selection_model"))
        req = SelectionRequest(strategy, int(budget), int(seed), labeled_ids, unlabeled_ids,
                               state.get("checkpoint", ("", -1)), held)
        sel, info = run_detection_strategy(self.cfg, workdir, self.task, state, self.data,
                                           req, mesh=self.mesh, split_data=self._split_data)
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
        req = SelectionRequest(cfg.strategy, int(cfg.budget), int(cfg.seed), labeled, pool,
                               (ckdir, step))
        sel, info = run_detection_strategy(cfg, workdir, dtask, state, data, req, mesh=mesh,
                                           split_data=lambda name: DetectionData(
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
