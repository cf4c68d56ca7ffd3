"""Command-line errors are one clear line and exit status 2, not a traceback."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, module="ezsd_jax.main"):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_unknown_config_field(tmp_path):
    r = _main("--config=configs/toy.py", f"--workdir={tmp_path}", "--config.toy.no_such=3")
    assert r.returncode == 2
    assert "unknown config field" in r.stderr and "no_such" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_config_value(tmp_path):
    r = _main("--config=configs/toy.py", f"--workdir={tmp_path}", "--config.toy.lr=fast")
    assert r.returncode == 2 and "lr" in r.stderr and "Traceback" not in r.stderr


def test_missing_config_file(tmp_path):
    r = _main("--config=configs/nope.py", f"--workdir={tmp_path}")
    assert r.returncode == 2 and "nope.py" in r.stderr


def test_unknown_stage(tmp_path):
    r = _main("--config=configs/toy.py", f"--workdir={tmp_path}", "--stages=toy,bogus")
    assert r.returncode == 2 and "unknown stage 'bogus'" in r.stderr and "toy" in r.stderr


def test_stage_input_missing(tmp_path):
    """A stage run before the stage that writes its input: one line naming what to run."""
    r = _main("--config=configs/demo.py", f"--workdir={tmp_path}", "--stages=proposals")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "stage proposals:" in r.stderr and "run the 'renorm' stage first" in r.stderr


def test_workdir_not_creatable(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    r = _main("--config=configs/toy.py", f"--workdir={f}/sub")
    assert r.returncode == 2 and "cannot create workdir" in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_workdir_without_permission(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        r = _main("--config=configs/toy.py", f"--workdir={d}")
        assert r.returncode == 2 and "not writable" in r.stderr
    finally:
        d.chmod(0o700)


def test_workdir_url_rejected():
    r = _main("--config=configs/toy.py", "--workdir=gs://bucket/run")
    assert r.returncode == 2 and "gcsfuse" in r.stderr


def test_workdir_required():
    r = _main("--config=configs/toy.py")
    assert r.returncode != 0 and "workdir" in r.stderr
