"""CLIP distillation proposals: regions that may hold novel objects, with their CLIP
embeddings (docs/ezsd-method.md section 2).

Second stage, after re-normalization: training images with their BASE GT boxes, the adapted
CLIP and the text embeddings of ALL names -> per image, proposal boxes and the base GT boxes
with their CLIP embeddings, for `store.ProposalStore`. One jitted function per batch
(`make_proposal_fn`); its six steps: docs/code-notes.md.
"""
from __future__ import annotations

import logging
import math
import time
import zlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ezsd_jax.clip import crops as crops_lib
from ezsd_jax.core.config_check import PROPOSAL_SELECTIONS
from ezsd_jax.clip.loading import CLIP_MEAN, CLIP_STD
from ezsd_jax.clip.renorm import valid_hw
from ezsd_jax.clip.text import encode_image
from ezsd_jax.core.metrics import MetricWriter, Progress
from ezsd_jax.ops.anchors import anchor_grid
from ezsd_jax.ops.boxes import box_area, clip_boxes, iou_matrix
from ezsd_jax.ops.nms import nms
from ezsd_jax.ops.vectors import l2_normalize

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- boxes

def sliding_candidates(padded_hw: Sequence[int], image_hw: jnp.ndarray, stride: int = 32,
                       sizes: Sequence[float] = (32, 64, 128, 256, 512),
                       ratios: Sequence[float] = (0.5, 1.0, 2.0), offset: float = 0.0
                       ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Dense sliding boxes laid out on the padded canvas (static count K), clipped to the
    image's valid region image_hw [2] (h, w) on device.

    Layout: ezsd_jax.ops.anchors.anchor_grid, centres at ((x + offset) * stride, (y + offset) *
    stride) on a ceil(H/stride) x ceil(W/stride) grid, order (y, x, size, ratio); a box of
    size s and ratio r = h/w has area s^2. Returns (boxes [K, 4] float32, valid [K]: the
    clipped box has positive width and height)."""
    hp, wp = int(padded_hw[0]), int(padded_hw[1])
    layout = jnp.asarray(anchor_grid((math.ceil(hp / stride), math.ceil(wp / stride)), stride,
                                     sizes, ratios, offset))
    hw = jnp.asarray(image_hw, jnp.float32)
    boxes = clip_boxes(layout, hw[0], hw[1])
    valid = box_area(boxes) > 0
    return boxes, valid


# ----------------------------------------------------------------------------- scoring

def entropy_score(logits: jnp.ndarray) -> jnp.ndarray:
    """score = log(C) - entropy(softmax(logits)) over the last axis (0 = uniform,
    log C = one-hot)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ent = -(jnp.exp(logp) * logp).sum(axis=-1)
    return math.log(logits.shape[-1]) - ent


def _logits(model, params, text_emb, crops):
    """crops [B, c, S, S, 3] -> (normalized embeddings [B, c, D], logits [B, c, C])."""
    b, c = crops.shape[:2]
    emb = l2_normalize(encode_image(model, params, crops.reshape((b * c,) + crops.shape[2:])))
    scale = jnp.exp(params["logit_scale"]).astype(jnp.float32)
    logits = scale * emb @ text_emb.T
    return emb.reshape(b, c, -1), logits.reshape(b, c, -1)


def score_candidates(model, params, text_emb: jnp.ndarray, images: jnp.ndarray,
                     image_hw: jnp.ndarray, *, stride: int = 32,
                     sizes: Sequence[float] = (32, 64, 128, 256, 512),
                     ratios: Sequence[float] = (0.5, 1.0, 2.0), offset: float = 0.0,
                     out_size: int | None = None, mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD, method: str = "bicubic",
                     chunk: int = 256, window: int | None = None,
                     return_logits: bool = False):
    """Jittable. images [B, H, W, 3], image_hw [B, 2] -> (candidates [B, K, 4],
    valid [B, K], score [B, K]) (+ logits [B, K, C] with return_logits; memory K*C).

    Every candidate is cropped at 1.0x and classified over the rows of text_emb [C, D]
    (unit norm) with exp(logit_scale) * cos; score = log C - entropy. Crops and the CLIP
    forward run `chunk` candidates per image at a time."""
    size = int(out_size or model.config.vision_config.image_size)
    txt = jnp.asarray(text_emb, jnp.float32)
    cand, valid = jax.vmap(lambda hw: sliding_candidates(images.shape[1:3], hw, stride, sizes,
                                                         ratios, offset))(image_hw)

    def fn(c):
        _, lg = _logits(model, params, txt, c)
        return (entropy_score(lg), lg) if return_logits else entropy_score(lg)

    out = crops_lib.map_crops(fn, images, cand, image_hw, enlarge=1.0, out_size=size,
                              mean=mean, std=std, method=method, chunk=chunk, window=window,
                              out_dtype=model.dtype)
    if return_logits:
        return cand, valid, out[0], out[1]
    return cand, valid, out


def near_gt(boxes: jnp.ndarray, gt_boxes: jnp.ndarray, gt_valid: jnp.ndarray,
            gt_iou: float = 0.3) -> jnp.ndarray:
    """[N] bool: IoU >= gt_iou with any valid GT box (boxes [N, 4], gt_boxes [G, 4])."""
    if not gt_boxes.shape[0]:
        return jnp.zeros(boxes.shape[:1], bool)
    return ((iou_matrix(boxes, gt_boxes) >= gt_iou) & gt_valid[None, :]).any(axis=1)


def select_proposals(boxes: jnp.ndarray, valid: jnp.ndarray, gt_boxes: jnp.ndarray,
                     gt_valid: jnp.ndarray, category: jnp.ndarray, is_base: jnp.ndarray,
                     keep: int, gt_iou: float = 0.3, drop_base: bool = True,
                     priority: jnp.ndarray | None = None
                     ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The feature-pass filter of one image, on boxes already in score order.

    Drops boxes with IoU >= gt_iou to any valid (base) GT box and, when drop_base, boxes
    whose category is base; returns (indices [keep] of the first `keep` survivors, their
    mask). Survivors are taken in score order, or by ascending `priority` [N] when given
    (random priorities = the LVIS mode's uniform sample of the survivors)."""
    n = boxes.shape[0]
    ok = valid & ~near_gt(boxes, gt_boxes, gt_valid, gt_iou)
    if drop_base:
        ok = ok & ~jnp.asarray(is_base, bool)[category]
    if priority is None:
        order = jnp.argsort(~ok, stable=True)      # survivors first, score order kept
    else:
        order = jnp.argsort(jnp.where(ok, priority.astype(jnp.float32), jnp.inf),
                            stable=True)
    if keep > n:
        order = jnp.concatenate([order, jnp.zeros((keep - n,), order.dtype)])
        oks = jnp.concatenate([ok[order[:n]], jnp.zeros((keep - n,), bool)])
        return order.astype(jnp.int32), oks
    idx = order[:keep].astype(jnp.int32)
    return idx, ok[idx]


def image_seeds(image_ids: Sequence[Any]) -> np.ndarray:
    """Per-image int32 seeds from image ids (ints or strings), the same on every run and
    host, so the LVIS mode's random sample of an image does not depend on batching."""
    out = []
    for iid in image_ids:
        iid = iid.item() if isinstance(iid, np.generic) else iid
        if isinstance(iid, (int, np.integer)):
            out.append(int(iid) % (2 ** 31 - 1))
        else:
            out.append(zlib.crc32(str(iid).encode()) % (2 ** 31 - 1))
    return np.asarray(out, np.int32)


def make_proposal_fn(model, text_emb: np.ndarray, is_base: np.ndarray, *,
                     stride: int = 32, sizes: Sequence[float] = (32, 64, 128, 256, 512),
                     ratios: Sequence[float] = (0.5, 1.0, 2.0), offset: float = 0.0,
                     nms_iou: float = 0.7, num_nms: int = 1000, gt_iou: float = 0.3,
                     keep: int = 300, drop_base: bool = True, selection: str = "top",
                     seed: int = 0, feature_enlarge: float = 1.2,
                     out_size: int | None = None, mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD, method: str = "bicubic",
                     chunk: int = 256, window: int | None = None, jit: bool = True
                     ) -> Callable[..., dict]:
    """-> fn(params, images [B,H,W,3], image_hw [B,2], gt_boxes [B,G,4], gt_valid [B,G],
    scale [B], image_seed [B] = None) -> dict of device arrays, the whole candidate path
    in one jitted function:

      boxes [B, keep, 4] (original image coords = input coords / scale), embeddings
      [B, keep, D] fp16 (unit norm, 1.2x crops), confidence [B, keep] (max softmax),
      category [B, keep] int32 (argmax over all names), score [B, keep] (log C - entropy of
      the 1.0x crop), valid [B, keep]; gt_boxes [B, G, 4] (original coords),
      gt_embeddings [B, G, D] fp16, gt_valid [B, G]; num_candidates [B], num_nms [B],
      num_after_gt [B] (valid counts after each stage, for monitoring); crops_per_image
      [B] (crops computed per image slot: K candidates + num_nms + G).

    gt_boxes/gt_valid: the BASE GT boxes (input coords) - the IoU filter uses exactly
    these. is_base [C] marks the base rows of text_emb (all names).

    selection='top' keeps the first `keep` survivors by score (COCO); 'random' keeps a
    uniform sample of them, keyed by (seed, image_seed[b]) (LVIS: 500 at random, with
    drop_base=False: no base-class filter)."""
    if selection not in PROPOSAL_SELECTIONS:
        raise ValueError(f"proposals: selection must be 'top' or 'random', got {selection!r}")
    txt = jnp.asarray(text_emb, jnp.float32)
    base = jnp.asarray(is_base, bool)
    if base.shape != (txt.shape[0],):
        raise ValueError(f"proposals: is_base must be [{txt.shape[0]}], got {base.shape}")
    size = int(out_size or model.config.vision_config.image_size)
    ckw = dict(out_size=size, mean=mean, std=std, method=method, window=window,
               out_dtype=model.dtype)

    def fn(params, images, image_hw, gt_boxes, gt_valid, scale, image_seed=None):
        images = jnp.asarray(images)
        image_hw = jnp.asarray(image_hw, jnp.int32)
        gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
        gt_valid = jnp.asarray(gt_valid, bool)
        scale = jnp.asarray(scale, jnp.float32).reshape(-1, 1, 1)
        cand, cvalid, score = score_candidates(
            model, params, txt, images, image_hw, stride=stride, sizes=sizes, ratios=ratios,
            offset=offset, chunk=chunk, **{k: v for k, v in ckw.items() if k != "out_dtype"})
        m = min(int(num_nms), cand.shape[1])
        idx, kv = jax.vmap(lambda b, s, v: nms(b, s, nms_iou, m, v))(cand, score, cvalid)
        sel = jnp.take_along_axis(cand, idx[..., None], axis=1)           # [B, m, 4]
        sel_score = jnp.take_along_axis(score, idx, axis=1)

        def feats(c):
            emb, lg = _logits(model, params, txt, c)
            p = jax.nn.softmax(lg, axis=-1)
            return emb, p.max(-1), jnp.argmax(lg, -1).astype(jnp.int32)

        emb, conf, cat = crops_lib.map_crops(feats, images, sel, image_hw,
                                             enlarge=feature_enlarge, chunk=chunk, **ckw)
        after_gt = kv & ~jax.vmap(lambda b, g, gv: near_gt(b, g, gv, gt_iou))(
            sel, gt_boxes, gt_valid)
        if selection == "random":
            seeds = (jnp.zeros(images.shape[:1], jnp.int32) if image_seed is None
                     else jnp.asarray(image_seed, jnp.int32))
            prio = jax.vmap(lambda s_: jax.random.uniform(
                jax.random.fold_in(jax.random.PRNGKey(seed), s_), (m,)))(seeds)
        else:
            prio = None
        pick, pvalid = jax.vmap(lambda b, v, g, gv, c, p: select_proposals(
            b, v, g, gv, c, base, keep, gt_iou, drop_base, p),
            in_axes=(0, 0, 0, 0, 0, None if prio is None else 0))(
                sel, kv, gt_boxes, gt_valid, cat, prio)

        def take(x):
            return jnp.take_along_axis(x, pick.reshape(pick.shape + (1,) * (x.ndim - 2)),
                                       axis=1)
        if gt_boxes.shape[1]:
            gt_emb = crops_lib.map_crops(
                lambda c: _logits(model, params, txt, c)[0], images, gt_boxes, image_hw,
                enlarge=feature_enlarge, chunk=chunk, **ckw)
        else:
            gt_emb = jnp.zeros(gt_boxes.shape[:2] + (txt.shape[1],), jnp.float32)
        return {"boxes": take(sel) / scale,
                "embeddings": take(emb).astype(jnp.float16),
                "confidence": take(conf), "category": take(cat), "score": take(sel_score),
                "valid": pvalid,
                "gt_boxes": gt_boxes / scale,
                "gt_embeddings": gt_emb.astype(jnp.float16), "gt_valid": gt_valid,
                "num_candidates": cvalid.sum(1), "num_nms": kv.sum(1),
                "num_after_gt": after_gt.sum(1),
                "crops_per_image": jnp.full((images.shape[0],),
                                            cand.shape[1] + m + gt_boxes.shape[1], jnp.int32)}

    return jax.jit(fn) if jit else fn


# ----------------------------------------------------------------------------- driver

def batch_inputs(batch: Mapping[str, np.ndarray], class_is_base: np.ndarray) -> dict:
    """Pipeline batch -> the proposal function's inputs (numpy). Refuses flipped images
    (proposal generation runs without flip); base GT = box_mask & class_is_base[classes]."""
    for k in ("image", "boxes", "classes", "box_mask", "scale", "image_id"):
        if k not in batch:
            raise KeyError(f"proposals: batch lacks {k!r} (have {sorted(batch)})")
    if "flipped" in batch and np.asarray(batch["flipped"]).any():
        raise ValueError("proposals: batch has flipped images; generate proposals with "
                         "flip disabled (boxes are stored in original coordinates)")
    classes = np.asarray(batch["classes"], np.int64)
    cib = np.asarray(class_is_base, bool)
    mask = np.asarray(batch["box_mask"], bool)
    if mask.any() and classes[mask].max() >= len(cib):
        raise ValueError(f"proposals: class id {classes[mask].max()} outside class_is_base "
                         f"({len(cib)} classes)")
    gt_valid = mask & cib[np.clip(classes, 0, len(cib) - 1)]
    valid = np.asarray(batch.get("valid", np.ones(mask.shape[0], bool)), bool)
    return {"images": np.asarray(batch["image"]), "image_hw": valid_hw(batch),
            "gt_boxes": np.asarray(batch["boxes"], np.float32), "gt_valid": gt_valid,
            "scale": np.asarray(batch["scale"], np.float32).reshape(-1), "valid": valid,
            "classes": classes}


def to_records(out: Mapping[str, Any], inputs: Mapping[str, np.ndarray],
               image_ids: Sequence[Any]) -> dict:
    """Device outputs of one batch -> {image_id: record} of the valid images, each record
    holding only the valid proposals / GT boxes (ragged)."""
    host = {k: np.asarray(v) for k, v in jax.device_get(dict(out)).items()}
    records = {}
    for i, iid in enumerate(image_ids):
        if not inputs["valid"][i]:
            continue
        v = host["valid"][i]
        g = host["gt_valid"][i]
        key = iid.item() if isinstance(iid, np.generic) else iid
        records[key] = {
            "boxes": host["boxes"][i][v].astype(np.float32),
            "embeddings": host["embeddings"][i][v].astype(np.float16),
            "confidence": host["confidence"][i][v].astype(np.float32),
            "category": host["category"][i][v].astype(np.int32),
            "score": host["score"][i][v].astype(np.float32),
            "gt_boxes": host["gt_boxes"][i][g].astype(np.float32),
            "gt_embeddings": host["gt_embeddings"][i][g].astype(np.float16),
            "gt_classes": inputs["classes"][i][g].astype(np.int32),
        }
    return records


def run_proposals(model, params, text_emb: np.ndarray, is_base: np.ndarray,
                  load_chunk: Callable[[int], Iterable[dict]], num_chunks: int, store,
                  cfg: Mapping[str, Any] | None = None, *, shard_index: int = 0,
                  num_shards: int = 1, class_is_base: np.ndarray | None = None,
                  workdir: str | None = None, proposal_fn: Callable | None = None) -> dict:
    """Generates and stores proposals for the image chunks of this job.

    Chunk c (a fixed, ordered slice of the dataset's images; `load_chunk(c)` yields its
    pipeline batches, no flip) belongs to job `shard_index` when c % num_shards ==
    shard_index (the `--shard i/n` split across jobs/hosts). Chunks whose file is already
    in `store` are skipped, so a killed job resumes where it stopped. cfg: keyword
    arguments of `make_proposal_fn`. class_is_base: per dataset class id (default
    `is_base`, i.e. class ids index the names of text_emb).
    Returns {'processed': [chunk ids], 'skipped': [...], 'images', 'crops', 'seconds',
    'crops_per_s'}.
    """
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"proposals: shard {shard_index}/{num_shards} out of range")
    cfg = dict(cfg or {})
    if store.num_chunks != int(num_chunks):
        raise ValueError(f"proposals: store {store.directory} was set up for "
                         f"{store.num_chunks} chunks, asked for {num_chunks}")
    fn = proposal_fn or make_proposal_fn(model, text_emb, is_base, **cfg)
    cib = np.asarray(is_base if class_is_base is None else class_is_base, bool)
    mine = [c for c in range(int(num_chunks)) if c % num_shards == shard_index]
    done = set(store.finished_shards())
    todo = [c for c in mine if c not in done]
    skipped = [c for c in mine if c in done]
    if skipped:
        log.info(f"[proposals] shard {shard_index}/{num_shards}: {len(skipped)} of {len(mine)} "
                 f"chunks already done, {len(todo)} to go")
    writer = MetricWriter(workdir, f"proposals_{shard_index}") if workdir else None
    progress = Progress(len(mine), start=len(skipped), per_step=1.0, unit="chunk",
                        name="proposals", every_s=10.0)
    n_img = n_crops = 0
    t0 = time.perf_counter()
    for j, c in enumerate(todo):
        records = {}
        for batch in load_chunk(c):
            inp = batch_inputs(batch, cib)
            ids = list(np.asarray(batch["image_id"]).reshape(-1))
            out = fn(params, inp["images"], inp["image_hw"], inp["gt_boxes"],
                     inp["gt_valid"], inp["scale"], image_seeds(ids))
            recs = to_records(out, inp, ids)
            dup = set(recs) & set(records)
            if dup:
                raise ValueError(f"proposals: chunk {c} repeats image ids {sorted(dup)[:5]}")
            records.update(recs)
            nv = int(inp["valid"].sum())
            n_img += nv
            # crops computed per image slot: candidates + NMS survivors' 1.2x + GT slots
            n_crops += int(np.asarray(out["crops_per_image"])[inp["valid"]].sum())
        store.write_shard(c, records)
        done_now = len(skipped) + j + 1
        if progress.tick(done_now, force=(j == len(todo) - 1)) and writer is not None:
            dt = time.perf_counter() - t0
            writer.write(done_now, {"images_per_s": n_img / dt, "crops_per_s": n_crops / dt})
    dt = time.perf_counter() - t0
    stats = {"processed": todo, "skipped": skipped, "images": n_img, "crops": n_crops,
             "seconds": dt, "crops_per_s": n_crops / dt if dt > 0 else 0.0}
    if todo:
        log.info(f"[proposals] shard {shard_index}/{num_shards}: {len(todo)} chunks, {n_img} "
                 f"images, {n_crops} crops in {dt:.1f}s = {stats['crops_per_s']:.1f} crops/s")
    return stats


__all__ = ["sliding_candidates", "entropy_score", "score_candidates", "near_gt",
           "select_proposals", "image_seeds", "make_proposal_fn", "batch_inputs", "to_records",
           "run_proposals"]
