"""The active-learning experiment loop, task-agnostic (classification and detection).

Place in the pipeline: config -> task adapter (isal_jax/classification_al.py,
isal_jax/detection_al.py) -> THIS -> workdir/al/results.csv -> isal_jax/curves.py (plot,
annotation-cost savings).

For every seed, every strategy and every cycle c = 0 .. cycles-1:

    labeled(0)   = `initial` ids drawn from task.pool_ids() with the seed (the SAME set for
                   every strategy of that seed)
    labeled(c+1) = labeled(c) + selection(c)      (`budget` ids per cycle)
    cycle c:  train from scratch on labeled(c) -> evaluate -> select `budget` new ids

Every cycle also selects after its evaluation (the last one too: it is what to label next,
and it lets a finished experiment be extended with more cycles). The training and
selection seed of a cycle is `seed * 1000 + c` for every strategy (common random numbers:
cycle 0 trains the identical model for all strategies of a seed).

Layout (all files atomic; `done.json` is written last, so a cycle is finished iff it exists):

    workdir/al/experiment.json                   initial/budget/pool fingerprint (checked)
    workdir/al/<strategy>/seed_<s>/cycle_<c>/
        labeled_ids.json     the training set of this cycle
        ckpt_train/ ...      the task's checkpoints (resumable training), metrics/
        eval.json            metrics of the trained model
        selection.json       {"ids": [...], "scores": [...]} in selection order
        done.json            {"metrics", "num_labeled", "timings"}
    workdir/al/results.csv   strategy, seed, cycle, num_labeled, <metrics> (rewritten after
                             every cycle, from the done markers; no timings -> deterministic)
    workdir/al/timings.csv   wall times of train / eval / select per cycle
    workdir/al/curves.png, savings.csv, savings.json   (isal_jax.curves, after each seed)

Resume: rerunning the same command skips finished cycles, resumes a half-trained cycle
from its checkpoint (train_loop.fit inside the task) and reuses eval.json /
selection.json already written.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from ezsd_jax.core.io_utils import atomic_write_json, atomic_write_text
from ezsd_jax.core.metrics import report


@runtime_checkable
class ActiveLearningTask(Protocol):
    primary_metric: str      # e.g. "accuracy" (classification) or "AP50" (detection)

    def pool_ids(self) -> np.ndarray: ...                       # all selectable ids

    def train(self, labeled_ids: np.ndarray, seed: int, workdir: str) -> Any: ...
    # from scratch; resumable via checkpoints in workdir

    def evaluate(self, state: Any, workdir: str) -> dict[str, float]: ...
    # must contain primary_metric

    def select(self, strategy: str, state: Any, labeled_ids: np.ndarray,
               unlabeled_ids: np.ndarray, budget: int, seed: int,
               workdir: str) -> tuple[np.ndarray, np.ndarray]: ...
    # (ids in selection order, scores)


class LoopError(ValueError):
    """Bad al config, or a workdir written with other settings."""


KEY_COLUMNS = ("strategy", "seed", "cycle", "num_labeled")


def _get(cfg, name: str, default=None):
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    try:
        return cfg[name] if name in cfg else default     # ConfigDict
    except TypeError:
        return getattr(cfg, name, default)


def cycle_seed(seed: int, cycle: int) -> int:
    """Training/selection seed of a cycle: the same for every strategy."""
    return int(seed) * 1000 + int(cycle)


def initial_labeled(pool_ids: np.ndarray, num: int, seed: int) -> np.ndarray:
    """The initial labeled set of a seed (sorted): a seeded draw without replacement,
    independent of the strategy."""
    pool_ids = np.sort(np.asarray(pool_ids, np.int64))
    rng = np.random.default_rng([int(seed), 0x15A1])
    return np.sort(rng.choice(pool_ids, int(num), replace=False))


def cycle_dir(al_dir: str, strategy: str, seed: int, cycle: int) -> str:
    return os.path.join(al_dir, strategy, f"seed_{seed}", f"cycle_{cycle}")


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _ids(x) -> list[int]:
    return [int(i) for i in np.asarray(x).reshape(-1)]


# ----------------------------------------------------------------------------- config

def _validate(task, al_cfg, pool: np.ndarray) -> dict:
    strategies = tuple(_get(al_cfg, "strategies", ()))
    seeds = tuple(int(s) for s in _get(al_cfg, "seeds", ()))
    initial, budget = int(_get(al_cfg, "initial", 0)), int(_get(al_cfg, "budget", 0))
    cycles = int(_get(al_cfg, "cycles", 0))
    if not strategies:
        raise LoopError("al.strategies is empty")
    if len(set(strategies)) != len(strategies):
        raise LoopError(f"al.strategies lists a strategy twice: {strategies}")
    for s in strategies:
        if not s or "/" in s or s.startswith("."):
            raise LoopError(f"al.strategies: {s!r} is not a valid strategy name")
    known = getattr(task, "known_strategies", None)
    if known is not None:
        bad = [s for s in strategies if s not in known]
        if bad:
            raise LoopError(f"al.strategies: {bad} not known to this task; known: "
                            f"{sorted(known)}")
    if not seeds:
        raise LoopError("al.seeds is empty")
    if len(set(seeds)) != len(seeds):
        raise LoopError(f"al.seeds lists a seed twice: {seeds}")
    if initial < 1 or budget < 1 or cycles < 1:
        raise LoopError(f"al.initial ({initial}), al.budget ({budget}) and al.cycles "
                        f"({cycles}) must all be >= 1")
    need = initial + budget * (cycles - 1)
    if need > len(pool):
        raise LoopError(f"al: initial + budget * (cycles - 1) = {need} labels, but the pool "
                        f"has only {len(pool)} ids")
    if len(np.unique(pool)) != len(pool):
        raise LoopError("task.pool_ids() returned duplicate ids")
    return dict(strategies=strategies, seeds=seeds, initial=initial, budget=budget,
                cycles=cycles)


def _check_experiment(al_dir: str, spec: dict, pool: np.ndarray, primary: str) -> None:
    """A workdir belongs to one (initial, budget, pool, metric); more strategies, seeds or
    cycles may be added later."""
    import hashlib
    record = {"initial": spec["initial"], "budget": spec["budget"],
              "pool_size": int(len(pool)), "primary_metric": primary,
              "pool_hash": hashlib.sha256(np.sort(pool).astype(np.int64).tobytes())
              .hexdigest()[:16]}
    path = os.path.join(al_dir, "experiment.json")
    if os.path.exists(path):
        old = _read_json(path)
        diff = {k: (old.get(k), v) for k, v in record.items() if old.get(k) != v}
        if diff:
            raise LoopError(f"{path}: this workdir was written with other settings "
                            f"{ {k: a for k, (a, b) in diff.items()} } (now "
                            f"{ {k: b for k, (a, b) in diff.items()} }); use a new --workdir")
    atomic_write_json(path, record)


# ----------------------------------------------------------------------------- results

def collect_results(al_dir: str, strategies: Sequence[str] | None = None,
                    seeds: Sequence[int] | None = None) -> list[dict]:
    """Rows (strategy, seed, cycle, num_labeled, metrics...) of every finished cycle under
    al_dir, ordered by (strategy order, seed, cycle). Default: every strategy/seed there."""
    rows = []
    if strategies is None:
        strategies = sorted(d for d in os.listdir(al_dir)
                            if os.path.isdir(os.path.join(al_dir, d)))
    for strategy in strategies:
        sdir = os.path.join(al_dir, strategy)
        if not os.path.isdir(sdir):
            continue
        found = sorted(int(d[5:]) for d in os.listdir(sdir)
                       if d.startswith("seed_") and d[5:].lstrip("-").isdigit())
        for seed in (found if seeds is None else [s for s in seeds if s in found]):
            c = 0
            while os.path.exists(os.path.join(cycle_dir(al_dir, strategy, seed, c),
                                              "done.json")):
                done = _read_json(os.path.join(cycle_dir(al_dir, strategy, seed, c),
                                               "done.json"))
                rows.append({"strategy": strategy, "seed": int(seed), "cycle": c,
                             "num_labeled": int(done["num_labeled"]), **done["metrics"]})
                c += 1
    return rows


def _csv_text(rows: list[dict], first: Sequence[str]) -> str:
    cols = list(first)
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, restval="", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def write_results(al_dir: str, rows: list[dict], primary: str) -> str:
    path = os.path.join(al_dir, "results.csv")
    atomic_write_text(path, _csv_text(rows, KEY_COLUMNS + (primary,)))
    return path


def _timing_rows(al_dir: str, rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        done = _read_json(os.path.join(cycle_dir(al_dir, r["strategy"], r["seed"], r["cycle"]),
                                       "done.json"))
        out.append({k: r[k] for k in KEY_COLUMNS} | done.get("timings", {}))
    return out


# ----------------------------------------------------------------------------- one cycle

def _maybe_kill(al_cfg, strategy: str, seed: int, cycle: int, phase: str) -> None:
    """Test-only fault injection (ezsd_jax.core.faults): kill_after='<strategy>/<seed>/<cycle>'
    (after the done marker) or '<strategy>/<seed>/<cycle>/<phase>' with phase train | eval
    | select -> SIGKILL this process right after that phase."""
    from ezsd_jax.core import faults
    spec = faults.setting("kill_after", "")
    want = f"{strategy}/{seed}/{cycle}" + ("" if phase == "done" else f"/{phase}")
    if spec and spec == want:
        faults.kill(f"kill_after={spec}")


def run_cycle(task: ActiveLearningTask, al_cfg, al_dir: str, strategy: str, seed: int,
              cycle: int, labeled: np.ndarray, pool: np.ndarray, budget: int) -> dict:
    """Train -> evaluate -> select for one cycle (each phase skipped when its output is
    already there); writes done.json last. Returns the done record."""
    cdir = cycle_dir(al_dir, strategy, seed, cycle)
    os.makedirs(cdir, exist_ok=True)
    lpath = os.path.join(cdir, "labeled_ids.json")
    if os.path.exists(lpath):
        old = _read_json(lpath)
        if old != _ids(labeled):
            raise LoopError(f"{lpath} holds another labeled set than the previous cycle "
                            "implies (settings changed?); use a new --workdir")
    else:
        atomic_write_json(lpath, _ids(labeled), indent=None)
    cseed = cycle_seed(seed, cycle)
    timings = {}

    t0 = time.perf_counter()
    state = task.train(labeled, cseed, cdir)
    timings["train_s"] = time.perf_counter() - t0
    _maybe_kill(al_cfg, strategy, seed, cycle, "train")

    epath = os.path.join(cdir, "eval.json")
    t0 = time.perf_counter()
    if os.path.exists(epath):
        metrics = _read_json(epath)
    else:
        metrics = {k: float(v) for k, v in task.evaluate(state, cdir).items()}
        if task.primary_metric not in metrics:
            raise LoopError(f"task.evaluate returned {sorted(metrics)} without the primary "
                            f"metric {task.primary_metric!r}")
        atomic_write_json(epath, metrics)
    timings["eval_s"] = time.perf_counter() - t0
    _maybe_kill(al_cfg, strategy, seed, cycle, "eval")

    spath = os.path.join(cdir, "selection.json")
    unlabeled = np.setdiff1d(pool, labeled)
    k = min(int(budget), len(unlabeled))
    t0 = time.perf_counter()
    if not os.path.exists(spath):
        if k > 0:
            ids, scores = task.select(strategy, state, labeled, unlabeled, k, cseed, cdir)
            ids = np.asarray(ids, np.int64).reshape(-1)
            scores = np.asarray(scores, np.float64).reshape(-1)
        else:
            ids, scores = np.zeros(0, np.int64), np.zeros(0)
        if len(ids) != k or len(scores) != k:
            raise LoopError(f"task.select({strategy!r}) returned {len(ids)} ids / "
                            f"{len(scores)} scores for a budget of {k}")
        if len(np.unique(ids)) != k or not np.isin(ids, unlabeled).all():
            raise LoopError(f"task.select({strategy!r}) returned duplicate ids or ids that "
                            "are not in the unlabeled pool")
        atomic_write_json(spath, {"strategy": strategy, "seed": cseed, "budget": k,
                                  "ids": _ids(ids), "scores": [float(s) for s in scores]})
    timings["select_s"] = time.perf_counter() - t0
    _maybe_kill(al_cfg, strategy, seed, cycle, "select")

    done = {"strategy": strategy, "seed": int(seed), "cycle": int(cycle),
            "num_labeled": int(len(labeled)), "metrics": metrics, "timings": timings}
    atomic_write_json(os.path.join(cdir, "done.json"), done)
    return done


# ----------------------------------------------------------------------------- experiment

def run_experiment(task: ActiveLearningTask, al_cfg, workdir: str) -> str:
    """Runs (or resumes) every seed x strategy x cycle; returns workdir/al/results.csv.
    al_cfg fields: strategies, seeds, initial, budget, cycles; optional: plot (True)."""
    from ezsd_jax.core.metrics import Progress

    al_dir = os.path.join(os.path.abspath(workdir), "al")
    os.makedirs(al_dir, exist_ok=True)
    pool = np.sort(np.asarray(task.pool_ids(), np.int64))
    spec = _validate(task, al_cfg, pool)
    primary = task.primary_metric
    _check_experiment(al_dir, spec, pool, primary)
    strategies, seeds = spec["strategies"], spec["seeds"]
    budget, cycles = spec["budget"], spec["cycles"]

    total = len(strategies) * len(seeds) * cycles
    finished = sum(os.path.exists(os.path.join(cycle_dir(al_dir, st, se, c), "done.json"))
                   for st in strategies for se in seeds for c in range(cycles))
    report(f"[al] {len(strategies)} strategies x {len(seeds)} seeds x {cycles} cycles "
           f"(initial {spec['initial']}, +{budget}/cycle, pool {len(pool)}); "
           f"{finished}/{total} cycles already done")
    progress = Progress(total, start=finished, per_step=1, unit="cycle", every_s=0.0,
                        name="al")
    csv_path = os.path.join(al_dir, "results.csv")

    def refresh(report: bool) -> None:
        rows = collect_results(al_dir, strategies, seeds)
        write_results(al_dir, rows, primary)
        trows = _timing_rows(al_dir, rows)
        atomic_write_text(os.path.join(al_dir, "timings.csv"),
                          _csv_text(trows, KEY_COLUMNS))
        if report and rows:
            from isal_jax import curves
            curves.report(csv_path, al_dir, metric=primary, reference="random",
                          plot=bool(_get(al_cfg, "plot", True)))

    n_done = finished
    for seed in seeds:
        init = initial_labeled(pool, spec["initial"], seed)
        for strategy in strategies:
            labeled = init
            for cycle in range(cycles):
                cdir = cycle_dir(al_dir, strategy, seed, cycle)
                done_path = os.path.join(cdir, "done.json")
                if os.path.exists(done_path):
                    done = _read_json(done_path)
                    if done["num_labeled"] != len(labeled):
                        raise LoopError(f"{done_path}: {done['num_labeled']} labels, expected "
                                        f"{len(labeled)} (settings changed?)")
                    report(f"[al] {strategy} seed {seed} cycle {cycle}: done "
                           f"({primary} {done['metrics'][primary]:.4f}), skipping")
                else:
                    report(f"[al] {strategy} seed {seed} cycle {cycle}: training on "
                           f"{len(labeled)} labels")
                    done = run_cycle(task, al_cfg, al_dir, strategy, seed, cycle, labeled,
                                     pool, budget)
                    t = done["timings"]
                    n_done += 1
                    report(f"[al] {strategy} seed {seed} cycle {cycle}: {len(labeled)} labels "
                           f"-> {primary} {done['metrics'][primary]:.4f} (train "
                           f"{t['train_s']:.1f}s, eval {t['eval_s']:.1f}s, select "
                           f"{t['select_s']:.1f}s)")
                    refresh(report=False)
                    progress.tick(n_done, force=True)
                    _maybe_kill(al_cfg, strategy, seed, cycle, "done")
                if cycle + 1 < cycles:
                    sel = _read_json(os.path.join(cdir, "selection.json"))["ids"]
                    labeled = np.sort(np.concatenate([labeled, np.asarray(sel, np.int64)]))
        refresh(report=True)
    report(f"[al] results: {csv_path}")
    return csv_path
