"""Metrics and progress for every long job: scalars to CSV + TensorBoard, rate and ETA to the log.

`MetricWriter` writes <workdir>/metrics/<name>.csv (process 0 only) and drops the rows past a
resumed run's checkpoint step; `Progress` says when to log. Usage: docs/code-notes.md.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import time
from typing import Mapping

import jax
import numpy as np


class MetricWriter:
    """Appends scalar rows to `<workdir>/metrics/<name>.csv` (new columns extend the header)
    and, when tensorboardX or tensorflow is importable, to TensorBoard event files."""

    def __init__(self, workdir: str, name: str, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics", f"{name}.csv")
        self._tb = None
        self._header = _read_csv(self.path)[0]
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if resume_step is not None:
            self._truncate_after(int(resume_step))
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # optional dependency
                purge = None if resume_step is None else int(resume_step) + 1
                self._tb = SummaryWriter(os.path.join(workdir, "tb", name), purge_step=purge)
            except ImportError:
                self._tb = None

    def _truncate_after(self, step: int) -> None:
        header, rows = _read_csv(self.path)
        kept = [r for r in rows if _row_step(r) <= step]
        if len(kept) != len(rows):
            _write_csv(self.path, header, kept)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _scalar(v) for k, v in scalars.items()})
        new_cols = [k for k in row if k not in self._header]
        if new_cols and self._header:
            # Rewrite with the widened header (rare: only when a new metric appears).
            self._header = self._header + new_cols
            _write_csv(self.path, self._header, _read_csv(self.path)[1] + [row])
        else:
            exists = os.path.exists(self.path)
            self._header = self._header or list(row)
            with open(self.path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self._header, restval="")
                if not exists:
                    w.writeheader()
                w.writerow(row)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()

    def read(self) -> list[dict]:
        return _read_csv(self.path)[1]


def _row_step(row: dict) -> float:
    try:
        return float(row.get("step", ""))
    except ValueError:
        return math.inf  # a half-written last row of a killed run: dropped


def _scalar(v) -> float:
    return float(np.asarray(v))


def _read_csv(path):
    if not os.path.exists(path):
        return [], []
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


def _write_csv(path, header, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(tmp, path)


def report(msg: str) -> None:
    """The one progress printer of long jobs: an INFO log record and the line on stdout
    (where users and tests read it, whatever the log verbosity)."""
    logging.info("%s", msg)
    print(msg, flush=True)


class Progress:
    """Rate and ETA for a loop of `total` steps that may start at `start` (resume)."""

    def __init__(self, total: int, start: int = 0, per_step: float = 1.0, unit: str = "item",
                 every_s: float = 10.0, name: str = "progress"):
        self.total, self.start, self.per_step = total, start, per_step
        self.unit, self.every_s, self.name = unit, every_s, name
        self.t0 = time.perf_counter()
        self._last_t, self._last_step = self.t0, start
        self.step = start

    def tick(self, step: int, force: bool = False) -> bool:
        """Records progress up to `step` (done steps); logs and returns True when due."""
        self.step = step
        now = time.perf_counter()
        if not force and now - self._last_t < self.every_s and step < self.total:
            return False
        report(self.line())
        self._last_t, self._last_step = now, step
        return True

    def rates(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        done = self.step - self.start
        steps_s = done / dt
        return {"steps_per_s": steps_s, f"{self.unit}s_per_s": steps_s * self.per_step}

    def eta_s(self) -> float:
        r = self.rates()["steps_per_s"]
        return (self.total - self.step) / r if r > 0 else math.inf

    def line(self) -> str:
        r = self.rates()
        eta = self.eta_s()
        eta_s = "?" if not math.isfinite(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
        return (f"[{self.name}] {self.step}/{self.total} "
                f"{r['steps_per_s']:.2f} steps/s {r[f'{self.unit}s_per_s']:.1f} {self.unit}s/s "
                f"ETA {eta_s}")
