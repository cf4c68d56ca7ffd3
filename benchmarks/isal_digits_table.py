"""Table of ISAL variants against the baselines on digits (benchmarks/RESULTS.md).

    python benchmarks/isal_digits_table.py --baselines=benchmarks/isal_digits_results.csv \
        --variant=isal_ref=W1/al/results.csv --variant=isal_cb=W2/al/results.csv ...

Each --variant NAME=CSV takes that results.csv's 'isal' rows as strategy NAME; the
baselines CSV gives random / margin / coreset (the same seeds give the same initial sets
and the same training, so rows of separate runs pair by (seed, num_labeled)). Prints, per
variant: the mean annotation-cost saving vs random (isal_jax.curves), and the paired
accuracy difference to random, margin and core-set: per seed the mean over every N after
the initial set of (variant - baseline), then mean +- standard error over seeds and how
many seeds the variant is ahead on; then each variant against the first one. Also writes
the merged rows with --out=CSV.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from isal_jax import curves as C  # noqa: E402

BASELINES = ("random", "margin", "coreset")


def paired_summary(rows, a: str, b: str, metric: str = "accuracy"):
    val = {(r["strategy"], int(r["seed"]), int(r["num_labeled"])): float(r[metric])
           for r in rows}
    first = min(int(r["num_labeled"]) for r in rows)
    per_seed = {}
    for (s, seed, n), v in val.items():
        if s == a and n > first and (b, seed, n) in val:
            per_seed.setdefault(seed, []).append(v - val[b, seed, n])
    d = np.array([np.mean(x) for x in per_seed.values()])
    if len(d) == 0:
        return None
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return float(d.mean()), float(se), int((d > 0).sum()), int(len(d))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baselines", required=True)
    ap.add_argument("--variant", action="append", default=[], help="NAME=results.csv")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    rows = [r for r in C.read_results(args.baselines) if r["strategy"] in BASELINES]
    names = []
    for spec in args.variant:
        name, path = spec.split("=", 1)
        names.append(name)
        rows += [{**r, "strategy": name} for r in C.read_results(path)
                 if r["strategy"] == "isal"]
    seeds = sorted({int(r["seed"]) for r in rows if r["strategy"] in names})
    rows = [r for r in rows if int(r["seed"]) in seeds]
    summ = C.summarize(C.savings(C.mean_curves(rows, "accuracy"), "random"))
    print(f"seeds {seeds}")
    print("| strategy | mean saving vs random | - random (points) | - margin | - core-set |")
    print("|---|---|---|---|---|")
    for s in names + [b for b in BASELINES if b != "random"]:
        cells = []
        for b in BASELINES:
            p = paired_summary(rows, s, b) if s != b else None
            cells.append("-" if p is None else
                         f"{100 * p[0]:+.2f} +- {100 * p[1]:.2f} ({p[2]}/{p[3]})")
        sv = summ.get(s, {}).get("mean")
        saving = "n/a" if sv is None else f"{100 * sv:+.1f}%"
        print(f"| {s} | {saving} | " + " | ".join(cells) + " |")
    if len(names) > 1:
        print(f"\npaired accuracy difference to {names[0]} (points, mean +- SE, seeds ahead):")
        for s in names[1:]:
            p = paired_summary(rows, s, names[0])
            if p is not None:
                print(f"  {s}: {100 * p[0]:+.2f} +- {100 * p[1]:.2f} ({p[2]}/{p[3]})")
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
