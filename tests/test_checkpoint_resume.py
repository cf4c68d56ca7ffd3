"""Checkpoint/resume: a real process SIGKILLed (after a save, or during one) resumes to
the identical final state an uninterrupted run reaches."""
import json
import os
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from ezsd_jax.core.checkpoint import CheckpointError, Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, *extra, fault=""):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", EZSD_FAULT=fault)
    cmd = [sys.executable, "-m", "ezsd_jax.main", "--config=configs/toy.py",
           f"--workdir={workdir}", "--config.toy.steps=120", "--config.toy.ckpt_every=20",
           "--config.toy.log_every=10", "--config.mesh.model=2", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _result(workdir):
    with open(os.path.join(workdir, "toy_result.json")) as f:
        return json.load(f)


def _losses(workdir):
    import csv
    with open(os.path.join(workdir, "metrics", "toy.csv")) as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def _steps(workdir):
    import csv
    with open(os.path.join(workdir, "metrics", "toy.csv")) as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(tmp_path):
    ref = tmp_path / "ref"
    r = _run(ref)
    assert r.returncode == 0, r.stderr[-2000:]

    # 1) killed after step 70, which it logged, 10 steps past its last checkpoint (60)
    a = tmp_path / "a"
    r = _run(a, fault="kill_at_step=70")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (a / "toy_result.json").exists()
    assert max(_steps(a)) == 70
    r = _run(a)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from checkpoint at step 60" in r.stdout
    assert _result(a) == _result(ref)
    # the metrics read like the uninterrupted run's: step 70 once, the same losses
    assert _steps(a) == _steps(ref) == list(range(10, 121, 10))
    assert _losses(a) == _losses(ref)

    # 2) killed while the checkpoint of step 80 was being written: the previous
    # checkpoint (60) or the completed 80 must restore, never a corrupt one.
    b = tmp_path / "b"
    r = _run(b, fault="kill_at_step=80,kill_during_save=1")
    assert r.returncode == -signal.SIGKILL
    r = _run(b)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("resumed from checkpoint at step 60" in r.stdout
            or "resumed from checkpoint at step 80" in r.stdout), r.stdout[-1000:]
    assert _result(b) == _result(ref)
    assert _steps(b) == _steps(ref) and _losses(b) == _losses(ref)


def test_restore_mismatch_is_clear(tmp_path):
    ck = Checkpointer(str(tmp_path / "c"), save_every=1, keep=2)
    ck.save(1, {"w": jnp.ones((3, 4))}, force=True)
    ck.wait()
    restored, step = ck.restore_or({"w": jnp.zeros((3, 4))})
    assert step == 1 and np.all(np.asarray(restored["w"]) == 1)
    # a shape mismatch names the array and both shapes (from the metadata, before orbax
    # reads anything); a structure mismatch is orbax's own error, wrapped
    with pytest.raises(CheckpointError, match=r"does not match.*: w is \(3, 4\) there, "
                                              r"\(5, 4\) here"):
        ck.restore(1, {"w": jnp.zeros((5, 4))})
    with pytest.raises(CheckpointError, match="does not match"):
        ck.restore(1, {"w": jnp.zeros((3, 4)), "b": jnp.zeros(2)})
    ck.close()


def test_unwritable_checkpoint_dir(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="cannot create"):
        Checkpointer(str(f / "sub"))


def test_error_inside_fit_closes_its_checkpointer(tmp_path, monkeypatch):
    """An error raised mid-training (here a bad image at step 3) leaves no orbax manager
    open, so nothing of orbax's runs on after the entry point's one-line error."""
    from ezsd_jax.core import train_loop
    from ezsd_jax.core.errors import DataError
    made = []

    class Spy(Checkpointer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)
    monkeypatch.setattr(train_loop, "Checkpointer", Spy)

    def batches(start):
        for step in range(start + 1, 100):
            if step == 3:
                raise DataError("x.jpg: cannot decode image")
            yield {"x": np.ones(2, np.float32)}

    def step_fn(state, batch):
        return {"w": state["w"] + batch["x"].sum()}, {"loss": state["w"]}

    with pytest.raises(DataError, match="x.jpg"):
        train_loop.fit(state={"w": jnp.zeros(())}, step_fn=step_fn, batches=batches,
                       num_steps=10, workdir=str(tmp_path), name="t", ckpt_every=2,
                       log_every=1)
    assert len(made) == 1 and made[0]._closed
    ck = Checkpointer(str(tmp_path / "ckpt_t"))
    assert ck.latest_step() == 2  # the step-2 checkpoint was written and completed
    ck.close()
