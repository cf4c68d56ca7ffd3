"""The one ISAL scoring path, for every task: reference set -> v -> s_test -> pool scores
(resumable shards) -> selection.

Place in the pipeline: isal_jax.select (classification CLI and AL loop) and
isal_jax.detection_al (detection CLI and AL loop) build an `InfluenceTask` and call
`isal_select`; every influence option (solver, damping, HVP order, NaN reset,
on_unconverged, diversity, reference source) therefore works for both tasks.
docs/isal-method.md describes the method and the options.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import numpy as np

from ezsd_jax.core.io_utils import atomic_savez
from ezsd_jax.core.metrics import report
from ezsd_jax.core import faults
from isal_jax.config_schema import DIVERSITY
from isal_jax.degenerate import check_lissa, check_model_outputs
from isal_jax.selection_io import (SelectError, load_cached, read_id_list, reference_source,
                                   score_dir)


@runtime_checkable
class InfluenceTask(Protocol):
    """What a task supplies to the scoring path.

    params: the trained parameter tree; loss_fn: (params, batch) -> per-sample losses [B]
    with the targets the batch carries (BN in inference mode); data: the pool's data set
    (ids, `check(ids, what)`); labeled_batches: true-label, engine-ready, masked batches
    of `ids` of `data` (v and the HVP minibatches); split_data(name): another split (the
    reference source 'split:NAME'); score_pool: pseudo labels from the model and the
    JVP scores -<G_z, s_test> of `ids` -> (scores [N] float64, scored [N] bool: False =
    no pseudo label (detection: no kept box), groups [N] int: the pseudo class, used by
    diversity='class_balanced'). Optional attribute `scale`: per-block LiSSA scales that
    replace config.influence.scale."""
    params: Any
    data: Any

    def loss_fn(self) -> Callable: ...

    def labeled_batches(self, data, ids, batch_size: int, what: str) -> Iterator[dict]: ...

    def split_data(self, name: str) -> Any: ...

    def score_pool(self, subset, s_test, ids, batch_size: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


@dataclasses.dataclass(eq=False)
class TrainedModel:
    """The fields and methods both InfluenceTask adapters share: a task adapter (with
    `model_state(state)` and `loss_fn(model_state)`), its trained state {'params',
    'batch_stats'}, the pool's data set and `split_loader(name)` for 'split:NAME'."""
    task: Any
    state: dict
    data: Any
    split_loader: Callable

    @property
    def params(self):
        return self.state["params"]

    @property
    def model_state(self) -> dict:
        return self.task.model_state(self.state)

    def loss_fn(self):
        return self.task.loss_fn(self.model_state)

    def split_data(self, name: str):
        return self.split_loader(name)


def s_test_settings(icfg, scale=None) -> dict:
    """config.influence -> influence.solve_s_test's keyword arguments (fields that older
    configs lack take the reference's behaviour). scale: a per-block mapping that replaces
    the scalar icfg.scale (detection's block_scales)."""
    kw = {"solver": str(icfg.get("solver", "lissa")), "damp": float(icfg.damp),
          "scale": float(icfg.scale) if scale is None else scale,
          "damp_mode": str(icfg.get("damp_mode", "fixed")),
          "damp_fraction": float(icfg.get("damp_fraction", 0.1)),
          "eig_iters": int(icfg.get("eig_iters", 0)),
          "eig_batches": int(icfg.residual_batches),
          "residual_batches": int(icfg.residual_batches),
          "block_mode": str(icfg.get("block_mode", "preconditioner"))}
    if kw["solver"] == "lissa":
        kw.update(depth=int(icfg.depth), repeats=int(icfg.repeats),
                  stop_residual=float(icfg.get("stop_residual", 0.0)),
                  hvp_order=str(icfg.get("hvp_order", "shuffled")),
                  nan_reset=str(icfg.get("nan_reset", "chain")))
        if kw["stop_residual"] > 0:
            kw["loop"] = "python"
    else:
        kw.update(cg_tol=float(icfg.get("cg_tol", 1e-3)),
                  cg_maxiter=int(icfg.get("cg_maxiter", 100)))
    return kw


def s_test_line(info: dict, seconds: float) -> str:
    """One log line on the s_test solve: norms, residual, resets, damping vs spectrum."""
    ratio = info.get("damping_ratio")
    spec = (f" top_eig={info['top_eigenvalue']:.4g} damping/top_eig={ratio:.3g}"
            if ratio is not None else "")
    return (f"s_test ({info.get('solver', 'lissa')}): {seconds:.1f}s  |v|={info['v_norm']:.4g}"
            f" |s|={info['s_norm']:.4g} residual={info['residual']:.3g} "
            f"nan_resets={info['nan_resets_total']} damp={info['damp']:.3g}{spec}")


def hvp_ids(icfg, labeled, seed: int) -> np.ndarray:
    """The labeled ids of the HVP minibatches. 'shuffled': a seeded permutation, at most
    hvp_num_batches * hvp_batch_size of them when hvp_num_batches is set (detection);
    'sequential' (the reference's): the first depth * repeats * hvp_batch_size labeled ids
    in the order given (with batch 1: one sample per step, chain r on samples r*depth..)."""
    labeled = np.asarray(labeled, np.int64)
    bs = int(icfg.hvp_batch_size)
    if str(icfg.get("hvp_order", "shuffled")) == "sequential":
        return labeled[:int(icfg.depth) * int(icfg.repeats) * bs]
    ids = np.random.default_rng([int(seed), 1]).permutation(labeled)
    n = int(icfg.get("hvp_num_batches", 0) or 0)
    return ids[:n * bs] if n > 0 else ids


def reference_ids(cfg, task: InfluenceTask, labeled, heldout=None) -> tuple[Any, np.ndarray]:
    """config.reference -> (data set, ids) of v's reference set R."""
    kind, arg = reference_source(cfg.reference)
    if kind == "labeled":
        return task.data, np.asarray(labeled, np.int64)
    if kind == "heldout":
        if heldout is None:
            raise SelectError("config.reference.source='heldout': no held-out ids given "
                              "(only the AL loop holds ids out of training)")
        return task.data, np.asarray(heldout, np.int64)
    if kind == "ids_file":
        ids = read_id_list(arg, "config.reference.ids_file")
        try:
            task.data.check(ids, "config.reference.ids_file")
        except ValueError as e:
            raise SelectError(str(e)) from e
        return task.data, ids
    try:
        data = task.split_data(arg)
    except (ValueError, FileNotFoundError) as e:
        raise SelectError(f"config.reference.source={cfg.reference.source!r}: {e}") from e
    return data, np.asarray(data.ids, np.int64)


def solve(cfg, workdir: str, task: InfluenceTask, subset, labeled, fingerprint: str,
          heldout=None) -> tuple[dict, dict]:
    """s_test (cached in workdir/isal_scores/s_test.npz under `fingerprint`) and its info."""
    from isal_jax import influence as infl
    icfg = cfg.influence
    s_path = os.path.join(score_dir(workdir), "s_test.npz")
    z = load_cached(s_path, fingerprint)
    if z is not None and all(f"s/{k}" in z for k in subset.keys):
        report(f"resume: loaded s_test from {s_path}")
        return {k: z[f"s/{k}"] for k in subset.keys}, json.loads(str(z["info"]))
    ref_data, ref_ids = reference_ids(cfg, task, labeled, heldout)
    t0 = time.perf_counter()
    loss_fn = task.loss_fn()
    v = infl.reference_gradient(loss_fn, task.params, subset, task.labeled_batches(
        ref_data, ref_ids, int(icfg.ref_batch_size), "reference"))
    h_ids = hvp_ids(icfg, labeled, int(cfg.seed))
    hvp = list(task.labeled_batches(task.data, h_ids, int(icfg.hvp_batch_size),
                                    "labeled ids"))
    if not hvp:
        raise SelectError("isal: no labeled samples for the HVP minibatches")
    try:
        s_test, info = infl.solve_s_test(loss_fn, task.params, subset, v,
                                         infl.stack_batches(hvp), seed=int(cfg.seed),
                                         **s_test_settings(icfg, getattr(task, "scale",
                                                                         None)))
    except ValueError as e:
        raise SelectError(f"config.influence: {e}") from e
    info.update(num_reference=int(len(ref_ids)), num_hvp_samples=int(len(h_ids)))
    s_test = {k: np.asarray(x) for k, x in s_test.items()}
    report(s_test_line(info, time.perf_counter() - t0))
    check_lissa(info, s_test, max_residual=float(icfg.get("max_residual", 1.0)),
                allow=bool(cfg.get("allow_degenerate", False)),
                on_unconverged=str(icfg.get("on_unconverged", "stop")))
    atomic_savez(s_path, fingerprint=np.asarray(fingerprint),
                 info=np.asarray(json.dumps(info)), **{f"s/{k}": x for k, x in s_test.items()})
    return s_test, info


def pool_scores(cfg, workdir: str, task: InfluenceTask, subset, s_test, pool,
                fingerprint: str, info: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores of `pool` in its order, shard by shard (workdir/isal_scores/shard_XXXXX.npz,
    fingerprinted; a killed run resumes at its first missing shard)."""
    icfg = cfg.influence
    bs = int(icfg.pool_batch_size)
    shard = max(int(icfg.shard_size) // bs, 1) * bs
    sdir = score_dir(workdir)
    starts = list(range(0, len(pool), shard))
    done = {}
    for i, st in enumerate(starts):
        z = load_cached(os.path.join(sdir, f"shard_{i:05d}.npz"), fingerprint,
                        pool[st:st + shard])
        if z is not None:
            done[i] = z
    if done:
        report(f"resume: {len(done)} of {len(starts)} score shards already done "
               f"(skipping {sorted(done)})")
    out = []
    for i, st in enumerate(starts):
        ids = pool[st:st + shard]
        z = done.get(i)
        if z is None:
            sc, ok, groups = task.score_pool(subset, s_test, ids, bs)
            bad = ok & ~np.isfinite(sc)
            if bad.any() and not bool(cfg.get("allow_degenerate", False)):
                raise SelectError(f"influence scores are NaN/inf for {int(bad.sum())} pool "
                                  f"samples of shard {i} (e.g. ids {ids[bad][:5].tolist()}); "
                                  f"s_test info: residual={info['residual']:.3g}, "
                                  f"nan_resets={info['nan_resets_total']}")
            atomic_savez(os.path.join(sdir, f"shard_{i:05d}.npz"),
                         fingerprint=np.asarray(fingerprint), ids=ids, scores=sc, scored=ok,
                         groups=groups)
            z = {"scores": sc, "scored": ok, "groups": groups}
            report(f"isal scores: shard {i} ({len(ids)} samples, {int(ok.sum())} scored)")
            if faults.setting("kill_after_shard", -1) == i:
                faults.kill(f"after score shard {i}")
        out.append((np.asarray(z["scores"], np.float64), np.asarray(z["scored"], bool),
                    np.asarray(z["groups"], np.int64)))
    if not out:
        return np.zeros(0), np.zeros(0, bool), np.zeros(0, np.int64)
    return tuple(np.concatenate(x) for x in zip(*out))


def select_scored(pool, budget: int, scores, scored, groups, *, seed: int,
                  diversity: str = "none"):
    """The scored pool samples by influence, most negative first (diversity
    'class_balanced': top-k per pseudo class in rounds); if the budget is larger than the
    number of scored samples, the unscored ones follow in a seeded random order (score
    NaN)."""
    from isal_jax import strategies as st
    if diversity not in DIVERSITY:
        raise SelectError(f"config.influence.diversity={diversity!r} is not one of "
                          f"{DIVERSITY}")
    pool = np.asarray(pool)
    k1 = min(int(budget), int(scored.sum()))
    first = st.select_isal(pool[scored], k1, scores=scores[scored], seed=seed,
                           groups=groups[scored] if diversity == "class_balanced" else None)
    rest = st.select_random(pool[~scored], int(budget) - k1, seed=seed)
    return st.Selection(np.concatenate([first.ids, rest.ids]),
                        np.concatenate([first.scores, np.full(len(rest.ids), np.nan)]))


def isal_select(cfg, workdir: str, task: InfluenceTask, labeled, pool, fingerprint: str,
                heldout=None):
    """ISAL selection of cfg.budget ids of `pool`: (Selection, info). `labeled`: the ids
    the model was trained on (the HVP set); `heldout`: the held-out ids of
    reference.source='heldout'."""
    from isal_jax import influence as infl
    pool = np.asarray(pool, np.int64)
    try:
        subset = infl.make_subset(task.params, cfg.influence.subset)
    except ValueError as e:
        raise SelectError(f"config.influence.subset: {e}") from e
    s_test, info = solve(cfg, workdir, task, subset, labeled, fingerprint, heldout)
    scores, scored, groups = pool_scores(cfg, workdir, task, subset, s_test, pool,
                                         fingerprint, info)
    check_model_outputs(scores[scored], "influence scores",
                        allow=bool(cfg.get("allow_degenerate", False)))
    try:
        sel = select_scored(pool, int(cfg.budget), scores, scored, groups, seed=int(cfg.seed),
                            diversity=str(cfg.influence.get("diversity", "none")))
    except ValueError as e:      # e.g. NaN scores that allow_degenerate let through
        raise SelectError(f"config.strategy='isal': {e}") from e
    info = {**info, "num_pool": int(len(pool)), "num_unscored": int((~scored).sum()),
            "fingerprint": fingerprint}
    return sel, info
