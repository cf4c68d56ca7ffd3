"""The demo (configs/demo.py) or the reduced CI demo (configs/demo_ci.py) for one seed,
with its controls: the spread over seeds that the README's demo tables report and that
the bounds of tests/test_demo_zeroshot.py must hold on. Also the home of the CI demo's
no-distillation control (a second ~2-minute training run that CI no longer pays for: the
test checks instead that the logged student-teacher cosine rises, which a run whose
distillation is off cannot log).

One seed per process (run several at once to use the cores):

  python benchmarks/demo_spread.py --config=configs/demo_ci.py --seed=0 \
      --workdir=/tmp/spread --out=/tmp/spread/s0.json
  python benchmarks/demo_spread.py --config=configs/demo.py --seed=0 \
      --variants=no_renorm,no_proposals,no_semantic_regression,no_distillation \
      --workdir=/tmp/demo_spread --out=/tmp/demo_spread/s0.json   # the README's tables

seed s sets config.train.seed, clip.pretrain.seed and clip.renorm.seed (as the README's
demo seeds do). Runs the config's stages as `python -m ezsd_jax.main` does, then each
ablation variant of --variants (ezsd_jax/demo/stages.run_variant) and the
shuffled-novel-text control. Writes {seed, stage seconds, clean / crop accuracies, box
(and, with masks on, mask) AP50 of the full run, of each variant and of the control} as
JSON.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPLITS = ("base", "novel", "all")


def _ap50(summary: dict) -> dict:
    """{split: {'AP50', 'mask_AP50' (with masks)}} of an ezsd_eval summary."""
    return {k: {m: summary[k][m] for m in ("AP50", "mask_AP50") if m in summary[k]}
            for k in SPLITS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo_ci.py",
                    help="configs/demo.py or configs/demo_ci.py")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="no_distillation",
                    help="comma-separated ablation variants (configs/demo.py: ablation)")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from ezsd_jax.core import cli
    from ezsd_jax.data.synthetic_stage import point_data_config
    from ezsd_jax.demo import stages as demo_stages
    from ezsd_jax.stages import resolve_stage

    module = os.path.splitext(os.path.relpath(a.config))[0].replace(os.sep, ".")
    cfg = importlib.import_module(module).get_config()
    variants = [v for v in a.variants.split(",") if v]
    unknown = sorted(set(variants) - set(cfg.ablation.variants))
    if unknown:
        sys.exit(f"--variants: {unknown} not in {a.config}'s ablation.variants "
                 f"{tuple(cfg.ablation.variants)}")
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
    read = lambda *p: json.load(open(os.path.join(wd, *p)))  # noqa: E731
    ap50 = {"full": _ap50(read("eval", "ezsd_summary.json"))}
    for v in variants:
        t0 = time.perf_counter()
        ap50[v] = _ap50(demo_stages.run_variant(cfg, v, wd)["summary"])
        secs[f"variant_{v}"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    ap50["shuffled_text"] = _ap50(demo_stages.shuffled_novel_text_control(cfg, wd))
    secs["control_shuffled_text"] = round(time.perf_counter() - t0, 1)
    rec = {"config": a.config, "seed": a.seed, "seconds": secs,
           "clean": read("clip_pretrain", "clean_accuracy.json"),
           "crop": {k: v for k, v in read("clip_renorm", "crop_accuracy.json").items()
                    if k in ("before", "after")},
           "ap50": ap50}
    with open(a.out, "w") as f:
        json.dump(rec, f, indent=1)
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
