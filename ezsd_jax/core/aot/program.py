"""One compiled step of the deviceless check: a StepSpec (stage, step, how to build the
project's jitted function with abstract arguments at a given per-chip batch) -> compile it
for a slice -> the report entry; bisection for the largest per-chip batch that fits.
"""
from __future__ import annotations

import dataclasses
import re
import time
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ezsd_jax.core.aot import report


@dataclasses.dataclass
class Program:
    fn: Callable            # the project's jitted function (jax.jit object)
    args: tuple             # abstract arguments (jax.ShapeDtypeStruct with shardings)
    donate: tuple = ()      # indices of donated arguments
    items: float = 0.0      # items (images, crops, samples) one call processes


@dataclasses.dataclass
class StepSpec:
    stage: str
    step: str
    batch_field: str        # the config field that sets the batch (for messages)
    batch_per_chip: int     # the config's own
    build: Callable[[Mesh, int], Program]   # (mesh, per-chip batch) -> Program
    per_process: bool = False   # runs on one chip per host (batch = that chip's)


def abstract(tree, shardings):
    """Arrays / ShapeDtypeStructs -> ShapeDtypeStructs carrying `shardings` (one sharding
    for every leaf or a matching tree)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=shardings), tree)
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s), tree, shardings)


def from_spec(spec: dict, sharding) -> dict:
    """{key: (shape, dtype)} -> {key: ShapeDtypeStruct} with one sharding."""
    return {k: jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding)
            for k, (shape, dtype) in spec.items()}


def one_chip_mesh(mesh: Mesh) -> Mesh:
    """A (1, 1) mesh of the slice's first chip (steps that run per process)."""
    return Mesh(np.asarray(mesh.devices).reshape(-1)[:1].reshape(1, 1), mesh.axis_names)


# the TPU compiler's out-of-memory messages: "... required for HLO temporaries (560.25G)
# exceeds available HBM (15.75G)" / "Used 20.5G of 15.75G hbm"
_OOM = (re.compile(r"required[^(]*\(([\d.]+)([KMGT]?)\)\s*exceeds available HBM", re.I),
        re.compile(r"Used\s+([\d.]+)([KMGT]?)\s+of\s+[\d.]+[KMGT]?\s+hbm", re.I))
_UNIT = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


class CompileOOM(Exception):
    """XLA refused to compile: the program needs more HBM than the chip has."""

    def __init__(self, msg: str, needed: int | None):
        super().__init__(msg)
        self.needed = needed


def compile_program(prog: Program):
    """-> (compiled, seconds); CompileOOM when the TPU compiler runs out of HBM."""
    t0 = time.perf_counter()
    # a persistent compilation cache cannot load executables of compile-only devices (no
    # client): none is written for them (so none is found and read back later)
    min_s = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e12)
    try:
        compiled = prog.fn.lower(*prog.args).compile()
    except Exception as e:  # noqa: BLE001 -- only out-of-memory is turned into a result
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
            raise
        m = next((m for m in (rx.search(text) for rx in _OOM) if m), None)
        needed = int(float(m.group(1)) * _UNIT[m.group(2).upper()]) if m else None
        raise CompileOOM(" ".join(text.split())[:300], needed) from None
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_s)
    return compiled, time.perf_counter() - t0


def run_step(spec: StepSpec, mesh: Mesh, chip, batch_per_chip: int | None = None) -> dict:
    """Compiles `spec` at `batch_per_chip` (default the config's) -> report entry."""
    b = int(batch_per_chip or spec.batch_per_chip)
    m = one_chip_mesh(mesh) if spec.per_process else mesh
    prog = spec.build(m, b)
    donated = sum(report.per_chip_bytes(prog.args[i]) for i in prog.donate)
    entry = {"stage": spec.stage, "step": spec.step, "batch_field": spec.batch_field,
             "batch_per_chip": b, "per_process": spec.per_process,
             "global_batch": b if spec.per_process else b * int(mesh.shape["data"]),
             "mesh": dict(mesh.shape)}
    try:
        compiled, secs = compile_program(prog)
    except CompileOOM as e:
        entry.update(oom_entry(e, chip, prog.items))
        return entry
    entry.update(report.analyse(compiled, donated_bytes=donated, items=prog.items, chip=chip,
                                compile_s=secs))
    return entry


def oom_entry(e: CompileOOM, chip, items: float) -> dict:
    return {"compile_s": None, "argument_bytes": 0, "output_bytes": 0, "temp_bytes": 0,
            "alias_bytes": 0, "code_bytes": 0, "total_bytes": e.needed or 0,
            "capacity_bytes": int(chip.hbm_bytes), "fits": False, "flops": 0.0,
            "bytes_accessed": 0.0, "collectives": {}, "donated_bytes": 0,
            "donation_honoured": None, "items_per_step": float(items),
            "xla_optimal_seconds": None, "estimate_step_s": None,
            "estimate_items_per_s": None, "estimate_bound": "-",
            "compile_error": str(e)}


def max_batch_per_chip(spec: StepSpec, mesh: Mesh, chip, known: dict | None = None,
                       limit: int = 1 << 24, log=print) -> int:
    """Largest per-chip batch whose step fits in HBM (0: not even 1), exact: it fits at
    the answer and not at answer + 1. Per-chip memory is close to linear in the batch, so
    a probe is the secant guess at capacity (from batch 1 and the largest fit while no
    misfit is known; else between the bracket's ends), and a bisection step whenever the
    bracket did not halve. `known`: {batch: report entry} already compiled."""
    seen = dict(known or {})

    def probe(b: int) -> dict:
        if b not in seen:
            seen[b] = e = run_step(spec, mesh, chip, b)
            log(f"[aot] {spec.stage}/{spec.step} at {b} per chip: "
                f"{e['total_bytes'] / 2 ** 30:.2f} GiB, {'fits' if e['fits'] else 'does not fit'}")
        return seen[b]

    def mem(b):
        return seen[b]["total_bytes"] or None

    if not probe(1)["fits"]:
        return 0

    def bracket():
        lo = max(b for b, e in seen.items() if e["fits"])
        his = [b for b, e in seen.items() if not e["fits"] and b > lo]
        return lo, (min(his) if his else None)

    lo, hi = bracket()
    while hi is None:                       # grow: the secant guess at capacity, or x2
        if lo >= limit:
            return lo
        m_lo, m_1 = mem(lo), mem(1)
        slope = (m_lo - m_1) / (lo - 1) if lo > 1 and m_lo and m_1 else 0
        guess = lo + int((chip.hbm_bytes - m_lo) / slope) if slope > 0 else 2 * lo
        probe(min(max(guess, lo + 1), 64 * lo, limit))
        lo, hi = bracket()
    bisect = False
    while hi - lo > 1:                      # shrink: secant, bisection when it stalls
        m_lo, m_hi = mem(lo), mem(hi)
        if bisect or not (m_lo and m_hi and m_hi > m_lo):
            g = (lo + hi) // 2
        else:
            g = lo + int((chip.hbm_bytes - m_lo) * (hi - lo) / (m_hi - m_lo))
        g = min(max(g, lo + 1), hi - 1)
        width = hi - lo
        probe(g)
        lo, hi = bracket()
        bisect = (hi - lo) > width // 2
    return lo


__all__ = ["Program", "StepSpec", "abstract", "from_spec", "one_chip_mesh", "CompileOOM",
           "compile_program", "run_step", "max_batch_per_chip", "P", "NamedSharding"]


def per_chip(global_batch: int, mesh, field: str) -> int:
    n = int(mesh.shape["data"])
    if global_batch % n:
        raise ValueError(f"config.{field}={global_batch} is not divisible by the mesh's "
                         f"data axis ({n}); change it or mesh.data/mesh.model")
    return global_batch // n
