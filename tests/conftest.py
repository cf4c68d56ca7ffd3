"""Test setup: no network, deterministic small runs, a shared compilation cache, and the
number of fake CPU devices.

Environment variables must be set before jax initializes its backend, so they live here,
at import time of the test session.

Devices: the tests run on ONE CPU device by default. Faking 8 devices on a 2-core machine
makes every in-process training step an 8-way SPMD program (measured on the reduced demo:
2.45 vs 3.98 detector steps/s) for no extra coverage, so only the tests marked
`multidevice` (sharding equivalence) ask for 8; they are skipped with a reason unless the
session has them: `EZSD_TEST_DEVICES=8 pytest -m multidevice` (which `make test` runs after
the main pass). Subprocess tests that need several devices (multi-host, kill-and-resume on
8 devices, the launch scripts) set XLA_FLAGS for their own processes.

Compilation cache: every process of the session (xdist workers and the subprocesses the
CLI tests start, which inherit the environment) shares one persistent XLA compilation
cache under .cache/ in the repository (git-ignored), so a program compiled once (the same
model, shapes and flags) is read back instead of compiled again, also on the next run.
`EZSD_TEST_JAX_CACHE=` (empty) turns it off. Cached executables are keyed by the program,
the jax/XLA version and the flags, so a hit is the same binary a compile would produce.

Code generation: the tests are tiny models whose time is XLA:CPU compilation, which LLVM
at -O0 cuts by about half (tests/test_isal_detection.py: 374 s -> 151 s, same machine and
load), so every test process compiles with --xla_backend_optimization_level=0
(EZSD_TEST_O0=0 turns it off). The flag changes code generation only, not the program.
The one job whose time is executing hundreds of training steps, the reduced demo of
tests/test_demo_zeroshot.py (-O0 would slow it ~2x), runs as a subprocess with the
default flags: the `optimized_env` fixture.

Scheduling (`make test`: `-n 2 --dist loadscope`, one module per work unit): each worker
takes the pending module that comes first in LONGEST_FIRST (measured with
--durations=0), then the rest in collection order, so no long module starts last.
"""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_DEVICES = int(os.environ.get("EZSD_TEST_DEVICES", "1"))

if TEST_DEVICES > 1:
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={TEST_DEVICES}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_cache = os.environ.get("EZSD_TEST_JAX_CACHE", os.path.join(ROOT, ".cache", "jax-tests"))
if _cache:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

MULTIDEVICE = 8
O0_FLAG = "--xla_backend_optimization_level=0"
O0 = os.environ.get("EZSD_TEST_O0", "1")
if O0 not in ("0", "1"):
    raise pytest.UsageError(f"EZSD_TEST_O0={O0!r}: expected 0 or 1")
if O0 == "1":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + O0_FLAG).strip()

LONGEST_FIRST = ("test_demo_zeroshot.py", "test_ezsd_cli_stages.py",
                 "test_isal_detection_loop.py", "test_multihost.py", "test_isal_detection.py",
                 "test_mask_rcnn_learns.py", "test_isal_scoring.py", "test_accelerator_suite.py",
                 "test_aot.py", "test_run_safety.py", "test_predict_safety.py",
                 "test_data_tfds.py", "test_protocol_reference.py", "test_predict_serve.py",
                 "test_predict_coco_results.py", "test_packaging.py", "test_detector.py",
                 "test_ezsd_train.py", "test_influence.py",
                 "test_clip_proposals_store.py", "test_al_loop.py", "test_clip_pretrain.py",
                 "test_select_cli.py", "test_checkpoint_resume.py",
                 "test_clip_text_renorm.py", "test_isal_heldout.py", "test_ezsd_head.py",
                 "test_launch_scripts.py", "test_predict_buckets.py", "test_clip_crops.py")


def _priority(scope: str) -> int:
    name = scope.split("::")[0].rsplit("/", 1)[-1]
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


@pytest.hookimpl(optionalhook=True)      # absent without xdist (-p no:xdist)
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LongestFirstScheduling(LoadScopeScheduling):
        """loadscope, but a free worker takes the longest pending module first."""

        def _assign_work_unit(self, node):
            scope = min(self.workqueue, key=_priority)   # ties: collection order
            self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return LongestFirstScheduling(config, log)


@pytest.fixture(scope="session")
def optimized_env():
    """The environment for a subprocess that executes many training steps: this session's
    (offline, compilation cache, devices) with the default XLA code generation and the
    repository importable."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if f != O0_FLAG)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICES >= MULTIDEVICE:
        return
    skip = pytest.mark.skip(reason=f"needs {MULTIDEVICE} fake CPU devices: run "
                                   f"`EZSD_TEST_DEVICES={MULTIDEVICE} pytest -m multidevice`"
                                   " (make test does)")
    for item in items:
        if "multidevice" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    import numpy as np
    return np.random.default_rng(0)
