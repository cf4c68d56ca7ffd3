"""The ISAL config schema, registered with the one validator (ezsd_jax.core.config_check)
on import; every configs/isal_*.py imports this module, so loading an ISAL config brings
its rules. Imports nothing heavy (no jax): a rejected value costs no jax import. The enum
tuples here are the definitions the engine (isal_jax.influence, scoring) uses.
"""
from __future__ import annotations

from typing import Any

from ezsd_jax.core.config_check import ConfigError, _get, _is_int, _is_num, register_schema

SOLVERS = ("lissa", "cg")
DAMP_MODES = ("fixed", "top_eig")
DIVERSITY = ("none", "class_balanced")
HVP_ORDERS = ("shuffled", "sequential")
NAN_RESETS = ("chain", "block")
ON_UNCONVERGED = ("stop", "select")

POSITIVE_INT = ("ref_batch_size", "hvp_batch_size", "pool_batch_size", "shard_size", "depth",
                "hvp_num_batches", "residual_batches", "budget", "initial", "cycles",
                "num_labeled")
ENUMS = {
    "task": ("classification", "detection"),                    # isal_jax.main
    "influence.pseudo_label": ("argmax", "expected"),           # isal_jax.tasks.classification
    "influence.solver": SOLVERS,                                # isal_jax.influence
    "influence.damp_mode": DAMP_MODES,
    "influence.diversity": DIVERSITY,                           # isal_jax.scoring
    "influence.hvp_order": HVP_ORDERS,
    "influence.nan_reset": NAN_RESETS,
    "influence.on_unconverged": ON_UNCONVERGED,
}

def heldout_count(n: int, fraction: float, size: int = 0) -> int:
    """Labeled ids held out as ISAL's reference set (reference.source='heldout'): `size`
    when > 0, else round(fraction * n), at least 1."""
    return int(size) if int(size) > 0 else max(1, int(round(float(fraction) * int(n))))


def check_reference(ref: Any) -> None:
    """config.reference: source labeled | heldout | ids_file | split:<name>; the held-out
    part's fraction in (0, 1) and size >= 0 (0: use the fraction)."""
    source = ref.get("source")
    if not (source in ("labeled", "heldout", "ids_file") or (
            isinstance(source, str) and source.startswith("split:") and len(source) > 6)):
        raise ConfigError(f"config.reference.source={source!r}: must be 'labeled', "
                          "'heldout', 'ids_file' or 'split:<name>'")
    fraction = ref.get("heldout_fraction", 0.2)
    if not (_is_num(fraction) and 0.0 < fraction < 1.0):
        raise ConfigError(f"config.reference.heldout_fraction={fraction!r}: must be a "
                          "number in (0, 1)")
    size = ref.get("heldout_size", 0)
    if not _is_int(size) or size < 0:
        raise ConfigError(f"config.reference.heldout_size={size!r}: must be an integer "
                          ">= 0 (0: use heldout_fraction)")


def check_loader(loader: Any, path: str) -> None:
    """config.<data|pool>.loader (isal_jax.data.load_dataset): keys are non-empty strings,
    mean/std 1+ numbers (std > 0), image_size () or (h, w) >= 1."""
    for key in ("image_key", "label_key"):
        if key in loader and not (isinstance(loader[key], str) and loader[key]):
            raise ConfigError(f"config.{path}.{key}={loader[key]!r}: must be a feature name")
    for key in ("mean", "std"):
        v = loader.get(key, (0.5,))
        if not (isinstance(v, (tuple, list)) and v and all(_is_num(x) for x in v)) or (
                key == "std" and min(v) <= 0):
            raise ConfigError(f"config.{path}.{key}={v!r}: must be a tuple of "
                              f"{'positive ' if key == 'std' else ''}numbers (one per "
                              "channel, or one for all)")
    size = loader.get("image_size", ())
    if not (isinstance(size, (tuple, list)) and len(size) in (0, 2) and all(
            _is_int(x) and x >= 1 for x in size)):
        raise ConfigError(f"config.{path}.image_size={size!r}: must be () (as stored) or "
                          "(height, width) >= 1")


def check(cfg: Any) -> None:
    """The ISAL rules beyond leaf names and enums: loader options, the reference set."""
    for path in ("data.loader", "pool.loader"):             # isal_jax.data
        present, loader = _get(cfg, path)
        if present and hasattr(loader, "keys"):
            check_loader(loader, path)
    present, ref = _get(cfg, "reference")                     # isal_jax.selection_io
    if present:
        check_reference(ref)
        _, initial = _get(cfg, "al.initial")
        if ref.get("source") == "heldout" and _is_int(initial) and initial >= 1:
            k = heldout_count(initial, ref.get("heldout_fraction", 0.2),
                              ref.get("heldout_size", 0))
            if not 0 < k < initial:
                raise ConfigError(f"config.reference: holding out {k} of al.initial="
                                  f"{initial} labels leaves nothing to train on")


register_schema(positive_int=POSITIVE_INT, enums=ENUMS, check=check)
