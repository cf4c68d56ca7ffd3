"""End-to-end tests of the active-learning loop (isal_jax/loop.py + classification_al.py) on
digits with a reduced config: a whole run writes the per-cycle layout, results.csv, the
plot and the savings; a real process SIGKILLed in the middle of a cycle's training resumes
at that cycle (finished cycles untouched, the half-trained one from its checkpoint) and
ends with the same results.csv as the uninterrupted run; bad settings -> clear errors."""
import csv
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
CONFIG = ROOT / "configs" / "isal_digits.py"

# 2 strategies x 1 seed x 2 cycles, a tiny MLP (fast to compile), 30 training steps,
# short LiSSA. The CNN of the real config takes the same code path.
SMALL = {"al.strategies": ("random", "isal"), "al.seeds": (0,), "al.initial": 20,
         "al.budget": 20, "al.cycles": 2, "model.name": "mlp", "model.features": (16,),
         "train.steps": 30, "train.ckpt_every": 10,
         "train.log_every": 10, "influence.depth": 20, "influence.repeats": 2,
         "influence.residual_batches": 2, "influence.pool_batch_size": 256,
         "influence.shard_size": 512, "influence.solver": "lissa",
         "influence.damp_mode": "fixed", "influence.diversity": "none"}


def _cfg(**flat):
    spec = importlib.util.spec_from_file_location("isal_digits_cfg", CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    cfg.update_from_flattened_dict({**SMALL, **flat})
    return cfg


def _argv(workdir, flat):
    args = [sys.executable, "-m", "isal_jax.main", f"--config={CONFIG}", f"--workdir={workdir}"]
    for k, v in {**SMALL, **flat}.items():
        args.append(f"--config.{k}={v}")
    return args


def _run(args, timeout=240, fault=""):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "EZSD_FAULT": fault})


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run, in-process."""
    from isal_jax.classification_al import build_task
    from isal_jax.loop import run_experiment
    wd = tmp_path_factory.mktemp("al_ref")
    cfg = _cfg()
    path = run_experiment(build_task(cfg, str(wd)), cfg.al, str(wd))
    return wd, Path(path)


def test_loop_end_to_end(reference_run):
    from isal_jax.data import load_digits
    wd, csv_path = reference_run
    al = wd / "al"
    assert csv_path == al / "results.csv"
    rows = _csv(csv_path)
    assert list(rows[0])[:5] == ["strategy", "seed", "cycle", "num_labeled", "accuracy"]
    assert "loss" in rows[0]
    assert [(r["strategy"], r["cycle"], r["num_labeled"]) for r in rows] == [
        (s, str(c), str(20 + 20 * c)) for s in ("random", "isal") for c in range(2)]
    # same seed -> same initial set and the same cycle-0 model for every strategy
    assert rows[0]["accuracy"] == rows[2]["accuracy"] and rows[0]["loss"] == rows[2]["loss"]
    acc = [float(r["accuracy"]) for r in rows]
    assert all(0.1 < a <= 1.0 for a in acc)
    pool = set(load_digits("train").ids.tolist())
    init = None
    for s in ("random", "isal"):
        labeled_prev, sel_prev = None, None
        for c in range(2):
            cdir = al / s / "seed_0" / f"cycle_{c}"
            for name in ("labeled_ids.json", "eval.json", "selection.json", "done.json"):
                assert (cdir / name).exists(), cdir / name
            assert (cdir / "ckpt_train" / "30").is_dir()
            assert (cdir / "metrics" / "train.csv").exists()
            lab = json.loads((cdir / "labeled_ids.json").read_text())
            sel = json.loads((cdir / "selection.json").read_text())
            assert len(lab) == 20 + 20 * c and set(lab) <= pool and lab == sorted(lab)
            assert len(sel["ids"]) == 20 and not set(sel["ids"]) & set(lab)
            assert set(sel["ids"]) <= pool
            if c == 0:
                init = lab if init is None else init
                assert lab == init
            else:
                assert set(lab) == set(labeled_prev) | set(sel_prev)
            labeled_prev, sel_prev = lab, sel["ids"]
            done = json.loads((cdir / "done.json").read_text())
            assert done["num_labeled"] == len(lab)
            assert set(done["timings"]) == {"train_s", "eval_s", "select_s"}
            if s == "isal":
                assert sel["scores"] == sorted(sel["scores"])     # most negative first
                lissa = json.loads((cdir / "lissa.json").read_text())
                assert lissa["depth"] == 20 and lissa["nan_resets_total"] == 0
                assert (cdir / "isal_scores" / "s_test.npz").exists()
    # reports
    assert (al / "curves.png").read_bytes()[:4] == b"\x89PNG"
    sav = _csv(al / "savings.csv")
    assert {(r["strategy"], r["num_labeled"]) for r in sav} == {("isal", "40")}
    js = json.loads((al / "savings.json").read_text())
    assert js["metric"] == "accuracy" and set(js["summary"]) == {"isal"}
    assert len(_csv(al / "timings.csv")) == 4
    exp = json.loads((al / "experiment.json").read_text())
    assert exp["initial"] == 20 and exp["budget"] == 20 and exp["pool_size"] == len(pool)


@pytest.mark.slow  # a killed and a resumed subprocess
def test_kill_mid_training_resumes_at_that_cycle(reference_run, tmp_path):
    ref_wd, ref_csv = reference_run
    wd = tmp_path / "run"
    al = wd / "al" / "random" / "seed_0"
    # SIGKILL after step 20 (a checkpoint step) of the 2nd training of the process:
    # random, seed 0, cycle 1.
    killed = _run(_argv(wd, {}), fault="kill_at_step=20,kill_at_fit_run=1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (al / "cycle_0" / "done.json").exists()
    assert not (al / "cycle_1" / "done.json").exists()
    assert (al / "cycle_1" / "ckpt_train" / "20").is_dir()
    assert not (al / "cycle_1" / "ckpt_train" / "30").exists()
    assert len(_csv(wd / "al" / "results.csv")) == 1
    stamp = {p: os.stat(al / "cycle_0" / p).st_mtime_ns
             for p in ("done.json", "selection.json", "eval.json", "labeled_ids.json")}
    ck0 = sorted(os.listdir(al / "cycle_0" / "ckpt_train"))

    resumed = _run(_argv(wd, {}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout
    assert "1/4 cycles already done" in out
    assert "random seed 0 cycle 0: done" in out                # skipped, not retrained
    assert "random seed 0 cycle 0: training" not in out
    assert "[train] resumed from checkpoint at step 20" in out  # cycle 1, mid-training
    assert out.count("resumed from checkpoint") == 1
    for p, t in stamp.items():
        assert os.stat(al / "cycle_0" / p).st_mtime_ns == t, p
    assert sorted(os.listdir(al / "cycle_0" / "ckpt_train")) == ck0
    assert out.strip().splitlines()[-1] == str(wd / "al" / "results.csv")
    # identical results (and selections) to the uninterrupted in-process run
    assert (wd / "al" / "results.csv").read_text() == ref_csv.read_text()
    for s in ("random", "isal"):
        for c in range(2):
            rel = Path("al") / s / "seed_0" / f"cycle_{c}" / "selection.json"
            assert json.loads((wd / rel).read_text())["ids"] == \
                json.loads((ref_wd / rel).read_text())["ids"]

    again = _run(_argv(wd, {}))                           # everything done: no work
    assert again.returncode == 0 and "4/4 cycles already done" in again.stdout
    assert "[train]" not in again.stdout


def test_bad_settings_are_clear_errors(reference_run, tmp_path):
    from isal_jax.classification_al import build_task
    from isal_jax.loop import LoopError, run_experiment
    ref_wd, _ = reference_run
    cfg = _cfg()
    task = build_task(cfg, str(tmp_path))
    al = cfg.al

    def run(**kw):
        c = al.copy_and_resolve_references()
        c.update(kw)
        return run_experiment(task, c, str(tmp_path / "x"))
    with pytest.raises(LoopError, match="pool has only 1437"):
        run(initial=1000, budget=200, cycles=4)
    with pytest.raises(LoopError, match=r"\['bald'\] not known to this task"):
        run(strategies=("random", "bald"))
    with pytest.raises(LoopError, match="seeds lists a seed twice"):
        run(seeds=(0, 0))
    with pytest.raises(LoopError, match="must all be >= 1"):
        run(budget=0)
    # a workdir written with other settings is refused (nothing is mixed)
    c = al.copy_and_resolve_references()
    c.budget = 25
    with pytest.raises(LoopError, match="written with other settings.*budget"):
        run_experiment(task, c, str(ref_wd))
    r = _run(_argv(tmp_path / "cli", {"data.dataset": "cifar10", "model.name": "resnet18",
                                      "data.data_dir": str(tmp_path / "none")}))
    assert r.returncode == 2 and "cifar10: no prepared dataset" in r.stderr
    assert "Traceback" not in r.stderr


def test_augment_flip_and_crop_against_numpy(rng):
    from isal_jax.classification_al import augment
    for b, h, w, pad in [(7, 8, 8, 1), (5, 32, 32, 4), (3, 6, 10, 2)]:
        x = rng.normal(size=(b, h, w, 3)).astype(np.float32)
        assert augment(x, np.random.default_rng(0), "none", pad) is x
        out = augment(x, np.random.default_rng(1), "flip_crop", pad)
        assert out.shape == x.shape
        xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        for i in range(b):      # each output is some crop of the padded (maybe flipped) input
            cands = [src[i, oy:oy + h, ox:ox + w] for src in (xp, xp[:, :, ::-1])
                     for oy in range(2 * pad + 1) for ox in range(2 * pad + 1)]
            assert any(np.array_equal(out[i], c) for c in cands)
        flips = augment(np.repeat(x[:1], 200, 0), np.random.default_rng(2), "flip", pad)
        n_flipped = sum(np.array_equal(f, x[0, :, ::-1]) for f in flips)
        assert 60 < n_flipped < 140
    with pytest.raises(ValueError, match="augment='mixup'"):
        augment(x, np.random.default_rng(0), "mixup", 1)


def test_schedule_and_batch_stream():
    """CIFAR protocol arithmetic (200 epochs, decay at epoch 160) and the sample stream:
    every labeled sample once per epoch, batches a pure function of (seed, step)."""
    from isal_jax.classification_al import ClassificationALTask
    task = ClassificationALTask(_cfg(**{"train.steps": 0, "train.epochs": 200.0,
                                        "train.batch_size": 128}))
    assert task.num_steps(1000) == (1563, [1250])          # 1250 * 128 / 1000 = 160 epochs
    assert task.num_steps(10000) == (15625, [12500])
    task = ClassificationALTask(_cfg(**{"train.batch_size": 8, "train.augment": "none"}))
    n = 12
    images = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((n, 8, 8, 1),
                                                                              np.float32)
    gen = task._batches(images, np.arange(n, dtype=np.int32), seed=3)
    it = gen(0)
    seen = np.concatenate([next(it)["label"] for _ in range(6)])     # 48 = 4 epochs
    for e in range(4):
        assert sorted(seen[e * n:(e + 1) * n].tolist()) == list(range(n))
    b4 = next(gen(4))
    np.testing.assert_array_equal(b4["label"], seen[32:40])           # resumable stream
    np.testing.assert_array_equal(b4["image"][:, 0, 0, 0], seen[32:40].astype(np.float32))
