"""Tests for isal_jax/influence.py: JVP scores vs explicit per-sample gradients, LiSSA vs the
exact damped solve (fixed point, Spearman of scores), CG, NaN resets, sharded scoring."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import spearmanr

from isal_jax import influence as infl
from isal_jax.data import pad_batch
from isal_jax.models import MLP, SmallCNN
from isal_jax.tasks import ClassificationTask


def _random_bn_stats(state, rng):
    return jax.tree_util.tree_map(
        lambda x: x + 0.3 * jnp.abs(jnp.asarray(rng.normal(size=x.shape), x.dtype)),
        state["batch_stats"])


def _setup(model, rng, shape=(8, 8, 1), n=24, seed=0):
    task = ClassificationTask(model)
    state = task.init(jax.random.PRNGKey(seed), shape)
    if state["batch_stats"]:
        state["batch_stats"] = _random_bn_stats(state, rng)
    batch = {"image": rng.normal(size=(n, *shape)).astype(np.float32),
             "label": rng.integers(0, model.num_classes, n).astype(np.int32),
             "mask": np.ones((n,), bool)}
    return task, state, batch


def _rand_vec(subset, params, rng, s=1.0):
    return {k: jnp.asarray(rng.normal(size=x.shape) * s, x.dtype)
            for k, x in subset.take(params).items()}


# ----------------------------------------------------------------------------- subsets

def test_subset_split_merge_and_predicates(rng):
    task, state, _ = _setup(SmallCNN(num_classes=5, channels=(4, 6)), rng)
    params = state["params"]
    sub = infl.make_subset(params)
    assert sub.keys == ("Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel")
    taken, rest = sub.split(params)
    back = sub.merge(taken, rest)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    zero = {k: jnp.zeros_like(x) for k, x in taken.items()}
    put = sub.put(params, zero)
    assert float(jnp.abs(put["Conv_0"]["kernel"]).sum()) == 0
    assert float(jnp.abs(put["BatchNorm_0"]["scale"] - params["BatchNorm_0"]["scale"]).sum()) == 0
    assert infl.make_subset(params, "regex:Dense").keys == ("Dense_0/bias", "Dense_0/kernel")
    assert len(infl.make_subset(params, "all").keys) == len(jax.tree_util.tree_leaves(params))
    with pytest.raises(ValueError, match="selects no parameter"):
        infl.make_subset(params, "regex:nothing_here")
    with pytest.raises(ValueError, match="unknown parameter-subset predicate"):
        infl.make_subset(params, "bogus")


def test_reference_gradient_is_masked_sum(rng):
    task, state, batch = _setup(MLP(num_classes=4, features=(6,)), rng, n=10)
    params, loss = state["params"], task.loss_fn({})
    sub = infl.make_subset(params)
    b1 = pad_batch({k: v[:7] for k, v in batch.items() if k != "mask"} | {"id": np.arange(7)}, 8)
    b2 = pad_batch({k: v[7:] for k, v in batch.items() if k != "mask"} | {"id": np.arange(3)}, 8)
    v = infl.reference_gradient(loss, params, sub, [b1, b2])
    g = jax.grad(lambda s: jnp.sum(loss(sub.put(params, s), batch)))(sub.take(params))
    for k in v:
        np.testing.assert_allclose(v[k], g[k], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- JVP scores

@pytest.mark.parametrize("model", [MLP(num_classes=5, features=(12, 7)),
                                   SmallCNN(num_classes=5, channels=(4, 6))],
                         ids=["mlp", "cnn_bn"])
@pytest.mark.parametrize("pseudo", ["argmax", "expected"])
def test_jvp_scores_equal_explicit_gradient_dots(model, pseudo, rng):
    task, state, batch = _setup(model, rng, n=12)
    task = ClassificationTask(model, pseudo_label=pseudo, topk=3)
    params, ms = state["params"], task.model_state(state)
    sub = infl.make_subset(params)
    s_test = _rand_vec(sub, params, rng)
    loss, plabel = task.loss_fn(ms), task.pseudo_label_fn(ms)
    batch["mask"][-3:] = False                     # padded rows are dropped
    ref = infl.explicit_scores(loss, params, sub, s_test, batch, plabel, method="vmap")
    if pseudo == "argmax" and isinstance(model, MLP):
        ref_loop = infl.explicit_scores(loss, params, sub, s_test, batch, plabel, method="loop")
        np.testing.assert_allclose(ref, ref_loop, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    tol = dict(rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    got = infl.pool_scores(loss, params, sub, s_test, [batch], plabel)
    np.testing.assert_allclose(got, ref[:9], **tol)
    fused = infl.pool_scores(task.self_labeled_loss_fn(ms), params, sub, s_test, [batch])
    np.testing.assert_allclose(fused, ref[:9], **tol)
    lin = infl.pool_scores(loss, params, sub, s_test, [batch], plabel, method="linearize")
    np.testing.assert_allclose(lin, ref[:9], **tol)
    # the class-balanced form: scores and the pseudo class from the same pass
    loss_c = task.self_labeled_loss_fn(ms, with_class=True)
    sc, cls = infl.pool_scores(loss_c, params, sub, s_test, [batch],
                               score_fn=infl.make_score_fn(loss_c, sub, has_aux=True))
    np.testing.assert_allclose(sc, ref[:9], **tol)
    want = np.argmax(np.asarray(task.logits(params, ms, batch["image"])), -1)[:9]
    np.testing.assert_array_equal(cls, want)
    if isinstance(model, MLP):           # (the random CNN predicts one class for all)
        assert len(np.unique(want)) > 1  # the check can tell classes apart
    # pseudo labels really are the model's (not the given random labels)
    given = infl.explicit_scores(loss, params, sub, s_test, batch, None)
    assert not np.allclose(given, ref, rtol=1e-3)


def test_expected_gradient_is_weighted_sum_of_class_gradients(rng):
    model = MLP(num_classes=4, features=(5,))
    task, state, batch = _setup(model, rng, n=6)
    task = ClassificationTask(model, pseudo_label="expected", topk=2)
    params = state["params"]
    sub = infl.make_subset(params)
    s_test = _rand_vec(sub, params, rng)
    loss = task.loss_fn({})
    got = infl.pool_scores(loss, params, sub, s_test, [batch], task.pseudo_label_fn({}))
    p = np.asarray(jax.nn.softmax(task.logits(params, {}, batch["image"])), np.float64)
    want = np.zeros(6)
    for c in range(4):
        b = dict(batch, label=np.full((6,), c, np.int32))
        sc = infl.explicit_scores(loss, params, sub, s_test, b, None)
        top2 = np.argsort(-p, axis=1)[:, :2]
        w = np.where((top2 == c).any(axis=1), p[:, c], 0.0) / np.take_along_axis(
            p, top2, 1).sum(1)
        want += w * sc
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.multidevice
def test_sharded_scoring_equals_single_device(rng):
    from ezsd_jax.core.sharding import make_mesh
    task, state, _ = _setup(SmallCNN(num_classes=5, channels=(4, 6)), rng)
    params, ms = state["params"], task.model_state(state)
    sub = infl.make_subset(params)
    s_test = _rand_vec(sub, params, rng)
    imgs = rng.normal(size=(40, 8, 8, 1)).astype(np.float32)
    batches = [pad_batch({"image": imgs[i:i + 16], "label": np.zeros(len(imgs[i:i + 16]), np.int32),
                          "id": np.arange(len(imgs[i:i + 16]))}, 16) for i in range(0, 40, 16)]
    loss, plabel = task.loss_fn(ms), task.pseudo_label_fn(ms)
    single = infl.pool_scores(loss, params, sub, s_test, batches, plabel)
    mesh = make_mesh(None)
    assert mesh.shape["data"] == 8
    sharded = infl.pool_scores(loss, params, sub, s_test, batches, plabel, mesh=mesh)
    assert single.shape == sharded.shape == (40,)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6 * np.abs(single).max())


# ----------------------------------------------------------------------------- LiSSA

@pytest.fixture(scope="module")
def tiny():
    """A tiny MLP trained a little + its data in 4 minibatches of 24 (module-wide, once)."""
    from isal_jax.tasks import train_tiny_classifier
    rng = np.random.default_rng(1)
    n = 96
    task = ClassificationTask(MLP(num_classes=3, features=(4,)))
    x = rng.normal(size=(n, 4, 4, 1)).astype(np.float32)
    y = (x.reshape(n, -1)[:, :3].argmax(1)).astype(np.int32)
    state = train_tiny_classifier(task, x, y, steps=60, batch_size=32, lr=1e-2)
    batches = [{"image": x[i:i + 24], "label": y[i:i + 24], "mask": np.ones(24, bool)}
               for i in range(0, n, 24)]
    params = state["params"]
    loss = task.loss_fn({})
    sub = infl.make_subset(params)                 # 16*4 + 4*3 = 76 params
    v = infl.reference_gradient(loss, params, sub, batches)
    return task, params, batches, loss, sub, v


def test_lissa_fixed_point_full_batch(tiny):
    task, params, batches, loss, sub, v = tiny
    full = infl.stack_batches([{k: np.concatenate([b[k] for b in batches]) for k in batches[0]}])
    H, unravel = infl.hessian_matrix(loss, params, sub, full)
    H = np.asarray(H, np.float64)
    lam = np.linalg.eigvalsh(H)
    damp, scale = 0.2, float(max(lam[-1], 1e-3))    # damp*scale > -lambda_min
    s_exact, info = infl.exact_inverse_hvp(loss, params, sub, v, full, damp=damp, scale=scale)
    assert info["lissa_converges"], info
    # exact: (H + damp*scale*I) s = scale * v, checked on the dense matrix
    flat_s = np.asarray(jax.flatten_util.ravel_pytree(s_exact)[0], np.float64)
    flat_v = np.asarray(jax.flatten_util.ravel_pytree(v)[0], np.float64)
    np.testing.assert_allclose(H @ flat_s + damp * scale * flat_s, scale * flat_v, rtol=1e-3,
                               atol=1e-4 * scale * np.abs(flat_v).max())
    # LiSSA on the full batch is a deterministic fixed-point iteration: same answer
    s_lissa, li = infl.lissa(loss, params, sub, v, full, damp=damp, scale=scale, depth=600,
                             repeats=1, loop="python")
    for k in s_exact:
        np.testing.assert_allclose(s_lissa[k], s_exact[k], rtol=2e-3,
                                   atol=2e-3 * float(jnp.abs(s_exact[k]).max()))
    assert li["residual"] < 1e-3 and li["nan_resets_total"] == 0
    assert len(li["norm_trace"]) == 1 and len(li["norm_trace"][0]) == 600
    # per-block scales (lax.scan loop) as a preconditioner: the fixed point is still the
    # damped inverse-HVP c0 (H + damp*c0 I)^-1 v of the '*' scale c0, on a model with
    # several blocks with different scales
    assert len(v) >= 2
    blocks = {"Dense_0/kernel": 0.5 * scale, "*": scale}
    s_b, lb = infl.lissa(loss, params, sub, v, full, damp=damp, scale=blocks, depth=800,
                         repeats=1, loop="scan")
    assert lb["block_mode"] == "preconditioner" and lb["damp_scale"] == scale
    want = np.asarray(jax.flatten_util.ravel_pytree(s_exact)[0], np.float64)
    got = np.asarray(jax.flatten_util.ravel_pytree(s_b)[0], np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    assert lb["residual"] < 1e-3
    # the exact path with the same blocks gives the same answer (cached eigendecomposition)
    eh = infl.ExactHessian.compute(loss, params, sub, full)
    s_eb, ib = eh.solve(v, damp=damp, scale=blocks)
    eig_id = id(eh.eig[0])
    s_e2, _ = infl.exact_inverse_hvp(loss, params, sub, v, full, damp=damp, scale=scale,
                                     hessian=eh)
    assert id(eh.eig[0]) == eig_id and ib["lissa_converges"]
    np.testing.assert_allclose(np.asarray(jax.flatten_util.ravel_pytree(s_eb)[0]), want,
                               rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # block_mode='reference' (the ISAL detection code): fixed point (H + damp*S) s = S v
    s_r, _ = infl.lissa(loss, params, sub, v, full, damp=damp, scale=blocks, depth=800,
                        repeats=1, loop="python", block_mode="reference")
    S = np.concatenate([np.full(np.size(v[k]), blocks.get(k, blocks["*"])) for k in sorted(v)])
    want_r = np.linalg.solve(H + damp * np.diag(S), S * flat_v)
    got_r = np.asarray(jax.flatten_util.ravel_pytree(s_r)[0], np.float64)
    np.testing.assert_allclose(got_r, want_r, rtol=2e-3, atol=2e-3 * np.abs(want_r).max())
    assert np.abs(want_r - want).max() > 0.05 * np.abs(want).max()   # really another point
    # CG solves the same system as the dense solve
    s_cg, cg = infl.conjugate_gradient(loss, params, sub, v, full, damp=damp, scale=scale,
                                       tol=1e-7, maxiter=300)
    for k in s_exact:
        np.testing.assert_allclose(s_cg[k], s_exact[k], rtol=1e-3,
                                   atol=1e-3 * float(jnp.abs(s_exact[k]).max()))
    assert cg["residual"] < 1e-4


def test_lissa_minibatch_ranks_like_exact(tiny, rng):
    task, params, batches, loss, sub, v = tiny
    stacked = infl.stack_batches(batches)
    H, unravel = infl.hessian_matrix(loss, params, sub, stacked)   # mean of 4 minibatch H
    H = np.asarray(H, np.float64)
    lam = np.linalg.eigvalsh(H)
    damp, scale = 0.1, 2.0 * lam[-1]
    assert lam[0] > -damp * scale                  # LiSSA converges on this H
    flat_v = np.asarray(jax.flatten_util.ravel_pytree(v)[0], np.float64)
    s_exact = unravel(jnp.asarray(np.linalg.solve(H + damp * scale * np.eye(len(H)),
                                                  scale * flat_v), jnp.float32))
    s_l, li = infl.lissa(loss, params, sub, v, stacked, damp=damp, scale=scale, depth=500,
                         repeats=4, seed=3)
    assert li["nan_resets_total"] == 0 and len(li["norm_trace"]) == 4
    pool = [{"image": rng.normal(size=(32, 4, 4, 1)).astype(np.float32),
             "label": np.zeros(32, np.int32), "mask": np.ones(32, bool)}]
    score_fn = infl.make_score_fn(task.self_labeled_loss_fn({}), sub)
    scores = lambda s: infl.pool_scores(None, params, sub, s, pool, score_fn=score_fn)  # noqa
    ex = scores(s_exact)
    assert spearmanr(ex, scores(s_l)).statistic >= 0.99
    # the same with a callable minibatch sampler
    x = jnp.concatenate([b["image"] for b in batches])
    y = jnp.concatenate([b["label"] for b in batches])

    def sample(key):
        idx = jax.random.choice(key, x.shape[0], (24,), replace=False)
        return {"image": x[idx], "label": y[idx]}
    s_c, lc = infl.lissa(loss, params, sub, v, sample, damp=damp, scale=scale, depth=500,
                         repeats=4)
    assert spearmanr(ex, scores(s_c)).statistic >= 0.98
    assert np.isfinite(lc["residual"])


def test_lissa_nan_chain_is_reset_and_counted(tiny):
    task, params, batches, loss, sub, v = tiny
    poisoned = [dict(b) for b in batches[:3]]
    poisoned[1]["image"] = poisoned[1]["image"].copy()
    poisoned[1]["image"][0, 0, 0, 0] = np.nan
    stacked = infl.stack_batches(poisoned)
    out = {}
    for loop in ("python", "scan"):
        s, info = infl.lissa(loss, params, sub, v, stacked, damp=0.01, scale=50.0, depth=6,
                             repeats=2, loop=loop)
        # every chain visits each of the 3 minibatches twice -> 2 resets per chain
        assert info["nan_resets"] == [2, 2] and info["nan_resets_total"] == 4
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in s.values())
        out[loop] = s
    for k in out["scan"]:   # both loops compute the same chains
        np.testing.assert_allclose(out["python"][k], out["scan"][k], rtol=1e-5, atol=1e-6)
    # a divergent chain (scale far too small) blows up to inf/NaN and is reset too
    _, info = infl.lissa(loss, params, sub, v, infl.stack_batches(batches), damp=0.0,
                         scale=1e-6, depth=40, repeats=1)
    assert info["nan_resets_total"] >= 1


# ----------------------------------------------------------------------------- select_top

def test_select_top_order_ties_and_errors():
    ids = np.array([7, 3, 5, 1, 9])
    scores = np.array([-1.0, -2.0, -1.0, 0.5, -2.0])
    sel, sc = infl.select_top(scores, 4, ids)
    assert sel.tolist() == [3, 9, 5, 7] and sc.tolist() == [-2.0, -2.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="NaN/inf.*ids \\[5\\]"):
        infl.select_top(np.array([0.0, 1.0, np.nan, 1.0, 2.0]), 2, ids)
    with pytest.raises(ValueError, match="larger than the pool"):
        infl.select_top(scores, 6, ids)


def test_engine_compiles_once_and_weights_valid_rows(tiny):
    """Same problem shapes reuse one executable across calls (a fresh task / model state /
    subset object, as in the next AL cycle); padded and short minibatches carry the weight
    of their valid rows in mean_hvp, hessian_matrix and LiSSA."""
    task, params, batches, loss, sub, v = tiny
    h = {k: jnp.ones_like(x) for k, x in v.items()}
    infl.mean_hvp(loss, params, sub, h, batches)
    infl.reference_gradient(loss, params, sub, batches)
    n_hvp, n_grad = infl._hvp_sum_jit._cache_size(), infl._grad_sum_jit._cache_size()
    sub2 = infl.make_subset(params)
    p2 = jax.tree_util.tree_map(lambda x: x * 1.01, params)
    for _ in range(2):
        infl.mean_hvp(task.loss_fn({}), p2, sub2, h, batches)
        infl.reference_gradient(task.loss_fn({}), p2, sub2, batches)
    assert infl._hvp_sum_jit._cache_size() == n_hvp
    assert infl._grad_sum_jit._cache_size() == n_grad
    # one full batch of 24 + one batch with 3 valid rows padded to 24 == the 27 rows
    x = np.concatenate([b["image"] for b in batches])
    y = np.concatenate([b["label"] for b in batches])
    short = {"image": x[24:48].copy(), "label": y[24:48].copy(),
             "mask": np.arange(24) < 3}
    short["image"][3:] = 100.0                       # padding content must not matter
    padded = [batches[0], short]
    whole = [{"image": x[:27], "label": y[:27], "mask": np.ones(27, bool)}]
    want = infl.mean_hvp(loss, params, sub, h, whole)
    got = infl.mean_hvp(loss, params, sub, h, padded)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6)
    Hw, _ = infl.hessian_matrix(loss, params, sub, whole)
    Hp, _ = infl.hessian_matrix(loss, params, sub, padded)
    np.testing.assert_allclose(Hp, Hw, rtol=1e-4, atol=1e-6)
    # LiSSA over the padded minibatches converges to the exact solve on the 27 rows
    lam = np.linalg.eigvalsh(np.asarray(Hw, np.float64))
    damp, scale = 0.2, float(2 * lam[-1])
    s_ex, _ = infl.exact_inverse_hvp(loss, params, sub, v, whole, damp=damp, scale=scale)
    s_l, li = infl.lissa(loss, params, sub, v, padded, damp=damp, scale=scale, depth=120,
                         repeats=2, residual_batches=2, loop="scan")
    fe = np.asarray(jax.flatten_util.ravel_pytree(s_ex)[0])
    fl = np.asarray(jax.flatten_util.ravel_pytree(s_l)[0])
    cos = np.dot(fe, fl) / np.linalg.norm(fe) / np.linalg.norm(fl)
    assert cos > 0.99
    # top eigenvalue by power iteration matches the dense spectrum
    top, ti = infl.top_eigenvalue(loss, params, sub, whole, iters=30)
    assert abs(top - lam[np.argmax(np.abs(lam))]) < 0.02 * np.abs(lam).max(), (top, lam)
    # CG (Python loop over the compiled HVP) reaches the exact solution
    s_cg, cg = infl.conjugate_gradient(loss, params, sub, v, padded, damp=damp, scale=scale,
                                       tol=1e-6)
    fc = np.asarray(jax.flatten_util.ravel_pytree(s_cg)[0])
    np.testing.assert_allclose(fc, fe, rtol=1e-3, atol=1e-3 * np.abs(fe).max())
    assert cg["converged"] and cg["hvp_batches"] == (cg["iterations"] + 1) * 2


def test_one_call_api_and_user_arrays(tiny, rng):
    """isal_jax.api on a user's arrays (ClassificationData.from_arrays, register_dataset)
    selects the top-k of the engine's own scores."""
    from isal_jax.api import select_by_influence
    from isal_jax.data import ClassificationData, load_dataset, register_dataset
    task, params, batches, loss, sub, v = tiny
    x = rng.normal(size=(40, 4, 4, 1)).astype(np.float32)
    data = ClassificationData.from_arrays(x, np.zeros(40, np.int64), ids=np.arange(100, 140),
                                          num_classes=3)
    register_dataset("user_arrays", lambda split, data_dir=None: data)
    d = load_dataset("user_arrays", "all")
    assert d.num_classes == 3 and d.image_shape == (4, 4, 1)
    pool = [{k: b[k] for k in ("image", "label", "mask")} for b in d.batches(d.ids, 16)]
    ids, scores, info = select_by_influence(
        loss, params, batches, pool, d.ids, 5, pseudo_label_fn=task.pseudo_label_fn({}),
        damp=0.1, scale=10.0, depth=20, repeats=1)
    want = d.ids[np.lexsort((d.ids, info["pool_scores"]))[:5]]
    assert ids.tolist() == want.tolist() and len(info["pool_scores"]) == 40
    with pytest.raises(ValueError, match="ids must be unique"):
        ClassificationData.from_arrays(x[:2], np.zeros(2, int), ids=[1, 1])
