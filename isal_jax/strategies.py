"""Active-learning selection strategies: random, entropy, margin, least confidence, core-set,
isal. Place in the pipeline: task predictions / influence scores -> THIS -> selection file.

Every strategy has the same shape:

    select_<name>(ids, budget, *, seed=0, <its inputs>) -> Selection(ids, scores)

`ids` are the pool ids [N] (row i of probs/features/scores belongs to ids[i]); the result
lists the `budget` chosen ids in selection order and each one's score. Deterministic given
the seed; ties are always broken by the smaller id. Scores and their order:

  random            a seeded uniform draw per id          (smallest first)
  entropy           -sum p log p                          (largest first)
  margin            p_top1 - p_top2                       (smallest first)
  least_confidence  1 - max p                             (largest first)
  coreset           squared distance to the nearest center at the time it was picked
                    (k-center greedy on penultimate features, on device; largest first)
  isal              influence I(z) = -<G_z, s_test>       (most negative first)
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from isal_jax.influence import select_top


class Selection(NamedTuple):
    ids: np.ndarray       # [budget] selected ids, in selection order
    scores: np.ndarray    # [budget] float64, each selected id's score


def _check(ids, budget: int, n_rows: int | None = None, what: str = "scores") -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"pool ids must be 1-D, got shape {ids.shape}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("pool ids are not unique")
    if n_rows is not None and n_rows != len(ids):
        raise ValueError(f"{what} has {n_rows} rows but the pool has {len(ids)} ids")
    if not 0 <= int(budget) <= len(ids):
        raise ValueError(f"budget {budget} is larger than the pool ({len(ids)} samples)")
    return ids


def _probs(probs, ids) -> np.ndarray:
    p = np.asarray(probs, np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, C], got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contain NaN/inf")
    return p


def _top(ids, scores, budget: int, largest: bool) -> Selection:
    scores = np.asarray(scores, np.float64)
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} score(s) are NaN/inf (e.g. ids "
                         f"{np.asarray(ids)[bad][:5].tolist()})")
    key = -scores if largest else scores
    order = np.lexsort((ids, key))[:budget]
    return Selection(np.asarray(ids)[order], scores[order])


def select_random(ids, budget: int, *, seed: int = 0) -> Selection:
    ids = _check(ids, budget)
    # One draw per id from (seed, id): a pool that shrinks keeps the relative order.
    u = np.array([np.random.default_rng([seed, int(i)]).random() for i in ids]) if len(ids) \
        else np.zeros(0)
    return _top(ids, u, budget, largest=False)


def select_entropy(ids, budget: int, *, probs, seed: int = 0) -> Selection:
    p = _probs(probs, ids)
    ids = _check(ids, budget, len(p), "probs")
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    return _top(ids, ent, budget, largest=True)


def select_margin(ids, budget: int, *, probs, seed: int = 0) -> Selection:
    p = _probs(probs, ids)
    ids = _check(ids, budget, len(p), "probs")
    if p.shape[1] < 2:
        raise ValueError("margin needs at least 2 classes")
    top2 = -np.sort(-p, axis=1)[:, :2]
    return _top(ids, top2[:, 0] - top2[:, 1], budget, largest=False)


def select_least_confidence(ids, budget: int, *, probs, seed: int = 0) -> Selection:
    p = _probs(probs, ids)
    ids = _check(ids, budget, len(p), "probs")
    return _top(ids, 1.0 - p.max(axis=1), budget, largest=True)


def select_isal(ids, budget: int, *, scores, seed: int = 0, groups=None) -> Selection:
    """Plain top-k of the most negative influence (the reference). With `groups` (e.g.
    the pool's pseudo classes; our addition against batches concentrated on a few
    classes): class-balanced top-k -- rounds that take each group's most negative
    remaining score, each round in score order, until the budget is spent."""
    scores = np.asarray(scores, np.float64)
    ids = _check(ids, budget, len(scores), "influence scores")
    if groups is None:
        sel_ids, sel_scores = select_top(scores, budget, ids)
        return Selection(sel_ids, sel_scores)
    groups = np.asarray(groups)
    if groups.shape != ids.shape:
        raise ValueError(f"groups has shape {groups.shape} but the pool has {len(ids)} ids")
    select_top(scores, 0, ids)                                   # validates the scores
    order = np.lexsort((ids, scores))                            # best first, ties by id
    rank = np.empty(len(ids), np.int64)                          # rank within its group
    for g in np.unique(groups):
        members = order[groups[order] == g]
        rank[members] = np.arange(len(members))
    pick = np.lexsort((ids, scores, rank))[:budget]              # round, then score, id
    return Selection(ids[pick], scores[pick])


# ----------------------------------------------------------------------------- core-set

def _min_sq_dist(x: jax.Array, centers: jax.Array, chunk: int) -> jax.Array:
    """min over centers of ||x - c||^2 for every row of x, over center chunks (on device)."""
    xx = jnp.sum(x * x, axis=1)
    n_c = centers.shape[0]
    pad = (-n_c) % chunk
    c = jnp.concatenate([centers, jnp.zeros((pad, centers.shape[1]), centers.dtype)])
    valid = jnp.arange(n_c + pad) < n_c
    c = c.reshape(-1, chunk, centers.shape[1])
    valid = valid.reshape(-1, chunk)

    def body(best, cv):
        cc, vv = cv
        d = xx[:, None] - 2.0 * x @ cc.T + jnp.sum(cc * cc, axis=1)[None, :]
        d = jnp.where(vv[None, :], jnp.maximum(d, 0.0), jnp.inf)
        return jnp.minimum(best, d.min(axis=1)), None
    best, _ = jax.lax.scan(body, jnp.full((x.shape[0],), jnp.inf, x.dtype), (c, valid))
    return best


def select_coreset(ids, budget: int, *, features, labeled_features=None, seed: int = 0,
                   chunk: int = 1024) -> Selection:
    """k-center greedy (Sener & Savarese): repeatedly take the pool point farthest from all
    centers (labeled points + points taken so far). Squared Euclidean distances in float32 on
    device; the greedy loop is one lax.fori_loop. Ties -> smaller id. With no labeled
    features, the first center is a seeded random pool point (score inf)."""
    x = np.asarray(features, np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {x.shape}")
    ids = _check(ids, budget, len(x), "features")
    if budget == 0:
        return Selection(ids[:0], np.zeros(0))
    order = np.argsort(ids, kind="stable")           # argmax's first hit = smallest id
    xs = jnp.asarray(x[order])
    if labeled_features is not None and len(labeled_features):
        lab = np.asarray(labeled_features, np.float32)
        if lab.ndim != 2 or lab.shape[1] != x.shape[1]:
            raise ValueError(f"labeled_features {lab.shape} do not match features {x.shape}")
        init = _min_sq_dist(xs, jnp.asarray(lab), chunk)
        first = None
    else:
        init = jnp.full((len(ids),), jnp.inf, jnp.float32)
        first = int(np.random.default_rng(seed).integers(len(ids)))

    @jax.jit
    def greedy(xs, dist, first_idx):
        xx = jnp.sum(xs * xs, axis=1)

        def body(i, carry):
            dist, picked, score = carry
            j = jnp.where((i == 0) & (first_idx >= 0), first_idx, jnp.argmax(dist))
            picked = picked.at[i].set(j)
            score = score.at[i].set(dist[j])
            d = jnp.maximum(xx - 2.0 * xs @ xs[j] + xx[j], 0.0)
            dist = jnp.minimum(dist, d).at[j].set(-jnp.inf)
            return dist, picked, score
        carry = (dist, jnp.zeros((budget,), jnp.int32), jnp.zeros((budget,), jnp.float32))
        _, picked, score = jax.lax.fori_loop(0, budget, body, carry)
        return picked, score

    picked, score = greedy(xs, init, -1 if first is None else int(np.argsort(order)[first]))
    picked = np.asarray(picked)
    return Selection(ids[order][picked], np.asarray(score, np.float64))


STRATEGIES: dict[str, Callable[..., Selection]] = {
    "random": select_random,
    "entropy": select_entropy,
    "margin": select_margin,
    "least_confidence": select_least_confidence,
    "coreset": select_coreset,
    "isal": select_isal,
}

# What each strategy needs from the task (select.py / the loop compute only that).
REQUIRES: dict[str, tuple[str, ...]] = {
    "random": (), "entropy": ("probs",), "margin": ("probs",),
    "least_confidence": ("probs",), "coreset": ("features", "labeled_features"),
    "isal": ("scores",),
}


def get_strategy(name: str) -> Callable[..., Selection]:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
    return STRATEGIES[name]
