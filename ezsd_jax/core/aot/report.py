"""What a compiled step costs on one chip: XLA's memory analysis (argument / output /
temporary bytes), cost analysis (FLOPs, bytes accessed), the collectives of the compiled
HLO (counted by kind, with bytes), whether donation was honoured, and a roofline estimate
of items per second. docs/aot.md says how to read it.
"""
from __future__ import annotations

import math
import re

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(COLLECTIVES) +
                 r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]")


def _array_bytes(shape_text: str) -> list[int]:
    out = []
    for dt, dims in _ARRAY.findall(shape_text):
        if dt not in _DTYPE_BYTES:
            continue
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        out.append(n * _DTYPE_BYTES[dt])
    return out


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {'count', 'bytes'}} of the collectives in compiled HLO text. Bytes: the
    op's result (an async '-start' returns (operand, result, ...): its largest array)."""
    out: dict[str, dict[str, int]] = {}
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        shape, kind, start = m.group(1), m.group(2), m.group(3)
        sizes = _array_bytes(shape)
        nbytes = (max(sizes) if start else sum(sizes)) if sizes else 0
        e = out.setdefault(kind, {"count": 0, "bytes": 0})
        e["count"] += 1
        e["bytes"] += nbytes
    return out


def per_chip_bytes(abstract_tree) -> int:
    """Bytes one chip holds of a tree of ShapeDtypeStructs with shardings (the largest
    shard: uneven splits round up)."""
    import jax
    total = 0
    for leaf in jax.tree_util.tree_leaves(abstract_tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def _cost(compiled) -> dict:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return dict(ca or {})


def analyse(compiled, *, donated_bytes: int, items: float, chip, compile_s: float) -> dict:
    """The report entry of one compiled step (all bytes per chip)."""
    ma = compiled.memory_analysis()
    arg = int(ma.argument_size_in_bytes)
    outb = int(ma.output_size_in_bytes)
    temp = int(ma.temp_size_in_bytes)
    alias = int(ma.alias_size_in_bytes)
    code = int(ma.generated_code_size_in_bytes)
    total = arg + outb - alias + temp + code
    hlo = compiled.as_text()
    return {
        "compile_s": round(compile_s, 2),
        "argument_bytes": arg, "output_bytes": outb, "temp_bytes": temp,
        "alias_bytes": alias, "code_bytes": code, "total_bytes": total,
        "capacity_bytes": int(chip.hbm_bytes), "fits": total <= chip.hbm_bytes,
        "collectives": collectives(hlo),
        "donated_bytes": int(donated_bytes),
        "donation_honoured": (alias >= donated_bytes) if donated_bytes else None,
        **roofline(compiled, items=items, chip=chip),
    }


def roofline(compiled, *, items: float, chip) -> dict:
    """FLOPs, bytes accessed and the roofline estimate of one compiled step on `chip`: the
    step takes at least max(FLOPs / peak, bytes / HBM bandwidth) -- an upper bound on
    items/s, not a measurement (benchmarks print it next to what they measure)."""
    cost = _cost(compiled)
    flops = float(cost.get("flops", 0.0))
    accessed = float(cost.get("bytes accessed", 0.0))
    xla_s = float(cost.get("optimal_seconds", -1.0))
    t_flops = flops / chip.peak_flops
    t_mem = accessed / chip.hbm_bw
    t = max(t_flops, t_mem)
    return {"flops": flops, "bytes_accessed": accessed, "items_per_step": float(items),
            "xla_optimal_seconds": xla_s if xla_s > 0 else None,
            "estimate_step_s": t,
            "estimate_items_per_s": (items / t) if t > 0 else None,
            # no cost analysis (XLA:GPU gives none): no estimate, so no bound either
            "estimate_bound": "-" if t <= 0 else "compute" if t_flops >= t_mem else "memory"}


def gib(n: float) -> str:
    return f"{n / 1024 ** 3:.2f}"


def markdown(entries: list[dict], header: str) -> str:
    """The report as a Markdown table (one row per step)."""
    rows = [header, "",
            "| stage | step | batch | compile s | args GiB | out GiB | temp GiB | total GiB "
            "| HBM GiB | fits | TFLOP/step | GB accessed | collectives (count, MiB) "
            "| donation | est. items/s (roofline) | max batch/chip |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        coll = ", ".join(f"{k} {v['count']} ({v['bytes'] / 2 ** 20:.1f})"
                         for k, v in sorted(e["collectives"].items())) or "none"
        don = {True: "yes", False: "NO", None: "-"}[e["donation_honoured"]]
        est = e["estimate_items_per_s"]
        mb = e.get("max_batch_per_chip")
        cs = "-" if e["compile_s"] is None else f"{e['compile_s']:.1f}"
        est_s = "-" if est is None else f"{est:.1f} ({e['estimate_bound']}-bound)"
        rows.append(
            f"| {e['stage']} | {e['step']} | {e['global_batch']} ({e['batch_per_chip']}/chip) "
            f"| {cs} | {gib(e['argument_bytes'])} | {gib(e['output_bytes'])} "
            f"| {gib(e['temp_bytes'])} | {gib(e['total_bytes'])} | {gib(e['capacity_bytes'])} "
            f"| {'yes' if e['fits'] else 'NO'} | {e['flops'] / 1e12:.3f} "
            f"| {e['bytes_accessed'] / 1e9:.2f} | {coll} | {don} "
            f"| {est_s} "
            f"| {'-' if mb is None else mb} |")
    return "\n".join(rows)
