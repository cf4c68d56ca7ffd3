"""The contract every benchmark script in benchmarks/ follows, so that
benchmarks/accelerator_suite.py can run any of them the same way:

  --smoke        tiny sizes that run on CPU in seconds (the same code paths); explicit
                 flags still win over the smoke defaults
  --json=PATH    write the figures as ONE JSON dict (atomically) besides printing it
  --profile=DIR  after the timed part, jax.profiler-trace a few more calls of the
                 benchmark's hot function into DIR and report the top XLA ops
                 (benchmarks/top_ops.py); --profile_steps=N calls
  --check_args   parse the flags, print them, exit 0 (tests check the suite's commands)

and `finish()` adds to every result: "env" (device kind, platform, device count,
jax/jaxlib/python versions), "peak_device_mem_bytes" / "device_mem_limit_bytes" from
`device.memory_stats()` (None where the backend has none, e.g. CPU) and "smoke". Each
script keeps its own figures (compile time apart from step time, the sizes it used).

Usage in a script:
    ap = argparse.ArgumentParser(...); ...; contract.add_args(ap)
    args = contract.parse(ap, argv, smoke={"size": "64", "steps": 1})
    ...
    if args.profile: res["profile"] = contract.profile(args, one_call)
    return contract.finish(args, res)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ezsd_jax.core.io_utils import atomic_write_json  # noqa: E402


def add_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("benchmark contract (benchmarks/contract.py)")
    g.add_argument("--smoke", action="store_true",
                   help="tiny sizes for a CPU check in seconds (explicit flags still win)")
    g.add_argument("--json", default="", help="write the result dict to this file")
    g.add_argument("--profile", default="",
                   help="trace a few calls of the hot function into this dir; top ops")
    g.add_argument("--profile_steps", type=int, default=3)
    g.add_argument("--check_args", action="store_true",
                   help="parse the flags, print them as JSON and exit 0 (nothing run)")


def parse(ap: argparse.ArgumentParser, argv=None, smoke: dict | None = None):
    """parse_args; with --smoke, `smoke` replaces the defaults of flags not given."""
    args = ap.parse_args(argv)
    if args.smoke and smoke:
        ap.set_defaults(**smoke)
        args = ap.parse_args(argv)
    if args.check_args:
        print(json.dumps(vars(args)))
        ap.exit(0)
    return args


def env() -> dict:
    import jax
    import jaxlib
    dev = jax.local_devices()[0]
    return {"device_kind": dev.device_kind, "platform": dev.platform,
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "python": platform.python_version(),
            "host": f"{platform.machine()} {os.cpu_count()} cpus"}


def device_memory() -> dict:
    """Peak bytes in use and the allocator limit, max over local devices (None where the
    backend reports no memory stats, e.g. CPU)."""
    import jax
    peak = limit = None
    for dev in jax.local_devices():
        stats = dev.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            peak = max(peak or 0, int(stats["peak_bytes_in_use"]))
        if "bytes_limit" in stats:
            limit = max(limit or 0, int(stats["bytes_limit"]))
    return {"peak_device_mem_bytes": peak, "device_mem_limit_bytes": limit}


def profile(args, call: Callable[[], Any], top: int = 15) -> dict:
    """Trace args.profile_steps calls of `call` (already compiled) into args.profile."""
    from benchmarks import top_ops
    res = top_ops.trace_top_ops(call, args.profile, steps=args.profile_steps, top=top)
    print(top_ops.format_table(res), flush=True)
    return res


def aot_estimate(compiled, items_per_device: float) -> dict | None:
    """The deviceless AOT check's roofline (ezsd_jax.core.aot.report.roofline) for a program
    compiled on THIS device: FLOPs and bytes per device and the estimated items/s of all
    devices, printed next to the measured figure. An ESTIMATE (an upper bound), not a
    measurement; None where the device has no published peak (CPU)."""
    import jax

    from ezsd_jax.core.aot.report import roofline
    from ezsd_jax.core.aot.topology import chip_of_device
    chip = chip_of_device(jax.devices()[0])
    if chip is None:
        return None
    r = roofline(compiled, items=items_per_device, chip=chip)
    if r["estimate_items_per_s"] is not None:
        r["estimate_items_per_s"] *= jax.device_count()
    return {**r, "chip": chip.name}


def finish(args, result: dict) -> dict:
    """Adds env, device memory and the smoke flag; prints one JSON line; writes --json."""
    result = dict(result)
    result["smoke"] = bool(args.smoke)
    result["env"] = env()
    result.update(device_memory())
    if args.json:
        atomic_write_json(args.json, result)
    print(json.dumps(result, default=str), flush=True)
    return result
