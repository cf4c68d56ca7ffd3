"""Tests for isal_jax/strategies.py: each baseline on a case with a known answer, core-set
greedy against a plain numpy k-center reference, determinism and input errors."""
import numpy as np
import pytest

from isal_jax import strategies as S


def _probs(rows):
    p = np.asarray(rows, np.float64)
    return p / p.sum(1, keepdims=True)


def test_uncertainty_baselines_known_answers():
    ids = np.array([10, 11, 12, 13, 14])
    probs = _probs([[0.98, 0.01, 0.01],     # confident
                    [1 / 3, 1 / 3, 1 / 3],  # most uncertain (max entropy, lc)
                    [0.5, 0.49, 0.01],      # smallest margin
                    [0.7, 0.2, 0.1],
                    [0.6, 0.4, 0.0]])
    ent = S.select_entropy(ids, 2, probs=probs)
    assert ent.ids.tolist() == [11, 13]
    assert ent.scores[0] == pytest.approx(np.log(3))
    mar = S.select_margin(ids, 2, probs=probs)
    assert mar.ids.tolist() == [11, 12]          # margin 0 (uniform) then 0.01
    assert mar.scores.tolist() == pytest.approx([0.0, 0.01])
    lc = S.select_least_confidence(ids, 3, probs=probs)
    assert lc.ids.tolist() == [11, 12, 14]
    assert lc.scores.tolist() == pytest.approx([2 / 3, 0.5, 0.4])


def test_ties_are_broken_by_smaller_id(rng):
    ids = np.array([5, 2, 9, 1])
    probs = _probs([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1], [0.5, 0.5]])
    for fn in (S.select_entropy, S.select_margin, S.select_least_confidence):
        assert fn(ids, 3, probs=probs).ids.tolist() == [1, 2, 5]


def test_entropy_matches_numpy_on_random(rng):
    ids = rng.permutation(200) + 1000
    probs = rng.dirichlet(np.ones(7) * 0.5, size=200)
    ent = -(probs * np.log(probs)).sum(1)
    want = ids[np.argsort(-ent, kind="stable")[:25]]
    assert S.select_entropy(ids, 25, probs=probs).ids.tolist() == want.tolist()


def test_random_is_deterministic_and_valid():
    ids = np.arange(100, 300)
    a = S.select_random(ids, 20, seed=1)
    b = S.select_random(ids, 20, seed=1)
    c = S.select_random(ids, 20, seed=2)
    assert a.ids.tolist() == b.ids.tolist() != c.ids.tolist()
    assert len(set(a.ids.tolist())) == 20 and set(a.ids.tolist()) <= set(ids.tolist())
    # the relative order of the survivors does not change when the pool shrinks
    rest = np.setdiff1d(ids, a.ids[:5])
    assert S.select_random(rest, 15, seed=1).ids.tolist() == a.ids[5:].tolist()


def test_isal_picks_most_negative():
    ids = np.array([4, 8, 15, 16, 23, 42])
    scores = np.array([0.3, -5.0, 1.0, -5.0, -0.1, 2.0])
    sel = S.select_isal(ids, 3, scores=scores)
    assert sel.ids.tolist() == [8, 16, 23] and sel.scores.tolist() == [-5.0, -5.0, -0.1]
    with pytest.raises(ValueError, match="NaN"):
        S.select_isal(ids, 3, scores=np.where(ids == 15, np.nan, scores))


def _kcenter_numpy(x, lab, budget, first=None):
    x = x.astype(np.float64)
    if lab is not None and len(lab):
        d = ((x[:, None, :] - lab[None].astype(np.float64)) ** 2).sum(-1).min(1)
    else:
        d = np.full(len(x), np.inf)
    picked, scores = [], []
    for i in range(budget):
        j = first if (i == 0 and first is not None) else int(np.argmax(d))
        picked.append(j)
        scores.append(d[j])
        d = np.minimum(d, ((x - x[j]) ** 2).sum(1))
        d[j] = -np.inf
    return picked, scores


@pytest.mark.parametrize("n,dim,n_lab,budget", [(150, 8, 20, 12), (64, 3, 5, 30),
                                                (300, 16, 0, 10)])
def test_coreset_matches_numpy_kcenter(rng, n, dim, n_lab, budget):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    lab = rng.normal(size=(n_lab, dim)).astype(np.float32) if n_lab else None
    ids = np.arange(n) * 3 + 7                           # sorted ids: positions == order
    sel = S.select_coreset(ids, budget, features=x, labeled_features=lab, seed=4, chunk=16)
    if n_lab:
        want, want_scores = _kcenter_numpy(x, lab, budget)
        np.testing.assert_allclose(sel.scores, want_scores, rtol=1e-4, atol=1e-4)
    else:
        first = int(np.searchsorted(ids, sel.ids[0]))
        want, want_scores = _kcenter_numpy(x, None, budget, first=first)
        assert np.isinf(sel.scores[0])
        np.testing.assert_allclose(sel.scores[1:], want_scores[1:], rtol=1e-4, atol=1e-4)
        # the first center is a seeded draw: same seed -> same selection
        again = S.select_coreset(ids, budget, features=x, seed=4)
        assert again.ids.tolist() == sel.ids.tolist()
    assert sel.ids.tolist() == ids[want].tolist()
    assert len(set(sel.ids.tolist())) == budget


def test_coreset_with_unsorted_ids_and_duplicates_of_labeled(rng):
    x = rng.normal(size=(40, 4)).astype(np.float32)
    ids = rng.permutation(40) + 500
    lab = x[:10]                       # pool points 0..9 are at distance 0 of a center
    sel = S.select_coreset(ids, 30, features=x, labeled_features=lab)
    assert set(sel.ids.tolist()) == set(ids[10:].tolist())   # never the covered points
    order = np.argsort(ids)
    want, _ = _kcenter_numpy(x[order], lab, 30)
    assert sel.ids.tolist() == ids[order][want].tolist()


def test_input_errors(rng):
    ids = np.arange(5)
    probs = _probs(rng.random((5, 3)))
    with pytest.raises(ValueError, match="larger than the pool"):
        S.select_entropy(ids, 6, probs=probs)
    with pytest.raises(ValueError, match="rows but the pool has"):
        S.select_margin(ids, 2, probs=probs[:4])
    with pytest.raises(ValueError, match="not unique"):
        S.select_random(np.array([1, 1, 2]), 1)
    with pytest.raises(ValueError, match="unknown strategy"):
        S.get_strategy("bald")
    with pytest.raises(ValueError, match="do not match"):
        S.select_coreset(ids, 2, features=rng.normal(size=(5, 3)),
                         labeled_features=rng.normal(size=(2, 4)))
    assert set(S.STRATEGIES) == set(S.REQUIRES)


def test_isal_class_balanced_known_answer():
    from isal_jax.strategies import select_isal
    ids = np.array([10, 11, 12, 13, 14, 15, 16])
    scores = np.array([-9.0, -8.0, -7.0, -1.0, -0.5, -6.0, -0.1])
    groups = np.array([0, 0, 0, 1, 1, 0, 2])
    plain = select_isal(ids, 3, scores=scores)
    assert plain.ids.tolist() == [10, 11, 12]          # all of class 0
    bal = select_isal(ids, 5, scores=scores, groups=groups)
    # round 1: best of each class (10, 13, 16) in score order; round 2: 11, 14
    assert bal.ids.tolist() == [10, 13, 16, 11, 14]
    assert bal.scores.tolist() == [-9.0, -1.0, -0.1, -8.0, -0.5]
    with pytest.raises(ValueError, match="NaN/inf"):
        select_isal(ids, 2, scores=np.where(ids == 12, np.nan, scores), groups=groups)
