"""ISAL regime study on Fashion-MNIST (idx files): where does influence selection help?

    nice -n 10 python benchmarks/isal_regimes.py run [--regimes low,paper] [--seeds 0,1,2]
        [--variants random,margin,...] [--workdir /tmp/isal_regimes_work]
    python benchmarks/isal_regimes.py table          # -> markdown tables from the results

One job = (regime, variant, seed): the AL loop (isal_jax.loop.run_experiment) in its own
subprocess and workdir; when it finishes, benchmarks/isal_regimes/<regime>/<variant>_seed<s>.json
holds its curve and timings. Existing result files are skipped and a killed job resumes
from its workdir (the loop's own resume), so the command can be rerun at any time.
Regimes and variants: REGIMES / VARIANTS below; docs/isal-method.md explains them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Result files; ISAL_REGIMES_OUT lets a frozen copy of the code (e.g. `git archive HEAD`
# unpacked elsewhere, so that editing the tree does not change running jobs) write here.
OUT = os.environ.get("ISAL_REGIMES_OUT", os.path.join(ROOT, "benchmarks", "isal_regimes"))
FASHION = "/usr/share/datasets/fashion-mnist"    # Debian package dataset-fashion-mnist
MEAN, STD = (0.286,), (0.353,)                   # Fashion-MNIST train statistics

# The regimes. 'paper' follows the reference's CIFAR-10 schedule (1/50 of the set first,
# then 1/49, 1/48, ... of the rest = 1/50 of the set per cycle) on the 60k Fashion-MNIST
# train split, with a width-reduced CIFAR ResNet-18 (widths 4-8-16-32 instead of
# 64-128-256-512) and a CPU-sized budget: 3 cycles (1.2k -> 3.6k labels instead of 1k ->
# 10k), 3 epochs per cycle instead of 200 (lr 0.1, x0.1 at 80%).
REGIMES = {
    "low": dict(pool_size=10000, initial=20, budget=20, cycles=10, model="cnn",
                channels=(16, 32), steps=300, epochs=0.0, batch=32, lr=0.05,
                decay=(0.8,), augment="none", eval_batch=1000,
                influence=dict(ref_batch_size=256, hvp_batch_size=32, pool_batch_size=500,
                               shard_size=10000)),
    "paper": dict(pool_size=60000, initial=1200, budget=1200, cycles=3, model="resnet18",
                  widths=(4, 8, 16, 32), steps=0, epochs=3.0, batch=128, lr=0.1,
                  decay=(0.8,), augment="crop", eval_batch=1000,
                  influence=dict(ref_batch_size=500, hvp_batch_size=128,
                                 pool_batch_size=500, shard_size=20000)),
}

# Strategy variants: (loop strategy, config overrides). isal_ref = the reference's own
# choices (LiSSA damp 0.01 / scale 1e4 / 4 chains x 250 steps of ONE labeled sample each,
# the first 1,000 labeled samples in order, per-block NaN reset, select even when LiSSA
# has not converged, v over the test split); isal_best = our fast settings (CG, top_eig
# damping, class-balanced top-k) with the same v; isal_best_heldout = v over a held-out
# labelled part instead of the test split; isal_last = isal_best on the last layers;
# isal_expected = isal_best with expected-gradient pseudo labels.
OURS = dict(solver="cg", damp_mode="top_eig", diversity="class_balanced")
LAST_LAYERS = r"regex:^(Conv_1/kernel|Dense_0/kernel|BasicBlock_[67]/.*kernel)$"
VARIANTS = {
    "random": ("random", {}, {}),
    "entropy": ("entropy", {}, {}),
    "margin": ("margin", {}, {}),
    "coreset": ("coreset", {}, {}),
    "isal_ref": ("isal", dict(solver="lissa", damp_mode="fixed", diversity="none",
                              reference_mode=True), {"source": "split:test"}),
    "isal_best": ("isal", OURS, {"source": "split:test"}),
    "isal_best_heldout": ("isal", OURS, {"source": "heldout"}),
    # our settings on the last layers only (the reference's commented-out alternative:
    # layer4 + linear; the small CNN: its last conv + the classifier): a cheaper JVP pass
    "isal_last": ("isal", dict(OURS, subset=LAST_LAYERS), {"source": "split:test"}),
    # our settings with the expected-gradient pseudo label (the top-k classes weighted by
    # the model's probabilities instead of the argmax)
    "isal_expected": ("isal", dict(OURS, pseudo_label="expected"), {"source": "split:test"}),
}


def make_config(regime: str, variant: str, seed: int, pool_file: str):
    from configs import isal_fashion
    r = REGIMES[regime]
    strategy, infl, ref = VARIANTS[variant]
    c = isal_fashion.get_config()
    c.al.strategies = (strategy,)
    c.al.seeds = (seed,)
    c.al.initial, c.al.budget, c.al.cycles = r["initial"], r["budget"], r["cycles"]
    c.al.plot = False
    c.data.data_dir = FASHION
    c.data.pool_ids_file = pool_file
    c.data.loader.mean, c.data.loader.std = MEAN, STD
    c.model.name = r["model"]
    if "channels" in r:
        c.model.channels = r["channels"]
    if "widths" in r:
        c.model.widths = r["widths"]
    t = c.train
    t.steps, t.epochs, t.batch_size, t.lr = r["steps"], r["epochs"], r["batch"], r["lr"]
    t.decay_fractions, t.augment, t.crop_pad = r["decay"], r["augment"], 2
    t.eval_batch_size, t.ckpt_every, t.log_every = r["eval_batch"], 100000, 1000
    i = c.influence
    for k, v in r["influence"].items():
        i[k] = v
    # the variants start from the reference's settings (every conv / linear weight, not
    # isal_fashion's last-layer subset) and change only what they name
    i.solver, i.damp_mode, i.diversity = "lissa", "fixed", "none"
    i.subset = "ndim_gt1"
    for k, v in infl.items():
        if k == "reference_mode":
            i.hvp_batch_size, i.hvp_order, i.nan_reset = 1, "sequential", "block"
            i.depth, i.repeats, i.on_unconverged = 250, 4, "select"
        else:
            i[k] = v
    for k, v in ref.items():
        c.reference[k] = v
    return c


def pool_file(workdir: str, regime: str) -> str:
    """The regime's pool: a fixed seed-0 draw of pool_size train ids (all 60k for 'paper')."""
    path = os.path.join(workdir, f"pool_{regime}.json")
    if not os.path.exists(path):
        n = REGIMES[regime]["pool_size"]
        ids = np.sort(np.random.default_rng(0).permutation(60000)[:n]).tolist()
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(ids, f)
    return path


def result_path(regime: str, variant: str, seed: int) -> str:
    return os.path.join(OUT, regime, f"{variant}_seed{seed}.json")


def run_job(regime: str, variant: str, seed: int, workdir: str) -> None:
    """In-process: one AL experiment, then its result file."""
    import isal_jax.scoring  # noqa: F401  (every module the job uses, imported up front)
    import isal_jax.select  # noqa: F401  (same)
    from isal_jax.classification_al import build_task
    from isal_jax.loop import cycle_dir, run_experiment
    wd = os.path.join(workdir, regime, variant, f"seed_{seed}")
    cfg = make_config(regime, variant, seed, pool_file(workdir, regime))
    task = build_task(cfg, wd)
    run_experiment(task, cfg.al, wd)
    rows = []
    strategy = VARIANTS[variant][0]
    for c in range(REGIMES[regime]["cycles"]):
        with open(os.path.join(cycle_dir(os.path.join(wd, "al"), strategy, seed, c),
                               "done.json")) as f:
            done = json.load(f)
        rows.append({"cycle": c, "num_labeled": done["num_labeled"],
                     "accuracy": done["metrics"]["accuracy"], **done["timings"]})
    os.makedirs(os.path.dirname(result_path(regime, variant, seed)), exist_ok=True)
    tmp = result_path(regime, variant, seed) + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"regime": regime, "variant": variant, "seed": seed,
                   "settings": REGIMES[regime], "variant_settings": VARIANTS[variant][1:],
                   "rows": rows}, f, indent=1)
    os.replace(tmp, result_path(regime, variant, seed))


def run_all(args) -> None:
    for seed in [int(s) for s in args.seeds.split(",")]:
        for regime in args.regimes.split(","):
            for variant in args.variants.split(","):
                if os.path.exists(result_path(regime, variant, seed)):
                    continue
                t0 = time.time()
                log = os.path.join(args.workdir, f"{regime}_{variant}_{seed}.log")
                os.makedirs(args.workdir, exist_ok=True)
                with open(log, "a") as f:
                    rc = subprocess.call([sys.executable, __file__, "job", regime, variant,
                                          str(seed), "--workdir", args.workdir],
                                         stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
                print(f"{regime}/{variant}/seed {seed}: rc={rc} {time.time() - t0:.0f}s",
                      flush=True)


# ----------------------------------------------------------------------------- tables

def load_results() -> dict:
    out: dict = {}
    for regime in REGIMES:
        d = os.path.join(OUT, regime)
        if not os.path.isdir(d):
            continue
        for f in sorted(os.listdir(d)):
            if f.endswith(".json"):
                r = json.load(open(os.path.join(d, f)))
                out.setdefault(regime, {}).setdefault(r["variant"], {})[r["seed"]] = r["rows"]
    return out


def saved(rows, ref_rows) -> tuple[float | None, int]:
    """Paired (same seed: same initial set and cycle seeds) annotation-cost saving of a run
    against a reference run: the mean over the reference's budgets N (after the first) of
    1 - labels(run reaches the reference's accuracy at N) / N, read off the run's
    piecewise-linear curve (isal_jax.curves.labels_to_reach: the first crossing). Budgets
    whose accuracy the run never reaches are left out and counted (second value)."""
    from isal_jax.curves import labels_to_reach
    n = [r["num_labeled"] for r in rows]
    acc = [r["accuracy"] for r in rows]
    vals, na = [], 0
    for r in ref_rows[1:]:
        need, _ = labels_to_reach(n, acc, r["accuracy"])
        if need is None:
            na += 1
        else:
            vals.append(1 - need / r["num_labeled"])
    return (float(np.mean(vals)) if vals else None), na


def _fmt(pairs) -> str:
    vals = [v for v, _ in pairs if v is not None]
    na = sum(k for _, k in pairs)
    if not vals:
        return "-"
    spread = f" +- {100 * np.std(vals, ddof=1):.1f}" if len(vals) > 1 else ""
    return (f"{100 * np.mean(vals):+.1f}%{spread} (seeds {len(vals)}"
            + (f", {na} budgets not reached" if na else "") + ")")


def table() -> str:
    """Markdown: per regime and variant, mean accuracy per budget, savings vs random and
    vs the best baseline (the non-random baseline with the highest mean accuracy over all
    budgets and seeds), mean over seeds +- sample std of the per-seed savings, and the
    mean selection seconds per cycle (the loop's last selection excluded)."""
    res = load_results()
    lines = []
    for regime, by_var in res.items():
        base = [v for v in ("entropy", "margin", "coreset") if v in by_var]
        best = max(base, key=lambda b: np.mean([[r["accuracy"] for r in by_var[b][s]]
                                                for s in by_var[b]])) if base else None
        n = [r["num_labeled"] for r in next(iter(next(iter(by_var.values())).values()))]
        lines.append(f"\n{regime}: labels {n[0]} -> {n[-1]}; best baseline: {best}\n")
        lines.append("| variant | seeds | accuracy % per budget (mean over seeds) | "
                     "saved vs random | saved vs best baseline | select s/cycle |")
        lines.append("|---|---|---|---|---|---|")
        for var, seeds in by_var.items():
            ss = sorted(seeds)
            accs = np.array([[r["accuracy"] for r in seeds[s]] for s in ss])
            sel = np.mean([r["select_s"] for s in ss for r in seeds[s][:-1]])
            vr = "reference" if var == "random" else _fmt(
                [saved(seeds[s], by_var["random"][s]) for s in ss
                 if "random" in by_var and s in by_var["random"]])
            vb = "reference" if var == best else _fmt(
                [saved(seeds[s], by_var[best][s]) for s in ss if best and s in by_var[best]])
            lines.append(f"| {var} | {len(ss)} | "
                         + " / ".join(f"{100 * a:.1f}" for a in accs.mean(0))
                         + f" | {vr} | {vb} | {sel:.1f} |")
    return "\n".join(lines)


def class_spread(workdir: str) -> str:
    """Markdown: how spread over the true classes each variant's selected batches are (mean
    over finished cycles and seeds of the normalized entropy of the batch's label
    histogram, 1 = uniform over the 10 classes), from the loop's selection.json files."""
    from isal_jax.data import load_dataset
    labels = load_dataset("idx", "train", FASHION).get(np.arange(60000))["label"]
    lines = ["| regime | variant | batches | class entropy of a selected batch (0..1) |",
             "|---|---|---|---|"]
    for regime in REGIMES:
        for variant, (strategy, _, _) in VARIANTS.items():
            ents = []
            for seed in range(5):
                c = 0
                while True:
                    f = os.path.join(workdir, regime, variant, f"seed_{seed}", "al", strategy,
                                     f"seed_{seed}", f"cycle_{c}", "selection.json")
                    if not os.path.exists(f):
                        break
                    ids = json.load(open(f))["ids"]
                    p = np.bincount(labels[np.asarray(ids)], minlength=10) / len(ids)
                    p = p[p > 0]
                    ents.append(float(-(p * np.log(p)).sum() / np.log(10)))
                    c += 1
            if ents:
                lines.append(f"| {regime} | {variant} | {len(ents)} | "
                             f"{np.mean(ents):.2f} +- {np.std(ents):.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=("run", "job", "table", "classes"))
    p.add_argument("rest", nargs="*")
    p.add_argument("--regimes", default="low,paper")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--workdir", default="/tmp/isal_regimes_work")
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    if args.cmd == "run":
        run_all(args)
    elif args.cmd == "job":
        regime, variant, seed = args.rest
        run_job(regime, variant, int(seed), args.workdir)
    elif args.cmd == "classes":
        print(class_spread(args.workdir))
    else:
        print(table())


if __name__ == "__main__":
    main()
