"""One run per workdir: a second real process is refused with the holder's PID; a
SIGKILLed holder leaves no stale lock."""
import os
import signal
import subprocess
import sys

import pytest

from ezsd_jax.core import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = ("import sys, time; from ezsd_jax.core.workdir_lock import acquire; acquire(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(120)")


def _holder(workdir):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=REPO,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_run_refused_and_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = _holder(tmp_path)
    try:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        runs = [subprocess.Popen([sys.executable, "-m", module, f"--config={cfg}",
                                  f"--workdir={tmp_path}"], cwd=REPO, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for module, cfg in (("ezsd_jax.main", "configs/toy.py"),
                                    ("isal_jax.select", "configs/isal_demo.py"))]
        for r in runs:
            out, err = r.communicate(timeout=120)
            assert r.returncode == 2, err[-2000:]
            assert err.strip().splitlines()[-1].startswith(
                f"error: workdir {tmp_path} in use by PID {holder.pid}"), err[-2000:]
            assert "Traceback" not in err
        assert not (tmp_path / "ckpt_toy").exists()  # refused before any work
        with pytest.raises(workdir_lock.WorkdirInUse, match=f"PID {holder.pid}"):
            workdir_lock.acquire(str(tmp_path))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel dropped the dead holder's lock: the next run takes it at once
    assert workdir_lock.acquire(str(tmp_path)) == str(tmp_path / ".lock")
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    workdir_lock.release(str(tmp_path))
