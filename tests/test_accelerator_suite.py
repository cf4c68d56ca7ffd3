"""benchmarks/accelerator_suite.py: the smoke run end to end (every smoke benchmark with
finite positive figures, JSON + Markdown, the profile path), the driver's handling of
failing / hanging / out-of-memory benchmarks and its batch search on fake benchmark
scripts (no jax), and that every accelerator entry's flags parse in its script."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"_bench_{name}", os.path.join(ROOT, "benchmarks", name))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                 # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


suite_mod = _load("accelerator_suite.py")


def _figures_ok(rec: dict) -> bool:
    """Every measured figure is a positive number; the roofline columns ('AOT est. ...')
    are None on the smoke run's CPU (no published peak) and positive on accelerators."""
    vals = [v for k, v in rec["figures"].items() if not k.startswith("AOT est.")]
    est = [v for k, v in rec["figures"].items() if k.startswith("AOT est.")]
    return (bool(vals) and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                               for v in vals) and all(v is None for v in est))


@pytest.mark.slow
def test_smoke_suite_end_to_end(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "accelerator_suite.py"), "--smoke",
         f"--out={out}", "--profile=isal_resnet18"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    suite = json.loads((out / "suite.json").read_text())
    smoke_names = [e.name for e in suite_mod.ENTRIES if e.in_smoke]
    assert {"train_1024_bf16", "clip_vitb32_bf16", "isal_resnet18"} <= set(smoke_names)
    assert list(suite["benchmarks"]) == smoke_names
    assert suite["smoke"] and suite["complete"]
    assert suite["machine"]["platform"] == "cpu" and suite["machine"]["jax"]
    for name, rec in suite["benchmarks"].items():
        assert rec["status"] == "ok", (name, rec)
        assert _figures_ok(rec), (name, rec["figures"])
        if name.startswith("train") or name.startswith("clip"):
            assert "AOT est. img/s" in rec["figures"]     # printed next to the measurement
        assert rec["compile_s"] > 0 and rec["peak_device_mem_bytes"] is None
        has_goal = next(e for e in suite_mod.ENTRIES if e.name == name).goal is not None
        assert ("goal" in rec) == has_goal, name       # predict has no goal
        if has_goal:
            assert rec["goal"]["met"] is None          # smoke figures are not judged
        assert rec["result"]["smoke"] and rec["result"]["env"]["device_kind"] == "cpu"
        assert rec["sizes"]
    train = suite["benchmarks"]["train_1024_bf16"]
    assert train["batch"] == 1 and [t["status"] for t in train["search"]] == ["ok"]
    ops = suite["benchmarks"]["isal_resnet18"]["top_ops"]
    assert ops and all(o["ms"] > 0 for o in ops)
    assert os.path.exists(suite["benchmarks"]["isal_resnet18"]["result"]["profile"]["trace"])
    md = (out / "suite.md").read_text()
    assert "SMOKE RUN" in md and "top ops" in md
    for name in smoke_names:
        assert f"| {name} | ok |" in md
    assert "train_1024_bf16: ok" in proc.stdout            # printed as it finished


FAKE = textwrap.dedent('''
    import argparse, json, sys, time
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--profile", default="")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--mode", default="ok")
    a = ap.parse_args()
    if a.mode == "fail":
        sys.exit("ValueError: broken benchmark")
    if a.mode == "hang":
        if a.profile:
            open(a.profile, "w").write(str(__import__("os").getpid()))
        time.sleep(60)
    if a.mode == "oom" and a.batch > 4:
        print("XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        sys.exit(1)
    mem = ({"peak_device_mem_bytes": a.batch * 10**9, "device_mem_limit_bytes": 100 * 10**9}
           if a.mode == "mem" else {})
    json.dump({"images_per_s": 10.0 * a.batch, "compile_s": 0.5, "sizes": {"batch": a.batch},
               "env": {"device_kind": "fake", "platform": "fake", "device_count": 2}, **mem},
              open(a.json, "w"))
''')


def test_failures_timeouts_and_batch_search(tmp_path):
    script = tmp_path / "fake_bench.py"
    script.write_text(FAKE)
    E, S, G = suite_mod.Entry, suite_mod.Search, suite_mod.Goal
    figs = (("img/s", "images_per_s"),)
    entries = [
        E("fails", str(script), ("--mode=fail",), (), 30, figs),
        E("hangs", str(script), ("--mode=hang",), (), 1, figs),
        E("fine", str(script), (), (), 30, figs, G(">= 8 per device", "images_per_s", 8, True)),
        E("oom_search", str(script), ("--mode=oom",), (), 60, figs, search=S(1, 64)),
        E("mem_search", str(script), ("--mode=mem",), (), 60, figs, search=S(2, 256)),
    ]
    out = str(tmp_path / "out")
    seen = []

    def log(line):          # after each benchmark the JSON on disk already has it
        if line.startswith("    "):
            with open(os.path.join(out, "suite.json")) as f:
                seen.append(list(json.load(f)["benchmarks"]))

    suite = suite_mod.run_suite(entries, out, smoke=False, budget_s=120, log=log)
    names = [e.name for e in entries]
    assert seen == [names[:i + 1] for i in range(len(names))]
    b = suite["benchmarks"]
    assert b["fails"]["status"] == "failed" and "broken benchmark" in b["fails"]["error"]
    assert b["hangs"]["status"] == "timeout" and b["hangs"]["wall_s"] < 10
    assert b["fine"]["status"] == "ok" and b["fine"]["figures"] == {"img/s": 10.0}
    assert b["fine"]["goal"]["value"] == 5.0 and b["fine"]["goal"]["met"] is False
    oom = b["oom_search"]
    assert oom["status"] == "ok" and oom["batch"] == 4 and oom["stopped"] == "oom at batch 8"
    assert [(t["batch"], t["status"]) for t in oom["search"]] == [
        (1, "ok"), (2, "ok"), (4, "ok"), (8, "oom")]
    mem = b["mem_search"]      # 2 GB of 100 at batch 2: jump to 64, stop before 128
    assert [t["batch"] for t in mem["search"]] == [2, 64] and mem["batch"] == 64
    assert mem["stopped"].startswith("peak memory predicts batch 128")
    md = open(os.path.join(out, "suite.md")).read()
    assert "| fails | failed |" in md and "| hangs | timeout |" in md
    assert "oom_search batch search: 1: ok" in md

    # --resume keeps the ok entries and reruns the others only
    ran = []
    again = suite_mod.run_suite(entries, out, smoke=False, budget_s=120, previous=suite,
                                log=ran.append)
    assert [ln for ln in ran if ln.startswith("[skip]")] == [
        f"[skip] {n}: ok in {os.path.join(out, 'suite.json')} (--resume)"
        for n in ("fine", "oom_search", "mem_search")]
    assert again["benchmarks"]["oom_search"] == b["oom_search"]


def test_budget_spent_skips_the_rest(tmp_path):
    script = tmp_path / "fake_bench.py"
    script.write_text(FAKE)
    e = suite_mod.Entry("late", str(script), (), (), 30, (("img/s", "images_per_s"),))
    suite = suite_mod.run_suite([e], str(tmp_path / "o"), smoke=False, budget_s=0, log=str)
    assert suite["benchmarks"]["late"]["status"] == "skipped"


def test_stopped_suite_kills_its_benchmark_and_saves(tmp_path):
    """SIGTERM to the driver (a `timeout` around it) kills the running benchmark's process
    group and leaves suite.json with the entry marked interrupted."""
    script = tmp_path / "fake_bench.py"
    script.write_text(FAKE)
    pid_file, out = tmp_path / "child.pid", tmp_path / "out"
    code = textwrap.dedent(f"""
        import importlib.util, signal, sys
        spec = importlib.util.spec_from_file_location("s", {os.path.join(ROOT, "benchmarks",
                                                        "accelerator_suite.py")!r})
        m = importlib.util.module_from_spec(spec); sys.modules["s"] = m
        spec.loader.exec_module(m)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        e = m.Entry("hangs", {str(script)!r}, ("--mode=hang", "--profile={pid_file}"), (), 60,
                    (("img/s", "images_per_s"),))
        m.run_suite([e], {str(out)!r}, smoke=False, budget_s=60, log=str)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    child = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    rec = json.loads((out / "suite.json").read_text())["benchmarks"]["hangs"]
    assert rec["status"] == "interrupted"
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_accelerator_commands_parse(capsys):
    """Every accelerator entry's flags are accepted by its script (the smoke run covers
    one entry per script; this covers the sizes/dtypes only the accelerator run uses)."""
    mods = {}
    for e in suite_mod.ENTRIES:
        mod = mods.setdefault(e.script, _load(e.script))
        argv = list(e.args) + ([f"--batch={e.search.start}"] if e.search else [])
        with pytest.raises(SystemExit) as ex:
            mod.main(argv + ["--json=/dev/null", "--check_args"])
        assert ex.value.code == 0, e.name
        parsed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert not parsed["smoke"] and parsed["json"] == "/dev/null"
    with pytest.raises(SystemExit) as ex:            # the check can fail
        mods["bench_train_step.py"].main(["--dtype=float16", "--check_args"])
    assert ex.value.code == 2


def test_unknown_benchmark_is_one_line_exit_2(capsys):
    assert suite_mod.main(["--only=nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("accelerator_suite: unknown benchmark 'nope'") and "\n" not in err
