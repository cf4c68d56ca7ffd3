"""The reduced demo (configs/demo_ci.py) and its two controls over seeds: the spread that
the bounds of tests/test_demo_zeroshot.py must hold on, and the home of the
no-distillation control (a second ~2-minute training run that CI no longer pays for: the
test checks instead that the logged student-teacher cosine rises, which a run whose
distillation is off cannot log).

One seed per process (run several at once to use the cores):

  python benchmarks/demo_ci_spread.py --seed=0 --workdir=/tmp/spread --out=/tmp/spread/s0.json

seed s sets config.train.seed, clip.pretrain.seed and clip.renorm.seed (as the README's
demo seeds do). Writes {seed, stage seconds, clean / crop accuracies, AP50 of the full
run, the no-distillation control and the shuffled-novel-text control} as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from configs import demo_ci
    from ezsd_jax import cli
    from ezsd_jax.data.synthetic_stage import point_data_config
    from ezsd_jax.demo import stages as demo_stages
    from ezsd_jax.main import resolve_stage

    cfg = demo_ci.get_config()
    cfg.train.seed = cfg.clip.pretrain.seed = cfg.clip.renorm.seed = a.seed
    wd = os.path.join(a.workdir, f"seed{a.seed}")
    os.makedirs(wd, exist_ok=True)
    point_data_config(cfg, wd)
    cli.save_config(cfg, wd)
    secs = {}
    for name in cfg.stages:          # the stages as `python -m ezsd_jax.main` runs them
        t0 = time.perf_counter()
        resolve_stage(name)(cfg, wd)
        secs[name] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    nodist = demo_stages.run_variant(cfg, "no_distillation", wd)["summary"]
    secs["control_no_distillation"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    shuffled = demo_stages.shuffled_novel_text_control(cfg, wd)
    secs["control_shuffled_text"] = round(time.perf_counter() - t0, 1)
    read = lambda *p: json.load(open(os.path.join(wd, *p)))  # noqa: E731
    full = read("eval", "ezsd_summary.json")
    rec = {"seed": a.seed, "seconds": secs,
           "clean": read("clip_pretrain", "clean_accuracy.json"),
           "crop": {k: v for k, v in read("clip_renorm", "crop_accuracy.json").items()
                    if k in ("before", "after")},
           "ap50": {"full": {k: full[k]["AP50"] for k in ("base", "novel", "all")},
                    "no_distillation": {k: nodist[k]["AP50"] for k in ("base", "novel")},
                    "shuffled_text": {k: shuffled[k]["AP50"] for k in ("base", "novel")}}}
    with open(a.out, "w") as f:
        json.dump(rec, f, indent=1)
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
