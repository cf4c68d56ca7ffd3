"""A run's checkpoints and config are safe from readers, re-runs, divergence, preemption
and a full disk: readers open checkpoints read-only (a writer's in-flight temporary step
survives; a read-only directory loads), config.json changes that alter the model or data
are refused on resume, no non-finite state is ever saved, SIGTERM saves and stops (and
the resumed run equals an uninterrupted one), ENOSPC is one line."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from ezsd_jax.core import cli, train_loop
from ezsd_jax.core.checkpoint import CheckpointError, Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- readers

def _tmp_step(directory: str) -> str:
    """A writer's in-flight step, as orbax names it while a save is running."""
    tmp = os.path.join(directory, "9.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(tmp, "default"))
    return tmp


def test_reader_leaves_a_writers_temporary_step_alone(tmp_path):
    d = str(tmp_path / "ckpt")
    with Checkpointer(d) as ck:
        ck.save(3, {"w": jnp.arange(4.0)}, force=True)
    tmp = _tmp_step(d)
    with Checkpointer(d, read_only=True) as ck:
        assert ck.latest_step() == 3
        out = ck.restore(3, {"w": jnp.zeros(4)})
        with pytest.raises(CheckpointError, match="read-only"):
            ck.save(4, out, force=True)
    np.testing.assert_array_equal(np.asarray(out["w"]), np.arange(4.0))
    assert os.path.isdir(tmp)                     # the writer's save in flight survives
    assert sorted(os.listdir(d)) == sorted(["3", os.path.basename(tmp)])
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        Checkpointer(str(tmp_path / "none"), read_only=True)
    assert not (tmp_path / "none").exists()       # a reader creates nothing


def _can_mount_read_only() -> str | None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return "needs root and unshare for a read-only bind mount"
    p = subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind / /mnt 2>/dev/null "
                        "&& echo ok"], capture_output=True, text=True)
    return None if "ok" in p.stdout else "mount namespaces not available here"


@pytest.mark.skipif(_can_mount_read_only() is not None, reason=str(_can_mount_read_only()))
def test_checkpoint_loads_from_a_read_only_mount(tmp_path):
    """chmod proves nothing as root: the directory is bind-mounted read-only."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    ro.mkdir()
    with Checkpointer(str(src / "ckpt")) as ck:
        ck.save(5, {"w": jnp.arange(3.0)}, force=True)
    _tmp_step(str(src / "ckpt"))
    code = ("import jax.numpy as jnp, numpy as np;"
            "from ezsd_jax.core.checkpoint import Checkpointer;"
            f"ck = Checkpointer('{ro}/ckpt', read_only=True);"
            "out = ck.restore(ck.latest_step(), {'w': jnp.zeros(3)}); ck.close();"
            "assert np.asarray(out['w']).tolist() == [0.0, 1.0, 2.0]; print('LOADED')")
    script = (f"mount --bind {src} {ro} && mount -o remount,bind,ro {ro} && "
              f"touch {ro}/probe 2>/dev/null && echo WRITABLE; "
              f"{sys.executable} -c \"{code}\"")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    p = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                       text=True, env=env, timeout=120)
    assert "WRITABLE" not in p.stdout
    assert "LOADED" in p.stdout, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_damaged_checkpoint_names_step_key_and_fix(tmp_path):
    with Checkpointer(str(tmp_path / "c")) as ck:
        ck.save(7, {"w": jnp.ones(2), "b": jnp.ones(3)}, force=True)
    with Checkpointer(str(tmp_path / "c"), read_only=True) as ck:
        with pytest.raises(CheckpointError) as e:
            ck.restore(7, {"w": jnp.ones(2), "b": jnp.ones(3), "a": jnp.ones(1)})
        msg = str(e.value)
        assert "step 7" in msg and "a is missing there" in msg and "Fix:" in msg
        assert len(msg) < 700 and "\n" not in msg
        with pytest.raises(CheckpointError, match=r"has no step 8 \(it has \[7\]\)"):
            ck.restore(8, {"w": jnp.ones(2), "b": jnp.ones(3)})


# ----------------------------------------------------------------------------- config

def _cfg(**model):
    import ml_collections
    return ml_collections.ConfigDict({
        "model": dict({"anchor_sizes": (32, 64), "width": 16}, **model),
        "data": {"train_ann": "a.json", "num_threads": 8},
        "train": {"steps": 100, "lr": 0.1, "log_every": 10},
        "mesh": {"data": -1, "model": 1}})


def test_config_change_refused_on_resume_unless_allowed(tmp_path, capsys):
    wd = str(tmp_path)
    cli.save_config(_cfg(), wd, allow_change=False)
    # no results yet (a run that failed at once): a new config simply replaces it
    cli.save_config(_cfg(width=32), wd, allow_change=False)
    os.makedirs(os.path.join(wd, "ckpt_x", "10"))
    open(os.path.join(wd, "ckpt_x", "10", "f"), "w").close()
    stored = open(os.path.join(wd, "config.json")).read()
    bad = _cfg(width=32, anchor_sizes=(16, 64))
    bad.data.train_ann = "b.json"
    with pytest.raises(cli.UsageError) as e:
        cli.save_config(bad, wd, allow_change=False)
    msg = str(e.value)
    assert "data.train_ann, model.anchor_sizes" in msg and "--allow_config_change" in msg
    assert open(os.path.join(wd, "config.json")).read() == stored   # untouched
    # training longer, logging more often, another mesh: a legitimate resume
    ok = _cfg(width=32)
    ok.train.steps, ok.train.log_every, ok.mesh.model = 200, 5, 2
    ok.data.num_threads = 2
    cli.save_config(ok, wd, allow_change=False)
    assert json.load(open(os.path.join(wd, "config.json")))["train"]["steps"] == 200
    assert "train.steps: 100 -> 200" in capsys.readouterr().out
    # allowed explicitly: written and logged
    cli.save_config(bad, wd, allow_change=True)
    assert json.load(open(os.path.join(wd, "config.json")))["model"]["anchor_sizes"] == [16, 64]
    log = [json.loads(ln) for ln in open(os.path.join(wd, "config_changes.jsonl"))]
    assert {"data.train_ann", "model.anchor_sizes"} <= set(log[-1]["fields"])


def test_config_change_refused_by_the_cli(tmp_path):
    """The entry point: one line, exit 2, config.json unchanged; the flag lets it run."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    base = [sys.executable, "-m", "ezsd_jax.main", "--config=configs/toy.py",
            f"--workdir={tmp_path}", "--config.toy.steps=4", "--config.toy.ckpt_every=2"]
    p = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    stored = (tmp_path / "config.json").read_text()
    p = subprocess.run(base + ["--config.toy.hidden=7"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "toy.hidden" in p.stderr and (tmp_path / "config.json").read_text() == stored
    p = subprocess.run(base + ["--config.toy.steps=6"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed from checkpoint at step 4" in p.stdout


# ----------------------------------------------------------------------------- fit

def _step_fn(nan_at=None, signal_at=None):
    def step_fn(state, batch):
        w = state["w"] * 0.9 + batch["x"]
        loss = jnp.sum(w ** 2)
        step = int(state["n"]) + 1
        if nan_at is not None and step >= nan_at:
            loss = loss * jnp.nan
        if signal_at is not None and step == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)    # a scheduler's preemption, mid-step
        return {"w": w, "n": state["n"] + 1}, {"loss": loss}
    return step_fn


def _batches(start):
    for step in range(start + 1, 10_000):
        yield {"x": np.random.default_rng(step).normal(size=4).astype(np.float32)}


def _fit(wd, step_fn, steps=12, **kw):
    return train_loop.fit(state={"w": jnp.zeros(4), "n": jnp.zeros((), jnp.int32)},
                          step_fn=step_fn, batches=_batches, num_steps=steps,
                          workdir=str(wd), name="t", ckpt_every=4, log_every=100, keep=2,
                          **kw)


def test_divergence_keeps_the_last_finite_checkpoint(tmp_path):
    """NaN from step 6 on, between log steps: no checkpoint of it is saved (keep=2 would
    otherwise evict 4 by 8 and 12), the error names step 6."""
    with pytest.raises(train_loop.Diverged, match=r"at step 6; the last finite checkpoint, "
                                                  r"step 4"):
        _fit(tmp_path, _step_fn(nan_at=6))
    with Checkpointer(str(tmp_path / "ckpt_t"), read_only=True) as ck:
        assert ck.all_steps() == [4]
    assert issubclass(train_loop.Diverged, cli.user_errors())


def test_divergence_from_the_cli_is_one_line(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-m", "ezsd_jax.main", "--config=configs/toy.py",
                        f"--workdir={tmp_path}", "--config.toy.steps=40",
                        "--config.toy.ckpt_every=10", "--config.toy.log_every=100",
                        "--config.toy.lr=1e18"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: toy: training diverged") and "at step " in last


def test_sigterm_saves_the_step_and_resume_equals_uninterrupted(tmp_path):
    ref, _ = _fit(tmp_path / "ref", _step_fn())
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(train_loop.Preempted) as e:
        _fit(tmp_path / "a", _step_fn(signal_at=6))
    assert e.value.exit_code == 128 + signal.SIGTERM
    assert "SIGTERM: stopped after step 6 of 12" in str(e.value)
    assert signal.getsignal(signal.SIGTERM) == before            # handler restored
    with Checkpointer(str(tmp_path / "a" / "ckpt_t"), read_only=True) as ck:
        assert ck.latest_step() == 6
    out, _ = _fit(tmp_path / "a", _step_fn())
    for k in ref:
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(ref[k]))


def test_sigterm_from_the_cli_is_one_line_and_resumable(tmp_path):
    """A real SIGTERM to `python -m ezsd_jax.main` (toy) while it trains: exit 143, one
    line, a checkpoint of the step it stopped at; the re-run resumes from it."""
    import time
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "ezsd_jax.main", "--config=configs/toy.py",
           f"--workdir={tmp_path}", "--config.toy.steps=200000",
           "--config.toy.ckpt_every=100000", "--config.toy.log_every=1"]
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    csv_path = tmp_path / "metrics" / "toy.csv"
    t0 = time.time()
    while time.time() - t0 < 240 and p.poll() is None:
        if csv_path.exists() and len(csv_path.read_text().splitlines()) > 3:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "[toy] SIGTERM: stopped after step" in last and "re-run" in last
    stopped = int(last.split("stopped after step ")[1].split()[0])
    with Checkpointer(str(tmp_path / "ckpt_toy"), read_only=True) as ck:
        assert ck.latest_step() == stopped
    p = subprocess.run(cmd[:-3] + [f"--config.toy.steps={stopped + 2}",
                                   "--config.toy.ckpt_every=100000", "--config.toy.log_every=1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"resumed from checkpoint at step {stopped}" in p.stdout


# ----------------------------------------------------------------------------- disk

def test_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    """ENOSPC from deep inside a writer (wrapped, as orbax does) -> one line, exit 2."""
    from ezsd_jax.core import io_utils

    def full(path, write):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        except OSError as e:
            raise RuntimeError("writer failed") from e
    monkeypatch.setattr(io_utils, "_atomic", full)
    monkeypatch.setattr(sys, "argv", ["prog"])

    def main(argv):
        cli.save_config(_cfg(), str(tmp_path), allow_change=False)
    with pytest.raises(SystemExit) as e:
        cli.run(main)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no space left on the device writing")
    assert "config.json" in err[0]
