"""One-call ISAL for a user's own model: `select_by_influence(loss_fn, params, ...)`.

Place in the pipeline: the same engine and strategy as `python -m isal_jax.select`
(isal_jax.influence + strategies.select_isal), without configs, checkpoints or files:

    from isal_jax.api import select_by_influence
    ids, scores, info = select_by_influence(
        loss_fn,            # (params, batch) -> per-sample losses [B]; BN in inference mode
        params,             # the trained parameter tree
        labeled,            # iterable of batches {'image', 'label', 'mask'?} (true labels)
        pool,               # iterable of batches {'image', 'mask'?} of the unlabeled pool
        pool_ids,           # [N] ids of the pool's valid rows, in order
        budget=100, pseudo_label_fn=fn)   # fn(params, batch) -> batch with 'label' filled

Batches are host pytrees of equal batch size (pad the last and set 'mask'). The labeled
batches give both v (their summed gradient: reference set = the labeled set) and the HVP
minibatches; `reference` batches may be given instead for v. Settings default to the
reference's LiSSA (damp 0.01, scale 1e4, depth 250, 4 chains) and plain top-k.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

from isal_jax import influence as infl
from isal_jax.strategies import select_isal


def select_by_influence(loss_fn: Callable, params: Any, labeled: Iterable[Any],
                        pool: Iterable[Any], pool_ids, budget: int, *,
                        pseudo_label_fn: Callable | None = None,
                        reference: Iterable[Any] | None = None,
                        subset: str | Callable | None = "ndim_gt1",
                        groups=None, seed: int = 0,
                        **s_test_kw) -> tuple[np.ndarray, np.ndarray, dict]:
    """ISAL selection of `budget` pool ids (most helpful first). Returns (ids, scores of
    the selected, info: the s_test solve's info plus 'pool_scores' for every pool id).
    s_test_kw go to influence.solve_s_test (solver, damp, scale, depth, repeats,
    damp_mode, ...). groups: optional [N] pseudo classes for class-balanced top-k.
    pseudo_label_fn None: `loss_fn` must label the pool itself (under stop_gradient)."""
    labeled = list(labeled)
    if not labeled:
        raise ValueError("select_by_influence: no labeled batches")
    sub = infl.make_subset(params, subset)
    v = infl.reference_gradient(loss_fn, params, sub, reference if reference is not None
                                else labeled)
    s_test_kw.setdefault("eig_iters", 0)
    s, info = infl.solve_s_test(loss_fn, params, sub, v, labeled, seed=seed, **s_test_kw)
    scores = infl.pool_scores(loss_fn, params, sub, s, pool, pseudo_label_fn)
    pool_ids = np.asarray(pool_ids)
    if len(scores) != len(pool_ids):
        raise ValueError(f"select_by_influence: {len(scores)} valid pool rows but "
                         f"{len(pool_ids)} pool ids")
    sel = select_isal(pool_ids, budget, scores=scores, seed=seed, groups=groups)
    return sel.ids, sel.scores, {**info, "pool_scores": scores}
