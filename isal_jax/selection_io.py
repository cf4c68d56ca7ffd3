"""Selection I/O shared by the classification and detection selection paths.

Place in the pipeline: isal_jax.select and isal_jax.detection_al (CLI and AL loop) ->
THIS -> files in the workdir: id lists the user gives (labeled / pool / reference ids),
settings fingerprints, the fingerprinted npz caches of s_test and score shards (resumable),
and the bad-input error both paths raise. Imports nothing of isal_jax, so either path can
import it without an import cycle.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from ezsd_jax.core.metrics import report


class SelectError(ValueError):
    """Bad input (config, id files, checkpoint, a degenerate model): reported as one line
    and exit status 2, without a traceback."""


def read_id_list(path: str, field: str) -> np.ndarray:
    """A JSON list of unique integer ids -> int64 array; SelectError naming `field`."""
    if not os.path.exists(path):
        raise SelectError(f"{field}: file {path!r} does not exist")
    try:
        with open(path) as f:
            ids = json.load(f)
    except json.JSONDecodeError as e:
        raise SelectError(f"{field}: {path!r} is not valid JSON ({e})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise SelectError(f"{field}: cannot read {path!r} ({e})") from e
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                            for i in ids):
        raise SelectError(f"{field}: {path!r} must hold a JSON list of integer ids")
    arr = np.asarray(ids, np.int64)
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise SelectError(f"{field}: {path!r} lists duplicate ids (e.g. {dup[:5].tolist()})")
    return arr


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (np.ndarray, tuple)):
        return o.tolist() if isinstance(o, np.ndarray) else list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able settings object (numpy scalars/arrays allowed)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default)
                          .encode()).hexdigest()[:16]


def ids_hash(ids) -> str:
    return hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()[:16]


def score_dir(workdir: str) -> str:
    """workdir/isal_scores, created, without the half-written files of a killed run."""
    sdir = os.path.join(workdir, "isal_scores")
    os.makedirs(sdir, exist_ok=True)
    for name in os.listdir(sdir):
        if ".tmp." in name:
            os.remove(os.path.join(sdir, name))
    return sdir


def load_cached(path: str, fp: str, ids=None) -> dict | None:
    """The arrays of a cache file written with `fingerprint=fp` (and `ids`, if given), or
    None when it is missing, stale (other settings/ids) or unreadable (reported)."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) == fp and (ids is None or np.array_equal(z["ids"], ids)):
                return {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError, KeyError):
        pass
    report(f"{path}: stale or unreadable, recomputing")
    return None


REFERENCE_SOURCES = ("labeled", "heldout", "ids_file", "split:<name>")


def reference_source(ref) -> tuple[str, str]:
    """config.reference -> ('labeled', '') | ('heldout', '') | ('ids_file', path) |
    ('split', split name).

    labeled     v sums the labeled set's gradients (no evaluation labels; but after training
                to ~100% train accuracy that gradient is ~0 and set by a few unfitted samples).
    heldout     a part of the labeled set (`heldout_split`) kept out of the training of the
                model that scores the pool (AL loop, classification; see classification_al).
    ids_file    an id list of the pool's split (e.g. a labeled part kept out of training).
    split:NAME  every sample of the data set's split NAME: the reference's choice (the
                CIFAR-10 test set, VOC/COCO val) -- it LEAKS the evaluation split's labels
                into the selection when NAME is the split that is evaluated."""
    from ezsd_jax.core.config_check import ConfigError
    from isal_jax.config_schema import check_reference
    try:
        check_reference(ref)
    except ConfigError as e:
        raise SelectError(str(e)) from e
    src = str(ref.source)
    if src in ("labeled", "heldout"):
        return src, ""
    if src == "ids_file":
        if not ref.ids_file:
            raise SelectError("config.reference.source='ids_file' needs "
                              "config.reference.ids_file")
        return "ids_file", str(ref.ids_file)
    return "split", src[6:]


def heldout_split(labeled, seed: int, ref) -> tuple[np.ndarray, np.ndarray]:
    """(kept for training, held out) of the labeled ids, both sorted: a seeded draw of
    `heldout_count(len(labeled), ...)` ids; the same (labeled ids, seed) -> the same split,
    so a resumed cycle holds out the same ids. seed: the AL cycle's seed."""
    from isal_jax.config_schema import heldout_count
    labeled = np.sort(np.asarray(labeled, np.int64))
    k = heldout_count(len(labeled), float(ref.get("heldout_fraction", 0.2)),
                      int(ref.get("heldout_size", 0)))
    if not 0 < k < len(labeled):
        raise SelectError(f"config.reference: holding out {k} of {len(labeled)} labeled ids "
                          "leaves nothing to train on or nothing held out (set "
                          "reference.heldout_fraction / heldout_size)")
    held = np.sort(np.random.default_rng([int(seed), 0x4E1D]).choice(labeled, k, replace=False))
    return np.setdiff1d(labeled, held), held
