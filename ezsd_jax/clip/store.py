"""On-disk store of per-image CLIP proposals: one .npz file per chunk of images + manifest.

Written by `proposals.run_proposals` (possibly many jobs/hosts in parallel, each its own
chunks), read by the detector's data pipeline (`get(image_id)`); chunk files are written
atomically, so a killed job redoes only the chunk it was writing. File layout:
docs/code-notes.md.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator, Mapping

import numpy as np

from ezsd_jax.core.io_utils import atomic_savez, atomic_write_json, json_default

MANIFEST = "manifest.json"
_NAME = re.compile(r"^shard_(\d{5,})-of-(\d{5,})\.npz$")
_LEN = "_len_"


class StoreError(ValueError):
    pass


def _key(iid: Any) -> Any:
    if isinstance(iid, np.generic):
        iid = iid.item()
    return iid


class ProposalStore:
    """Per-image proposal records in chunk files (see module docstring).

    manifest: given when writing - {'num_chunks': n, 'chunk_size': s, 'names': [...],
    'settings': {...}, ...}; stored on first use and checked against the stored one
    afterwards (a different manifest is an error: results of different settings never
    mix). Reading needs no manifest argument.
    """

    def __init__(self, directory: str, manifest: Mapping[str, Any] | None = None):
        self.directory = os.path.abspath(directory)
        self._index: dict | None = None
        self._cached: tuple[str, dict] | None = None       # last shard read by get()
        path = os.path.join(self.directory, MANIFEST)
        stored = None
        if os.path.exists(path):
            with open(path) as f:
                stored = json.load(f)
        if manifest is not None:
            manifest = json.loads(json.dumps(dict(manifest), default=json_default))
            if "num_chunks" not in manifest:
                raise StoreError("ProposalStore: manifest needs 'num_chunks'")
            if stored is None:
                os.makedirs(self.directory, exist_ok=True)
                atomic_write_json(path, manifest)
                stored = manifest
            elif stored != manifest:
                diff = sorted(k for k in set(stored) | set(manifest)
                              if stored.get(k) != manifest.get(k))
                raise StoreError(f"{path}: existing store was written with a different "
                                 f"manifest (fields {diff} differ); use another directory "
                                 f"or delete it")
        elif stored is None and not os.path.isdir(self.directory):
            raise StoreError(f"proposal store {self.directory} does not exist")
        self.manifest = stored

    # ------------------------------------------------------------------ writing
    @property
    def num_chunks(self) -> int:
        if not self.manifest or "num_chunks" not in self.manifest:
            raise StoreError(f"{self.directory}: no manifest with num_chunks")
        return int(self.manifest["num_chunks"])

    def shard_path(self, shard_id: int) -> str:
        n = self.num_chunks
        if not 0 <= int(shard_id) < n:
            raise StoreError(f"{self.directory}: shard id {shard_id} outside 0..{n - 1}")
        return os.path.join(self.directory, f"shard_{int(shard_id):05d}-of-{n:05d}.npz")

    def write_shard(self, shard_id: int, records: Mapping[Any, Mapping[str, np.ndarray]]
                    ) -> str:
        """records: image_id -> {field: array with leading axis = that image's count}.
        Every record must have the same fields, each field the same dtype and trailing
        shape across records."""
        ids = list(records)
        fields = None
        cols: dict[str, list] = {}
        for iid in ids:
            rec = records[iid]
            if fields is None:
                fields = sorted(rec)
                for f in fields:
                    if f.startswith(_LEN) or f == "image_ids":
                        raise StoreError(f"record field name {f!r} is reserved")
                cols = {f: [] for f in fields}
            elif sorted(rec) != fields:
                raise StoreError(f"shard {shard_id}: image {iid} has fields {sorted(rec)}, "
                                 f"expected {fields}")
            for f in fields:
                a = np.asarray(rec[f])
                if a.ndim == 0:
                    raise StoreError(f"shard {shard_id}: image {iid} field {f} is a scalar; "
                                     f"fields need a leading (count) axis")
                if cols[f] and (cols[f][0].dtype != a.dtype or
                                cols[f][0].shape[1:] != a.shape[1:]):
                    raise StoreError(f"shard {shard_id}: image {iid} field {f} is "
                                     f"{a.dtype}{a.shape}, others {cols[f][0].dtype}"
                                     f"{cols[f][0].shape}")
                cols[f].append(a)
        arrays = {"image_ids": np.asarray([_key(i) for i in ids])}
        for f in fields or []:
            arrays[f] = np.concatenate(cols[f], axis=0)
            arrays[_LEN + f] = np.asarray([len(a) for a in cols[f]], np.int64)
        path = self.shard_path(shard_id)
        atomic_savez(path, **arrays)
        self._index = None
        self._cached = None
        return path

    # ------------------------------------------------------------------ reading
    def _shard_files(self) -> dict[int, str]:
        out = {}
        if not os.path.isdir(self.directory):
            return out
        n = self.manifest.get("num_chunks") if self.manifest else None
        for name in os.listdir(self.directory):
            m = _NAME.match(name)
            if m and (n is None or int(m.group(2)) == int(n)):
                out[int(m.group(1))] = os.path.join(self.directory, name)
        return out

    def finished_shards(self) -> list[int]:
        """Chunk ids whose file exists (complete: files appear only by atomic rename)."""
        return sorted(self._shard_files())

    @staticmethod
    def read_shard(path: str) -> dict[Any, dict[str, np.ndarray]]:
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise StoreError(f"{path}: unreadable proposal shard ({e})") from e
        with z:
            ids = [_key(i) for i in z["image_ids"]]
            fields = [k[len(_LEN):] for k in z.files if k.startswith(_LEN)]
            data = {f: (z[f], np.concatenate([[0], np.cumsum(z[_LEN + f])]))
                    for f in fields}
        out = {}
        for i, iid in enumerate(ids):
            out[iid] = {f: a[off[i]:off[i + 1]] for f, (a, off) in data.items()}
        return out

    def load_all(self) -> dict[Any, dict[str, np.ndarray]]:
        out = {}
        for sid, path in sorted(self._shard_files().items()):
            for iid, rec in self.read_shard(path).items():
                if iid in out:
                    raise StoreError(f"{path}: image {iid} also in another shard")
                out[iid] = rec
        return out

    def _build_index(self) -> dict:
        index = {}
        for sid, path in self._shard_files().items():
            with np.load(path, allow_pickle=False) as z:
                for iid in z["image_ids"]:
                    index[_key(iid)] = path
        self._index = index
        return index

    def get(self, image_id: Any) -> dict[str, np.ndarray]:
        index = self._index if self._index is not None else self._build_index()
        key = _key(image_id)
        if key not in index:
            raise KeyError(f"proposal store {self.directory}: no record for image {image_id!r}")
        path = index[key]
        cached = self._cached  # one read of the attribute: safe with concurrent readers
        if cached is None or cached[0] != path:
            cached = (path, self.read_shard(path))
            self._cached = cached
        return cached[1][key]

    def __contains__(self, image_id: Any) -> bool:
        index = self._index if self._index is not None else self._build_index()
        return _key(image_id) in index

    def image_ids(self) -> list:
        index = self._index if self._index is not None else self._build_index()
        return sorted(index, key=lambda x: (str(type(x)), x))

    def __len__(self) -> int:
        return len(self._index if self._index is not None else self._build_index())

    def __iter__(self) -> Iterator:
        return iter(self.image_ids())


__all__ = ["ProposalStore", "StoreError", "MANIFEST"]
