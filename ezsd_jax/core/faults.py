"""Test-only fault injection for the kill-and-resume tests: the one place that reads
$EZSD_FAULT (unset in production; no config field). Keys and where they act:
docs/code-notes.md ("ezsd_jax/core/faults.py")."""
from __future__ import annotations

import os
import signal

ENV = "EZSD_FAULT"
_fit_runs = [0]          # train_loop.fit calls of this process


def setting(key: str, default):
    """The value of `key` in $EZSD_FAULT ('key=value,...'), converted to the type of
    `default`; `default` when it is not set."""
    for part in os.environ.get(ENV, "").split(","):
        k, _, v = part.partition("=")
        if k.strip() == key:
            v = v.strip()
            if isinstance(default, bool):
                return v.lower() in ("1", "true", "yes")
            return type(default)(v)
    return default


def fit_kill_step() -> tuple[int, bool]:
    """For the next train_loop.fit call: (step after which to SIGKILL, -1 = never; whether
    the kill comes while that step's checkpoint is written). kill_at_step acts in the
    kill_at_fit_run-th fit call of the process (default 0, the first; -1: every one)."""
    run = _fit_runs[0]
    _fit_runs[0] += 1
    if setting("kill_at_fit_run", 0) not in (-1, run):
        return -1, False
    return setting("kill_at_step", -1), setting("kill_during_save", False)


def kill(what: str) -> None:
    """SIGKILL this process, as a crash or a pre-empted job would, after one line."""
    from ezsd_jax.core.metrics import report
    report(f"{ENV}: {what}: SIGKILL")
    os.kill(os.getpid(), signal.SIGKILL)
