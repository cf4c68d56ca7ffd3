"""Checks that a selection's inputs carry information, before any strategy ranks them.

Place in the pipeline: model outputs (softmax probabilities, penultimate features), LiSSA's
s_test and the influence scores -> THIS -> strategies. A diverged but finite model gives
constant outputs, and every strategy would then pick the smallest ids; a NaN model gives
NaN outputs; a LiSSA run that diverged returns v (every step reset) with an inf residual.
Each check raises SelectError with one line naming the cause (the model's outputs vs the
LiSSA settings) unless the user sets `allow_degenerate=True` in the config.
"""
from __future__ import annotations

import math

import numpy as np

from isal_jax.selection_io import SelectError

_ALLOW = "set --config.allow_degenerate=True to select anyway"


def _raise(msg: str, allow: bool) -> None:
    if not allow:
        raise SelectError(f"{msg}; {_ALLOW}")


def check_model_outputs(x, what: str, *, allow: bool = False) -> None:
    """`what` ('softmax probabilities', 'penultimate features', 'influence scores') of the
    pool, [N] or [N, D]: every value finite and not the same for every sample."""
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        _raise(f"the model's {what} are NaN/inf for {int(bad.sum())} of {len(x)} samples: "
               "the model (checkpoint) is broken (diverged training?)", allow)
        return
    if len(x) > 1 and np.all(np.ptp(x, axis=0) == 0):
        _raise(f"the model's {what} are the same for all {len(x)} samples: the model "
               "(checkpoint) is degenerate (diverged or collapsed training?), so any ranking "
               "of them is by id only", allow)


def check_lissa(info: dict, s_test: dict, *, max_residual: float, allow: bool = False,
                on_unconverged: str = "stop") -> None:
    """LiSSA converged by its own measure: s_test finite, residual finite and below
    `max_residual` (residual 1 is what s_test = 0 gives), and not every step reset.
    on_unconverged='select' (the reference's behaviour): a finite s_test whose residual is
    above max_residual is used anyway (info['converged'] = False records it)."""
    s_ok = all(np.all(np.isfinite(np.asarray(x))) for x in s_test.values())
    res = float(info.get("residual", math.nan))
    settings = (f"damp={info.get('damp')}, scale={info.get('scale')}, "
                f"depth={info.get('depth')}")
    if not s_ok:
        _raise(f"LiSSA s_test is NaN/inf (nan_resets={info.get('nan_resets')}): check the "
               f"LiSSA settings ({settings}; increase config.influence.scale or damp)", allow)
        return
    steps = int(info.get("steps_run", info.get("depth", 0))) * int(info.get("repeats", 1))
    if steps and int(info.get("nan_resets_total", 0)) >= steps:
        _raise(f"every LiSSA step was reset (non-finite), so s_test = v: the LiSSA settings "
               f"({settings}) diverge on this model; increase config.influence.scale", allow)
    info["converged"] = bool(math.isfinite(res) and res <= max_residual)
    if not info["converged"] and on_unconverged == "select" and math.isfinite(res):
        return
    if not info["converged"]:
        _raise(f"LiSSA did not converge by its own residual ({res:.3g} > "
               f"config.influence.max_residual={max_residual}; nan_resets="
               f"{info.get('nan_resets_total')}): check the LiSSA settings ({settings}; "
               "increase scale/damp, or depth)", allow)
