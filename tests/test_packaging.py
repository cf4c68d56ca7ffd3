"""`pip install .` as a user does it: into a fresh venv outside the checkout (not
editable), then the console scripts (`ezsd`, `ezsd-predict`, `isal`, `isal-select`) print
their usage, a tiny job runs from a built-in config of the installed `configs` package,
and the installed distribution declares dependencies that the tested environment
satisfies. Offline and fast: the fresh venv reaches this environment's packages through a
.pth file, and the project is installed with --no-deps --no-build-isolation from a copy of
its source (so no build files land in the checkout)."""
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

pytestmark = pytest.mark.slow          # ~20 s: a venv, an install and five commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"ezsd": "Entry point of the EZSD package",
           "ezsd-predict": "python -m ezsd_jax.predict serve",
           "isal": "Entry point of the active-learning experiment",
           "isal-select": "Standalone selection step"}


def _fresh_env(tmp):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PIP_NO_INDEX="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin dir, env, work dir) of `pip install .` into a fresh venv."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("ezsd_jax", "isal_jax", "configs"):
        shutil.copytree(os.path.join(ROOT, d), src / d, ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, f), src / f)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    # the dependencies: this process's import path minus the project (.pth lines; the
    # .pth files inside them, e.g. an editable install of the checkout, are not processed)
    deps = [p for p in dict.fromkeys(sys.path + [sysconfig.get_paths()["purelib"]])
            if os.path.isdir(p) and not any(os.path.isdir(os.path.join(p, pkg)) for pkg
                                            in ("ezsd_jax", "isal_jax", "configs", "tests"))
            and os.path.realpath(p) != os.path.realpath(os.path.join(ROOT, "tests"))]
    with open(os.path.join(site.stdout.strip(), "_deps.pth"), "w") as f:
        f.write("\n".join(deps) + "\n")
    env = _fresh_env(tmp)
    wheel_ok = subprocess.run([str(py), "-c", "import importlib.util as u, sys; sys.exit("
                               "not (u.find_spec('setuptools.command.bdist_wheel') or "
                               "u.find_spec('wheel')))"], env=env, cwd=tmp)
    if wheel_ok.returncode:
        pytest.skip("building the wheel offline needs setuptools>=70.1 or wheel in this "
                    "environment (the Makefile's venv step installs setuptools>=70.1)")
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                        "--no-deps", "--no-build-isolation", str(src)],
                       cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    shutil.rmtree(src)                      # nothing may read the copy after the install
    work = tmp / "work"
    work.mkdir()
    return venv / "bin", env, work


def _run(cmd, installed, timeout=300):
    bindir, env, work = installed
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_console_scripts_print_their_usage(installed):
    bindir, _, _ = installed
    for script, usage in SCRIPTS.items():
        p = _run([str(bindir / script), "--help"], installed)
        assert p.returncode in (0, 1) and not p.stderr, p.stdout + p.stderr  # absl: 1
        assert usage in p.stdout, (script, p.stdout[:500])
    # the installed copy is imported (not the checkout)
    p = _run([str(bindir / "python"), "-c", "import ezsd_jax, configs, isal_jax; "
              "print(ezsd_jax.__file__, configs.__path__[0], isal_jax.__file__)"], installed)
    assert p.returncode == 0, p.stderr
    assert all(str(bindir.parent) in f and ROOT not in f for f in p.stdout.split()), p.stdout
    # the serve page is package data of the installed copy
    p = _run([str(bindir / "python"), "-c", "from ezsd_jax.predict import serve; "
              "print(len(serve.page()), '<canvas' in serve.page())"], installed)
    assert p.returncode == 0 and p.stdout.split()[1] == "True", p.stdout + p.stderr


def test_tiny_job_from_an_installed_config(installed):
    bindir, _, work = installed
    p = _run([str(bindir / "python"), "-c", "import configs; print(configs.__path__[0])"],
             installed)
    toy = os.path.join(p.stdout.strip(), "toy.py")
    wd = work / "toy"
    p = _run([str(bindir / "ezsd"), f"--config={toy}", f"--workdir={wd}",
              "--config.toy.steps=4", "--config.toy.ckpt_every=4",
              "--config.toy.log_every=2"], installed)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "=== stage toy done" in p.stdout
    assert json.load(open(wd / "config.json"))["toy"]["steps"] == 4
    # a bad input is one line and status 2, from the console script as from python -m
    p = _run([str(bindir / "ezsd-predict"), "--workdir=/nonexistent", "--images=x",
              "--names=a", f"--out={work / 'o'}"], installed)
    assert p.returncode == 2 and p.stderr.startswith("error: "), p.stderr


def test_installed_distribution_declares_satisfied_dependencies(installed):
    from packaging.requirements import Requirement
    bindir, _, _ = installed
    code = ("import importlib.metadata as md, json; d = md.distribution('ezsd-isal-jax'); "
            "print(json.dumps({'requires': d.requires, 'scripts': sorted(e.name for e in "
            "d.entry_points if e.group == 'console_scripts'), 'path': str(d._path)}))")
    p = _run([str(bindir / "python"), "-c", code], installed)
    assert p.returncode == 0, p.stderr
    meta = json.loads(p.stdout)
    assert str(bindir.parent) in meta["path"]
    assert meta["scripts"] == sorted(SCRIPTS)
    reqs = [Requirement(r) for r in meta["requires"]]
    runtime = [r for r in reqs if r.marker is None]
    names = {r.name.lower().replace("_", "-") for r in runtime}
    assert {"jax", "flax", "optax", "orbax-checkpoint", "transformers", "pycocotools",
            "tensorflow-datasets", "ml-collections", "absl-py", "numpy"} <= names
    for r in runtime:                     # the tested environment satisfies every range
        assert r.specifier.contains(md.version(r.name), prereleases=True), (r, md.version(
            r.name))
    tf = next(r for r in runtime if r.name == "transformers")
    assert not tf.specifier.contains("4.58.0") and tf.specifier.contains("4.57.6")
    extras = {str(r.marker).split("==")[-1].strip(" '\"") for r in reqs if r.marker}
    assert {"tpu", "cuda12", "test"} <= extras
    tpu = [r for r in reqs if r.marker and "tpu" in str(r.marker)]
    assert [str(r).split(";")[0] for r in tpu] == ["jax[tpu]==0.10.2"]
    # the pinned set of requirements.txt lies inside the declared ranges
    pins = {}
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if "==" in line:
                name, ver = line.split("==")
                pins[name.lower().replace("_", "-")] = ver
    for r in runtime:
        key = r.name.lower().replace("_", "-")
        assert key in pins and r.specifier.contains(pins[key]), (r, pins.get(key))
