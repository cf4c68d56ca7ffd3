"""Atomic file writes (temp file + rename) for every output another step reads.

A reader never sees a half-written file: either the old one, the new one, or none.
Files get the usual permissions (0666 minus the umask), not mkstemp's private 0600, so
outputs on a shared disk stay readable by the team.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()   # read once: os.umask is process-wide, writers may be threads


def _atomic(path: str, write) -> str:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_bytes(path: str, data: bytes) -> str:
    return _atomic(path, lambda f: f.write(data))


def atomic_write_text(path: str, text: str) -> str:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any, indent: int | None = 2) -> str:
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=json_default))


def atomic_savez(path: str, **arrays: np.ndarray) -> str:
    """np.savez to `path` atomically (path should end in .npz)."""
    return _atomic(path, lambda f: np.savez(f, **arrays))


def json_default(o):
    """json.dumps(default=...) for numpy values: scalars -> Python numbers, arrays -> lists."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
