"""Every accelerator figure of the project from one command, in under 8 minutes on one
H100/H200 (benchmarks/accelerator_suite.sh calls this driver).

Runs the benchmark scripts of benchmarks/ in order, each as its own subprocess with its
own time cap (a crash, an OOM or a hang costs that benchmark only), prints each result as
it finishes and rewrites, atomically after every benchmark, OUT/suite.json (machine-
readable: device, jax/jaxlib versions, per benchmark its status, figures, compile time,
peak device memory, sizes, the script's own JSON) and OUT/suite.md (a Markdown section
to paste into benchmarks/RESULTS.md, each figure against its goal). A run cut short
leaves both files with what finished. Logs: OUT/logs/, raw JSON: OUT/raw/.

    bash benchmarks/accelerator_suite.sh                   # the accelerator run, OUT=workdir/accelerator_suite
    bash benchmarks/accelerator_suite.sh --smoke           # same code paths, tiny, CPU (CI)
    ... --only=clip_vitb32_bf16,isal_resnet18              # a subset (e.g. what a cut run missed)
    ... --resume                                           # keep OUT/suite.json's ok entries, run the rest
    ... --profile=train_1024_bf16 --only=train_1024_bf16   # + jax.profiler trace, top ops
    ... --list                                             # the commands, nothing run

Benchmarks (ENTRIES, run in this order; goals from the issues, all for ONE device):
  train_*           benchmarks/bench_train_step.py: R50-FPN Faster R-CNN train step, random
                    init, 1024x1024 and 832x1344 (the 1333x800 canvas), bf16 and fp32, at
                    the largest batch that fits (search below). Goal: >= 60 img/s, 1024 bf16.
  clip_vitb32_bf16  benchmarks/bench_clip_crops.py: random-init ViT-B/32 CLIP, bf16, crops
                    vs PIL, candidate scoring, tower alone, and the FULL proposal function
                    on 800x1344 (1333x800) images, 2 per batch (15,750 sliding candidates
                    + 1000 NMS survivors + 8 GT = 16,758 crops per image). Goal: >= 30k
                    crops/s (full function).
  isal_resnet18     benchmarks/bench_influence.py: CIFAR ResNet-18 (11.2M params) pool
                    scoring, pool 4096 in batches of 256: forward, JVP (fused, the
                    select.py default; bf16) and the reference's per-sample-gradient loop
                    (256 samples). Goal: jvp_fused >= 20x the loop.

Batch search (train): each try is a fresh subprocess (an OOM cannot poison the next try).
From `start`, the batch doubles until a try runs out of memory (RESOURCE_EXHAUSTED / out
of memory in its log), the batch limit, or the entry's time cap (no new try unless the
time left is >= 1.1x the last try's wall time). Where the device reports memory stats, a
try's peak memory extrapolated linearly in the batch skips doublings predicted to fit
with 10% to spare, and stops the search when the next doubling is predicted not to fit.
After an OOM the search tries the untested power of two below it, if any. The entry's
figure is the largest batch that ran; its record lists every try and why it stopped.

Time budget (--budget_s=480 = 8 minutes, enforced: an entry gets min(its cap, time left),
a try that exceeds it is killed and recorded as "timeout", later entries still run):
    train_1024_bf16        115 s   2 tries of ~45-55 s each (import + CUDA init ~8 s,
                                   random init ~5 s, step compile ~30-40 s, 1+5 steps)
    train_832x1344_bf16     50 s   1 try
    train_1024_fp32         50 s   1 try
    train_832x1344_fp32     50 s   1 try
    clip_vitb32_bf16        90 s   model init ~10 s, 4 compiles (crops, scoring, tower,
                                   full) ~60 s, timed calls ~10 s (2 x 33.5k crops)
    isal_resnet18           60 s   4 variant compiles ~8 s each, 2 timed passes ~5 s
    predict_r50_bf16        45 s   one R50 EZSD forward compile + timed batches
    reserve                 20 s   driver, process starts
    total                  480 s
    train_mask_832x1344_bf16  last, on what is left (cap 50 s): Mask R-CNN (--masks)
The per-try times are ESTIMATES (no accelerator was available when this was written);
the caps, not the estimates, bound the wall time. If a first run shows them wrong, change
cap_s / start below and say so in RESULTS.md.

Adding a benchmark is ONE line in ENTRIES: any script that follows benchmarks/contract.py
(--smoke, --json=PATH, --profile=DIR) works, e.g. the predict benchmark:
    Entry("predict_r50_1333x800_bf16", "bench_predict.py", ("--model=r50", "--size=1333x800",
          "--names=80", "--batch=8", "--dtype=bfloat16"), (), 45, (("img/s", "images_per_s"),)),
Fields: name, script (in benchmarks/), accelerator args, extra smoke args (--smoke is
always added there), cap_s, figures ((label, dotted path into the script's JSON), ...; the
first is the headline), goal=Goal(...) (optional), search=Search(start, limit) (optional:
the driver appends --batch=N). Mask R-CNN: once the train step has it, copy the train_*
lines with its flag (train_mask_832x1344_bf16 is --masks on the 1333x800 canvas).

--smoke: the same code paths on CPU with tiny sizes (the scripts' --smoke defaults),
XLA:CPU at optimization level 0 (halves compile time, which is nearly all the time
there), batch search from 1 to 1, the train step in fp32 (a bf16 tiny-detector compile
costs ~6 more CPU seconds); tests/test_accelerator_suite.py runs it. It runs one
entry per script and variant set: the train_* entries after the first differ from it only
in --size/--dtype (in_smoke=False; a tiny-detector compile costs ~20 CPU seconds each, the
CI budget has room for one); the test checks that their arguments parse. Smoke figures
are not accelerator figures and suite.md says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from typing import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ezsd_jax.core.io_utils import atomic_write_json, atomic_write_text  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Goal:
    text: str                  # as written in the issue
    path: str                  # dotted path of the figure in the script's JSON
    at_least: float
    per_device: bool = False   # divide by env.device_count (the data-parallel train
                               # step uses every device; CLIP and ISAL run on one)


@dataclasses.dataclass(frozen=True)
class Search:
    start: int
    limit: int


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    script: str                          # file in benchmarks/ (or an absolute path)
    args: tuple                          # accelerator arguments
    smoke_args: tuple                    # extra arguments with --smoke
    cap_s: float                         # wall-time cap of the whole entry
    figures: tuple                       # ((label, dotted path), ...), headline first
    goal: Goal | None = None
    search: Search | None = None         # batch search, appends --batch=N
    in_smoke: bool = True                # False: --smoke skips it (see the docstring)


# "AOT est.": the deviceless check's roofline for the same compiled program on this
# device (contract.aot_estimate), an upper bound printed next to the measured figure
_TRAIN_FIGS = (("img/s", "images_per_s"), ("AOT est. img/s", "aot.estimate_items_per_s"),
               ("step ms", "step_ms"))
_TRAIN = ("--model=r50", "--steps=5", "--warmup=1")
_ISAL_VARIANTS = "--variants=forward,jvp_fused,jvp_bf16,loop"
ENTRIES = (
    Entry("train_1024_bf16", "bench_train_step.py", _TRAIN + ("--size=1024", "--dtype=bfloat16"),
          (), 115, _TRAIN_FIGS,
          Goal(">= 60 img/s (R50-FPN 1024² bf16, one H100)", "images_per_s", 60, True),
          Search(16, 256)),
    Entry("train_832x1344_bf16", "bench_train_step.py",
          _TRAIN + ("--size=832,1344", "--dtype=bfloat16"), (), 50, _TRAIN_FIGS,
          search=Search(16, 256), in_smoke=False),
    Entry("train_1024_fp32", "bench_train_step.py", _TRAIN + ("--size=1024",), (), 50,
          _TRAIN_FIGS, search=Search(8, 256), in_smoke=False),
    Entry("train_832x1344_fp32", "bench_train_step.py", _TRAIN + ("--size=832,1344",), (), 50,
          _TRAIN_FIGS, search=Search(8, 256), in_smoke=False),
    Entry("clip_vitb32_bf16", "bench_clip_crops.py",
          ("--random_vitb32", "--dtype=bfloat16", "--image_hw=800,1344", "--batch=2",
           "--chunk=512", "--crop_boxes=512", "--pil_boxes=128", "--repeats=2", "--full"),
          ("--full",), 90,
          (("crops/s", "full.crops_per_s"), ("img/s", "full.images_per_s"),
           ("AOT est. img/s", "full.aot.estimate_items_per_s"),
           ("scoring crops/s", "scoring.crops_per_s"),
           ("tower-only crops/s", "scoring.clip_only_crops_per_s"),
           ("crop vs PIL", "crop.speedup")),
          Goal(">= 30k crops/s (ViT-B/32 bf16, full proposal fn, one H100)",
               "full.crops_per_s", 30000)),         # runs on one device
    Entry("isal_resnet18", "bench_influence.py",
          ("--pool=4096", "--batch=256", "--loop_samples=256", "--repeats=2", _ISAL_VARIANTS),
          (_ISAL_VARIANTS,), 60,
          (("jvp_fused x loop", "speedup_vs_loop.jvp_fused"),
           ("jvp_bf16 x loop", "speedup_vs_loop.jvp_bf16"),
           ("jvp_fused ms/sample", "ms_per_sample.jvp_fused"),
           ("jvp_fused x fwd", "x_forward.jvp_fused")),
          Goal(">= 20x the per-sample loop (jvp_fused)", "speedup_vs_loop.jvp_fused", 20)),
    Entry("predict_r50_bf16", "bench_predict.py", ("--model=r50", "--size=1333x800",
          "--names=80", "--batch=8", "--dtype=bfloat16"), (), 45,
          (("img/s", "images_per_s"), ("compile s", "compile_s"))),
    Entry("train_mask_832x1344_bf16", "bench_train_step.py",
          _TRAIN + ("--size=832,1344", "--dtype=bfloat16", "--masks"), (), 50, _TRAIN_FIGS,
          search=Search(16, 256), in_smoke=False),
)
BUDGET_S = 480
SMOKE_CAP_S = 150          # per entry on a loaded 2-core CPU
_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|\bOOM\b")
_MEM_MARGIN = 0.9


# ----------------------------------------------------------------------------- one process

@dataclasses.dataclass
class Try:
    status: str              # ok | oom | failed | timeout
    wall_s: float
    result: dict | None
    log: str
    command: list
    batch: int | None = None
    error: str = ""
    cpu_s: float = 0.0       # user + system CPU seconds of the process tree


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_process(cmd: list, timeout_s: float, log: str, json_path: str, env: dict) -> Try:
    """Runs cmd in its own process group (killed whole on timeout); classifies the end."""
    for d in (log, json_path):
        os.makedirs(os.path.dirname(d), exist_ok=True)
    if os.path.exists(json_path):
        os.remove(json_path)
    t0 = time.monotonic()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = ru.ru_utime + ru.ru_stime
    with open(log, "w") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout_s, 0.1))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
        except BaseException:        # the driver is stopped: do not leave it running
            _kill_group(proc)
            raise
    wall = time.monotonic() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru.ru_utime + ru.ru_stime - cpu0
    if rc is None:
        return Try("timeout", wall, None, log, cmd, error=f"killed after {timeout_s:.0f} s cap",
                   cpu_s=cpu)
    text = _tail(log, 40)
    if rc == 0 and os.path.exists(json_path):
        with open(json_path) as f:
            return Try("ok", wall, json.load(f), log, cmd, cpu_s=cpu)
    status = "oom" if _OOM.search(text) else "failed"
    err = (f"exit {rc}" + ("" if rc else ", no JSON written") + ": "
           + " | ".join(ln.strip() for ln in text.splitlines()[-3:] if ln.strip()))
    return Try(status, wall, None, log, cmd, error=err[:600], cpu_s=cpu)


# ----------------------------------------------------------------------------- batch search

def predicted_max_batch(batch: int, result: dict | None, margin: float) -> int | None:
    """Largest batch whose peak memory, extrapolated linearly from this try, stays within
    margin x the device limit (None where the backend reports no memory stats)."""
    peak = (result or {}).get("peak_device_mem_bytes")
    limit = (result or {}).get("device_mem_limit_bytes")
    if not peak or not limit:
        return None
    return int(math.floor(batch * margin * limit / peak))


def batch_search(run_try: Callable[[int, float], Try], search: Search,
                 time_left: Callable[[], float]) -> tuple[Try | None, list, str]:
    """-> (the largest batch's ok try or None, all tries, why it stopped)."""
    tries: list = []
    ok: Try | None = None
    fail: int | None = None          # smallest batch that ran out of memory
    b = search.start
    while True:
        t = run_try(b, time_left())
        t.batch = b
        tries.append(t)
        if t.status == "ok":
            ok = t if ok is None or b > ok.batch else ok
        elif t.status == "oom":
            fail = b if fail is None else min(fail, b)
        else:
            return ok, tries, f"{t.status} at batch {b}"
        if ok is None:                                   # nothing fits yet: halve
            nxt = b // 2
            if nxt < 1:
                return None, tries, f"oom at batch {b}"
        else:
            nxt = ok.batch * 2
            if fail is not None and nxt >= fail:
                return ok, tries, f"oom at batch {fail}"
            if nxt > search.limit:
                return ok, tries, f"batch limit {search.limit}"
            pred = predicted_max_batch(ok.batch, ok.result, 1.0)
            if fail is None and pred is not None:
                if pred < nxt:
                    return ok, tries, (f"peak memory predicts batch {nxt} does not fit "
                                       f"(max ~{pred})")
                safe = predicted_max_batch(ok.batch, ok.result, _MEM_MARGIN)
                while nxt * 2 <= min(safe, search.limit):
                    nxt *= 2
        if time_left() < 1.1 * t.wall_s:
            return ok, tries, f"time cap (next: batch {nxt})"
        b = nxt


# ----------------------------------------------------------------------------- the suite

def get_path(d: dict | None, path: str):
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def child_env(smoke: bool, compile_cache: str = "") -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if smoke:
        env["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + ["--xla_backend_optimization_level=0"])
    else:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")   # room for the search
    if compile_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = compile_cache
    return env


def entry_command(e: Entry, smoke: bool, out: str, profile: bool, tag: str,
                  batch: int | None) -> tuple[list, str]:
    json_path = os.path.join(out, "raw", tag + ".json")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", e.script)]
    cmd += ["--smoke", *e.smoke_args] if smoke else list(e.args)
    if batch is not None:
        cmd.append(f"--batch={batch}")
    cmd.append(f"--json={json_path}")
    if profile:
        cmd.append(f"--profile={os.path.join(out, 'profile', tag)}")
    return cmd, json_path


def summarize(e: Entry, final: Try | None, tries: list, stopped: str, cap: float,
              wall: float, smoke: bool = False) -> dict:
    rec = {"script": f"benchmarks/{e.script}", "cap_s": cap, "wall_s": round(wall, 2),
           "cpu_s": round(sum(t.cpu_s for t in tries), 2)}
    if final is not None and final.status == "ok":
        r = final.result
        rec.update(status="ok", command=shlex.join(final.command), log=final.log)
        rec["figures"] = {label: get_path(r, path) for label, path in e.figures}
        rec["compile_s"] = get_path(r, "compile_s")
        rec["peak_device_mem_bytes"] = r.get("peak_device_mem_bytes")
        rec["device_mem_limit_bytes"] = r.get("device_mem_limit_bytes")
        rec["sizes"] = r.get("sizes")
        rec["env"] = r.get("env")
        if "profile" in r:
            rec["top_ops"] = r["profile"].get("ops", [])[:10]
        if e.goal is not None:
            v = get_path(r, e.goal.path)
            n = (r.get("env") or {}).get("device_count", 1) if e.goal.per_device else 1
            value = None if v is None else v / n
            met = None if value is None or smoke else value >= e.goal.at_least
            rec["goal"] = {"text": e.goal.text, "value": value, "per_device": e.goal.per_device,
                           "devices": n, "met": met}
        rec["result"] = r
    else:
        last = tries[-1] if tries else None
        rec.update(status=last.status if last else "skipped",
                   command=shlex.join(last.command) if last else "",
                   log=last.log if last else "", error=last.error if last else stopped)
        if e.goal is not None:
            rec["goal"] = {"text": e.goal.text, "value": None, "met": None}
    if e.search is not None:
        rec["batch"] = final.batch if final is not None and final.status == "ok" else None
        rec["search"] = [{"batch": t.batch, "status": t.status, "wall_s": round(t.wall_s, 2),
                          "images_per_s": get_path(t.result, "images_per_s"),
                          "peak_device_mem_bytes": get_path(t.result, "peak_device_mem_bytes"),
                          "error": t.error} for t in tries]
        rec["stopped"] = stopped
    return rec


def _search(e: Entry, smoke: bool) -> Search | None:
    return Search(1, 1) if e.search is not None and smoke else e.search


def run_entry(e: Entry, smoke: bool, out: str, cap: float, env: dict,
              profile: bool) -> dict:
    t0 = time.monotonic()
    left = lambda: cap - (time.monotonic() - t0)  # noqa: E731
    search = _search(e, smoke)

    def one(batch, timeout_s):
        tag = e.name if batch is None else f"{e.name}_b{batch}"
        cmd, jp = entry_command(e, smoke, out, profile, tag, batch)
        return run_process(cmd, timeout_s, os.path.join(out, "logs", tag + ".log"), jp, env)

    if search is None:
        t = one(None, left())
        final, tries, stopped = t, [t], ""
    else:
        final, tries, stopped = batch_search(one, search, left)
    return summarize(e, final, tries, stopped, cap, time.monotonic() - t0, smoke)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def _gib(b) -> str:
    return "-" if b is None else f"{b / 2**30:.1f} GiB"


def one_line(name: str, rec: dict) -> str:
    if rec["status"] != "ok":
        return f"{name}: {rec['status'].upper()} after {rec['wall_s']:.0f} s: {rec.get('error', '')}"
    figs = ", ".join(f"{k} {_fmt(v)}" for k, v in rec["figures"].items())
    extra = f" (batch {rec['batch']}; stopped: {rec['stopped']})" if "batch" in rec else ""
    goal = rec.get("goal")
    verdict = {True: "MET", False: "MISSED", None: "not judged"}[goal["met"]] if goal else ""
    g = f"; goal {goal['text']}: {verdict}" if goal else ""
    return (f"{name}: ok in {rec['wall_s']:.0f} s ({rec['cpu_s']:.0f} CPU s): {figs}{extra}; compile "
            f"{_fmt(rec['compile_s'])} s; peak {_gib(rec['peak_device_mem_bytes'])}{g}")


def markdown(suite: dict) -> str:
    m = suite.get("machine") or {}
    date = suite["started"][:10]
    head = (f"## Accelerator suite: {m.get('device_kind', '?')} x{m.get('device_count', '?')}"
            f" ({date})")
    lines = []
    if suite["smoke"]:
        head += " - SMOKE RUN (CPU, tiny sizes: NOT accelerator figures)"
    lines += [head, "",
              f"`{suite['command']}` on {m.get('device_kind', '?')} "
              f"({m.get('platform', '?')}, {m.get('device_count', '?')} device(s), host "
              f"{m.get('host', '?')}), jax {m.get('jax', '?')} / jaxlib {m.get('jaxlib', '?')}; "
              f"{suite['elapsed_s']:.0f} s wall of a {suite['budget_s']:.0f} s budget"
              + ("" if suite["complete"] else " (INCOMPLETE: cut short)") + ".", "",
              "| benchmark | status | figures | compile s | peak device memory | goal | met |",
              "|---|---|---|---|---|---|---|"]
    for name, rec in suite["benchmarks"].items():
        if rec["status"] == "ok":
            figs = ", ".join(f"{k} {_fmt(v)}" for k, v in rec["figures"].items())
            if "batch" in rec:
                figs = f"batch {rec['batch']} ({rec['stopped']}): " + figs
            comp, peak = _fmt(rec["compile_s"]), _gib(rec["peak_device_mem_bytes"])
        else:
            figs, comp, peak = rec.get("error", "").replace("|", "/")[:200], "-", "-"
        goal = rec.get("goal") or {}
        met = "-" if not goal else _fmt(goal.get("met"))
        if goal.get("value") is not None:
            met += f" ({_fmt(goal['value'])}{' per device' if goal.get('per_device') and goal.get('devices', 1) > 1 else ''})"
        lines.append(f"| {name} | {rec['status']} | {figs} | {comp} | {peak} | "
                     f"{goal.get('text', '-')} | {met} |")
    for name, rec in suite["benchmarks"].items():
        if rec.get("search"):
            s = "; ".join(f"{t['batch']}: {t['status']}"
                          + (f" {_fmt(t['images_per_s'])} img/s" if t["images_per_s"] else "")
                          + (f", {_gib(t['peak_device_mem_bytes'])}"
                             if t["peak_device_mem_bytes"] else "") for t in rec["search"])
            lines.append(f"\n{name} batch search: {s}.")
        if rec.get("top_ops"):
            ops = ", ".join(f"{o['op']} {100 * o['fraction']:.0f}%" for o in rec["top_ops"][:5])
            lines.append(f"\n{name} top ops (jax.profiler): {ops}.")
    lines.append("\nSizes and every raw figure: `suite.json` of the run.")
    return "\n".join(lines) + "\n"


def run_suite(entries: Sequence[Entry], out: str, smoke: bool, budget_s: float,
              profile: Sequence[str] = (), previous: dict | None = None,
              compile_cache: str = "", command: str = "", log=print) -> dict:
    os.makedirs(out, exist_ok=True)
    env = child_env(smoke, compile_cache)
    t0 = time.monotonic()
    suite = {"suite": "accelerator_suite", "smoke": smoke, "command": command,
             "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                 timespec="seconds"),
             "budget_s": budget_s, "elapsed_s": 0.0, "complete": False,
             "xla_flags": env.get("XLA_FLAGS", ""), "machine": None,
             "benchmarks": dict((previous or {}).get("benchmarks", {}))}

    def save():
        suite["elapsed_s"] = round(time.monotonic() - t0, 1)
        oks = [r for r in suite["benchmarks"].values() if r.get("env")]
        suite["machine"] = oks[0]["env"] if oks else None
        atomic_write_json(os.path.join(out, "suite.json"), suite)
        atomic_write_text(os.path.join(out, "suite.md"), markdown(suite))

    todo = [e for e in entries if suite["benchmarks"].get(e.name, {}).get("status") != "ok"]
    for e in entries:
        if e not in todo:
            log(f"[skip] {e.name}: ok in {os.path.join(out, 'suite.json')} (--resume)")
    save()
    for i, e in enumerate(todo):
        left = budget_s - (time.monotonic() - t0)
        cap = min(SMOKE_CAP_S if smoke else e.cap_s, left)
        if cap < 1:
            rec = {"status": "skipped", "wall_s": 0.0, "cap_s": 0.0,
                   "error": f"suite budget of {budget_s:.0f} s spent"}
        else:
            log(f"[{i + 1}/{len(todo)}] {e.name} (cap {cap:.0f} s) ...")
            t_e = time.monotonic()
            try:
                rec = run_entry(e, smoke, out, cap, env, e.name in profile)
            except (KeyboardInterrupt, SystemExit):
                suite["benchmarks"][e.name] = {
                    "status": "interrupted", "cap_s": cap, "cpu_s": 0.0,
                    "wall_s": round(time.monotonic() - t_e, 2), "error": "suite stopped"}
                save()
                raise
        suite["benchmarks"][e.name] = rec
        save()
        log("    " + one_line(e.name, rec))
    suite["complete"] = True
    save()
    return suite


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--out", default=os.environ.get("OUT") or "workdir/accelerator_suite")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--budget_s", type=float, default=BUDGET_S)
    ap.add_argument("--only", default="", help="comma-separated entry names")
    ap.add_argument("--profile", default="", help="entries to trace (comma-separated)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the ok entries of OUT/suite.json, run the others")
    ap.add_argument("--compile_cache", default="",
                    help="JAX persistent compilation cache dir (reruns compile faster; "
                         "compile_s then measures cache loads)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # a `timeout` kill saves too
    names = [e.name for e in ENTRIES]
    only = [n for n in args.only.split(",") if n]
    prof = [n for n in args.profile.split(",") if n]
    for n in only + prof:
        if n not in names:
            print(f"accelerator_suite: unknown benchmark {n!r}; known: {', '.join(names)}",
                  file=sys.stderr)
            return 2
    entries = [e for e in ENTRIES if (not only or e.name in only)
               and (e.in_smoke or not args.smoke)]
    if args.list:
        for e in entries:
            sr = _search(e, args.smoke)
            cmd, _ = entry_command(e, args.smoke, args.out, e.name in prof, e.name,
                                   sr.start if sr else None)
            print(f"{e.name} (cap {e.cap_s:.0f} s{', batch search' if e.search else ''}): "
                  f"{shlex.join(cmd)}")
        return 0
    previous = None
    path = os.path.join(args.out, "suite.json")
    if args.resume and os.path.exists(path):
        try:
            with open(path) as f:
                previous = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            print(f"accelerator_suite: cannot read {path}: {err}", file=sys.stderr)
            return 2
        if previous.get("smoke") != args.smoke:
            print(f"accelerator_suite: {path} is from a {'smoke' if previous.get('smoke') else 'full'}"
                  " run; --resume needs the same mode", file=sys.stderr)
            return 2
    command = "bash benchmarks/accelerator_suite.sh" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--out"))
    print(f"accelerator suite{' (smoke)' if args.smoke else ''}: {len(entries)} benchmarks, "
          f"budget {args.budget_s:.0f} s, output {args.out}/suite.json + suite.md", flush=True)
    suite = run_suite(entries, args.out, args.smoke, args.budget_s, prof, previous,
                      args.compile_cache, command, log=lambda s: print(s, flush=True))
    print(f"\n{markdown(suite)}", flush=True)
    bad = [n for n, r in suite["benchmarks"].items() if r["status"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
