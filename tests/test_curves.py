"""Tests for isal_jax/curves.py: the annotation-cost saving on synthetic curves with known
answers (interpolation, the never-reaches case, lower bounds, negative savings), mean
curves over seeds, and the written report files (CSV, JSON, PNG)."""
import csv
import json

import numpy as np
import pytest

from isal_jax import curves as C


def _rows(strategy, ns, vals_per_seed):
    rows = []
    for seed, vals in enumerate(vals_per_seed):
        for cycle, (n, v) in enumerate(zip(ns, vals)):
            rows.append({"strategy": strategy, "seed": seed, "cycle": cycle, "num_labeled": n,
                         "accuracy": v})
    return rows


def test_labels_to_reach_interpolates_first_crossing():
    n = [100, 200, 300, 400]
    v = [0.5, 0.7, 0.6, 0.9]                       # not monotone: the FIRST crossing counts
    assert C.labels_to_reach(n, v, 0.6) == (pytest.approx(150.0), False)
    assert C.labels_to_reach(n, v, 0.7) == (pytest.approx(200.0), False)   # exactly a point
    assert C.labels_to_reach(n, v, 0.8) == (pytest.approx(300 + 200 / 3), False)  # after dip
    assert C.labels_to_reach(n, v, 0.45) == (100.0, True)   # reached at the first point
    assert C.labels_to_reach(n, v, 0.95) == (None, False)   # never
    assert C.labels_to_reach([], [], 0.5) == (None, False)
    with pytest.raises(ValueError, match="strictly increasing"):
        C.labels_to_reach([100, 100], [0.1, 0.2], 0.15)


def test_labels_to_reach_matches_dense_scan_on_random_curves(rng):
    for _ in range(30):
        k = int(rng.integers(2, 8))
        n = np.cumsum(rng.integers(1, 50, k)).astype(float)
        v = rng.random(k)
        t = float(rng.random())
        got, _ = C.labels_to_reach(n, v, t)
        xs = np.linspace(n[0], n[-1], 200001)
        ys = np.interp(xs, n, v)
        hit = np.nonzero(ys >= t)[0]
        if len(hit) == 0:
            assert got is None
        else:
            assert got == pytest.approx(xs[hit[0]], abs=(n[-1] - n[0]) / 100000 + 1e-9)


def test_savings_known_answers():
    ns = [100, 200, 300, 400]
    rows = (_rows("random", ns, [[0.5, 0.6, 0.7, 0.8]])
            + _rows("good", ns, [[0.5, 0.7, 0.8, 0.85]])
            + _rows("bad", ns, [[0.5, 0.55, 0.6, 0.65]]))
    curves = C.mean_curves(rows, "accuracy")
    sav = {(r["strategy"], r["num_labeled"]): r for r in C.savings(curves, "random")}
    # N=100 (the initial point) is not reported; random itself is not compared
    assert set(sav) == {(s, n) for s in ("good", "bad") for n in (200, 300, 400)}
    # good: random's 0.6 at N=200 is reached at 150 (between 0.5@100 and 0.7@200)
    assert sav["good", 200]["labels_needed"] == pytest.approx(150)
    assert sav["good", 200]["saving"] == pytest.approx(0.25)
    assert sav["good", 300]["saving"] == pytest.approx(1 - 200 / 300)
    assert sav["good", 400]["saving"] == pytest.approx(0.25)        # 0.8 at 300
    # bad: random's 0.6 at N=200 needs 300 labels -> negative saving; 0.7, 0.8 never
    assert sav["bad", 200]["saving"] == pytest.approx(-0.5)
    assert sav["bad", 300]["saving"] is None and sav["bad", 300]["labels_needed"] is None
    assert sav["bad", 400]["saving"] is None
    assert not any(r["lower_bound"] for r in sav.values())
    s = C.summarize(C.savings(curves, "random"))
    assert s["good"]["mean"] == pytest.approx((0.25 + 1 / 3 + 0.25) / 3)
    assert s["good"]["n_na"] == 0 and s["good"]["n_defined"] == 3
    assert s["bad"] == {"mean": pytest.approx(-0.5), "min": pytest.approx(-0.5),
                        "max": pytest.approx(-0.5), "n_defined": 1, "n_na": 2}


def test_lower_bound_when_first_point_already_reaches():
    ns = [100, 200, 300]
    rows = _rows("random", ns, [[0.5, 0.5, 0.7]]) + _rows("s", ns, [[0.6, 0.8, 0.9]])
    sav = {r["num_labeled"]: r for r in C.savings(C.mean_curves(rows, "accuracy"))}
    assert sav[200]["labels_needed"] == 100 and sav[200]["lower_bound"]
    assert sav[200]["saving"] == pytest.approx(0.5)
    assert sav[300]["labels_needed"] == pytest.approx(150) and not sav[300]["lower_bound"]


def test_mean_curves_average_over_seeds_and_savings_use_the_mean():
    ns = [10, 20, 30]
    rows = (_rows("random", ns, [[0.4, 0.6, 0.8], [0.6, 0.6, 0.6]])    # mean .5 .6 .7
            + _rows("s", ns, [[0.5, 0.7, 0.9], [0.5, 0.7, 0.7]]))      # mean .5 .7 .8
    cur = C.mean_curves(rows, "accuracy")
    np.testing.assert_allclose(cur["random"].mean, [0.5, 0.6, 0.7])
    np.testing.assert_allclose(cur["random"].std, np.std([[0.4, 0.6, 0.8], [0.6, 0.6, 0.6]],
                                                         axis=0, ddof=1))
    assert cur["s"].count.tolist() == [2, 2, 2]
    sav = {r["num_labeled"]: r for r in C.savings(cur)}
    assert sav[20]["labels_needed"] == pytest.approx(15)      # 0.6 between .5@10 and .7@20
    assert sav[30]["labels_needed"] == pytest.approx(20)
    with pytest.raises(KeyError, match="no 'random' curve"):
        C.savings({"s": cur["s"]})
    with pytest.raises(KeyError, match="no column 'AP50'"):
        C.mean_curves(rows, "AP50")


def test_report_writes_csv_json_png(tmp_path, capsys):
    ns = [30, 60, 90]
    rows = (_rows("isal", ns, [[0.6, 0.8, 0.9], [0.6, 0.82, 0.9]])
            + _rows("random", ns, [[0.6, 0.7, 0.8], [0.6, 0.72, 0.84]])
            + _rows("entropy", ns, [[0.6, 0.65, 0.7], [0.6, 0.66, 0.7]]))
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = C.report(str(path), str(tmp_path), metric="accuracy")
    table = capsys.readouterr().out
    assert "annotation-cost saving vs random" in table and "n/a" in table
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "savings.csv") as f:
        srows = list(csv.DictReader(f))
    assert {(r["strategy"], r["num_labeled"]) for r in srows} == {
        (s, str(n)) for s in ("isal", "entropy") for n in (60, 90)}
    ent90 = next(r for r in srows if r["strategy"] == "entropy" and r["num_labeled"] == "90")
    assert ent90["saving"] == "n/a" and ent90["labels_needed"] == "n/a"
    js = json.loads((tmp_path / "savings.json").read_text())
    assert js["metric"] == "accuracy" and js["reference"] == "random"
    # isal: random's 0.71 at N=60 -> 30 + (0.71-0.6)/(0.81-0.6)*30
    isal60 = next(r for r in js["rows"] if r["strategy"] == "isal" and r["num_labeled"] == 60)
    assert isal60["labels_needed"] == pytest.approx(30 + 0.11 / 0.21 * 30)
    assert js["summary"]["entropy"]["n_na"] == 2 and js["summary"]["entropy"]["mean"] is None
    assert out["summary"]["isal"]["n_defined"] == 2
    assert C.main(["curves", str(tmp_path), "accuracy"]) == 0       # the CLI form
    assert C.main(["curves", str(tmp_path / "missing")]) == 2


def test_paired_differences_pair_by_seed():
    ns = [10, 20]
    rows = (_rows("random", ns, [[0.5, 0.6], [0.7, 0.9]])
            + _rows("s", ns, [[0.5, 0.7], [0.7, 0.9], [0.1, 0.1]]))   # seed 2: no partner
    d = C.paired_differences(rows, "accuracy")["s"]
    np.testing.assert_allclose(d.n, [10, 20])
    np.testing.assert_allclose(d.mean, [0.0, 0.05])
    np.testing.assert_allclose(d.std, [0.0, np.std([0.1, 0.0], ddof=1)])
    assert d.count.tolist() == [2, 2]
    assert "random" not in C.paired_differences(rows, "accuracy")
