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

Two xdist workers with different XLA flags (`make test`: `-n 2 --dist loadscope`): most
tests are tiny models whose time is XLA:CPU compilation, which LLVM at -O0 cuts by about
half (tests/test_isal_detection.py: 374 s -> 151 s, same machine and load), while a few
train for hundreds of steps, which -O0 slows down (toy CLIP pretraining ~2x). So worker
gw0 keeps the default optimization and takes the modules in EXECUTION_BOUND first; every
other worker compiles with --xla_backend_optimization_level=0 and takes the rest, the
longest modules first (LONGEST_FIRST, measured with --durations=0); when a worker runs out
of its own kind it takes the other kind. The flag changes code generation only, not the
program: the tests assert the same things on either worker. Outside xdist nothing changes.
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
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if WORKER and WORKER != "gw0":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

# modules dominated by executing many training steps (run on gw0, optimized code)
EXECUTION_BOUND = ("test_demo_zeroshot.py", "test_detector_learns.py", "test_clip_pretrain.py")
# compile-dominated modules, longest first (the rest follow in collection order)
LONGEST_FIRST = ("test_ezsd_cli_stages.py", "test_mask_rcnn_cli.py",
                 "test_isal_detection_loop.py", "test_multihost.py", "test_isal_detection.py",
                 "test_mask_rcnn_learns.py",
                 "test_detector.py", "test_accelerator_suite.py", "test_ezsd_train.py",
                 "test_al_loop.py", "test_select_cli.py", "test_checkpoint_resume.py",
                 "test_clip_text_renorm.py", "test_clip_proposals_store.py",
                 "test_isal_heldout.py", "test_ezsd_head.py", "test_launch_scripts.py",
                 "test_predict_buckets.py", "test_clip_crops.py")


def _priority(scope: str, own: tuple, other: tuple) -> tuple[int, int]:
    """Sort key of a pending module for a worker: its own kind (in listed order), then
    unlisted modules, then the other kind."""
    name = scope.split("::")[0].rsplit("/", 1)[-1]
    if name in own:
        return 0, own.index(name)
    return (2, other.index(name)) if name in other else (1, 0)


@pytest.hookimpl(optionalhook=True)      # absent without xdist (-p no:xdist)
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FlagAwareScheduling(LoadScopeScheduling):
        """loadscope, but each worker picks the pending module that suits its flags."""

        def _assign_work_unit(self, node):
            own = EXECUTION_BOUND if node.gateway.id == "gw0" else LONGEST_FIRST
            other = LONGEST_FIRST if own is EXECUTION_BOUND else EXECUTION_BOUND
            scope = min(self.workqueue, key=lambda sc: _priority(sc, own, other))
            self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return FlagAwareScheduling(config, log)


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
