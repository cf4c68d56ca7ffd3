"""The reference protocol's defaults vs the earlier ones on the demo, for one seed: the
shared stages (demo data, toy CLIP, re-normalization, proposals) run once, then the
detector is trained and evaluated under each variant of VARIANTS in its own directory
(docs/protocol.md, "Protocol defaults measured on the demo"; figures in RESULTS.md).

  python benchmarks/protocol_ab.py --config=configs/demo_ci.py --seed=0 \
      --workdir=/tmp/protocol_ab --out=/tmp/protocol_ab/s0.json

Resumable: a variant whose eval summary is of the final step is not re-run (as the demo's
ablation). seed s sets train.seed, clip.pretrain.seed and clip.renorm.seed
(benchmarks/demo_spread.py's convention).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHARED = ("demo_data", "clip_pretrain", "renorm", "proposals")
# config overrides (dotted path -> value) of each variant; 'reference' = the defaults
VARIANTS = {
    # the background init is set explicitly: configs/demo.py keeps 'normal' (measured)
    "reference": {"model.ezsd.background_init": "xavier"},
    "earlier": {   # every item of docs/protocol.md's reference read at its earlier value
        "ezsd.distill.sample": "random", "ezsd.distill.norm_images": 0,
        "model.rpn_low_quality_min_iou": 0.0, "model.roi_low_quality_min_iou": -1.0,
        "model.input_padding": "black", "model.test_topk_candidates": 1024,
        "model.ezsd.background_init": "normal"},
}
# one item changed at a time
VARIANTS["reference_bg_normal"] = {"model.ezsd.background_init": "normal"}
VARIANTS["earlier_bg_xavier"] = dict(VARIANTS["earlier"], **{"model.ezsd.background_init":
                                                              "xavier"})


def _set(cfg, path: str, value) -> None:
    node = cfg
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo_ci.py")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=0,
                    help="detector training steps (0: the config's train.steps)")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from ezsd_jax.core import cli
    from ezsd_jax.data.synthetic_stage import point_data_config
    from ezsd_jax.ezsd import stages as ezsd_stages
    from ezsd_jax.stages import resolve_stage

    module = os.path.splitext(os.path.relpath(a.config))[0].replace(os.sep, ".")
    cfg = importlib.import_module(module).get_config()
    cfg.train.seed = cfg.clip.pretrain.seed = cfg.clip.renorm.seed = a.seed
    if a.steps:
        cfg.train.steps = cfg.train.ckpt_every = a.steps
    wd = os.path.join(a.workdir, f"seed{a.seed}")
    os.makedirs(wd, exist_ok=True)
    point_data_config(cfg, wd)
    cli.save_config(cfg, wd)
    secs, ap50 = {}, {}
    for name in SHARED:
        t0 = time.perf_counter()
        resolve_stage(name)(cfg, wd)
        secs[name] = round(time.perf_counter() - t0, 1)
    rec = {"config": a.config, "seed": a.seed, "steps": int(cfg.train.steps),
           "seconds": secs, "ap50": ap50}
    for v in [v for v in a.variants.split(",") if v]:
        vdir = os.path.join(wd, "variants", f"{v}_{cfg.train.steps}steps")
        os.makedirs(vdir, exist_ok=True)
        vcfg = cfg.copy_and_resolve_references()     # the shared stages' outputs
        vcfg.ezsd.text_embeddings = ezsd_stages.text_embeddings_path(cfg, wd)
        vcfg.ezsd.proposals_dir = os.path.join(wd, "proposals")
        for path, value in VARIANTS[v].items():
            _set(vcfg, path, value)
        t0 = time.perf_counter()
        spath = os.path.join(vdir, "eval", "ezsd_summary.json")
        done = json.load(open(spath)) if os.path.exists(spath) else None
        if done is None or done.get("step") != int(cfg.train.steps):
            ezsd_stages.ezsd_train(vcfg, vdir)
            done = ezsd_stages.ezsd_eval(vcfg, vdir)
        secs[v] = round(time.perf_counter() - t0, 1)
        ap50[v] = {k: done[k]["AP50"] for k in ("base", "novel", "all")}
        rec = {"config": a.config, "seed": a.seed, "steps": int(cfg.train.steps),
               "seconds": secs, "ap50": ap50,
               "variants": {k: VARIANTS[k] for k in ap50}}
        with open(a.out, "w") as f:       # after every variant: partial results survive
            json.dump(rec, f, indent=1)
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
