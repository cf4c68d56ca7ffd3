"""The one training loop: restore -> steps -> metrics/progress -> checkpoints -> final save.

Every trainer in the project (toy, CLIP re-normalization, detector, ISAL classifiers) gives
it a jitted `step_fn(state, batch) -> (state, metrics)` and a `batches(start_step)` iterator
of per-process numpy batches; the loop owns resume, logging and saving, so these behave
the same everywhere. Metrics stay on device between log points: no host round trip in
the hot loop except when a log line is due.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable, Iterator

import jax
import numpy as np

from ezsd_jax.core.checkpoint import Checkpointer
from ezsd_jax.core.metrics import MetricWriter, Progress
from ezsd_jax.core.sharding import host_to_global


def fit(*, state: Any, step_fn: Callable, batches: Callable[[int], Iterator[Any]],
        num_steps: int, workdir: str, name: str, mesh=None, ckpt_every: int = 1000,
        keep: int = 3, log_every: int = 50, items_per_step: float = 1.0, unit: str = "img",
        debug_kill_at_step: int = -1, debug_kill_during_save: bool = False,
        on_log: Callable[[int, dict], None] | None = None) -> tuple[Any, list[dict]]:
    """Runs `num_steps` steps of `step_fn`, resuming from `workdir/ckpt_<name>`.

    Returns (final state, logged metric rows of this run). `batches(start)` must yield the
    batch of step `start`, `start+1`, ... (deterministic given the step, so a resumed run
    sees exactly the batches an uninterrupted one would). With `mesh`, numpy host batches are
    turned into global arrays split on the data axis.

    debug_kill_at_step: fault injection for resume tests - SIGKILL this process right
    after finishing that step (and its checkpoint, if one is due there); with
    debug_kill_during_save the kill is sent from a thread while that step's checkpoint is
    being written.
    """
    ckpt = Checkpointer(os.path.join(workdir, f"ckpt_{name}"), save_every=ckpt_every, keep=keep)
    try:  # closed on every path: no orbax thread outlives an error raised here
        return _fit(ckpt, state=state, step_fn=step_fn, batches=batches,
                    num_steps=num_steps, workdir=workdir, name=name, mesh=mesh,
                    ckpt_every=ckpt_every, log_every=log_every,
                    items_per_step=items_per_step, unit=unit,
                    debug_kill_at_step=debug_kill_at_step,
                    debug_kill_during_save=debug_kill_during_save, on_log=on_log)
    finally:
        ckpt.close()


def _fit(ckpt: Checkpointer, *, state, step_fn, batches, num_steps, workdir, name, mesh,
         ckpt_every, log_every, items_per_step, unit, debug_kill_at_step,
         debug_kill_during_save, on_log):
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
    progress = Progress(num_steps, start=start, per_step=items_per_step, unit=unit, name=name,
                        every_s=0.0 if log_every <= 1 else 30.0)
    rows = []
    it = batches(start)
    metrics = None
    for step in range(start + 1, num_steps + 1):
        batch = next(it)
        if mesh is not None:
            batch = host_to_global(batch, mesh)
        state, metrics = step_fn(state, batch)
        if step % log_every == 0 or step == num_steps:
            host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
            if not all(np.isfinite(list(host.values()))):
                raise FloatingPointError(f"{name}: non-finite metrics at step {step}: {host}")
            progress.tick(step, force=True)
            host.update(progress.rates())
            writer.write(step, host)
            rows.append({"step": step, **host})
            if on_log is not None:
                on_log(step, host)
        if step == debug_kill_at_step and debug_kill_during_save:
            threading.Timer(0.0, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
            ckpt.save(step, state, force=True)
        elif step % ckpt_every == 0 or step == num_steps:
            ckpt.save(step, state, force=True)
        if step == debug_kill_at_step:
            ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)
    return state, rows
