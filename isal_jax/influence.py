"""ISAL influence engine: parameter subsets, reference gradient, LiSSA s_test, JVP pool scores.

Place in the pipeline: task adapter (loss, pseudo labels) -> THIS -> strategies.isal ->
select / loop. Model- and task-agnostic: everything takes a per-sample loss

    loss_fn(params, batch) -> [B]        (batch: a pytree; a dict may carry 'mask' [B])

and a parameter-subset predicate `(path_str, leaf) -> bool` (default: every leaf with
ndim > 1 -- convolution kernels and FC weights, no BN, no biases).

    I(z) = -<G_z, s_test>,   s_test ~ scale * (H + damp*scale*I)^-1 v,   v = sum_R grad L

* Vectors (v, s_test, HVP tangents) live only on the subset: a flat dict
  {'/'-joined param path: array}; the other params stay fixed inside the loss closure.
* HVPs are forward-over-reverse, `jax.jvp(jax.grad(f), (p,), (h,))`. H below is always
  the MEAN-loss Hessian over every VALID row of the HVP batches (padded rows and a short
  last batch carry their true weight, see `lissa`).
* Pool scores never materialize per-sample gradients: the JVP of the per-sample loss
  VECTOR in direction s_test gives all B dot products <G_z, s_test> in one forward-mode pass.
* Compiled once: the engine's jitted pieces are module-level and take the loss function as
  a pytree argument (`as_pytree_fn`) and the subset as a hashable static argument, so the
  same problem shape reuses one executable across calls and AL cycles.

LiSSA fixed point. h_{j+1} = v + (1 - damp) h_j - H_j h_j / scale converges (when the
spectrum of (1-damp) I - H/scale lies inside (-1, 1), i.e. -damp*scale < lambda(H) <
(2-damp)*scale) to h* = scale * (H + damp*scale*I)^-1 v. Per-block scales S (one per
parameter block) act as a diagonal preconditioner of the same damped system, so the fixed
point stays c0 * (H + damp*c0*I)^-1 v (c0: the mapping's '*' scale); the reference's
per-block recursion, whose fixed point (H + damp*S)^-1 S v is not a damped inverse-HVP, is
block_mode='reference' (`lissa_coefficients`). `lissa` returns h (NOT h/scale, like the
ISAL reference; Koh & Liang divide by scale -- a positive constant, same rankings).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from isal_jax.config_schema import DAMP_MODES, HVP_ORDERS, NAN_RESETS, SOLVERS
from jax.flatten_util import ravel_pytree

from ezsd_jax.core.tree_paths import path_str

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


@dataclasses.dataclass(frozen=True)
class ParamSubset:
    """Which leaves of a param tree take part. `take` -> the subset as a flat dict,
    `put` -> params with the subset leaves replaced; `split`/`merge` for (subset, rest).
    Hashable by value: a static argument of the engine's compiled functions."""
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

def as_pytree_fn(fn):
    """A callable as a jit ARGUMENT, so that the engine compiles once per shape and reuses
    the executable across calls and AL cycles. A `jax.tree_util.Partial` is a pytree: its
    bound arguments (e.g. a model's batch_stats) are traced leaves and its function is part
    of the cache key; any other callable is wrapped in an empty Partial (cache key: the
    function object, so pass the same object to reuse a compile, not a fresh lambda)."""
    if fn is None or isinstance(fn, jax.tree_util.Partial):
        return fn
    return jax.tree_util.Partial(fn)


def _mask(batch, n: int):
    if isinstance(batch, Mapping) and "mask" in batch:
        return jnp.asarray(batch["mask"]).astype(jnp.float32)
    return jnp.ones((n,), jnp.float32)


def masked_sum(losses: jax.Array, batch) -> jax.Array:
    return jnp.sum(losses * _mask(batch, losses.shape[0]))


def masked_mean(losses: jax.Array, batch) -> jax.Array:
    m = _mask(batch, losses.shape[0])
    return jnp.sum(losses * m) / jnp.maximum(jnp.sum(m), 1.0)


def valid_rows(batch) -> int:
    """Number of valid rows of a host batch (its 'mask', else its length)."""
    if isinstance(batch, Mapping) and "mask" in batch:
        return int(np.sum(np.asarray(batch["mask"], bool)))
    return int(len(jax.tree_util.tree_leaves(batch)[0]))


def _sub_loss(loss_fn: LossFn, subset: ParamSubset, params, batch, reduce):
    """f(sub) = reduce(loss_fn(params with the subset replaced by sub, batch))."""
    return lambda sub: reduce(loss_fn(subset.put(params, sub), batch), batch)


def _hvp_sum(loss_fn, subset: ParamSubset, params, h: Vec, batch) -> Vec:
    """Hessian of the SUMMED (masked) loss of the batch, on the subset, @ h."""
    f = _sub_loss(loss_fn, subset, params, batch, masked_sum)
    return jax.jvp(jax.grad(f), (subset.take(params),), (h,))[1]


@functools.partial(jax.jit, static_argnames=("subset",))
def _hvp_sum_jit(loss_fn, subset, params, h, batch):
    return _hvp_sum(loss_fn, subset, params, h, batch)


@functools.partial(jax.jit, static_argnames=("subset",))
def _grad_sum_jit(loss_fn, subset, params, batch):
    return jax.grad(_sub_loss(loss_fn, subset, params, batch, masked_sum))(subset.take(params))


def hvp(loss_fn: LossFn, params, subset: ParamSubset, h: Vec, batch) -> Vec:
    """Hessian(of the MEAN loss over the batch's valid rows, on the subset) @ h."""
    hs = _hvp_sum(loss_fn, subset, params, h, batch)
    n = jnp.maximum(jnp.sum(_mask(batch, len(jax.tree_util.tree_leaves(batch)[0]))), 1.0)
    return {k: x / n for k, x in hs.items()}


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


def _as_list(batches) -> list:
    if isinstance(batches, (list, tuple)):
        return list(batches)
    return [_index(batches, j) for j in range(_num_steps(batches))]


def _total_valid(batches: list) -> int:
    n = sum(valid_rows(b) for b in batches)
    if n == 0:
        raise ValueError("the HVP batches have no valid row")
    return n


# ----------------------------------------------------------------------------- v

def reference_gradient(loss_fn: LossFn, params, subset: ParamSubset,
                       batches: Iterable[Any]) -> Vec:
    """v = SUM over all (valid) reference samples of grad loss, on the subset.
    Per batch: grad of the masked SUMMED loss; accumulated over batches (compiled once per
    batch shape, reused across calls)."""
    loss_fn = as_pytree_fn(loss_fn)
    v = None
    for batch in batches:
        g = _grad_sum_jit(loss_fn, subset, params, batch)
        v = g if v is None else jax.tree_util.tree_map(jnp.add, v, g)
    if v is None:
        raise ValueError("reference_gradient: the reference set is empty")
    return v


# ----------------------------------------------------------------------------- LiSSA



def _chain_orders(num_steps: int, depth: int, repeats: int, seed: int,
                  order: str = "shuffled") -> np.ndarray:
    """[repeats, depth] minibatch indices. 'shuffled': per chain, seeded reshuffled passes
    over the minibatches; 'sequential' (the reference's): chain r visits minibatches
    r*depth, r*depth+1, ... in the given order (wrapping around when there are fewer)."""
    if order not in HVP_ORDERS:
        raise ValueError(f"lissa: hvp_order must be one of {HVP_ORDERS}, got {order!r}")
    out = np.zeros((repeats, depth), np.int32)
    if order == "sequential":
        return ((np.arange(repeats)[:, None] * depth + np.arange(depth)[None]) % num_steps
                ).astype(np.int32)
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


BLOCK_MODES = ("preconditioner", "reference")


def lissa_coefficients(scale, like: Vec, damp: float, block_mode: str = "preconditioner"
                       ) -> tuple[float, dict]:
    """The recursion h' = (1 - d) h + a v - H h / S (per block) for a scalar or per-block
    `scale`. Returns (damping scale c0, {'a', 'd', 'inv_s'}: per-block floats).

    scalar scale s: a = 1, d = damp, S = s (the reference's LiSSA), c0 = s.
    per-block S, block_mode 'preconditioner' (default): S is a diagonal preconditioner of
      the Richardson iteration for (H + damp*c0 I) x = v with c0 = the mapping's '*'
      entry: a = c0/S, d = damp*c0/S, so the fixed point is h* = c0 (H + damp*c0 I)^-1 v,
      the same damped inverse-HVP as the scalar scale c0; S only changes how fast (and
      whether) the chain gets there.
    per-block S, block_mode 'reference': a = 1, d = damp (the ISAL detection code); its
      fixed point (H + damp S)^-1 S v is not a damped inverse-HVP (kept to reproduce it).
    """
    if block_mode not in BLOCK_MODES:
        raise ValueError(f"lissa: block_mode must be one of {BLOCK_MODES}, got {block_mode!r}")
    s_t = _scale_tree(scale, like)
    if any(not (s > 0) for s in s_t.values()):
        raise ValueError(f"lissa: scale must be > 0, got {scale}")
    if isinstance(scale, Mapping) and block_mode == "preconditioner":
        if "*" not in scale:
            raise ValueError("per-block LiSSA scales need a '*' entry: the scale c0 of the "
                             "damped system (H + damp*c0 I) (block_mode='preconditioner')")
        c0 = float(scale["*"])
        a = {k: c0 / s for k, s in s_t.items()}
    else:
        c0 = float(scale["*"]) if isinstance(scale, Mapping) and "*" in scale else \
            (float(scale) if not isinstance(scale, Mapping) else float("nan"))
        a = {k: 1.0 for k in s_t}
    coef = {"a": a, "d": {k: damp * a[k] for k in s_t},
            "inv_s": {k: 1.0 / s for k, s in s_t.items()}}
    return c0, coef


def _lissa_step(loss_fn, subset, sampler, params, v, h, data, x, coef, norm):
    b = sampler(x) if sampler is not None else _index(data, x)
    hs = _hvp_sum(loss_fn, subset, params, h, b)
    # norm > 0: S/N for stacked minibatches (so that E[step HVP] is the mean-loss Hessian
    # over ALL valid rows, whatever each minibatch's padding); else the batch's own mean.
    nb = jnp.maximum(jnp.sum(_mask(b, len(jax.tree_util.tree_leaves(b)[0]))), 1.0)
    w = jnp.where(norm > 0, norm, 1.0 / nb)
    new = {k: (1.0 - coef["d"][k]) * h[k] + coef["a"][k] * v[k]
           - coef["inv_s"][k] * w * hs[k] for k in h}
    ok = tree_all_finite(new)
    # nan_reset 'chain': any non-finite block resets every block to v; 'block' (the
    # reference's): only the non-finite blocks are reset.
    keep = {k: jnp.where(coef["block_reset"], jnp.all(jnp.isfinite(new[k])), ok) for k in new}
    new = {k: jnp.where(keep[k], new[k], v[k]) for k in new}
    diff = tree_norm(jax.tree_util.tree_map(jnp.subtract, new, h))
    return new, (tree_norm(new), ~ok, diff)


_lissa_step_jit = jax.jit(_lissa_step, static_argnames=("subset",))


@functools.partial(jax.jit, static_argnames=("subset",))
def _lissa_chain_scan(loss_fn, subset, sampler, params, v, data, sel, coef, norm):
    def body(h, x):
        return _lissa_step(loss_fn, subset, sampler, params, v, h, data, x, coef, norm)
    return jax.lax.scan(body, v, sel)


def lissa(loss_fn: LossFn, params, subset: ParamSubset, v: Vec, hvp_batches, *,
          damp: float = 0.01, scale: float | Mapping[str, float] = 1e4, depth: int = 250,
          repeats: int = 4, seed: int = 0, residual_batches: int = 8,
          loop: str = "auto", block_mode: str = "preconditioner",
          stop_residual: float = 0.0, check_every: int = 0, hvp_order: str = "shuffled",
          nan_reset: str = "chain") -> tuple[Vec, dict]:
    """LiSSA estimate of s_test = c0 * (H + damp*c0*I)^-1 v (module docstring;
    `lissa_coefficients` for per-block scales).

    hvp_batches: either a pytree of arrays with a leading minibatch axis [S, B, ...] (or a
      list of equally shaped batches), which chain r visits in its own seeded random order,
      reshuffled every pass; or a jittable callable `key -> batch` that draws a minibatch
      (a fresh key per step and chain). H is the mean-loss Hessian over every VALID row of
      the stacked minibatches (a step's HVP of the summed minibatch loss is weighted by
      S/N, N the valid rows of all S minibatches, so padded rows and short batches do not
      tilt it); for a callable, the mean over each drawn minibatch's valid rows.
      hvp_order 'sequential' (the reference's): chain r takes minibatches r*depth.. in
      order instead of a seeded shuffle (`_chain_orders`).
    Each of the `repeats` chains runs `depth` steps; a step whose result is not finite
      resets that chain to v (nan_reset 'chain'; 'block': only the non-finite parameter
      blocks, as the reference does); resets are counted. The chains are averaged.
    stop_residual > 0 (python loop only): every `check_every` steps (default 25) the
      running average of the chains' current iterates is checked against the residual
      below; the chains stop once it is <= stop_residual ('steps_run' in info).
    loop: 'scan' runs a chain as one lax.scan; 'python' runs one jitted step per call
      (same numbers). 'auto' = 'python' on CPU, 'scan' elsewhere: XLA:CPU leaves the
      weight-gradient convolutions of an HVP inside a while loop in a non-canonical layout
      and runs them ~10x slower (measured: 13-17 ms vs 1.2 ms per step, small CNN).
    Every piece is compiled once per (loss function, subset, shapes) and reused across
      calls (pass a stable `loss_fn`, e.g. a jax.tree_util.Partial over the model state).

    info: damp, scale, depth, repeats, nan_resets (per chain), norm_trace ([repeats][steps]
      ||h_j||), v_norm, s_norm, last_rel_change (per chain, ||h_d - h_{d-1}|| / ||h_d||), and
      residual = || (H_bar s / S + d s) / a - v || / ||v|| (= ||H_bar s / c0 + damp s - v||
      / ||v|| for a scalar scale or preconditioner blocks), H_bar the mean-loss Hessian over
      the valid rows of the first `residual_batches` HVP minibatches (or that many draws of
      the callable with a fixed key). residual is 0 exactly at the fixed point for H_bar;
      it measures both truncation (depth) and the minibatch noise of the chains' average.
    """
    if depth < 1 or repeats < 1:
        raise ValueError(f"lissa: depth ({depth}) and repeats ({repeats}) must be >= 1")
    loop = _resolve_loop(loop)
    if stop_residual > 0 and loop != "python":
        raise ValueError("lissa: stop_residual needs loop='python'")
    v = {k: jnp.asarray(x) for k, x in v.items()}
    if set(v) != set(subset.keys):
        raise ValueError("lissa: v is not a vector on this parameter subset")
    if nan_reset not in NAN_RESETS:
        raise ValueError(f"lissa: nan_reset must be one of {NAN_RESETS}, got {nan_reset!r}")
    c0, coef = lissa_coefficients(scale, v, damp, block_mode)
    coef = jax.tree_util.tree_map(lambda c: jnp.asarray(c, jnp.float32), coef)
    coef["block_reset"] = jnp.asarray(nan_reset == "block")
    loss_fn = as_pytree_fn(loss_fn)
    sampler = as_pytree_fn(hvp_batches) if callable(hvp_batches) else None
    if sampler is None:
        if isinstance(hvp_batches, (list, tuple)):
            hvp_batches = stack_batches(hvp_batches)
        num = _num_steps(hvp_batches)
        norm = jnp.float32(num / _total_valid(_as_list(hvp_batches)))
        selectors = list(_chain_orders(num, depth, repeats, seed, hvp_order))
        data = jax.device_put(hvp_batches)        # minibatches go to the device once
    else:
        norm = jnp.float32(-1.0)
        base = jax.random.PRNGKey(seed)
        selectors = [np.asarray(jax.random.split(jax.random.fold_in(base, r), depth))
                     for r in range(repeats)]
        data = None
    if sampler is not None:
        keys = jax.random.split(jax.random.PRNGKey(seed + 7919), max(residual_batches, 1))
        res_batches = [jax.jit(hvp_batches)(k) for k in keys]
    else:
        n = min(max(residual_batches, 1), _num_steps(hvp_batches))
        res_batches = [_index(hvp_batches, j) for j in range(n)]

    def residual(s):
        hs = mean_hvp(loss_fn, params, subset, s, res_batches)
        r = {k: (coef["inv_s"][k] * hs[k] + coef["d"][k] * s[k]) / coef["a"][k] - v[k]
             for k in s}
        return float(tree_norm(r)) / max(float(tree_norm(v)), 1e-30)

    check_every = int(check_every) or 25
    hs_ = [v] * repeats
    outs = [[] for _ in range(repeats)]
    steps_run = depth
    if loop == "scan":
        for r in range(repeats):
            hs_[r], o = _lissa_chain_scan(loss_fn, subset, sampler, params, v, data,
                                          selectors[r], coef, norm)
            outs[r] = [tuple(z[j] for z in o) for j in range(depth)]
    else:
        # The chains advance in lockstep, so that the running average can be checked.
        for j in range(depth):
            for r in range(repeats):
                hs_[r], o = _lissa_step_jit(loss_fn, subset, sampler, params, v, hs_[r], data,
                                            selectors[r][j], coef, norm)
                outs[r].append(o)
            if stop_residual > 0 and (j + 1) % check_every == 0 and j + 1 < depth:
                avg = jax.tree_util.tree_map(lambda *xs: sum(xs) / repeats, *hs_)
                if residual(avg) <= stop_residual:
                    steps_run = j + 1
                    break
    traces, resets, rel = [], [], []
    for r in range(repeats):
        norms, bad, diff = (np.asarray(jax.device_get(list(z))) for z in zip(*outs[r]))
        traces.append([float(x) for x in norms])
        resets.append(int(bad.sum()))
        with np.errstate(invalid="ignore", divide="ignore"):
            rel.append(float(diff[-1] / max(norms[-1], 1e-30)))
    s = jax.tree_util.tree_map(lambda *xs: sum(xs) / repeats, *hs_)
    info = {
        "damp": float(damp), "scale": _scale_to_json(scale), "damp_scale": c0,
        "block_mode": block_mode if isinstance(scale, Mapping) else "scalar",
        "depth": int(depth), "steps_run": int(steps_run),
        "repeats": int(repeats), "seed": int(seed), "loop": loop,
        "hvp_order": hvp_order, "nan_reset": nan_reset,
        "nan_resets": resets, "nan_resets_total": int(sum(resets)),
        "v_norm": float(tree_norm(v)), "s_norm": float(tree_norm(s)),
        "residual": residual(s), "residual_batches": len(res_batches),
        "last_rel_change": rel, "norm_trace": traces,
    }
    if not all(math.isfinite(x) for x in (info["s_norm"], info["residual"])):
        info["warning"] = "s_test is not finite"
    return s, info


def mean_hvp(loss_fn: LossFn, params, subset: ParamSubset, h: Vec, batches) -> Vec:
    """The mean-loss Hessian over every VALID row of `batches` (a list, or a stacked
    pytree) @ h: the sum of the summed-loss HVPs divided by the number of valid rows.
    A Python loop over one compiled HVP (see `lissa`'s note on loops on CPU)."""
    batches = _as_list(batches)
    n = _total_valid(batches)
    loss_fn = as_pytree_fn(loss_fn)
    acc = None
    for b in batches:
        hv = _hvp_sum_jit(loss_fn, subset, params, h, b)
        acc = hv if acc is None else jax.tree_util.tree_map(jnp.add, acc, hv)
    return jax.tree_util.tree_map(lambda x: x / n, acc)


def top_eigenvalue(loss_fn: LossFn, params, subset: ParamSubset, batches, *,
                   iters: int = 20, seed: int = 0) -> tuple[float, dict]:
    """Largest-magnitude eigenvalue of the mean-loss Hessian over `batches` (the H of
    `mean_hvp`) by power iteration from a seeded random start. Returns (lambda, info:
    iters, rel_change of the last step)."""
    sub = subset.take(params)
    key = jax.random.PRNGKey(seed)
    h = {k: jax.random.normal(jax.random.fold_in(key, i), np.shape(x), jnp.float32)
         for i, (k, x) in enumerate(sub.items())}
    lams = []
    for _ in range(max(int(iters), 1)):
        nrm = tree_norm(h)
        h = {k: x / nrm for k, x in h.items()}
        hv = mean_hvp(loss_fn, params, subset, h, batches)
        lams.append(float(tree_vdot(h, hv)))
        if not math.isfinite(lams[-1]):
            break
        h = hv
    lam = lams[-1]
    rel = abs(lam - lams[-2]) / max(abs(lam), 1e-30) if len(lams) > 1 else float("nan")
    return lam, {"iters": len(lams), "rel_change": float(rel)}




def solve_s_test(loss_fn: LossFn, params, subset: ParamSubset, v: Vec, hvp_batches, *,
                 solver: str = "lissa", damp: float = 0.01, scale=1e4,
                 damp_mode: str = "fixed", damp_fraction: float = 0.1, eig_iters: int = 20,
                 eig_batches: int = 8, cg_tol: float = 1e-3, cg_maxiter: int = 100,
                 seed: int = 0, **lissa_kw) -> tuple[Vec, dict]:
    """s_test for the selection: the damped system c0 (H + damp*c0 I)^-1 v solved by
    `solver` ('lissa': the reference's recursion, `lissa_kw` = depth, repeats, ...;
    'cg': `conjugate_gradient` on the stacked minibatches, the same fixed point).

    The Hessian's top eigenvalue (power iteration, `eig_iters` steps over the first
    `eig_batches` minibatches; 0 = skip) is reported with the effective damping ratio
    damp*c0 / lambda_max in info. damp_mode='top_eig' sets damp = damp_fraction *
    lambda_max / c0 (damping a fixed fraction of the spectrum's top); 'fixed' keeps `damp`
    (the reference's). Stacked / list minibatches only for 'cg' and the eigenvalue."""
    if solver not in SOLVERS:
        raise ValueError(f"influence.solver must be one of {SOLVERS}, got {solver!r}")
    if damp_mode not in DAMP_MODES:
        raise ValueError(f"influence.damp_mode must be one of {DAMP_MODES}, got {damp_mode!r}")
    c0, _ = lissa_coefficients(scale, v, damp, lissa_kw.get("block_mode", "preconditioner"))
    batches = None if callable(hvp_batches) else _as_list(hvp_batches)
    top = None
    if (eig_iters > 0 or damp_mode == "top_eig") and batches is not None:
        top, _ = top_eigenvalue(loss_fn, params, subset, batches[:max(eig_batches, 1)],
                                iters=max(eig_iters, 1), seed=seed)
    if damp_mode == "top_eig":
        if top is None or not (top > 0) or not math.isfinite(c0):
            raise ValueError(f"damp_mode='top_eig' needs stacked HVP minibatches, a scalar "
                             f"(or '*') scale and a positive top eigenvalue (got {top})")
        damp = float(damp_fraction) * top / c0
    if solver == "cg":
        s, info = conjugate_gradient(loss_fn, params, subset, v, batches, damp=damp,
                                     scale=scale, tol=cg_tol, maxiter=cg_maxiter,
                                     block_mode=lissa_kw.get("block_mode", "preconditioner"))
        hs = mean_hvp(loss_fn, params, subset, s, batches[:lissa_kw.get("residual_batches",
                                                                        8)])
        r = {k: hs[k] / c0 + damp * s[k] - v[k] for k in s}
        info = {**info, "cg_residual": info["residual"], "damp": float(damp),
                "scale": _scale_to_json(scale), "damp_scale": c0, "nan_resets": [],
                "nan_resets_total": 0, "v_norm": float(tree_norm(v)),
                "s_norm": float(tree_norm(s)),
                "residual": float(tree_norm(r)) / max(float(tree_norm(v)), 1e-30)}
    else:
        s, info = lissa(loss_fn, params, subset, v, hvp_batches, damp=damp, scale=scale,
                        seed=seed, **lissa_kw)
    info.update({"solver": solver, "damp_mode": damp_mode, "top_eigenvalue": top,
                 "damping_ratio": (damp * c0 / top) if top else None})
    if damp_mode == "top_eig":
        info["damp_fraction"] = float(damp_fraction)
    return s, info


# ----------------------------------------------------------------------------- validation solvers

def hessian_matrix(loss_fn: LossFn, params, subset: ParamSubset, batches,
                   max_params: int = 4096) -> tuple[jax.Array, Callable]:
    """Dense mean-loss Hessian on the flattened subset over every valid row of `batches`
    (same H as `mean_hvp`). Returns (H [n, n], unravel: flat -> Vec). Small models only."""
    sub0 = subset.take(params)
    flat0, unravel = ravel_pytree(sub0)
    n = flat0.shape[0]
    if n > max_params:
        raise ValueError(f"hessian_matrix: the subset has {n} parameters (> max_params="
                         f"{max_params}); use conjugate_gradient or lissa")
    blist = _as_list(batches)
    total = _total_valid(blist)
    stacked = stack_batches(blist)

    @jax.jit
    def dense(params, stacked):
        def one(b):
            f = lambda flat: masked_sum(loss_fn(subset.put(params, unravel(flat)), b), b)  # noqa
            return jax.hessian(f)(flat0)
        hs = jax.lax.map(one, stacked)
        return jnp.sum(hs, axis=0) / total
    return dense(params, stacked), unravel


@dataclasses.dataclass
class ExactHessian:
    """A dense Hessian with its eigendecomposition computed once (lazily) and reused by
    every `solve` (any v, damp, scalar or preconditioner scale)."""
    H: np.ndarray                  # [n, n] float64, symmetrized
    unravel: Callable
    _eig: tuple | None = None

    @classmethod
    def compute(cls, loss_fn, params, subset, batches, max_params: int = 4096):
        H, unravel = hessian_matrix(loss_fn, params, subset, batches, max_params)
        H = np.asarray(H, np.float64)
        return cls(0.5 * (H + H.T), unravel)

    @property
    def eig(self) -> tuple[np.ndarray, np.ndarray]:
        if self._eig is None:
            self._eig = np.linalg.eigh(self.H)
        return self._eig

    def solve(self, v: Vec, *, damp: float, scale, block_mode: str = "preconditioner"
              ) -> tuple[Vec, dict]:
        flat_v, _ = ravel_pytree(v)
        fv = np.asarray(flat_v, np.float64)
        c0, coef = lissa_coefficients(scale, v, damp, block_mode)
        lam, Q = self.eig
        S = np.concatenate([np.full(np.size(x), 1.0 / coef["inv_s"][k]) for k, x in v.items()])
        if block_mode == "reference" and isinstance(scale, Mapping):
            sol = np.linalg.solve(self.H + damp * np.diag(S), S * fv)
            conv = bool(lam[0] > -damp * S.min() and lam[-1] < (2 - damp) * S.max())
        else:   # c0 (H + damp c0 I)^-1 v from the cached eigendecomposition
            sol = Q @ ((c0 / (lam + damp * c0)) * (Q.T @ fv))
            a = np.concatenate([np.full(np.size(x), coef["a"][k]) for k, x in v.items()])
            if isinstance(scale, Mapping):   # spectrum of the preconditioned iteration
                M = np.sqrt(a)[:, None] * (damp * np.eye(len(fv)) + self.H / c0) * np.sqrt(a)
                mu = np.linalg.eigvalsh(M)
                conv = bool(mu[0] > 0 and mu[-1] < 2)
            else:
                conv = bool(lam[0] > -damp * c0 and lam[-1] < (2 - damp) * c0)
        info = {"lambda_min": float(lam[0]), "lambda_max": float(lam[-1]),
                "n": int(len(fv)), "lissa_converges": conv}
        return self.unravel(jnp.asarray(sol, flat_v.dtype)), info


def exact_inverse_hvp(loss_fn: LossFn, params, subset: ParamSubset, v: Vec, batches, *,
                      damp: float = 0.01, scale: float | Mapping[str, float] = 1e4,
                      max_params: int = 4096, block_mode: str = "preconditioner",
                      hessian: ExactHessian | None = None) -> tuple[Vec, dict]:
    """LiSSA's fixed point by a dense solve (`lissa_coefficients`): c0 (H + damp*c0 I)^-1 v,
    or for block_mode='reference' (H + damp*S)^-1 S v; H the mean-loss Hessian over the
    valid rows of `batches`. Pass `hessian` (ExactHessian.compute) to reuse H and its
    eigendecomposition across calls. info: H's extreme eigenvalues and whether LiSSA
    converges on this H."""
    if hessian is None:
        hessian = ExactHessian.compute(loss_fn, params, subset, batches, max_params)
    return hessian.solve(v, damp=damp, scale=scale, block_mode=block_mode)


def conjugate_gradient(loss_fn: LossFn, params, subset: ParamSubset, v: Vec, batches, *,
                       damp: float = 0.01, scale: float | Mapping[str, float] = 1e4,
                       maxiter: int = 200, tol: float = 1e-6,
                       block_mode: str = "preconditioner") -> tuple[Vec, dict]:
    """Matrix-free CG for LiSSA's fixed point (same answer as `exact_inverse_hvp`):
    (H + damp*c0 I) x = v, s = c0 x (scalar scale or preconditioner blocks; for
    block_mode='reference', (H + damp*S) s = S v). H h = `mean_hvp` over `batches`.
    Needs the system matrix positive definite (true when lambda_min(H) > -damp*c0).
    A Python loop over the compiled HVP (fast on XLA:CPU, see `lissa`).
    info: iterations, hvp_batches (HVP minibatch evaluations), relative residual
    ||A x - b|| / ||b||, converged."""
    blist = _as_list(batches)
    v = {k: jnp.asarray(x, jnp.float32) for k, x in v.items()}
    c0, coef = lissa_coefficients(scale, v, damp, block_mode)
    ref_blocks = block_mode == "reference" and isinstance(scale, Mapping)
    S = {k: 1.0 / coef["inv_s"][k] for k in v}

    def matvec(h):
        hv = mean_hvp(loss_fn, params, subset, h, blist)
        if ref_blocks:
            return {k: hv[k] + damp * S[k] * h[k] for k in h}
        return {k: hv[k] + damp * c0 * h[k] for k in h}

    b = {k: S[k] * v[k] for k in v} if ref_blocks else v
    b_norm = float(tree_norm(b))
    x = jax.tree_util.tree_map(jnp.zeros_like, b)
    r, p = b, b
    rs = tree_vdot(r, r)
    it = 0
    while it < maxiter and math.sqrt(max(float(rs), 0.0)) > tol * b_norm:
        ap = matvec(p)
        alpha = rs / tree_vdot(p, ap)
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rs_new = tree_vdot(r, r)
        p = {k: r[k] + (rs_new / rs) * p[k] for k in p}
        rs = rs_new
        it += 1
    ax = matvec(x)
    res = float(tree_norm({k: ax[k] - b[k] for k in b})) / max(b_norm, 1e-30)
    s = x if ref_blocks else {k: c0 * x[k] for k in x}
    return s, {"iterations": it, "hvp_batches": (it + 1) * len(blist), "residual": res,
               "converged": bool(res <= max(tol, 1e-30) * 10)}


# ----------------------------------------------------------------------------- pool scores

def _score(loss_fn, pseudo_label_fn, subset, method, params, s_test, batch, has_aux=False):
    if pseudo_label_fn is not None:
        batch = jax.lax.stop_gradient(pseudo_label_fn(params, batch))
    sub = subset.take(params)
    tangent = {k: s_test[k].astype(sub[k].dtype) for k in sub}
    if has_aux:     # loss_fn -> (losses, aux): aux (e.g. the pseudo class) rides along
        f = lambda q: loss_fn(subset.put(params, q), batch)  # noqa: E731
        _, dots, aux = jax.jvp(f, (sub,), (tangent,), has_aux=True)
    else:
        f = _sub_loss(loss_fn, subset, params, batch, lambda l, b: l)  # noqa: E741
        if method == "jvp":
            _, dots = jax.jvp(f, (sub,), (tangent,))
        else:
            _, lin = jax.linearize(f, sub)
            dots = lin(tangent)
    m = _mask(batch, dots.shape[0])
    scores = jnp.where(m > 0, -dots, 0.0)
    return (scores, aux) if has_aux else scores


_score_jit = jax.jit(_score, static_argnames=("subset", "method", "has_aux"))


def make_score_fn(loss_fn: LossFn, subset: ParamSubset,
                  pseudo_label_fn: Callable[[Any, Any], Any] | None = None, *,
                  mesh=None, method: str = "jvp", has_aux: bool = False) -> Callable:
    """Compiled `score(params, s_test, batch) -> [B]` with I(z) = -<G_z, s_test> (0 on rows
    whose mask is False). One module-level jit: the same (loss_fn, pseudo_label_fn,
    subset, shapes) reuse one executable across calls (see `as_pytree_fn`).

    pseudo_label_fn(params, batch) -> batch with pseudo targets filled in; computed first,
    under stop_gradient. None: use the batch as given (or a `loss_fn` that labels itself
    under stop_gradient -- the fused form, which saves one forward pass).
    method: 'jvp' (one forward-mode pass of the per-sample loss vector in direction s_test;
    the tangent is only on the subset, so the other params carry symbolic zeros) or
    'linearize' (jax.linearize then apply; same numbers, kept for the benchmark).
    has_aux: loss_fn returns (per-sample losses, aux [B]); score returns (scores, aux)
    from the same forward pass (the fused pseudo label's class: no second pool pass).
    mesh: accepted for the callers' symmetry; the placement is the inputs' (pool_scores
    puts params/s_test replicated and the batch split on 'data'), which jit follows.
    """
    if method not in ("jvp", "linearize"):
        raise ValueError(f"make_score_fn: unknown method {method!r}")
    if has_aux and method != "jvp":
        raise ValueError("make_score_fn: has_aux needs method='jvp'")
    return functools.partial(_score_jit, as_pytree_fn(loss_fn), as_pytree_fn(pseudo_label_fn),
                             subset, method, has_aux=has_aux)


def pool_scores(loss_fn: LossFn, params, subset: ParamSubset, s_test: Vec,
                batches: Iterable[Any], pseudo_label_fn=None, *, mesh=None,
                method: str = "jvp", score_fn: Callable | None = None) -> np.ndarray:
    """Influence scores I(z) = -<G_z, s_test> for every VALID row of `batches`, in order,
    as float64 numpy [N]. Batches are host (numpy) pytrees with a fixed batch size (pad and
    set 'mask'); with a mesh the batch size must be divisible by the 'data' axis size.
    `score_fn` (from make_score_fn) may be passed instead of loss_fn/pseudo_label_fn; one
    made with has_aux=True makes this return (scores, aux of the valid rows)."""
    if score_fn is None:
        score_fn = make_score_fn(loss_fn, subset, pseudo_label_fn, mesh=mesh, method=method)
    if mesh is not None:
        from ezsd_jax.core.sharding import host_to_global, replicated
        params = jax.device_put(params, replicated(mesh))
        s_test = jax.device_put(s_test, replicated(mesh))
    pending = []
    for batch in batches:
        n = len(jax.tree_util.tree_leaves(batch)[0])
        mask = (np.asarray(batch["mask"], bool) if isinstance(batch, Mapping) and "mask" in batch
                else np.ones((n,), bool))
        dev_batch = host_to_global(batch, mesh) if mesh is not None else batch
        pending.append((score_fn(params, s_test, dev_batch), mask))  # async dispatch
    if getattr(score_fn, "keywords", {}).get("has_aux"):      # make_score_fn(has_aux=True)
        got = [(jax.device_get(s), m) for s, m in pending]
        return (np.concatenate([np.asarray(s, np.float64)[m] for (s, _), m in got]
                               or [np.zeros((0,), np.float64)]),
                np.concatenate([np.asarray(a)[m] for (_, a), m in got]
                               or [np.zeros((0,), np.int64)]))
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


# The engine's compiled programs by name (LiSSA and CG steps are one "hvp" each plus
# vector updates): the deviceless AOT check (isal_jax/aot_steps.py) lowers these.
PROGRAMS = {"ref_grad": _grad_sum_jit, "hvp": _hvp_sum_jit, "score": _score_jit}
