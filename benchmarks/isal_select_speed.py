"""Selection time on a 10k pool with the small CNN: ISAL settings vs margin (same process,
same trained model, Fashion-MNIST idx files).

    python benchmarks/isal_select_speed.py [--repeats 2] [--settings all|1,2,...]
        [--out benchmarks/isal_select_speed.json]

Trains the small CNN of configs/isal_fashion.py on 200 random labels, then times one
selection of 20 ids from a fixed 10k pool per setting through the AL task's select (the
code path of `python -m isal_jax.main`), `repeats` times each in a fresh score directory;
the first call of each setting includes its compiles, the table reports the median of
the later ones and the first separately.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {
    "margin": ("margin", {}),
    "isal cg": ("isal", {"solver": "cg"}),
    "isal cg + top_eig + class_balanced": (
        "isal", {"solver": "cg", "damp_mode": "top_eig", "diversity": "class_balanced"}),
    "isal lissa (4x250, batch 32)": ("isal", {"solver": "lissa"}),
    "isal default, last layers (last conv + classifier)": (
        "isal", {"solver": "cg", "damp_mode": "top_eig", "diversity": "class_balanced",
                 "subset": "isal_fashion"}),     # configs/isal_fashion.py's subset
    "isal reference mode (4x250, batch 1, in order)": (
        "isal", {"solver": "lissa", "hvp_order": "sequential", "hvp_batch_size": 1,
                 "nan_reset": "block", "on_unconverged": "select"}),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--settings", default="all",
                   help="comma-separated indices into SETTINGS (0 = margin, always run)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "isal_select_speed.json"))
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    from configs import isal_fashion
    from isal_jax.classification_al import build_task
    cfg = isal_fashion.get_config()
    last_layers = cfg.influence.subset          # the config's own (last conv + classifier)
    cfg.influence.solver, cfg.influence.damp_mode, cfg.influence.diversity = \
        "lissa", "fixed", "none"
    cfg.influence.subset = "ndim_gt1"          # every setting names its subset change
    tmp = tempfile.mkdtemp(prefix="isal_speed_")
    pool = np.sort(np.random.default_rng(0).permutation(60000)[:10000])
    with open(os.path.join(tmp, "pool.json"), "w") as f:
        json.dump(pool.tolist(), f)
    cfg.data.pool_ids_file = os.path.join(tmp, "pool.json")
    task = build_task(cfg, tmp)
    labeled = np.sort(np.random.default_rng(1).choice(pool, 200, replace=False))
    unlabeled = np.setdiff1d(pool, labeled)
    state = task.train(labeled, 0, os.path.join(tmp, "train"))
    rows = {}
    base_influence = cfg.influence.to_dict()
    keep = (set(range(len(SETTINGS))) if args.settings == "all"
            else {0} | {int(i) for i in args.settings.split(",")})
    for i, (name, (strategy, over)) in enumerate(SETTINGS.items()):
        if i not in keep:
            continue
        if over.get("subset") == "isal_fashion":
            over = {**over, "subset": last_layers}
        cfg.influence.update({**base_influence, **over})
        times = []
        for r in range(args.repeats):
            wd = os.path.join(tmp, f"{len(rows)}_{r}")
            os.makedirs(wd)
            t0 = time.perf_counter()
            task.select(strategy, state, labeled, unlabeled, 20, 0, wd)
            times.append(time.perf_counter() - t0)
        rows[name] = {"first_s": times[0], "warm_s": statistics.median(times[1:] or times)}
        rows[name]["x_margin"] = rows[name]["warm_s"] / rows["margin"]["warm_s"]
        print(f"{name}: first {times[0]:.1f}s, warm {rows[name]['warm_s']:.1f}s", flush=True)
        with open(args.out, "w") as f:       # after every setting: a partial run counts
            json.dump({"pool": 10000, "labeled": 200, "budget": 20, "model": "cnn (16, 32)",
                       "repeats": args.repeats, "rows": rows}, f, indent=1)
    print("| setting | first call s | warm s | x margin |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['first_s']:.1f} | {r['warm_s']:.1f} | {r['x_margin']:.1f} |")


if __name__ == "__main__":
    main()
