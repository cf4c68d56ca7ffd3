"""Test-only fault injection for the resume tests: the one place that reads ISAL_FAULT.

ISAL_FAULT='key=value,...' (unset in production; no config field) with keys
kill_after_shard (ISAL score shard index), kill_at_step + kill_at_train_run (training step
of the N-th task.train call of the process, -1: any), kill_during_save (1) and kill_after
('<strategy>/<seed>/<cycle>[/train|eval|select]', the AL loop). The process SIGKILLs itself
there, as a crash or a pre-empted job would.
"""
from __future__ import annotations

import os
import signal

ENV = "ISAL_FAULT"


def setting(key: str, default):
    """The value of `key` in $ISAL_FAULT, converted to the type of `default`."""
    for part in os.environ.get(ENV, "").split(","):
        k, _, v = part.partition("=")
        if k.strip() == key:
            v = v.strip()
            if isinstance(default, bool):
                return v.lower() in ("1", "true", "yes")
            return type(default)(v)
    return default


def kill(what: str) -> None:
    from ezsd_jax.core.metrics import report
    report(f"{ENV}: {what}: SIGKILL")
    os.kill(os.getpid(), signal.SIGKILL)
