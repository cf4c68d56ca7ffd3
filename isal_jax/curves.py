"""Learning curves and annotation-cost savings of an active-learning experiment.

Place in the pipeline: isal_jax/loop.py writes workdir/al/results.csv -> THIS -> curves.png,
savings.csv, savings.json and a printed table (also `python -m isal_jax.curves AL_DIR`).

Mean curve of a strategy: at every num_labeled N it has results for, the mean (and the
sample standard deviation, ddof=1; 0 for one seed) of the metric over its seeds there.

Annotation-cost saving of strategy S against the reference R (random) at N labels, for
every N on R's mean curve except its first point (the initial labeled set, identical for
every strategy of a seed):

    target(N)   = R's mean metric at N
    needed(S,N) = the smallest n on S's mean curve, read as the piecewise-linear
                  interpolation between its measured points, where the metric >= target(N):
                  the first segment [n_{i-1}, n_i] with m_{i-1} < target <= m_i gives
                  n = n_{i-1} + (target - m_{i-1}) / (m_i - m_{i-1}) * (n_i - n_{i-1});
                  if S's first point already reaches it, needed = n_0 (no extrapolation
                  below the first point; flagged `lower_bound`, the saving is then at least
                  the value given)
    saving(S,N) = 1 - needed(S,N) / N       (> 0: S needs fewer labels; < 0: more)

If S's mean curve never reaches target(N) within its measured range, needed and saving
are None ("n/a" in the table): S did worse than R at N and we do not extrapolate. The
per-strategy summary gives the mean/min/max over the N where the saving is defined and
how many N were n/a (so a mean over few defined points is visible as such).
"""
from __future__ import annotations

import csv
import io
import math
import os
import sys
from typing import NamedTuple, Sequence

import numpy as np

from ezsd_jax.core.io_utils import atomic_write_bytes, atomic_write_json, atomic_write_text


class Curve(NamedTuple):
    n: np.ndarray        # [K] num_labeled, increasing
    mean: np.ndarray     # [K]
    std: np.ndarray      # [K] sample std over seeds (0 with one seed)
    count: np.ndarray    # [K] seeds at each point


def read_results(csv_path: str) -> list[dict]:
    """results.csv -> rows with ints for seed/cycle/num_labeled and floats for metrics."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        row = {}
        for k, v in r.items():
            if k == "strategy":
                row[k] = v
            elif k in ("seed", "cycle", "num_labeled"):
                row[k] = int(v)
            else:
                row[k] = float(v) if v not in ("", None) else math.nan
        out.append(row)
    return out


def mean_curves(rows: Sequence[dict], metric: str) -> dict[str, Curve]:
    """Per strategy (in first-appearance order): mean/std over seeds at each num_labeled."""
    by: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        if metric not in r:
            raise KeyError(f"results have no column {metric!r} (have {sorted(r)})")
        by.setdefault(r["strategy"], {}).setdefault(int(r["num_labeled"]), []).append(
            float(r[metric]))
    out = {}
    for s, pts in by.items():
        ns = np.array(sorted(pts), np.float64)
        vals = [np.asarray(pts[int(n)], np.float64) for n in ns]
        out[s] = Curve(ns, np.array([v.mean() for v in vals]),
                       np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals]),
                       np.array([len(v) for v in vals]))
    return out


def labels_to_reach(n: Sequence[float], values: Sequence[float],
                    target: float) -> tuple[float | None, bool]:
    """(smallest n where the piecewise-linear curve reaches `target`, lower_bound flag);
    (None, False) when it never does within the measured range. See the module docstring."""
    n = np.asarray(n, np.float64)
    v = np.asarray(values, np.float64)
    if len(n) == 0:
        return None, False
    if np.any(np.diff(n) <= 0):
        raise ValueError(f"labels_to_reach: n must be strictly increasing, got {n.tolist()}")
    if v[0] >= target:
        return float(n[0]), True
    for i in range(1, len(n)):
        if v[i - 1] < target <= v[i]:
            frac = (target - v[i - 1]) / (v[i] - v[i - 1])
            return float(n[i - 1] + frac * (n[i] - n[i - 1])), False
    return None, False


def savings(curves: dict[str, Curve], reference: str = "random") -> list[dict]:
    """Rows {strategy, num_labeled, reference_value, labels_needed, saving, lower_bound}
    for every strategy but the reference and every N of the reference curve except its
    first point."""
    if reference not in curves:
        raise KeyError(f"no {reference!r} curve to compare against (have {sorted(curves)})")
    ref = curves[reference]
    out = []
    for s, c in curves.items():
        if s == reference:
            continue
        for N, target in zip(ref.n[1:], ref.mean[1:]):
            needed, lower = labels_to_reach(c.n, c.mean, float(target))
            out.append({"strategy": s, "num_labeled": int(N),
                        "reference_value": float(target),
                        "labels_needed": needed,
                        "saving": None if needed is None else 1.0 - needed / float(N),
                        "lower_bound": bool(lower and needed is not None and needed < N)})
    return out


def summarize(rows: Sequence[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in rows:
        d = out.setdefault(r["strategy"], {"defined": [], "n_na": 0})
        if r["saving"] is None:
            d["n_na"] += 1
        else:
            d["defined"].append(r["saving"])
    res = {}
    for s, d in out.items():
        x = np.asarray(d["defined"], np.float64)
        res[s] = {"mean": float(x.mean()) if len(x) else None,
                  "min": float(x.min()) if len(x) else None,
                  "max": float(x.max()) if len(x) else None,
                  "n_defined": int(len(x)), "n_na": int(d["n_na"])}
    return res


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def format_table(rows: Sequence[dict], curves: dict[str, Curve], metric: str,
                 reference: str = "random") -> str:
    """Two plain-text tables: the mean metric per strategy and N, and the savings."""
    ns = sorted({int(n) for c in curves.values() for n in c.n})
    w = max([len(s) for s in curves] + [10])
    lines = [f"mean {metric} over seeds (seeds per point in brackets where not all equal)"]
    lines.append(f"{'strategy':<{w}} " + " ".join(f"{n:>9d}" for n in ns))
    for s, c in curves.items():
        cells = []
        for n in ns:
            hit = np.nonzero(c.n == n)[0]
            if len(hit):
                i = hit[0]
                cell = f"{c.mean[i]:.4f}"
                if c.count[i] != c.count.max():
                    cell += f"({c.count[i]})"
                cells.append(f"{cell:>9}")
            else:
                cells.append(f"{'-':>9}")
        lines.append(f"{s:<{w}} " + " ".join(cells))
    if rows:
        sn = sorted({r["num_labeled"] for r in rows})
        summ = summarize(rows)
        lines.append("")
        lines.append(f"annotation-cost saving vs {reference}: 1 - (labels needed to reach "
                     f"{reference}'s mean {metric} at N) / N  (n/a = never reaches it; "
                     "'>=' = reached at the first point)")
        lines.append(f"{'strategy':<{w}} " + " ".join(f"{'N=' + str(n):>9}" for n in sn)
                     + "   mean(defined)  n/a")
        for s in summ:
            cells = []
            for n in sn:
                r = next((r for r in rows if r["strategy"] == s and r["num_labeled"] == n),
                         None)
                cell = "-" if r is None else (">=" if r["lower_bound"] else "") + _pct(
                    r["saving"])
                cells.append(f"{cell:>9}")
            lines.append(f"{s:<{w}} " + " ".join(cells)
                         + f"   {_pct(summ[s]['mean']):>13}  {summ[s]['n_na']:>3}")
    return "\n".join(lines)


def paired_differences(rows: Sequence[dict], metric: str,
                       reference: str = "random") -> dict[str, Curve]:
    """Per strategy: mean and std over seeds of (strategy - reference) at the same seed and
    N (seeds paired: the same initial set), at every N both have for some seed."""
    val = {(r["strategy"], int(r["seed"]), int(r["num_labeled"])): float(r[metric])
           for r in rows}
    out = {}
    for s in dict.fromkeys(r["strategy"] for r in rows):
        if s == reference:
            continue
        by: dict[int, list[float]] = {}
        for (st, seed, n), v in val.items():
            if st == s and (reference, seed, n) in val:
                by.setdefault(n, []).append(v - val[reference, seed, n])
        if by:
            ns = np.array(sorted(by), np.float64)
            d = [np.asarray(by[int(n)]) for n in ns]
            out[s] = Curve(ns, np.array([x.mean() for x in d]),
                           np.array([x.std(ddof=1) if len(x) > 1 else 0.0 for x in d]),
                           np.array([len(x) for x in d]))
    return out


def plot_curves(curves: dict[str, Curve], path: str, metric: str,
                reference: str = "random", title: str = "",
                differences: dict[str, Curve] | None = None) -> str:
    """PNG: (left) mean +- std over seeds per strategy; (right, when given) the paired
    differences to the reference (mean +- std over seeds). Written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if differences else 1, figsize=(12, 4.5), squeeze=False)

    def style(s):
        return dict(lw=2.5) if s == "isal" else (dict(ls="--", color="k") if s == reference
                                                  else {})
    ax = axes[0, 0]
    for s, c in curves.items():
        (line,) = ax.plot(c.n, c.mean, marker="o", ms=3, label=f"{s} (n={c.count.max()})",
                          **style(s))
        ax.fill_between(c.n, c.mean - c.std, c.mean + c.std, alpha=0.15,
                        color=line.get_color())
    ax.set_xlabel("labeled samples")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric}: mean +- std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if differences:
        ax = axes[0, 1]
        ax.axhline(0, color="k", ls="--", lw=1.0, label=reference)
        for s, c in curves.items():
            if s not in differences:
                continue
            d = differences[s]
            (line,) = ax.plot(d.n, d.mean, marker="o", ms=3, label=s, **style(s))
            ax.fill_between(d.n, d.mean - d.std, d.mean + d.std, alpha=0.12,
                            color=line.get_color())
        ax.set_xlabel("labeled samples")
        ax.set_ylabel(f"{metric} - {reference}")
        ax.set_title(f"paired difference to {reference} (same seed): mean +- std")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def report(csv_path: str, out_dir: str, metric: str, reference: str = "random",
           plot: bool = True, quiet: bool = False) -> dict:
    """Reads results.csv; writes savings.csv/.json (and curves.png); prints the tables.
    Returns {'table', 'savings', 'summary', 'png', 'savings_csv', 'savings_json'}."""
    rows = read_results(csv_path)
    curves = mean_curves(rows, metric)
    sav = savings(curves, reference) if reference in curves else []
    summ = summarize(sav)
    table = format_table(sav, curves, metric, reference)
    out = {"table": table, "savings": sav, "summary": summ}
    buf = io.StringIO()
    cols = ["strategy", "num_labeled", "reference_value", "labels_needed", "saving",
            "lower_bound"]
    wr = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    wr.writeheader()
    for r in sav:
        wr.writerow({k: ("n/a" if r[k] is None else r[k]) for k in cols})
    out["savings_csv"] = atomic_write_text(os.path.join(out_dir, "savings.csv"),
                                           buf.getvalue())
    out["savings_json"] = atomic_write_json(os.path.join(out_dir, "savings.json"), {
        "metric": metric, "reference": reference,
        "definition": "saving(S, N) = 1 - labels S needs to reach the reference's mean "
                      "metric at N (linear interpolation along S's mean curve) / N; None "
                      "when S's mean curve never reaches it",
        "curves": {s: {k: v.tolist() for k, v in c._asdict().items()}
                   for s, c in curves.items()},
        "rows": sav, "summary": summ})
    if plot:
        out["png"] = plot_curves(curves, os.path.join(out_dir, "curves.png"), metric,
                                 reference, differences=paired_differences(rows, metric,
                                                                           reference))
    if not quiet:
        print(table, flush=True)
        if plot:
            print(f"plot: {out['png']}", flush=True)
    return out


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m isal_jax.curves AL_DIR [METRIC]  (AL_DIR = <workdir>/al)",
              file=sys.stderr)
        return 2
    al_dir = argv[1]
    csv_path = os.path.join(al_dir, "results.csv")
    if not os.path.exists(csv_path):
        print(f"error: {csv_path} does not exist", file=sys.stderr)
        return 2
    if len(argv) == 3:
        metric = argv[2]
    else:
        import json
        metric = json.load(open(os.path.join(al_dir, "experiment.json")))["primary_metric"]
    report(csv_path, al_dir, metric)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
