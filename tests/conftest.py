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
