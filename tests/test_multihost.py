"""Multi-host check: two real processes (jax.distributed over 127.0.0.1, gloo CPU
collectives, fake CPU devices) run `python -m ezsd_jax.main` and must agree with one
process that has the same total device count and global batch.

(a) toy: sharded train steps, a checkpoint, a resumed second run (restore across
    processes) -> final loss / parameter checksum equal a single-process run.
(b) synthetic detection: synth_data -> train -> eval; the eval gathers detections from
    both processes: every val image (an odd count, so one process's last batch is padding)
    is evaluated once, and detections/metrics match a single-process run.

Equality is up to float round-off, not bitwise: the gradient all-reduce across processes
(gloo) sums in a different order than XLA's in-process all-reduce, which moves the
parameters in the last bits (seen: toy checksum 3e-8 relative, detector losses 1e-7).
Inference itself is per image on one device, so the eval adds no further difference,
but rounded detection scores can swap order at ties, hence the per-image comparisons
of sorted scores. Runs take ~1.5-2 min in total on 2 CPU cores (XLA backend
optimization is turned off to cut compile time; both sides of each comparison use the
same flags).
"""
from __future__ import annotations

import collections
import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=(f"--xla_force_host_platform_device_count={devices} "
                   "--xla_backend_optimization_level=0"),
        # gloo is jax 0.10.2's default for cross-process CPU collectives; explicit here.
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    env.pop("EZSD_DISTRIBUTED", None)
    return env


def _main_cmd(config: str, workdir: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "ezsd_jax.main", f"--config={ROOT / config}",
            f"--workdir={workdir}", *args]


def _launch(cmds: list[list[str]], envs: list[dict], logs: list[Path]) -> list[str]:
    """Starts all commands at once; fails (killing the rest) as soon as one fails, so a
    crashed peer does not leave the other waiting at a barrier until the timeout."""
    procs, files = [], []
    for cmd, env, log in zip(cmds, envs, logs):
        f = open(log, "w")
        files.append(f)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f,
                                      stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if bad:
                failed = f"process {bad[0]} exited with {procs[bad[0]].returncode}"
                break
            if time.monotonic() > deadline:
                failed = f"timed out after {TIMEOUT_S} s"
                break
            time.sleep(0.2)
        if failed is None:
            bad = [i for i, p in enumerate(procs) if p.returncode != 0]
            if bad:
                failed = f"process {bad[0]} exited with {procs[bad[0]].returncode}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()
    outs = [log.read_text() for log in logs]
    if failed:
        tails = "\n".join(f"--- {log.name} (last 3000 chars) ---\n{o[-3000:]}"
                          for log, o in zip(logs, outs))
        pytest.fail(f"{failed}: {' '.join(cmds[0][:5])} ...\n{tails}")
    return outs


def run_single(config: str, workdir: Path, args: list[str], devices: int) -> str:
    return _launch([_main_cmd(config, workdir, args)], [_env(devices)],
                   [workdir.parent / f"{workdir.name}.log"])[0]


def run_multi(config: str, workdir: Path, args: list[str], processes: int = 2,
              devices_per_process: int = 2) -> list[str]:
    port = _free_port()
    cmds = [_main_cmd(config, workdir, args + [
        "--config.distributed.enabled=True",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        f"--config.distributed.num_processes={processes}",
        f"--config.distributed.process_id={i}"]) for i in range(processes)]
    logs = [workdir.parent / f"{workdir.name}.p{i}.log" for i in range(processes)]
    return _launch(cmds, [_env(devices_per_process)] * processes, logs)


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- (a) toy ---------------------------------------------------------------------------

TOY_ARGS = ["--config.toy.ckpt_every=3", "--config.toy.log_every=1"]


@pytest.mark.slow
def test_toy_two_processes_match_single_process_with_checkpoint_resume(tmp_path):
    single = tmp_path / "toy_single"
    run_single("configs/toy.py", single, TOY_ARGS + ["--config.toy.steps=6"], devices=4)
    ref = json.loads((single / "toy_result.json").read_text())

    multi = tmp_path / "toy_multi"
    # 3 steps (checkpoint at 3), then a second launch to 6 that restores it on both.
    run_multi("configs/toy.py", multi, TOY_ARGS + ["--config.toy.steps=3"])
    outs = run_multi("configs/toy.py", multi, TOY_ARGS + ["--config.toy.steps=6"])
    for i, out in enumerate(outs):
        assert "resumed from checkpoint at step 3" in out, f"process {i} did not resume"
    results = [json.loads(line) for out in outs for line in out.splitlines()
               if line.startswith('{"final_loss"')]
    assert len(results) == 2 and results[0] == results[1], results  # replicated state
    got = json.loads((multi / "toy_result.json").read_text())
    assert got["steps"] == ref["steps"] == 6
    np.testing.assert_allclose(got["final_loss"], ref["final_loss"], rtol=1e-6)
    np.testing.assert_allclose(got["param_checksum"], ref["param_checksum"], rtol=1e-6)

    # Checkpoint steps written once, by both processes together; metrics by process 0
    # only (each step exactly once, the second run's rows after the first run's).
    steps = sorted(int(p.name) for p in (multi / "ckpt_toy").iterdir() if p.name.isdigit())
    assert steps[-1] == 6 and 3 in steps, steps
    rows = _csv_rows(multi / "metrics" / "toy.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    ref_rows = _csv_rows(single / "metrics" / "toy.csv")
    np.testing.assert_allclose([float(r["loss"]) for r in rows],
                               [float(r["loss"]) for r in ref_rows], rtol=1e-6)


# ---- (b) synthetic detection -------------------------------------------------------------

DET_ARGS = [
    "--config.synth.train_images=32", "--config.synth.val_images=15",
    "--config.synth.image_hw_range=((48,64),(48,64))", "--config.synth.object_size=(12,28)",
    "--config.model.image_size=(64,64)", "--config.data.short_side=64",
    "--config.data.max_side=64", "--config.data.num_threads=1",
    "--config.train.steps=4", "--config.train.batch_size=4", "--config.train.warmup_steps=2",
    "--config.train.log_every=1", "--config.train.ckpt_every=4", "--config.eval.batch_size=4",
]


def _detections_by_image(workdir: Path) -> dict[int, list[dict]]:
    by = collections.defaultdict(list)
    for r in json.loads((workdir / "eval" / "eval_detections.json").read_text()):
        by[r["image_id"]].append(r)
    return by


@pytest.mark.slow
def test_detection_two_processes_train_and_eval_match_single_process(tmp_path):
    multi = tmp_path / "det_multi"
    outs = run_multi("configs/synthetic_detection.py", multi, DET_ARGS)
    single = tmp_path / "det_single"
    run_single("configs/synthetic_detection.py", single, DET_ARGS, devices=4)

    # Only process 0 reports and writes the eval outputs.
    assert '[eval] {"all"' in outs[0] and '[eval] {"all"' not in outs[1]
    val = json.loads((multi / "synthetic" / "annotations" / "instances_val.json").read_text())
    val_ids = sorted(im["id"] for im in val["images"])
    assert len(val_ids) == 15

    m = json.loads((multi / "eval" / "eval_metrics.json").read_text())
    s = json.loads((single / "eval" / "eval_metrics.json").read_text())
    assert m["num_images"] == s["num_images"] == 15
    assert m["num_detections"] == s["num_detections"] > 0
    for k, v in s["all"].items():
        np.testing.assert_allclose(m["all"][k], v, atol=1e-3, err_msg=k)

    # The gathered detections cover every val image exactly as the single run does:
    # same images, same count per image, same (sorted) scores up to round-off.
    dm, ds = _detections_by_image(multi), _detections_by_image(single)
    assert sorted(dm) == sorted(ds) == val_ids
    for img in val_ids:
        sm = sorted((r["score"] for r in dm[img]), reverse=True)
        ss = sorted((r["score"] for r in ds[img]), reverse=True)
        assert len(sm) == len(ss), img
        np.testing.assert_allclose(sm, ss, atol=1e-4, err_msg=f"image {img}")

    # Training saw the same global batches: per-step losses agree.
    lm = _csv_rows(multi / "metrics" / "detector.csv")
    ls = _csv_rows(single / "metrics" / "detector.csv")
    assert [r["step"] for r in lm] == [r["step"] for r in ls] == ["1", "2", "3", "4"]
    for key in ("loss", "rpn_cls", "box_cls", "grad_norm"):
        np.testing.assert_allclose([float(r[key]) for r in lm], [float(r[key]) for r in ls],
                                   rtol=1e-4, err_msg=key)
