"""End-to-end tests of `python -m isal_jax.select` on digits with a tiny MLP: a run killed
(SIGKILL) after a score shard resumes from its finished shards and gives the same
selection as an uninterrupted run; baselines; bad input -> clear errors."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "isal_demo.py"

# Small and fast: tiny MLP, short LiSSA, pool of 700 ids in shards of 192 -> 4 shards.
FAST = {"model.name": "mlp", "model.features": (16,), "influence.depth": 30,
        "influence.repeats": 2, "influence.pool_batch_size": 64, "influence.shard_size": 192,
        "influence.ref_batch_size": 64, "init_checkpoint_if_missing": False, "budget": 40,
        "influence.solver": "lissa", "influence.damp_mode": "fixed",
        "influence.diversity": "none"}        # the LiSSA path (its trace is compared)


def _cfg(**flat):
    spec = importlib.util.spec_from_file_location("isal_demo_cfg", DEMO)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    cfg.update_from_flattened_dict({**FAST, **flat})
    return cfg


def _argv(workdir, flat):
    args = [sys.executable, "-m", "isal_jax.select", f"--config={DEMO}", f"--workdir={workdir}"]
    for k, v in {**FAST, **flat}.items():
        args.append(f"--config.{k}={v}")
    return args


def _run(args, timeout=120, fault=""):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "EZSD_FAULT": fault})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from isal_jax.data import load_digits
    from isal_jax.models import get_model
    from isal_jax.tasks import (ClassificationTask, save_classifier_checkpoint,
                                train_tiny_classifier)
    d = tmp_path_factory.mktemp("isal_cli")
    data = load_digits("train")
    rng = np.random.default_rng(0)
    labeled = np.sort(rng.choice(data.ids, 80, replace=False))
    pool_ids = np.sort(rng.choice(data.ids, 720, replace=False))   # overlaps labeled a bit
    (d / "labeled.json").write_text(json.dumps(labeled.tolist()))
    (d / "pool.json").write_text(json.dumps(pool_ids.tolist()))
    task = ClassificationTask(get_model("mlp", features=(16,)))
    b = data.get(labeled)
    state = train_tiny_classifier(task, b["image"], b["label"], steps=60)
    save_classifier_checkpoint(str(d / "ckpt"), state)
    flat = {"labeled_ids_file": str(d / "labeled.json"), "pool.ids_file": str(d / "pool.json"),
            "checkpoint_dir": str(d / "ckpt")}
    expected_pool = np.setdiff1d(pool_ids, labeled)
    return d, flat, labeled, expected_pool, state


@pytest.mark.slow  # killed + resumed CLI runs
def test_isal_kill_and_resume_equals_uninterrupted(setup):
    from isal_jax.select import run_selection
    d, flat, labeled, pool, _ = setup
    path_a = run_selection(_cfg(**flat), str(d / "A"))
    a = json.loads(Path(path_a).read_text())
    n_shards = -(-len(pool) // 192)
    assert n_shards >= 3

    wd = d / "B"
    killed = _run(_argv(wd, flat), fault="kill_after_shard=1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    sdir = wd / "isal_scores"
    assert (sdir / "shard_00000.npz").exists() and (sdir / "shard_00001.npz").exists()
    assert not (sdir / "shard_00002.npz").exists()
    assert not (wd / "selection_isal.json").exists()
    assert not [p for p in os.listdir(sdir) if ".tmp" in p]
    mtimes = {i: os.stat(sdir / f"shard_{i:05d}.npz").st_mtime_ns for i in (0, 1)}

    resumed = _run(_argv(wd, flat))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume: 2 of {n_shards} score shards already done" in resumed.stdout
    assert "resume: loaded s_test" in resumed.stdout
    assert resumed.stdout.strip().splitlines()[-1] == str(wd / "selection_isal.json")
    for i, t in mtimes.items():          # finished shards were not recomputed
        assert os.stat(sdir / f"shard_{i:05d}.npz").st_mtime_ns == t
    b = json.loads((wd / "selection_isal.json").read_text())

    assert b["strategy"] == a["strategy"] == "isal" and b["budget"] == a["budget"] == 40
    assert [s["id"] for s in b["selected"]] == [s["id"] for s in a["selected"]]
    np.testing.assert_allclose([s["score"] for s in b["selected"]],
                               [s["score"] for s in a["selected"]], rtol=1e-6)
    assert b["lissa"]["nan_resets"] == a["lissa"]["nan_resets"]
    np.testing.assert_allclose(b["lissa"]["norm_trace"], a["lissa"]["norm_trace"], rtol=1e-6)
    # the selection is a valid top-k of the pool
    ids = [s["id"] for s in a["selected"]]
    scores = [s["score"] for s in a["selected"]]
    assert len(set(ids)) == 40 and set(ids) <= set(pool.tolist())
    assert not set(ids) & set(labeled.tolist())
    assert scores == sorted(scores)
    assert a["settings"]["influence"]["damp"] == 0.01 and a["lissa"]["depth"] == 30
    assert a["settings"]["resolved"]["pool_size"] == len(pool)


def _numpy_mlp(params, x):
    """The tiny MLP's forward pass in numpy (an independent reference): logits, features."""
    p = params
    h = np.maximum(x.reshape(len(x), -1) @ np.asarray(p["Dense_0"]["kernel"])
                   + np.asarray(p["Dense_0"]["bias"]), 0.0)
    return h @ np.asarray(p["Dense_1"]["kernel"]) + np.asarray(p["Dense_1"]["bias"]), h


def _kcenter(x, lab, budget):
    d = ((x[:, None] - lab[None]) ** 2).sum(-1).min(1)
    out = []
    for _ in range(budget):
        j = int(np.argmax(d))
        out.append(j)
        d = np.minimum(d, ((x - x[j]) ** 2).sum(-1))
        d[j] = -np.inf
    return out


@pytest.mark.parametrize("strategy", ["entropy", "coreset", "random", "margin"])
def test_baseline_strategies(setup, strategy):
    """The CLI's selection = the ranking a numpy re-implementation of the model and the
    strategy gives (the known answer), not just some valid ids."""
    from isal_jax.data import load_digits
    from isal_jax.select import run_selection
    d, flat, labeled, pool, state = setup
    path = run_selection(_cfg(**flat, strategy=strategy), str(d / f"S_{strategy}"))
    out = json.loads(Path(path).read_text())
    assert path.endswith(f"selection_{strategy}.json") and out["lissa"] == {}
    ids = [s["id"] for s in out["selected"]]
    data = load_digits("train")
    logits, feats = _numpy_mlp(state["params"], data.get(pool)["image"].astype(np.float64))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    if strategy == "entropy":
        want = pool[np.lexsort((pool, (p * np.log(p)).sum(1)))[:40]]
    elif strategy == "margin":
        top2 = -np.sort(-p, 1)[:, :2]
        want = pool[np.lexsort((pool, top2[:, 0] - top2[:, 1]))[:40]]
    elif strategy == "random":
        u = [np.random.default_rng([0, int(i)]).random() for i in pool]
        want = pool[np.argsort(u)[:40]]
    else:
        _, lab = _numpy_mlp(state["params"], data.get(labeled)["image"].astype(np.float64))
        want = pool[_kcenter(feats, lab, 40)]
    if strategy in ("entropy", "margin"):   # float32 vs float64: equal up to near-ties
        assert len(set(ids) & set(want.tolist())) >= 38 and ids[:10] == want[:10].tolist()
    else:
        assert ids == want.tolist()


def test_bad_inputs(setup, monkeypatch):
    from isal_jax.select import SelectError, run_selection
    d, flat, labeled, pool, state = setup
    w = str(d / "bad")
    (d / "bad_labeled.json").write_text(json.dumps(labeled.tolist()[:5] + [99999]))
    with pytest.raises(SelectError, match=r"labeled_ids_file.*not in digits/train.*99999"):
        run_selection(_cfg(**{**flat, "labeled_ids_file": str(d / "bad_labeled.json")}), w)
    (d / "bad_pool.json").write_text(json.dumps([1, 2, -4]))
    with pytest.raises(SelectError, match=r"pool.ids_file.*-4"):
        run_selection(_cfg(**{**flat, "pool.ids_file": str(d / "bad_pool.json")}), w)
    (d / "notalist.json").write_text('{"a": 1}')
    with pytest.raises(SelectError, match="JSON list of integer ids"):
        run_selection(_cfg(**{**flat, "labeled_ids_file": str(d / "notalist.json")}), w)
    with pytest.raises(SelectError, match="does not exist"):   # even with the demo flag
        run_selection(_cfg(**{**flat, "labeled_ids_file": str(d / "missing.json"),
                              "init_checkpoint_if_missing": True}), w)
    assert not (d / "missing.json").exists()
    with pytest.raises(SelectError, match="diversity='dpp' is not one of"):
        run_selection(_cfg(**flat, **{"influence.diversity": "dpp"}), w)
    with pytest.raises(SelectError, match=r"budget=5000 is larger than the pool \(\d+"):
        run_selection(_cfg(**flat, budget=5000), w)
    with pytest.raises(SelectError, match="does not match"):
        run_selection(_cfg(**flat, **{"model.features": (32,)}), w)
    # a mistyped checkpoint path is an error even with init_checkpoint_if_missing=True:
    # no demo model is trained into it
    with pytest.raises(SelectError, match="checkpoint_dir: .*empty_ckpt' does not exist"):
        run_selection(_cfg(**{**flat, "checkpoint_dir": str(d / "empty_ckpt"),
                              "init_checkpoint_if_missing": True}), w)
    assert not (d / "empty_ckpt").exists()
    with pytest.raises(SelectError, match="strategy='bald' is not one of"):
        run_selection(_cfg(**flat, strategy="bald"), w)
    with pytest.raises(SelectError, match="(?s)cifar10: no prepared dataset.*tfds build cifar10"):
        run_selection(_cfg(**{**flat, "pool.dataset": "cifar10", "model.name": "resnet18",
                              "pool.data_dir": str(d / "no_tfds")}), w)

    # NaN influence scores -> a clear error naming the shard and ids (nothing written)
    import isal_jax.influence as infl
    real = infl.pool_scores

    def nan_scores(*a, **k):
        s = real(*a, **k)
        s[3] = np.nan
        return s
    monkeypatch.setattr(infl, "pool_scores", nan_scores)
    with pytest.raises(SelectError, match=r"NaN/inf for 1 pool samples of shard 0 \(e.g. ids"):
        run_selection(_cfg(**flat), str(d / "nan"))
    assert not (d / "nan" / "isal_scores" / "shard_00000.npz").exists()
    monkeypatch.setattr(infl, "pool_scores", real)

    # a checkpoint whose weights are NaN -> s_test is NaN -> clear error
    import jax
    from isal_jax.tasks import save_classifier_checkpoint
    bad = jax.tree_util.tree_map(lambda x: x * np.nan, state)
    save_classifier_checkpoint(str(d / "nan_ckpt"), bad)
    with pytest.raises(SelectError, match="s_test is NaN/inf.*LiSSA settings"):
        run_selection(_cfg(**{**flat, "checkpoint_dir": str(d / "nan_ckpt")}), str(d / "nan2"))
    # ... and the baselines name the model's outputs as the cause
    with pytest.raises(SelectError, match="model's softmax probabilities are NaN/inf"):
        run_selection(_cfg(**{**flat, "checkpoint_dir": str(d / "nan_ckpt"),
                              "strategy": "entropy"}), str(d / "nan3"))
    with pytest.raises(SelectError, match="model's penultimate features \\(pool\\) are NaN"):
        run_selection(_cfg(**{**flat, "checkpoint_dir": str(d / "nan_ckpt"),
                              "strategy": "coreset"}), str(d / "nan3"))
    # a diverged but finite model (every weight 0): constant outputs, all-zero ISAL scores
    zero = jax.tree_util.tree_map(np.zeros_like, state)
    save_classifier_checkpoint(str(d / "zero_ckpt"), zero)
    zflat = {**flat, "checkpoint_dir": str(d / "zero_ckpt")}
    for strategy, what in [("margin", "softmax probabilities"),
                           ("coreset", "penultimate features"),
                           ("isal", "influence scores")]:
        with pytest.raises(SelectError, match=f"model's {what}.* are the same for all"):
            run_selection(_cfg(**zflat, strategy=strategy), str(d / f"zero_{strategy}"))
    # unless the user allows it (then ties go to the smallest ids, as documented)
    out = json.loads(Path(run_selection(_cfg(**zflat, strategy="margin", allow_degenerate=True),
                                        str(d / "zero_ok"))).read_text())
    assert [s["id"] for s in out["selected"]] == pool[:40].tolist()
    # a LiSSA whose residual does not reach max_residual is stopped, naming LiSSA's settings
    with pytest.raises(SelectError, match="LiSSA did not converge by its own residual"):
        run_selection(_cfg(**flat, **{"influence.max_residual": 1e-9}), str(d / "res"))


def test_cli_help_and_flag_errors(setup, tmp_path):
    h = _run([sys.executable, "-m", "isal_jax.select", "--help"])
    # absl's --help exits with status 1 by design; it must print the usage, not crash
    assert h.returncode in (0, 1) and "Traceback" not in h.stderr
    assert "--workdir" in h.stdout and "--config" in h.stdout and "selection_" in h.stdout
    bad = _run([sys.executable, "-m", "isal_jax.select", f"--config={DEMO}",
                f"--workdir={tmp_path}", "--config.influence.dampp=0.1"])
    assert bad.returncode == 2
    assert "unknown config field 'influence.dampp'" in bad.stderr and "'damp'" in bad.stderr
    assert "Traceback" not in bad.stderr
