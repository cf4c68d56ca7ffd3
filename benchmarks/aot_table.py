"""Real-size deviceless AOT reports for the reference configs on the TPU slices one would
book, and the RESULTS table made from them (docs/aot.md).

  python benchmarks/aot_table.py run [--configs coco,lvis] [--topologies v5e-8,v4-16]
      [--steps ezsd_train/train_step,...] [--find_max_batch]
  python benchmarks/aot_table.py render > table.md

`run` compiles one step per process (python -m ezsd_jax.aot --steps=...) and writes
benchmarks/aot/<config>__<topology>__<stage>_<step>.json atomically; an existing file is
skipped, so a killed run resumes. A step that does not fit still writes its JSON (exit 2).
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


def render() -> str:
    rows = ["| config | slice | step | per-chip batch (global) | per-chip HBM GiB (of) | "
            "fits | largest per-chip batch | TFLOP/step/chip | est. items/s (roofline) | "
            "compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(glob.glob(os.path.join(OUT, "*.json"))):
        with open(path) as f:
            rep = json.load(f)
        config = os.path.basename(path).split("__")[0]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("run", "render"))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--topologies", default=",".join(TOPOLOGIES))
    ap.add_argument("--steps", default="")
    ap.add_argument("--find_max_batch", action="store_true")
    a = ap.parse_args()
    if a.what == "render":
        print(render())
        return
    run(a.configs.split(","), a.topologies.split(","),
        [s for s in a.steps.split(",") if s], a.find_max_batch)


if __name__ == "__main__":
    main()
