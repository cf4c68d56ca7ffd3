"""Command-line errors are one clear line and exit status 2, not a traceback."""
import json
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


def _many(cases):
    """Runs the entry-point command lines concurrently; returns CompletedProcess-likes."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args in cases]
    out = []
    for p in procs:
        _, err = p.communicate(timeout=180)
        out.append((p.returncode, err))
    return out


def _one_line_error(rc, err, *texts):
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(t in last for t in texts), err[-3000:]


def test_bad_input_is_one_line_from_every_entry_point(tmp_path):
    """Config file errors, rejected values and bad annotation files: one line naming the
    file or field, exit 2, from ezsd_jax.main, isal_jax.main and isal_jax.select."""
    (tmp_path / "syntax.py").write_text("def get_config(:\n    pass\n")
    (tmp_path / "raises.py").write_text("def get_config():\n    return {}['nope']\n")
    good = json.dumps({"images": [], "annotations": [], "categories": []})
    (tmp_path / "broken.json").write_text(good[:20])
    det = ["ezsd_jax.main", "--config=configs/synthetic_detection.py", "--stages=train",
           f"--config.data.train_images={tmp_path}"]
    cases = {
        "syntax": (["ezsd_jax.main", f"--config={tmp_path}/syntax.py"],
                   ["syntax.py: syntax error at line 1"]),
        "raises": (["isal_jax.main", f"--config={tmp_path}/raises.py"],
                   ["raises.py: loading it failed: KeyError: 'nope'"]),
        "steps0": (["ezsd_jax.main", "--config=configs/toy.py", "--config.toy.steps=0"],
                   ["config.toy.steps=0"]),
        "on_error": ([*det, "--config.data.on_error=ignore"], ["config.data.on_error='ignore'"]),
        "al_budget": (["isal_jax.main", "--config=configs/isal_digits.py",
                       "--config.al.budget=0"], ["config.al.budget=0"]),
        "select": (["isal_jax.select", "--config=configs/isal_demo.py",
                    "--config.init.batch_size=0"], ["config.init.batch_size=0"]),
        "malformed": ([*det, f"--config.data.train_ann={tmp_path}/broken.json"],
                      ["broken.json: malformed JSON at line 1"]),
        "missing_ann": ([*det, f"--config.data.train_ann={tmp_path}/nope.json"],
                        ["nope.json", "not found"]),
    }
    results = _many([args + [f"--workdir={tmp_path}/w_{name}"]
                     for name, (args, _) in cases.items()])
    for (name, (_, texts)), (rc, err) in zip(cases.items(), results):
        _one_line_error(rc, err, *texts)
    # a rejected config does no work: nothing but the (empty) workdir
    assert not (tmp_path / "w_steps0").exists() or not os.listdir(tmp_path / "w_steps0")
