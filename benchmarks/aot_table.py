"""Real-size deviceless AOT reports for the reference configs on the TPU slices one would
book, and the RESULTS table made from them (docs/aot.md).

  python benchmarks/aot_table.py run [--configs coco,lvis] [--topologies v5e-8,v4-16]
      [--steps ezsd_train/train_step,...] [--find_max_batch]
  python benchmarks/aot_table.py flops [--configs ...]     # no compile: see below
  python benchmarks/aot_table.py render > table.md

`run` compiles one step per process (python -m ezsd_jax.aot --steps=...) and writes
benchmarks/aot/<config>__<topology>__<stage>_<step>.json atomically; an existing file is
skipped, so a killed run resumes. A step that does not fit still writes its JSON (exit 2).
`flops` lowers every step at the config's per-chip batch on ONE CPU device (no compile, a
few seconds a step) and writes benchmarks/aot/flops__<config>.json: XLA's cost analysis of
the unoptimized per-chip program (FLOPs per item; data parallelism does not change them).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "aot")
# the CLIP teacher's architecture: the hub cache or transformers' ViT-B/32 defaults, no
# network (docs/aot.md)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONFIGS = ("coco", "lvis", "isal_cifar10", "isal_voc", "isal_coco")
TOPOLOGIES = ("v5e-8", "v4-16", "v5e-16", "v5p-16")
STEPS = {"detector": ("ezsd_train/train_step", "ezsd_eval/infer", "renorm/train_step",
                      "proposals/propose"),
         "isal": ("train/train_step", "select/ref_grad", "select/hvp", "select/score"),
         "isal_detection": ("train/train_step", "select/label_pool", "select/ref_grad",
                            "select/hvp", "select/score")}
# classes of the configs whose detector reads them from the annotation file
NUM_CLASSES = {"isal_voc": 20, "isal_coco": 80}


def steps_of(config: str) -> tuple[str, ...]:
    if config in NUM_CLASSES:
        return STEPS["isal_detection"]
    return STEPS["isal" if config.startswith("isal") else "detector"]


def out_path(config: str, topology: str, step: str) -> str:
    return os.path.join(OUT, f"{config}__{topology}__{step.replace('/', '_')}.json")


def run(configs, topologies, steps, find_max_batch: bool) -> None:
    os.makedirs(OUT, exist_ok=True)
    for topo in topologies:
        for config in configs:
            for step in steps or steps_of(config):
                path = out_path(config, topo, step)
                if os.path.exists(path):
                    continue
                cmd = [sys.executable, "-m", "ezsd_jax.aot", f"--config=configs/{config}.py",
                       f"--topology={topo}", f"--steps=^{step}$", f"--out={path}"]
                if find_max_batch:
                    cmd.append("--find_max_batch")
                if config in NUM_CLASSES:
                    cmd.append(f"--num_classes={NUM_CLASSES[config]}")
                t0 = time.time()
                p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
                print(f"{config} {topo} {step}: exit {p.returncode} in {time.time() - t0:.0f}s"
                      f"{' ' + err[-1] if err else ''}", flush=True)
                if p.returncode not in (0, 2):
                    print(p.stderr[-3000:], flush=True)


def flops(configs) -> None:
    """FLOPs per item of every step, from the per-chip program lowered on one CPU device."""
    os.makedirs(OUT, exist_ok=True)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import importlib.util

    import jax
    import numpy as np
    from jax.sharding import Mesh

    from ezsd_jax.aot.registry import step_specs
    mesh = Mesh(np.array(jax.devices("cpu")[:1]).reshape(1, 1), ("data", "model"))
    for config in configs:
        path = os.path.join(OUT, f"flops__{config}.json")
        if os.path.exists(path):
            continue
        spec = importlib.util.spec_from_file_location("c", os.path.join(ROOT, "configs",
                                                                        f"{config}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cfg = mod.get_config()
        real = {"data": 8, "model": int(cfg.mesh.model)}    # per-chip batch of an 8-chip slice
        out = []
        for s in step_specs(cfg, Mesh(np.array(jax.devices("cpu")[:1] * 1).reshape(1, 1),
                                      ("data", "model")), NUM_CLASSES.get(config)):
            b = max(1, s.batch_per_chip if s.per_process else
                    s.batch_per_chip // real["data"] // real["model"] * real["model"] or 1)
            t0 = time.time()
            p = s.build(mesh, b)
            ca = p.fn.lower(*p.args).cost_analysis()
            ca = (ca[0] if isinstance(ca, (list, tuple)) else ca) or {}
            out.append({"step": f"{s.stage}/{s.step}", "batch_per_chip": b, "items": p.items,
                        "flops": ca.get("flops"), "flops_per_item": ca.get("flops", 0) / p.items,
                        "lower_s": round(time.time() - t0, 1)})
            print(config, out[-1], flush=True)
        from ezsd_jax.core.io_utils import atomic_write_json
        atomic_write_json(path, {"config": config, "note": "unoptimized HLO, per chip, CPU "
                                 "lowering; 8-chip data parallelism", "steps": out})


def render() -> str:
    rows = ["| config | slice | step | per-chip batch (global) | per-chip HBM GiB (of) | "
            "fits | largest per-chip batch | TFLOP/step/chip | est. items/s (roofline) | "
            "compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    # one step per file (`run`), then whole configs compiled by one command each
    # (benchmarks/aot/full/<config>__<slice>.json: `python -m ezsd_jax.aot ... --out=`)
    paths = (sorted(glob.glob(os.path.join(OUT, "*__*__*.json")))
             + sorted(glob.glob(os.path.join(OUT, "full", "*__*.json"))))
    for path in paths:
        with open(path) as f:
            rep = json.load(f)
        config = os.path.basename(path).split("__")[0]
        if os.path.basename(os.path.dirname(path)) == "full":
            config += " (one command)"
        for e in rep["steps"]:
            est = e.get("estimate_items_per_s")
            rows.append(
                f"| {config} | {e['topology']} ({e['chips']} chips) | {e['stage']}/{e['step']} "
                f"| {e['batch_per_chip']} ({e['global_batch']}) "
                f"| {e['total_bytes'] / 2 ** 30:.2f} ({e['capacity_bytes'] / 2 ** 30:.0f}) "
                f"| {'yes' if e['fits'] else 'no'} | {e.get('max_batch_per_chip', '-')} "
                f"| {e['flops'] / 1e12:.2f} | {'-' if est is None else f'{est:.0f}'} "
                f"| {e['compile_s'] if e['compile_s'] is not None else '-'} |")
    return "\n".join(rows)


# published per-chip peak bf16 FLOP/s (ezsd_jax/core/aot/topology.py CHIPS)
SLICES = {"v5e-8": (8, 197e12), "v5e-16": (16, 197e12), "v4-16": (8, 275e12),
          "v5p-16": (8, 459e12)}


def render_flops() -> str:
    """FLOPs per item and the compute-bound ceiling of items/s on each slice."""
    head = " | ".join(f"{k} ({n} chips) items/s at 100% / 40% of peak"
                      for k, (n, _) in SLICES.items())
    rows = [f"| config | step | per-chip batch | TFLOP per item | {head} |",
            "|---|---|---|---|" + "---|" * len(SLICES)]
    for path in sorted(glob.glob(os.path.join(OUT, "flops__*.json"))):
        with open(path) as f:
            rep = json.load(f)
        for e in rep["steps"]:
            fpi = e["flops_per_item"]
            cells = " | ".join(f"{n * peak / fpi:.0f} / {0.4 * n * peak / fpi:.0f}"
                               for n, peak in SLICES.values())
            rows.append(f"| {rep['config']} | {e['step']} | {e['batch_per_chip']} "
                        f"| {fpi / 1e12:.3f} | {cells} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("run", "flops", "render"))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--topologies", default=",".join(TOPOLOGIES))
    ap.add_argument("--steps", default="")
    ap.add_argument("--find_max_batch", action="store_true")
    a = ap.parse_args()
    if a.what == "render":
        print(render())
        print()
        print(render_flops())
        return
    if a.what == "flops":
        flops(a.configs.split(","))
        return
    run(a.configs.split(","), a.topologies.split(","),
        [s for s in a.steps.split(",") if s], a.find_max_batch)


if __name__ == "__main__":
    main()
