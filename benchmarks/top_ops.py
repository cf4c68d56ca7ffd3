"""jax.profiler trace of a few calls of a compiled function -> the XLA ops that take the
time (benchmarks' `--profile`, see benchmarks/contract.py).

The trace (an .xplane.pb under DIR/plugins/profile/<run>/, readable by TensorBoard /
xprof) is read back with jax.profiler.ProfileData. Every op event carries an `hlo_op`
stat: on GPU/TPU they are the kernels on the device planes ("/device:..."; the derived
"XLA Ops" line when the trace has one, so nothing is counted twice), on CPU the thunks on
the host's XLA client threads. Only innermost ops count (a loop's span contains its
body's ops). Durations of one op are summed over the traced calls.
Only the CPU path has been run (tests/test_accelerator_suite.py); the device-plane path
follows the XPlane layout and has not met a real GPU trace yet.
"""
from __future__ import annotations

import collections
import glob
import os
import re
from typing import Any, Callable


def trace_top_ops(call: Callable[[], Any], trace_dir: str, steps: int = 3,
                  top: int = 15) -> dict:
    import jax
    os.makedirs(trace_dir, exist_ok=True)
    before = set(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            jax.block_until_ready(call())
    new = sorted(set(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"),
                               recursive=True)) - before)
    if not new:
        raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {trace_dir}")
    res = top_ops_from_xplane(new[-1], top=top)
    res["steps"] = steps
    return res


# device lines that summarize other lines (counting them would count time twice)
_SUMMARY_LINES = {"XLA Modules", "Steps", "XLA TraceMe", "Framework Ops",
                  "Framework Name Scope", "Source code", "Launch Stats"}
_ANNOTATED_OP = re.compile(r"hlo_op=([^,#\s]+)")


def _op_name(event, on_device: bool):
    """The HLO op of an event: its hlo_op stat, else (device kernels) an `hlo_op=` in a
    stat such as the kernel annotation, else the kernel's own name; host events without
    an hlo_op stat are runtime bookkeeping and are skipped."""
    stats = {k: v for k, v in event.stats}
    if stats.get("hlo_op"):
        return str(stats["hlo_op"]), str(stats.get("hlo_module", ""))
    if not on_device:
        return None, ""
    for v in stats.values():
        m = _ANNOTATED_OP.search(str(v))
        if m:
            return m.group(1), ""
    return event.name, ""


def _leaves(line, on_device: bool) -> list:
    """Op events of one line that contain no other op event (a while loop's thunk spans
    its body's thunks: counting both would count the body twice)."""
    evs = sorted((ev for ev in line.events if _op_name(ev, on_device)[0]),
                 key=lambda e: (e.start_ns, -e.duration_ns))
    return [ev for ev, nxt in zip(evs, evs[1:] + [None])
            if nxt is None or nxt.start_ns >= ev.start_ns + ev.duration_ns]


def top_ops_from_xplane(path: str, top: int = 15) -> dict:
    """{"trace": path, "source": "device"|"host", "total_ms", "ops": [{op, module, ms,
    count, fraction}] (largest first, `top` of them)}."""
    from jax.profiler import ProfileData
    pd = ProfileData.from_file(path)
    device, host = [], []
    for plane in pd.planes:
        if plane.name.startswith("/device:"):
            lines = list(plane.lines)
            xla_ops = [ln for ln in lines if ln.name == "XLA Ops"]
            device.extend(xla_ops or [ln for ln in lines if ln.name not in _SUMMARY_LINES])
        elif plane.name.startswith("/host:"):
            host.extend(ln for ln in plane.lines if ln.name != "python")
    tally: dict = collections.defaultdict(lambda: [0.0, 0])
    source = "device"
    for lines, on_device in ((device, True), (host, False)):
        for line in lines:
            for ev in _leaves(line, on_device):
                op, module = _op_name(ev, on_device)
                t = tally[(op, module)]
                t[0] += ev.duration_ns
                t[1] += 1
        if tally:
            break
        source = "host"
    total = sum(v[0] for v in tally.values())
    ops = sorted(tally.items(), key=lambda kv: -kv[1][0])[:top]
    return {"trace": path, "source": source if tally else "none",
            "total_ms": total / 1e6,
            "ops": [{"op": op, "module": mod, "ms": ns / 1e6, "count": n,
                     "fraction": ns / total if total else 0.0}
                    for (op, mod), (ns, n) in ops]}


def format_table(res: dict) -> str:
    rows = [f"top ops ({res['source']} events, {res['total_ms']:.1f} ms over "
            f"{res.get('steps', '?')} calls; trace {res['trace']})",
            f"{'ms':>10} {'share':>6} {'count':>6}  op  [module]"]
    for o in res["ops"]:
        rows.append(f"{o['ms']:>10.2f} {100 * o['fraction']:>5.1f}% {o['count']:>6}  "
                    f"{o['op']}  [{o['module']}]")
    return "\n".join(rows)
