"""The one training loop: restore -> steps -> metrics/progress -> checkpoints -> final save.

Every trainer in the project (toy, CLIP re-normalization, detector, ISAL classifiers) gives
it a jitted `step_fn(state, batch) -> (state, metrics)` and a `batches(start_step)` iterator
of per-process numpy batches; the loop owns resume, logging and saving, so these behave
the same everywhere. Metrics stay on device between log points: no host round trip in
the hot loop except when a log line or a checkpoint is due.

Safety: every checkpoint is of a finite state (the first step with a non-finite metric is
tracked on device; a divergence stops the run with `Diverged` naming that step, and the
last finite checkpoint stays the resume point), and SIGTERM / SIGINT (a preempted job)
finish the current step, save it and stop with `Preempted` (exit status 128 + signal).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ezsd_jax.core import cli, faults
from ezsd_jax.core.checkpoint import Checkpointer
from ezsd_jax.core.io_utils import atomic_write_json
from ezsd_jax.core.metrics import MetricWriter, Progress
from ezsd_jax.core.sharding import host_to_global


class Diverged(FloatingPointError):
    """A non-finite loss or state: nothing was saved past the last finite checkpoint."""


class Preempted(cli.Interrupted):
    """SIGTERM/SIGINT during training: the step finished and was saved."""


@jax.jit
def _track_first_bad(first_bad, step, metrics):
    """first_bad (-1: none yet) := step when a floating metric of `metrics` is not finite."""
    ok = jnp.array(True)
    for v in jax.tree_util.tree_leaves(metrics):
        if jnp.issubdtype(jnp.result_type(v), jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(v))
    return jnp.where((first_bad < 0) & ~ok, step, first_bad)


@jax.jit
def _tree_finite(tree):
    ok = jnp.array(True)
    for v in jax.tree_util.tree_leaves(tree):
        if isinstance(v, jax.Array) and jnp.issubdtype(v.dtype, jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(v))
    return ok


class _StopSignals:
    """SIGTERM/SIGINT -> a flag the loop reads after each step (main thread only; a second
    signal acts as it would without this)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False


def fit(*, state: Any, step_fn: Callable, batches: Callable[[int], Iterator[Any]],
        num_steps: int, workdir: str, name: str, mesh=None, ckpt_every: int = 1000,
        keep: int = 3, log_every: int = 50, items_per_step: float = 1.0, unit: str = "img",
        on_log: Callable[[int, dict], None] | None = None) -> tuple[Any, list[dict]]:
    """Runs `num_steps` steps of `step_fn`, resuming from `workdir/ckpt_<name>`.

    Returns (final state, logged metric rows of this run). `batches(start)` must yield the
    batch of step `start`, `start+1`, ... (deterministic given the step, so a resumed run
    sees exactly the batches an uninterrupted one would). With `mesh`, numpy host batches are
    turned into global arrays split on the data axis.

    Resume tests inject a SIGKILL after a step, or while its checkpoint is written,
    through $EZSD_FAULT (core/faults.py).
    """
    ckpt = Checkpointer(os.path.join(workdir, f"ckpt_{name}"), save_every=ckpt_every, keep=keep)
    try:  # closed on every path: no orbax thread outlives an error raised here
        with _StopSignals() as stop:
            out = _fit(ckpt, stop, state=state, step_fn=step_fn, batches=batches,
                       num_steps=num_steps, workdir=workdir, name=name, mesh=mesh,
                       ckpt_every=ckpt_every, log_every=log_every,
                       items_per_step=items_per_step, unit=unit, on_log=on_log)
        if stop.signum is not None:       # the signal came with the last step: all saved
            ckpt.wait()
            raise Preempted(f"[{name}] {signal.Signals(stop.signum).name}: stopped after "
                            f"the last step ({num_steps}), saved in {ckpt.directory}; re-run "
                            "the same command to go on", exit_code=128 + int(stop.signum))
        return out
    finally:
        ckpt.close()


def _fit(ckpt: Checkpointer, stop: _StopSignals, *, state, step_fn, batches, num_steps,
         workdir, name, mesh, ckpt_every, log_every, items_per_step, unit, on_log):
    kill_at_step, kill_during_save = faults.fit_kill_step()
    if ckpt_every < 1 or log_every < 1:
        raise ValueError(f"{name}: need ckpt_every, log_every >= 1; got {ckpt_every}, "
                         f"{log_every}")
    state, start = ckpt.restore_or(state)
    if start:
        logging.info("%s: resumed at step %d", name, start)
        print(f"[{name}] resumed from checkpoint at step {start}", flush=True)
    if start >= num_steps:
        return state, []
    # rows the killed run logged after its last checkpoint are re-run: drop them
    writer = MetricWriter(workdir, name, resume_step=start)
    if writer.enabled:   # the run's length, for readers of an unfinished run (predict)
        atomic_write_json(os.path.join(workdir, "metrics", f"{name}.steps.json"),
                          {"num_steps": int(num_steps)})
    progress = Progress(num_steps, start=start, per_step=items_per_step, unit=unit, name=name,
                        every_s=0.0 if log_every <= 1 else 30.0)
    rows = []
    it = batches(start)
    first_bad = jnp.asarray(-1, jnp.int32)   # first step with a non-finite metric, on device

    def diverged(step: int, what: str) -> Diverged:
        last = ckpt.latest_step()
        keep = (f"the last finite checkpoint, step {last}, is kept in {ckpt.directory}"
                if last is not None else "no checkpoint was saved")
        return Diverged(f"{name}: training diverged: {what} at step {step}; {keep}. Lower "
                        "the learning rate (a config change: add --allow_config_change to "
                        "resume) or check the data")

    def save(step: int, state) -> None:
        bad = int(first_bad)                 # one host sync per checkpoint (save syncs anyway)
        if bad >= 0:
            raise diverged(bad, "a non-finite loss/metric")
        if not bool(_tree_finite(state)):
            raise diverged(step, "a non-finite parameter/optimizer state")
        ckpt.save(step, state, force=True)

    for step in range(start + 1, num_steps + 1):
        batch = next(it)
        if mesh is not None:
            batch = host_to_global(batch, mesh)
        state, metrics = step_fn(state, batch)
        first_bad = _track_first_bad(first_bad, np.int32(step), metrics)
        saved = False
        if step % log_every == 0 or step == num_steps:
            host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
            if not all(np.isfinite(list(host.values()))):
                bad = int(first_bad)
                raise diverged(bad if bad >= 0 else step, "a non-finite loss/metric "
                               f"({', '.join(k for k, v in host.items() if not np.isfinite(v))})")
            progress.tick(step, force=True)
            host.update(progress.rates())
            writer.write(step, host)
            rows.append({"step": step, **host})
            if on_log is not None:
                on_log(step, host)
        if step == kill_at_step and kill_during_save:
            threading.Timer(0.0, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
            save(step, state)
            saved = True
        elif step % ckpt_every == 0 or step == num_steps:
            save(step, state)
            saved = True
        if step == kill_at_step:
            ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        if stop.signum is not None and step < num_steps:
            if not saved:
                save(step, state)
            ckpt.wait()
            sig = signal.Signals(stop.signum).name
            raise Preempted(f"[{name}] {sig}: stopped after step {step} of {num_steps} and "
                            f"saved its checkpoint in {ckpt.directory}; re-run the same "
                            "command to resume", exit_code=128 + int(stop.signum))
    return state, rows
