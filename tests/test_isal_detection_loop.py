"""End to end on the synthetic detection set (tiny Faster R-CNN, 64x64 images): a 2-cycle
active-learning loop (isal and random) through `python -m isal_jax.main` writes the results
CSV and each cycle's selection, and `python -m isal_jax.select` (config.task='detection')
selects from one of the loop's detector checkpoints (a rerun reuses its cached s_test and
score shards). Both runs share a persistent XLA
compilation cache, so identical programs (the same model, shapes and seed) compile once,
and compile with LLVM at -O0 (the runs are tiny; compilation dominates them)."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end AL loop subprocesses

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "isal_det_synthetic.py"
# Tiny: 24 pool images, 8 val, 8 initial labels, +8, 4 training steps, a short LiSSA.
FAST = {"synth.train_images": 24, "synth.val_images": 8, "al.initial": 8, "al.budget": 8,
        "al.plot": False, "train.steps": 4, "train.warmup_steps": 1, "influence.depth": 3,
        "influence.repeats": 1, "influence.hvp_num_batches": 1,
        "influence.residual_batches": 1}


def _run(module, workdir, flat, cache, timeout=400):
    args = [sys.executable, "-m", module, f"--config={CONFIG}", f"--workdir={workdir}"]
    args += [f"--config.{k}={v}" for k, v in {**FAST, **flat}.items()]
    # LLVM at -O0: XLA:CPU compiles the detector's programs ~2x faster; these runs are tiny.
    xla = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": xla,
           "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("isal_det_loop")
    r = _run("isal_jax.main", d / "wd", {}, d / "jax_cache")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return d, d / "wd" / "al"


def _read(path):
    return json.loads(Path(path).read_text())


def test_two_cycle_loop_writes_csv_and_selections(loop_run):
    _, al = loop_run
    with open(al / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["strategy"], r["cycle"], r["num_labeled"]) for r in rows] == [
        ("isal", "0", "8"), ("isal", "1", "16"), ("random", "0", "8"), ("random", "1", "16")]
    # every row's AP/AP50 is what pycocotools computes from that cycle's saved detections
    # on the val annotations (the CSV records the right model's numbers on the right split)
    import contextlib
    import io
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    val_ann = [p for p in (al.parent / "synthetic").rglob("*.json") if "val" in p.name]
    assert len(val_ann) == 1, val_ann
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(val_ann[0]))
    for r in rows:
        dets = _read(al / r["strategy"] / "seed_0" / f"cycle_{r['cycle']}" / "eval" /
                     "eval_detections.json")
        if not dets:
            assert float(r["AP50"]) == 0.0 and float(r["AP"]) == 0.0
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(dets), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert math.isclose(float(r["AP"]), max(ev.stats[0], 0.0), abs_tol=1e-6), r
        assert math.isclose(float(r["AP50"]), max(ev.stats[1], 0.0), abs_tol=1e-6), r
    # cycle 0 is the same model for both strategies (same initial set and seed)
    assert rows[0]["AP50"] == rows[2]["AP50"]
    for strategy in ("isal", "random"):
        c0, c1 = al / strategy / "seed_0" / "cycle_0", al / strategy / "seed_0" / "cycle_1"
        lab0 = _read(c0 / "labeled_ids.json")
        sel = _read(c0 / "selection.json")
        assert len(sel["ids"]) == 8 and len(set(sel["ids"])) == 8
        assert not set(sel["ids"]) & set(lab0)
        assert sorted(lab0 + sel["ids"]) == _read(c1 / "labeled_ids.json")
        assert (c0 / "ckpt_detector").is_dir() and (c0 / "eval" / "eval_metrics.json").exists()
    info = _read(al / "isal" / "seed_0" / "cycle_0" / "select_isal_info.json")
    assert info["num_pool"] == 16 and math.isfinite(info["residual"])
    assert info["depth"] == 3 and info["nan_resets_total"] == 0
    scores = _read(al / "isal" / "seed_0" / "cycle_0" / "selection.json")["scores"]
    n_nan = sum(not math.isfinite(s) for s in scores)     # unscored (no pseudo box) ...
    assert n_nan <= info["num_unscored"]
    finite = scores[:len(scores) - n_nan]                 # ... only after the scored ones
    assert all(math.isfinite(s) for s in finite) and finite == sorted(finite)
    shards = list((al / "isal" / "seed_0" / "cycle_0" / "isal_scores").glob("shard_*.npz"))
    assert shards and (al / "isal" / "seed_0" / "cycle_0" / "isal_scores" / "s_test.npz").exists()


def test_select_cli_on_a_detection_checkpoint(loop_run):
    d, al = loop_run
    cdir = al / "random" / "seed_0" / "cycle_0"
    labeled = _read(cdir / "labeled_ids.json")
    flat = {"checkpoint_workdir": cdir, "labeled_ids_file": cdir / "labeled_ids.json",
            "synth.out_dir": d / "wd" / "synthetic", "strategy": "isal", "budget": 5}
    r = _run("isal_jax.select", d / "sel", flat, d / "jax_cache")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    out = _read(d / "sel" / "selection_isal.json")
    assert out["task"] == "detection" and out["budget"] == 5
    ids = [e["id"] for e in out["selected"]]
    assert len(set(ids)) == 5 and not set(ids) & set(labeled)
    scored = [e["score"] for e in out["selected"] if e["scored"]]
    assert scored == sorted(scored)
    assert out["settings"]["resolved"]["checkpoint_step"] == 4
    assert out["info"]["num_pool"] == 16
    # a rerun reuses the cached s_test and score shards and gives the same selection
    again = _run("isal_jax.select", d / "sel", flat, d / "jax_cache")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resume: loaded s_test" in again.stdout and "isal scores: shard" not in again.stdout
    assert _read(d / "sel" / "selection_isal.json")["selected"] == out["selected"]
    # bad input -> a clear error and exit status 2
    bad = _run("isal_jax.select", d / "bad", {**flat, "strategy": "margin"}, d / "jax_cache")
    assert bad.returncode == 2 and "not one of" in bad.stderr
