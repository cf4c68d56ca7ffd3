"""ISAL influence engine: parameter subsets, reference gradient, LiSSA s_test, JVP pool scores.

Place in the pipeline: task adapter (loss, pseudo labels) -> THIS -> strategies.isal ->
select / loop. Model- and task-agnostic: everything takes a per-sample loss

    loss_fn(params, batch) -> [B]        (batch: a pytree; a dict may carry 'mask' [B])

and a parameter-subset predicate `(path_str, leaf) -> bool` (default: every leaf with
ndim > 1 -- convolution kernels and FC weights, no BN, no biases).

    I(z) = -<G_z, s_test>,   s_test ~ scale * (H + damp*scale*I)^-1 v,   v = sum_R grad L

* Vectors (v, s_test, HVP tangents) live only on the subset: a flat dict
  {'/'-joined param path: array}; the other params stay fixed inside the loss closure.
* HVPs are forward-over-reverse, `jax.jvp(jax.grad(f), (p,), (h,))`, where f is the MEAN
  loss over the (valid rows of the) minibatch, as in the reference implementation.
  So H below is always the mean-loss Hessian; for LiSSA with stacked minibatches it is the
  average of the per-minibatch mean-loss Hessians (the expectation the recursion sees).
* Pool scores never materialize per-sample gradients: the JVP of the per-sample loss
  VECTOR in direction s_test gives all B dot products <G_z, s_test> in one forward-mode pass.

LiSSA fixed point. h_{j+1} = v + (1 - damp) h_j - H_j h_j / scale converges (when the
spectrum of (1-damp) I - H/scale lies inside (-1, 1), i.e. -damp*scale < lambda(H) <
(2-damp)*scale) to h* = scale * (H + damp*scale*I)^-1 v; with per-block scales S
(a diagonal matrix, one scale per parameter block) to h* = (H + damp*S)^-1 S v. `lissa`
returns h (NOT h/scale, like the ISAL reference; Koh & Liang divide by scale -- a positive
constant that does not change rankings for a scalar scale).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ezsd_jax.tree_paths import path_str

LossFn = Callable[[Any, Any], jax.Array]
Predicate = Callable[[str, Any], bool]
Vec = dict  # {path_str: array}: a vector on the parameter subset


# ----------------------------------------------------------------------------- subsets

def ndim_gt1(path: str, leaf: Any) -> bool:
    """Classification default (the reference): conv kernels and FC weights; no BN, no biases."""
    return np.ndim(leaf) > 1


def all_params(path: str, leaf: Any) -> bool:
    return True


PREDICATES: dict[str, Predicate] = {"ndim_gt1": ndim_gt1, "all": all_params}


def get_predicate(name: str | Predicate | None) -> Predicate:
    """A predicate by config name: 'ndim_gt1' (default), 'all', or 'regex:<pattern>'
    (re.search on the '/'-joined path, e.g. 'regex:(cls|reg)_convs' for detection heads)."""
    if name is None:
        return ndim_gt1
    if callable(name):
        return name
    if name.startswith("regex:"):
        rx = re.compile(name[len("regex:"):])
        return lambda p, leaf: bool(rx.search(p))
    if name not in PREDICATES:
        raise ValueError(f"unknown parameter-subset predicate {name!r}; use one of "
                         f"{sorted(PREDICATES)} or 'regex:<pattern>'")
    return PREDICATES[name]


@dataclasses.dataclass(frozen=True, eq=False)
class ParamSubset:
    """Which leaves of a param tree take part. `take` -> the subset as a flat dict,
    `put` -> params with the subset leaves replaced; `split`/`merge` for (subset, rest)."""
    treedef: Any
    names: tuple[str, ...]          # every leaf's path, in flatten order
    selected: tuple[int, ...]       # indices of the subset leaves

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.names[i] for i in self.selected)

    def _leaves(self, params) -> list:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if treedef != self.treedef:
            raise ValueError("params do not have the tree structure this ParamSubset was "
                             f"built for:\n  expected {self.treedef}\n  got {treedef}")
        return leaves

    def take(self, params) -> Vec:
        leaves = self._leaves(params)
        return {self.names[i]: leaves[i] for i in self.selected}

    def put(self, params, sub: Mapping[str, Any]):
        leaves = self._leaves(params)
        for i in self.selected:
            leaves[i] = sub[self.names[i]]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def split(self, params) -> tuple[Vec, tuple]:
        leaves = self._leaves(params)
        sel = set(self.selected)
        rest = tuple(x for i, x in enumerate(leaves) if i not in sel)
        return {self.names[i]: leaves[i] for i in self.selected}, rest

    def merge(self, sub: Mapping[str, Any], rest: Sequence[Any]):
        sel = set(self.selected)
        rest = iter(rest)
        leaves = [sub[self.names[i]] if i in sel else next(rest) for i in range(len(self.names))]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def size(self, params) -> int:
        return int(sum(np.size(x) for x in self.take(params).values()))


def make_subset(params, predicate: str | Predicate | None = None) -> ParamSubset:
    pred = get_predicate(predicate)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = tuple(path_str(p) for p, _ in flat)
    if len(set(names)) != len(names):
        raise ValueError("parameter paths are not unique; cannot name the subset leaves")
    selected = tuple(i for i, (n, (_, x)) in enumerate(zip(names, flat)) if pred(n, x))
    if not selected:
        raise ValueError(f"parameter-subset predicate {predicate!r} selects no parameter; "
                         f"paths are: {list(names)[:20]}")
    return ParamSubset(treedef, names, selected)


# ----------------------------------------------------------------------------- vector ops

def tree_vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(a[k], b[k]) for k in a)


def tree_norm(a) -> jax.Array:
    return jnp.sqrt(sum(jnp.vdot(x, x) for x in a.values()))


def tree_all_finite(a) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in a.values()]))


def _scale_tree(scale, like: Vec) -> Vec:
    """Scalar scale or a per-block mapping {path (exact) or 'regex:...': scale} -> {path: scale}.
    Blocks a mapping does not name get its '*' entry (default: error)."""
    if isinstance(scale, Mapping):
        out = {}
        for k in like:
            if k in scale:
                out[k] = float(scale[k])
                continue
            hits = [v for pat, v in scale.items()
                    if pat.startswith("regex:") and re.search(pat[6:], k)]
            if hits:
                out[k] = float(hits[0])
            elif "*" in scale:
                out[k] = float(scale["*"])
            else:
                raise ValueError(f"per-block LiSSA scale has no entry for block {k!r} "
                                 f"(give its path, a 'regex:...' key or a '*' default)")
        return out
    return {k: float(scale) for k in like}


def _scale_to_json(scale):
    return {k: float(v) for k, v in scale.items()} if isinstance(scale, Mapping) else float(scale)


# ----------------------------------------------------------------------------- losses

def _mask(batch, n: int):
    if isinstance(batch, Mapping) and "mask" in batch:
        return jnp.asarray(batch["mask"]).astype(jnp.float32)
    return jnp.ones((n,), jnp.float32)


def masked_sum(losses: jax.Array, batch) -> jax.Array:
    return jnp.sum(losses * _mask(batch, losses.shape[0]))


def masked_mean(losses: jax.Array, batch) -> jax.Array:
    m = _mask(batch, losses.shape[0])
    return jnp.sum(losses * m) / jnp.maximum(jnp.sum(m), 1.0)


def _sub_loss(loss_fn: LossFn, subset: ParamSubset, params, batch, reduce):
    """f(sub) = reduce(loss_fn(params with the subset replaced by sub, batch))."""
    return lambda sub: reduce(loss_fn(subset.put(params, sub), batch), batch)


def hvp(loss_fn: LossFn, params, subset: ParamSubset, h: Vec, batch) -> Vec:
    """Hessian(of the MEAN loss over the minibatch, on the subset) @ h, forward-over-reverse."""
    f = _sub_loss(loss_fn, subset, params, batch, masked_mean)
    return jax.jvp(jax.grad(f), (subset.take(params),), (h,))[1]


# ----------------------------------------------------------------------------- batches

def stack_batches(batches: Iterable[Any]):
    """List of equally shaped batches -> one pytree with a leading step axis."""
    batches = list(batches)
    if not batches:
        raise ValueError("no batches given")
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *batches)


def _num_steps(stacked) -> int:
    return int(jax.tree_util.tree_leaves(stacked)[0].shape[0])


def _index(stacked, j):
    return jax.tree_util.tree_map(lambda x: x[j], stacked)


# ----------------------------------------------------------------------------- v

def reference_gradient(loss_fn: LossFn, params, subset: ParamSubset,
                       batches: Iterable[Any]) -> Vec:
    """v = SUM over all (valid) reference samples of grad loss, on the subset.
    Per batch: grad of the masked SUMMED loss; accumulated over batches (jit once)."""
    @jax.jit
    def grad_sum(params, batch):
        return jax.grad(_sub_loss(loss_fn, subset, params, batch, masked_sum))(
            subset.take(params))

    v = None
    for batch in batches:
        g = grad_sum(params, batch)
        v = g if v is None else jax.tree_util.tree_map(jnp.add, v, g)
    if v is None:
        raise ValueError("reference_gradient: the reference set is empty")
    return v


# ----------------------------------------------------------------------------- LiSSA

def _chain_orders(num_steps: int, depth: int, repeats: int, seed: int) -> np.ndarray:
    """[repeats, depth] minibatch indices: per chain, reshuffled passes over the minibatches."""
    out = np.zeros((repeats, depth), np.int32)
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        passes = -(-depth // num_steps)
        out[r] = np.concatenate([rng.permutation(num_steps) for _ in range(passes)])[:depth]
    return out


def _resolve_loop(loop: str) -> str:
    if loop == "auto":
        return "python" if jax.default_backend() == "cpu" else "scan"
    if loop not in ("scan", "python"):
        raise ValueError(f"lissa: loop must be 'auto', 'scan' or 'python', got {loop!r}")
    return loop


def lissa(loss_fn: LossFn, params, subset: ParamSubset, v: Vec, hvp_batches, *,
          damp: float = 0.01, scale: float | Mapping[str, float] = 1e4, depth: int = 250,
          repeats: int = 4, seed: int = 0, residual_batches: int = 8,
          loop: str = "auto") -> tuple[Vec, dict]:
    """LiSSA estimate of s_test = scale * (H + damp*scale*I)^-1 v (see module docstring).

    hvp_batches: either a pytree of arrays with a leading minibatch axis [S, B, ...] (or a
      list of equally shaped batches), which chain r visits in its own seeded random order,
      reshuffled every pass; or a jittable callable `key -> batch` that draws a minibatch
      (a fresh key per step and chain). HVPs use the MEAN loss over the minibatch's valid rows.
    Each of the `repeats` chains runs `depth` steps; a step whose result is not finite
    resets that chain to v (counted). The chains are averaged.
    loop: 'scan' runs a chain as one lax.scan; 'python' runs one jitted step per call
      (same numbers). 'auto' = 'python' on CPU, 'scan' elsewhere: XLA:CPU leaves the
      weight-gradient convolutions of an HVP inside a while loop in a non-canonical layout
      and runs them ~10x slower (measured: 13-17 ms vs 1.2 ms per step, small CNN).

    info: damp, scale, depth, repeats, nan_resets (per chain), norm_trace ([repeats][depth]
      ||h_j||), v_norm, s_norm, last_rel_change (per chain, ||h_d - h_{d-1}|| / ||h_d||), and
      residual = || H_bar s / scale + damp s - v || / ||v|| (per-block: H_bar s is divided
      block-wise by its scale), where H_bar is the mean-loss Hessian averaged over the first
      `residual_batches` HVP minibatches (or that many draws of the callable with a fixed
      key). residual is 0 exactly at the fixed point for H_bar; it measures both truncation
      (depth) and the minibatch noise of the average of the chains.
    """
    if depth < 1 or repeats < 1:
        raise ValueError(f"lissa: depth ({depth}) and repeats ({repeats}) must be >= 1")
    loop = _resolve_loop(loop)
    scale_t = _scale_tree(scale, v)
    if any(not (s > 0) for s in scale_t.values()):
        raise ValueError(f"lissa: scale must be > 0, got {scale}")
    v = {k: jnp.asarray(x) for k, x in v.items()}
    if set(v) != set(subset.keys):
        raise ValueError("lissa: v is not a vector on this parameter subset")
    callable_batches = callable(hvp_batches)
    if isinstance(hvp_batches, (list, tuple)):
        hvp_batches = stack_batches(hvp_batches)
    get_batch = hvp_batches if callable_batches else (lambda j: _index(hvp_batches, j))

    def step_fn(params, v, h, batch):
        hv = hvp(loss_fn, params, subset, h, batch)
        new = {k: v[k] + (1.0 - damp) * h[k] - hv[k] / scale_t[k] for k in h}
        ok = tree_all_finite(new)
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, v)
        diff = tree_norm(jax.tree_util.tree_map(jnp.subtract, new, h))
        return new, (tree_norm(new), ~ok, diff)

    # Per-step "selectors": minibatch index (stacked) or PRNG key (callable).
    if callable_batches:
        base = jax.random.PRNGKey(seed)
        selectors = [np.asarray(jax.random.split(jax.random.fold_in(base, r), depth))
                     for r in range(repeats)]
    else:
        selectors = list(_chain_orders(_num_steps(hvp_batches), depth, repeats, seed))
    # Minibatches go to the device once (not once per step).
    data = None if callable_batches else jax.device_put(hvp_batches)

    if loop == "scan":
        @jax.jit
        def chain(params, v, data, sel):
            def body(h, x):
                b = hvp_batches(x) if callable_batches else _index(data, x)
                return step_fn(params, v, h, b)
            return jax.lax.scan(body, v, sel)
    else:
        @jax.jit
        def step(params, v, h, data, x):
            b = hvp_batches(x) if callable_batches else _index(data, x)
            return step_fn(params, v, h, b)

        def chain(params, v, data, sel):
            h, outs = v, []
            for x in sel:
                h, o = step(params, v, h, data, x)
                outs.append(o)
            return h, tuple(jnp.stack(z) for z in zip(*outs))

    total = None
    traces, resets, rel = [], [], []
    for r in range(repeats):
        h, (norms, bad, diff) = chain(params, v, data, selectors[r])
        total = h if total is None else jax.tree_util.tree_map(jnp.add, total, h)
        norms, bad, diff = np.asarray(norms), np.asarray(bad), np.asarray(diff)
        traces.append([float(x) for x in norms])
        resets.append(int(bad.sum()))
        with np.errstate(invalid="ignore", divide="ignore"):
            rel.append(float(diff[-1] / max(norms[-1], 1e-30)))
    s = jax.tree_util.tree_map(lambda x: x / repeats, total)

    # Residual of the fixed-point equation against the mean Hessian of a few minibatches.
    if callable_batches:
        keys = jax.random.split(jax.random.PRNGKey(seed + 7919), max(residual_batches, 1))
        res_batches = [hvp_batches(k) for k in keys]
    else:
        n = min(max(residual_batches, 1), _num_steps(hvp_batches))
        res_batches = [get_batch(j) for j in range(n)]
    hs = mean_hvp(loss_fn, params, subset, s, res_batches)
    resid = {k: hs[k] / scale_t[k] + damp * s[k] - v[k] for k in s}
    v_norm = float(tree_norm(v))
    info = {
        "damp": float(damp), "scale": _scale_to_json(scale), "depth": int(depth),
        "repeats": int(repeats), "seed": int(seed), "loop": loop,
        "nan_resets": resets, "nan_resets_total": int(sum(resets)),
        "v_norm": v_norm, "s_norm": float(tree_norm(s)),
        "residual": float(tree_norm(resid)) / max(v_norm, 1e-30),
        "residual_batches": len(res_batches),
        "last_rel_change": rel, "norm_trace": traces,
    }
    if not all(math.isfinite(x) for x in (info["s_norm"], info["residual"])):
        info["warning"] = "s_test is not finite"
    return s, info


def mean_hvp(loss_fn: LossFn, params, subset: ParamSubset, h: Vec, batches) -> Vec:
    """Average over `batches` (a list, or a stacked pytree) of the mean-loss HVPs H_j h.
    A Python loop over one jitted HVP (see `lissa`'s note on loops on CPU)."""
    if not isinstance(batches, (list, tuple)):
        batches = [_index(batches, j) for j in range(_num_steps(batches))]
    f = jax.jit(lambda params, h, b: hvp(loss_fn, params, subset, h, b))
    acc = None
    for b in batches:
        hv = f(params, h, b)
        acc = hv if acc is None else jax.tree_util.tree_map(jnp.add, acc, hv)
    return jax.tree_util.tree_map(lambda x: x / len(batches), acc)


# ----------------------------------------------------------------------------- validation solvers

def hessian_matrix(loss_fn: LossFn, params, subset: ParamSubset, batches,
                   max_params: int = 4096) -> tuple[jax.Array, Callable]:
    """Dense mean-loss Hessian on the flattened subset, averaged over `batches` (same H as
    `mean_hvp`). Returns (H [n, n], unravel: flat -> Vec). For small models only."""
    sub0 = subset.take(params)
    flat0, unravel = ravel_pytree(sub0)
    n = flat0.shape[0]
    if n > max_params:
        raise ValueError(f"hessian_matrix: the subset has {n} parameters (> max_params="
                         f"{max_params}); use conjugate_gradient or lissa")
    stacked = stack_batches(batches) if isinstance(batches, (list, tuple)) else batches

    @jax.jit
    def dense(params, stacked):
        def one(b):
            f = lambda flat: masked_mean(loss_fn(subset.put(params, unravel(flat)), b), b)  # noqa
            return jax.hessian(f)(flat0)
        hs = jax.lax.map(one, stacked)
        return jnp.mean(hs, axis=0)
    return dense(params, stacked), unravel


def exact_inverse_hvp(loss_fn: LossFn, params, subset: ParamSubset, v: Vec, batches, *,
                      damp: float = 0.01, scale: float | Mapping[str, float] = 1e4,
                      max_params: int = 4096) -> tuple[Vec, dict]:
    """LiSSA's fixed point by a dense solve: (H + damp*S) s = S v, S = scale (scalar or
    per-block diagonal), H the mean-loss Hessian averaged over `batches`. info reports
    H's extreme eigenvalues and whether LiSSA would converge on this H."""
    H, unravel = hessian_matrix(loss_fn, params, subset, batches, max_params)
    flat_v, _ = ravel_pytree(v)
    flat_s_scale, _ = ravel_pytree({k: jnp.full(np.shape(x), c, flat_v.dtype)
                                    for (k, x), c in zip(v.items(),
                                                         _scale_tree(scale, v).values())})
    H64 = np.asarray(H, np.float64)
    H64 = 0.5 * (H64 + H64.T)
    S = np.asarray(flat_s_scale, np.float64)
    A = H64 + damp * np.diag(S)
    sol = np.linalg.solve(A, S * np.asarray(flat_v, np.float64))
    eig = np.linalg.eigvalsh(H64)
    smin, smax = float(S.min()), float(S.max())
    info = {"lambda_min": float(eig[0]), "lambda_max": float(eig[-1]), "n": int(H.shape[0]),
            "lissa_converges": bool(eig[0] > -damp * smin and eig[-1] < (2 - damp) * smax)}
    return unravel(jnp.asarray(sol, flat_v.dtype)), info


def conjugate_gradient(loss_fn: LossFn, params, subset: ParamSubset, v: Vec, batches, *,
                       damp: float = 0.01, scale: float | Mapping[str, float] = 1e4,
                       maxiter: int = 200, tol: float = 1e-6) -> tuple[Vec, dict]:
    """Matrix-free CG for the same system as `exact_inverse_hvp`, (H + damp*S) s = S v,
    with H h = the average of the mean-loss HVPs over `batches` (list or stacked).
    Needs H + damp*S positive definite (true when lambda_min(H) > -damp*min(S)).
    info: iterations, relative residual ||A s - S v|| / ||S v||, converged.
    A validation path: the iteration is one lax.while_loop, which on XLA:CPU runs conv
    HVPs slowly (see `lissa`); fine for the small models it is meant to check."""
    stacked = stack_batches(batches) if isinstance(batches, (list, tuple)) else batches
    scale_t = _scale_tree(scale, v)
    v = {k: jnp.asarray(x) for k, x in v.items()}

    @jax.jit
    def solve(params, v, stacked):
        def matvec(h):
            def body(acc, b):
                hv = hvp(loss_fn, params, subset, h, b)
                return jax.tree_util.tree_map(jnp.add, acc, hv), None
            acc, _ = jax.lax.scan(body, jax.tree_util.tree_map(jnp.zeros_like, h), stacked)
            n = _num_steps(stacked)
            return {k: acc[k] / n + damp * scale_t[k] * h[k] for k in h}

        b = {k: scale_t[k] * v[k] for k in v}
        b_norm = tree_norm(b)
        x = jax.tree_util.tree_map(jnp.zeros_like, b)
        r = b
        p = r
        rs = tree_vdot(r, r)

        def cond(c):
            _, r, _, rs, i = c
            return (i < maxiter) & (jnp.sqrt(rs) > tol * b_norm)

        def body(c):
            x, r, p, rs, i = c
            ap = matvec(p)
            alpha = rs / tree_vdot(p, ap)
            x = {k: x[k] + alpha * p[k] for k in x}
            r = {k: r[k] - alpha * ap[k] for k in r}
            rs_new = tree_vdot(r, r)
            p = {k: r[k] + (rs_new / rs) * p[k] for k in p}
            return x, r, p, rs_new, i + 1

        x, r, p, rs, i = jax.lax.while_loop(cond, body, (x, r, p, rs, jnp.int32(0)))
        ax = matvec(x)
        res = tree_norm({k: ax[k] - b[k] for k in b}) / jnp.maximum(b_norm, 1e-30)
        return x, i, res

    x, iters, res = solve(params, v, stacked)
    return x, {"iterations": int(iters), "residual": float(res),
               "converged": bool(float(res) <= max(tol, 1e-30) * 10)}


# ----------------------------------------------------------------------------- pool scores

def make_score_fn(loss_fn: LossFn, subset: ParamSubset,
                  pseudo_label_fn: Callable[[Any, Any], Any] | None = None, *,
                  mesh=None, method: str = "jvp") -> Callable:
    """Jitted `score(params, s_test, batch) -> [B]` with I(z) = -<G_z, s_test> (0 on rows
    whose mask is False).

    pseudo_label_fn(params, batch) -> batch with pseudo targets filled in; computed first,
    under stop_gradient. None: use the batch as given (or a `loss_fn` that labels itself
    under stop_gradient -- the fused form, which saves one forward pass).
    method: 'jvp' (one forward-mode pass of the per-sample loss vector in direction s_test;
    the tangent is only on the subset, so the other params carry symbolic zeros) or
    'linearize' (jax.linearize then apply; same numbers, kept for the benchmark).
    mesh: a ('data', ...) mesh -> batch split on 'data', params/s_test replicated.
    """
    if method not in ("jvp", "linearize"):
        raise ValueError(f"make_score_fn: unknown method {method!r}")

    def score(params, s_test, batch):
        if pseudo_label_fn is not None:
            batch = jax.lax.stop_gradient(pseudo_label_fn(params, batch))
        f = _sub_loss(loss_fn, subset, params, batch, lambda l, b: l)  # noqa: E741
        sub = subset.take(params)
        tangent = {k: s_test[k].astype(sub[k].dtype) for k in sub}
        if method == "jvp":
            _, dots = jax.jvp(f, (sub,), (tangent,))
        else:
            _, lin = jax.linearize(f, sub)
            dots = lin(tangent)
        m = _mask(batch, dots.shape[0])
        return jnp.where(m > 0, -dots, 0.0)

    if mesh is None:
        return jax.jit(score)
    from ezsd_jax.sharding import data_sharding, replicated
    return jax.jit(score, in_shardings=(replicated(mesh), replicated(mesh), data_sharding(mesh)),
                   out_shardings=data_sharding(mesh))


def pool_scores(loss_fn: LossFn, params, subset: ParamSubset, s_test: Vec,
                batches: Iterable[Any], pseudo_label_fn=None, *, mesh=None,
                method: str = "jvp", score_fn: Callable | None = None) -> np.ndarray:
    """Influence scores I(z) = -<G_z, s_test> for every VALID row of `batches`, in order,
    as float64 numpy [N]. Batches are host (numpy) pytrees with a fixed batch size (pad and
    set 'mask'); with a mesh the batch size must be divisible by the 'data' axis size.
    `score_fn` (from make_score_fn) may be passed to reuse a compiled function."""
    if score_fn is None:
        score_fn = make_score_fn(loss_fn, subset, pseudo_label_fn, mesh=mesh, method=method)
    if mesh is not None:
        from ezsd_jax.sharding import host_to_global, replicated
        params = jax.device_put(params, replicated(mesh))
        s_test = jax.device_put(s_test, replicated(mesh))
    pending = []
    for batch in batches:
        n = len(jax.tree_util.tree_leaves(batch)[0])
        mask = (np.asarray(batch["mask"], bool) if isinstance(batch, Mapping) and "mask" in batch
                else np.ones((n,), bool))
        dev_batch = host_to_global(batch, mesh) if mesh is not None else batch
        pending.append((score_fn(params, s_test, dev_batch), mask))  # async dispatch
    out = [np.asarray(jax.device_get(s), np.float64)[m] for s, m in pending]
    return np.concatenate(out) if out else np.zeros((0,), np.float64)


def explicit_scores(loss_fn: LossFn, params, subset: ParamSubset, s_test: Vec, batch,
                    pseudo_label_fn=None, *, method: str = "vmap") -> np.ndarray:
    """Reference path (tests, benchmark): materialize per-sample gradients on the subset and
    dot them with s_test. method 'vmap': jax.vmap(jax.grad) over the batch; 'loop': the
    reference implementation's way, one jitted grad+dot per sample in a Python loop."""
    if pseudo_label_fn is not None:
        batch = jax.jit(pseudo_label_fn)(params, batch)
    batch = jax.tree_util.tree_map(jnp.asarray, batch)

    def one(params, s_test, sample):
        b = jax.tree_util.tree_map(lambda x: x[None], sample)
        f = _sub_loss(loss_fn, subset, params, b, lambda l, _: l[0])  # noqa: E741
        g = jax.grad(f)(subset.take(params))
        return -tree_vdot(g, s_test)

    if method == "vmap":
        return np.asarray(jax.jit(jax.vmap(one, in_axes=(None, None, 0)))(params, s_test, batch),
                          np.float64)
    if method == "loop":
        f = jax.jit(one)
        n = len(jax.tree_util.tree_leaves(batch)[0])
        outs = [f(params, s_test, jax.tree_util.tree_map(lambda x: x[i], batch)) for i in range(n)]
        return np.asarray(jax.device_get(outs), np.float64)
    raise ValueError(f"explicit_scores: unknown method {method!r}")


# ----------------------------------------------------------------------------- selection

def select_top(scores, k: int, ids) -> tuple[np.ndarray, np.ndarray]:
    """The k MOST NEGATIVE scores (most helpful), ascending; ties broken by ascending id.
    Returns (ids [k], scores [k]). NaN/inf scores are an error naming the offending ids."""
    scores = np.asarray(scores, np.float64)
    ids = np.asarray(ids)
    if scores.shape != ids.shape or scores.ndim != 1:
        raise ValueError(f"select_top: scores {scores.shape} and ids {ids.shape} must be "
                         "1-D and of equal length")
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ValueError(f"select_top: {int(bad.sum())} of {len(scores)} influence scores are "
                         f"NaN/inf (e.g. ids {ids[bad][:5].tolist()}); check the LiSSA info "
                         "(nan_resets, residual) and the damp/scale settings")
    if not 0 <= k <= len(scores):
        raise ValueError(f"select_top: budget k={k} is larger than the pool ({len(scores)})")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("select_top: ids are not unique")
    order = np.lexsort((ids, scores))[:k]
    return ids[order], scores[order]
