"""CLIP feature distillation for the EZSD detector (docs/ezsd-method.md sections 2-3).

Place in the pipeline: the proposal stage stores, per training image, CLIP proposal boxes
(original image coordinates) with fp16 normalized CLIP embeddings and confidences, and the
base GT boxes with their embeddings (ezsd_jax.clip.store). Here:

  host:   make_extra_fn(store) -> the DetectionPipeline's extra_fn(record, info): reads the
          image's stored entries, maps the boxes to the prepared input (resize + the
          image's flip; the embedding stays, as in the reference) and returns fixed-shape
          arrays  distill_boxes [P,4] f32, distill_emb [P,D] f16, distill_weight [P] f32
          (raw: proposal = CLIP max-softmax confidence, GT = 1), distill_mask [P] bool.
          Layout: `proposal_slots` proposal slots (stored score order) then `max_gt` GT
          slots (0 proposal slots for GT-only distillation).
  device: make_distill_loss(...) -> forward_train's extra_loss_fn(module, feats, batch,
          key): samples `num_proposals` proposal slots per image ('replacement': draws
          with replacement from the first num_proposals, the reference; 'random': a
          subset of all; 'first'), keeps every GT slot, renormalizes the weights
          to mean 1 per image over the kept entries (duplicates count), runs the head's
          classification branch on RoIAlign of those boxes and returns
            loss_distill = mean over valid (box, dim) of w * |r - t|, x D x factor
          (= sum(w * |r - t|_1) / num_valid * factor; with norm_images = g that mean per
          group of g images, averaged over the groups) and distill_* metrics.

`ProposalReader` gives thread-safe per-image reads of the store's uncompressed .npz shards
(only the requested rows are read from disk), so random-order training does not re-read
a whole shard per image.
"""
from __future__ import annotations

import logging
import struct
import threading
import zipfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ezsd_jax.core.config_check import DISTILL_ON_MISSING, DISTILL_SAMPLES
from ezsd_jax.data.transforms import boxes_to_input

log = logging.getLogger(__name__)

FIELDS = ("boxes", "embeddings", "confidence", "gt_boxes", "gt_embeddings")
KEYS = ("distill_boxes", "distill_emb", "distill_weight", "distill_mask")
_DUMMY_BOX = (0.0, 0.0, 16.0, 16.0)   # stands in for padding slots inside RoIAlign


# ----------------------------------------------------------------------------- reading

class ProposalReader:
    """Per-image records of a `ezsd_jax.clip.store.ProposalStore`, thread-safe.

    get(image_id) -> {field: array} for FIELDS. Rows are read straight from the shard
    files (np.savez writes uncompressed .npy members: offsets are computed once per
    shard); a compressed member falls back to the store's own (locked) get()."""

    def __init__(self, store, fields=FIELDS):
        self.store = store
        self.fields = tuple(fields)
        self._lock = threading.Lock()
        self._layout: dict[str, dict] = {}
        self._index: dict[Any, tuple[str, int]] = {}
        for path in self._shard_paths():
            with np.load(path, allow_pickle=False) as z:
                for i, iid in enumerate(z["image_ids"]):
                    self._index[iid.item() if isinstance(iid, np.generic) else iid] = (path, i)

    def _shard_paths(self) -> list[str]:
        return [self.store.shard_path(s) for s in self.store.finished_shards()]

    def __contains__(self, image_id) -> bool:
        return image_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def _shard_layout(self, path: str) -> dict:
        lay = self._layout.get(path)
        if lay is not None:
            return lay
        with self._lock:
            lay = self._layout.get(path)
            if lay is None:
                lay = _npz_layout(path, self.fields)
                self._layout[path] = lay
        return lay

    def get(self, image_id) -> dict[str, np.ndarray]:
        key = image_id.item() if isinstance(image_id, np.generic) else image_id
        if key not in self._index:
            raise KeyError(f"proposal store {self.store.directory}: no record for image "
                           f"{image_id!r} (run the proposals stage on this dataset)")
        path, i = self._index[key]
        lay = self._shard_layout(path)
        if lay is None:   # compressed or unusual file: the store's reader, serialized
            with self._lock:
                rec = self.store.get(key)
                return {f: np.array(rec[f]) for f in self.fields}
        out = {}
        with open(path, "rb") as fh:
            for f in self.fields:
                m = lay[f]
                lo, hi = int(m["offsets"][i]), int(m["offsets"][i + 1])
                fh.seek(m["data"] + lo * m["row_bytes"])
                buf = fh.read((hi - lo) * m["row_bytes"])
                out[f] = np.frombuffer(buf, m["dtype"]).reshape((hi - lo,) + m["row_shape"])
        return out


def _npz_layout(path: str, fields) -> dict | None:
    """Byte offsets of each field's data in an uncompressed .npz, plus per-image row
    offsets; None when a member is compressed or not a plain C-order array."""
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh, \
            np.load(path, allow_pickle=False) as z:
        for f in fields:
            name = f + ".npy"
            if name not in zf.namelist() or f"_len_{f}" not in z.files:
                raise KeyError(f"{path}: proposal shard lacks field {f!r} "
                               f"(has {sorted(z.files)})")
            info = zf.getinfo(name)
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            fh.seek(info.header_offset)
            hdr = struct.unpack("<4s5H3L2H", fh.read(30))
            fh.seek(info.header_offset + 30 + hdr[9] + hdr[10])
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            if fortran and len(shape) > 1 or dtype.hasobject:
                return None
            lens = z[f"_len_{f}"]
            row_shape = tuple(shape[1:])
            out[f] = {"data": fh.tell(), "dtype": dtype, "row_shape": row_shape,
                      "row_bytes": int(dtype.itemsize * int(np.prod(row_shape))),
                      "offsets": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)}
    return out


# ----------------------------------------------------------------------------- host side

def _slots(proposal_slots: int, max_gt: int, gt_only: bool) -> tuple[int, int]:
    n_prop = 0 if gt_only else int(proposal_slots)
    n_gt = int(max_gt)
    if n_prop < 0 or n_gt < 0 or n_prop + n_gt == 0:
        raise ValueError(f"distillation needs slots: proposal_slots={n_prop}, max_gt={n_gt}")
    return n_prop, n_gt


def distill_spec(*, embed_dim: int, proposal_slots: int = 300, max_gt: int = 100,
                 gt_only: bool = False) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-image {key: (shape, dtype)} of what make_extra_fn returns (the same slots)."""
    n = sum(_slots(proposal_slots, max_gt, gt_only))
    return {"distill_boxes": ((n, 4), np.dtype(np.float32)),
            "distill_emb": ((n, int(embed_dim)), np.dtype(np.float16)),
            "distill_weight": ((n,), np.dtype(np.float32)),
            "distill_mask": ((n,), np.dtype(bool))}


def make_extra_fn(store, *, embed_dim: int, proposal_slots: int = 300, max_gt: int = 100,
                  gt_only: bool = False, min_size: float = 1.0,
                  on_missing: str = "raise") -> Callable[[Any, dict], dict]:
    """The pipeline's extra_fn(record, info) -> distill_* arrays (see module docstring).

    store: a ProposalStore, a ProposalReader, or anything with get(image_id) returning
      'boxes' [n,4] (original coords), 'embeddings' [n,D], 'confidence' [n], 'gt_boxes',
      'gt_embeddings'.
    proposal_slots: proposals kept per image (the first ones, in stored score order);
      gt_only=True -> none (GT-only distillation ablation).
    max_gt: GT slots (the first max_gt stored GT boxes; more are dropped with a warning).
    min_size: boxes narrower/shorter than this (input pixels) after mapping are invalid.
    on_missing: 'raise' (KeyError naming the image) or 'empty' (no distillation targets).
    """
    if on_missing not in DISTILL_ON_MISSING:
        raise ValueError(f"on_missing must be 'raise' or 'empty', got {on_missing!r}")
    if hasattr(store, "finished_shards") and not isinstance(store, ProposalReader):
        store = ProposalReader(store)
    n_prop, n_gt = _slots(proposal_slots, max_gt, gt_only)
    d = int(embed_dim)
    warned = {"gt": False}

    def fill(boxes, emb, w, info, n, what, image_id):
        out_b = np.tile(np.asarray(_DUMMY_BOX, np.float32), (n, 1))
        out_e = np.zeros((n, d), np.float16)
        out_w = np.zeros((n,), np.float32)
        out_m = np.zeros((n,), bool)
        k = len(boxes)
        if k and emb.shape[1:] != (d,):
            raise ValueError(f"proposal store: image {image_id} {what} embeddings have shape "
                             f"{emb.shape}, the head's embed_dim is {d}")
        if k > n:
            if what == "gt" and not warned["gt"]:
                warned["gt"] = True
                log.warning("image %s has %d stored GT boxes > distill max_gt=%d: keeping "
                            "the first (warned once)", image_id, k, n)
            boxes, emb, w, k = boxes[:n], emb[:n], w[:n], n
        if k:
            b = boxes_to_input(np.asarray(boxes, np.float32), info)
            ok = ((b[:, 2] - b[:, 0]) >= min_size) & ((b[:, 3] - b[:, 1]) >= min_size)
            ok &= np.isfinite(b).all(1) & np.isfinite(np.asarray(w, np.float32))
            out_b[:k] = np.where(ok[:, None], b, out_b[:k])
            out_e[:k] = np.asarray(emb, np.float16)
            out_w[:k] = np.where(ok, np.asarray(w, np.float32), 0.0)
            out_m[:k] = ok
        return out_b, out_e, out_w, out_m

    def extra_fn(record, info: dict) -> dict:
        iid = record.image_id
        try:
            rec = store.get(iid)
        except KeyError:
            if on_missing == "raise":
                raise KeyError(f"distillation: no stored CLIP proposals for image id {iid} "
                               f"({record.path}); run the proposals stage over the training "
                               "set, or set config.ezsd.distill.on_missing='empty'") from None
            rec = {"boxes": np.zeros((0, 4), np.float32),
                   "embeddings": np.zeros((0, d), np.float16),
                   "confidence": np.zeros((0,), np.float32),
                   "gt_boxes": np.zeros((0, 4), np.float32),
                   "gt_embeddings": np.zeros((0, d), np.float16)}
        parts = []
        if n_prop:
            parts.append(fill(rec["boxes"], rec["embeddings"], rec["confidence"], info,
                              n_prop, "proposal", iid))
        if n_gt:
            g = np.asarray(rec["gt_boxes"]).reshape(-1, 4)
            parts.append(fill(g, rec["gt_embeddings"], np.ones(len(g), np.float32), info,
                              n_gt, "gt", iid))
        return {k: np.concatenate([p[j] for p in parts]) for j, k in enumerate(KEYS)}

    return extra_fn


# ----------------------------------------------------------------------------- device side

def normalize_weights(w: jax.Array, mask: jax.Array) -> jax.Array:
    """Per image (last axis): weights of the valid entries scaled to mean 1; invalid -> 0.
    An image whose valid weights sum to 0 gets weight 1 on every valid entry."""
    m = mask.astype(jnp.float32)
    w = jnp.where(mask, w.astype(jnp.float32), 0.0)
    n = m.sum(-1, keepdims=True)
    s = w.sum(-1, keepdims=True)
    return jnp.where(s > 0, w * n / jnp.where(s > 0, s, 1.0), m)


SAMPLE_MODES = DISTILL_SAMPLES


def sample_slots(key, mask: jax.Array, num: int, mode: str = "random") -> jax.Array:
    """Indices [B, num] of valid entries of mask [B, S] per image.

    'replacement' (the reference's LoadCLIPFeat: the first `num` stored, then `num` draws
    from them with replacement, new at every load): `num` uniform draws with replacement
    from the valid entries among the first `num` slots; 'random': a subset without
    replacement of all valid slots; 'first': the first valid ones in order. Valid picks
    come first; when an image has fewer valid entries ('random' / 'first') or none, the
    rest point at invalid ones (mask them)."""
    b, s = mask.shape
    if mode == "random":
        prio = jax.random.uniform(key, (b, s))
        prio = jnp.where(mask, prio, 2.0)
    elif mode in ("first", "replacement"):
        prio = jnp.where(mask, 0.0, 1.0)
    else:
        raise ValueError(f"distill sample mode must be one of {SAMPLE_MODES}, got {mode!r}")
    if mode != "replacement":
        return jnp.argsort(prio, axis=-1, stable=True)[:, :num].astype(jnp.int32)
    k = min(int(num), s)
    pool = jnp.argsort(prio[:, :k], axis=-1, stable=True).astype(jnp.int32)   # valid first
    n_valid = jnp.sum(mask[:, :k], axis=-1, keepdims=True)                      # [B,1]
    draw = jnp.floor(jax.random.uniform(key, (b, int(num))) * n_valid).astype(jnp.int32)
    draw = jnp.minimum(draw, jnp.maximum(n_valid - 1, 0))
    # no valid entry: point at slot k-1's sorted position (invalid, masked by the caller)
    draw = jnp.where(n_valid > 0, draw, k - 1)
    return jnp.take_along_axis(pool, draw, axis=1)


def select_entries(key, batch: dict, proposal_slots: int, num_proposals: int,
                   mode: str = "random") -> dict:
    """Keeps `num_proposals` of the first `proposal_slots` entries (sampled) and all the
    rest (GT) of distill_boxes/emb/weight/mask; mask &= the image's `valid` flag."""
    boxes, emb = batch["distill_boxes"], batch["distill_emb"]
    w, mask = batch["distill_weight"], batch["distill_mask"]
    if "valid" in batch:
        mask = mask & batch["valid"][:, None]
    total = boxes.shape[1]
    if not 0 <= proposal_slots <= total:
        raise ValueError(f"distillation: proposal_slots={proposal_slots} but the batch has "
                         f"{total} distill slots")
    out = {"boxes": boxes, "emb": emb, "weight": w, "mask": mask}
    if proposal_slots == 0 or (num_proposals >= proposal_slots and mode != "replacement"):
        return out
    idx = sample_slots(key, mask[:, :proposal_slots], num_proposals, mode)

    def pick(x):
        p = jnp.take_along_axis(x[:, :proposal_slots],
                                idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
        return jnp.concatenate([p, x[:, proposal_slots:]], axis=1)
    return {k: pick(v) for k, v in out.items()}


def distill_loss_terms(r: jax.Array, target: jax.Array, weight: jax.Array,
                       mask: jax.Array, factor: float = 1.0, norm_images: int = 0) -> dict:
    """r, target [B,P,D]; weight, mask [B,P] (weights already normalized).
    norm_images = 0: loss = sum(w * mask * |r - t|) / (num_valid * D) * D * factor over
    the batch; g > 0: that mean within each group of g consecutive images, averaged over
    the groups (the reference: mmdet's L1Loss mean on each GPU's 2 images, then the
    gradient average over GPUs; a group without entries contributes 0)."""
    b, _, d = r.shape
    t = target.astype(jnp.float32)
    m = mask.astype(jnp.float32)
    l1 = jnp.where(mask[..., None], jnp.abs(r.astype(jnp.float32) - t), 0.0).sum(-1)
    n = jnp.maximum(m.sum(), 1.0)
    if norm_images:
        g = int(norm_images)
        if b % g:
            raise ValueError(f"distillation: norm_images={g} does not divide the batch of "
                             f"{b} images")
        num = jnp.sum((weight * m * l1).reshape(b // g, -1), axis=1)
        cnt = jnp.sum(m.reshape(b // g, -1), axis=1)
        loss = jnp.mean(num / jnp.maximum(cnt, 1.0)) * factor
    else:
        loss = jnp.sum(weight * m * l1) / (n * d) * d * factor
    cos = jnp.sum(jnp.where(mask, (r * t).sum(-1), 0.0)) / n
    return {"loss_distill": loss, "distill_l1": jnp.sum(l1 * m) / (n * d),
            "distill_cos": cos, "distill_num": m.sum() / mask.shape[0]}


def make_distill_loss(*, factor: float = 1.0, num_proposals: int = 200,
                      proposal_slots: int = 300, sample: str = "random",
                      gt_only: bool = False, norm_images: int = 0) -> Callable:
    """forward_train's extra_loss_fn(module, feats, batch, key) -> {'loss_distill', ...}.

    proposal_slots / gt_only must match make_extra_fn's (the batch layout); norm_images:
    distill_loss_terms' (0 = one mean over the batch)."""
    slots = 0 if gt_only else int(proposal_slots)
    if sample not in SAMPLE_MODES:
        raise ValueError(f"distill sample mode must be one of {SAMPLE_MODES}, got {sample!r}")
    if int(norm_images) < 0:
        raise ValueError(f"distillation: norm_images must be >= 0, got {norm_images}")

    def extra_loss_fn(module, feats, batch, key) -> dict:
        for k in KEYS:
            if k not in batch:
                raise KeyError(f"distillation: batch lacks {k!r}; build the pipeline with "
                               "ezsd.distill.make_extra_fn")
        head = module.roi_head
        if not hasattr(head, "embed"):
            raise ValueError("distillation needs the EZSD RoI head (model.roi_head='ezsd')")
        sel = select_entries(key, batch, slots, int(num_proposals), sample)
        boxes = jnp.where(sel["mask"][..., None], sel["boxes"].astype(jnp.float32),
                          jnp.asarray(_DUMMY_BOX, jnp.float32))
        w = normalize_weights(sel["weight"], sel["mask"])
        r = head.embed(module.roi_features(feats, boxes))
        return distill_loss_terms(r, sel["emb"], w, sel["mask"], factor, int(norm_images))

    return extra_loss_fn


__all__ = ["ProposalReader", "make_extra_fn", "distill_spec", "normalize_weights", "sample_slots",
           "SAMPLE_MODES",
           "select_entries", "distill_loss_terms", "make_distill_loss", "KEYS"]
