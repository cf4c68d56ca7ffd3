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

from ezsd_jax.metrics import report


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


REFERENCE_SOURCES = ("labeled", "ids_file", "split:<name>")


def reference_source(ref) -> tuple[str, str]:
    """config.reference -> ('labeled', '') | ('ids_file', path) | ('split', split name).

    labeled     v sums the labeled set's gradients (our default: no evaluation labels).
    ids_file    an id list of the pool's split (e.g. a labeled part kept out of training).
    split:NAME  every sample of the data set's split NAME: the reference's choice (the
                CIFAR-10 test set, VOC/COCO val) -- it LEAKS the evaluation split's labels
                into the selection when NAME is the split that is evaluated."""
    src = str(ref.source)
    if src == "labeled":
        return "labeled", ""
    if src == "ids_file":
        if not ref.ids_file:
            raise SelectError("config.reference.source='ids_file' needs "
                              "config.reference.ids_file")
        return "ids_file", str(ref.ids_file)
    if src.startswith("split:") and len(src) > 6:
        return "split", src[6:]
    raise SelectError(f"config.reference.source={src!r} is not one of {REFERENCE_SOURCES}")
