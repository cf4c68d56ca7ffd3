"""The Python API of open-vocabulary detection on any image (`python -m ezsd_jax.predict`
is a thin CLI over it):

    det = ezsd_jax.Detector.load("workdir/demo")           # a trained workdir or a bundle
    for d in det.detect("photo.jpg", ["orange diamond", "red circle"]):
        print(d["name"], d["score"], d["bbox"])            # xywh in the photo's pixels

Place in the pipeline: after ezsd_train. The detector is restored the way ezsd_eval does
(evaluate.restore_variables on <workdir>/ckpt_ezsd with the workdir's config.json), or
from an exported bundle (bundle.py). Names are embedded on the fly by the workdir's
re-normalized CLIP text tower (clip_renorm/adapted_clip) with the training prompt
(config.clip.renorm.templates) or a prompt ensemble, cached per name. Images decode
through data/images.decode_image (EXIF, 16-bit, palette/alpha, CMYK) and are resized like
evaluation; the forward is one jitted program per (input-size bucket, vocabulary-size
bucket, batch size, threshold) (buckets.py), kept for later calls. Box conversion back to
the original pixels is evaluate.to_coco_results. A Mask R-CNN (model.mask_on) pastes the
masks of the detections it returns (after the threshold and --max_detections) at the
original size, PASTE_CHUNK detections at a time per image (a jitted paste per canvas:
the image's size rounded up to the bucket step), each chunk encoded to COCO RLE before
the next, so memory stays bounded at any photo size and detection count; each detection
dict gains 'segmentation'. Loading is read-only: nothing in the workdir or bundle is
written, so a run still training is never disturbed.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import time
from typing import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ezsd_jax.predict import bundle, buckets
from ezsd_jax.core import cli
from ezsd_jax import evaluate
from ezsd_jax.clip.text import RENORM_DIR
from ezsd_jax.clip.text import ENSEMBLE_TEMPLATES, text_embeddings
from ezsd_jax.core.errors import DataError
from ezsd_jax.core.images import decode_image
from ezsd_jax.data.splits import COCO_80
from ezsd_jax.ezsd.stages import CKPT_NAME, head_config
from ezsd_jax.core.metrics import Progress
from ezsd_jax.models import detector as det
from ezsd_jax.ops.masks import encode_masks
from ezsd_jax.predict.trained_run import (load_text_tower, planned_steps, read_config,
                                          split_names, to_device)

PROMPT_MODES = ("single", "ensemble")
PASTE_CHUNK = 8          # detections pasted at once at the original size (memory bound)
VOCABULARIES = ("base", "novel", "all", "coco")


class Detector:
    """A trained EZSD detector + its adapted CLIP text tower. Use `Detector.load`."""

    def __init__(self, cfg, variables, clip, *, step: int, source: str, base: Sequence[str],
                 novel: Sequence[str], batch_size: int = 8, bucket_step: int = 64,
                 fixed_embeddings: dict | None = None, clip_dir: str | None = None,
                 train_steps: int | None = None):
        self.cfg = cfg
        self.train_steps = int(train_steps) if train_steps else None
        self.step, self.source = int(step), source
        self.base, self.novel = list(base), list(novel)
        self.dcfg, hcfg = head_config(cfg, 1)
        self.embed_dim = hcfg.embed_dim
        self.variables = variables
        self.clip = clip                          # (model, params, tokenizer) or None
        self.batch_size, self.bucket_step = int(batch_size), int(bucket_step)
        self.templates = tuple(cfg.clip.renorm.get("templates", ("a photo of a {}.",)))
        self.clip_dir = clip_dir                  # what bundle.export copies
        # (prompt mode, name) -> [D]; a fixed-vocabulary bundle starts with its names
        self._emb_cache: dict[tuple[str, str], np.ndarray] = dict(fixed_embeddings or {})
        # (input bucket, vocabulary bucket, batch, threshold, cap) -> seconds of the
        # call that compiled it in this process (compile + one run)
        self.compile_seconds: dict = {}

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str, batch_size: int = 8, bucket_step: int = 64) -> "Detector":
        """A trained workdir (ckpt_ezsd/, config.json, clip_renorm/adapted_clip/) or a
        bundle written by `export` (manifest.json). Missing pieces: cli.MissingInput."""
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(path):
            raise cli.MissingInput(f"{path}: not a directory (a trained workdir or a bundle)")
        if bundle.is_bundle(path):
            return bundle.load(cls, path, batch_size=batch_size, bucket_step=bucket_step)
        return cls._from_workdir(path, batch_size, bucket_step)

    @classmethod
    def _from_workdir(cls, workdir: str, batch_size: int, bucket_step: int) -> "Detector":
        cfg = read_config(os.path.join(workdir, "config.json"))
        if "ezsd" not in cfg or "clip" not in cfg:
            raise cli.MissingInput(f"{workdir}: its config.json has no ezsd/clip block: a "
                                   "plain detector's workdir (stage train); predict serves "
                                   "EZSD runs (run the ezsd_train stage of an EZSD config, "
                                   "e.g. configs/demo.py)")
        if not os.path.isdir(os.path.join(workdir, f"ckpt_{CKPT_NAME}")):
            raise cli.MissingInput(f"{workdir}: no ckpt_{CKPT_NAME}/ (run the ezsd_train "
                                   "stage first)")
        base, novel = split_names(cfg)
        dcfg, hcfg = head_config(cfg, len(base) + len(novel))
        consts = {"class_embeddings": np.zeros((dcfg.num_classes, hcfg.embed_dim),
                                               np.float32)}
        variables, step = evaluate.restore_variables(cfg, workdir, det.FasterRCNN(dcfg),
                                                     consts, name=CKPT_NAME,
                                                     stage="ezsd_train")
        variables = to_device(jax.device_get(variables))
        clip_dir = os.path.join(workdir, RENORM_DIR, "adapted_clip")
        return cls(cfg, variables, load_text_tower(clip_dir), step=step, source=workdir,
                   base=base, novel=novel, batch_size=batch_size, bucket_step=bucket_step,
                   clip_dir=clip_dir, train_steps=planned_steps(cfg, workdir, CKPT_NAME))

    def unfinished(self) -> str | None:
        """A warning line when the checkpoint is of a training that has not finished
        (step k of n), else None."""
        if self.train_steps and self.step < self.train_steps:
            return (f"{self.source}: the detector is at step {self.step} of "
                    f"{self.train_steps}: its training has not finished (still running, or "
                    "stopped); results are of that checkpoint")
        return None

    # ------------------------------------------------------------------ vocabulary

    def vocabulary(self, which: str) -> list[str]:
        """Names of a named vocabulary: base / novel / all (the run's split) or coco."""
        table = {"base": self.base, "novel": self.novel, "all": self.base + self.novel,
                 "coco": list(COCO_80)}
        if which not in table:
            raise ValueError(f"vocabulary {which!r}: one of {', '.join(VOCABULARIES)}")
        return list(table[which])

    def templates_for(self, prompts: str) -> tuple[str, ...]:
        if prompts == "single":
            return self.templates
        if prompts == "ensemble":
            return tuple(dict.fromkeys(self.templates + ENSEMBLE_TEMPLATES))
        raise ValueError(f"prompts {prompts!r}: one of {', '.join(PROMPT_MODES)}")

    def embed_names(self, names: Sequence[str], prompts: str = "single") -> np.ndarray:
        """[K, D] unit-norm text embeddings of `names` (in that order), from the adapted
        text tower with the training prompt ('single') or the prompt ensemble; computed
        once per name and prompt mode."""
        missing = list(dict.fromkeys(n for n in names if (prompts, n) not in self._emb_cache))
        if missing:
            if self.clip is None:
                raise ValueError(f"this bundle holds text embeddings of a fixed vocabulary "
                                 f"only; no embedding for {missing[:10]} (prompts="
                                 f"{prompts!r})")
            model, params, tok = self.clip
            # encode in padded groups (fixed shapes: one compile per vocabulary bucket)
            size = buckets.vocab_bucket(len(missing))
            padded = missing + [missing[0]] * (size - len(missing))
            emb = text_embeddings(model, params, tok, padded, self.templates_for(prompts))
            for n, e in zip(missing, emb):
                self._emb_cache[(prompts, n)] = e
        return np.stack([self._emb_cache[(prompts, n)] for n in names])

    # ------------------------------------------------------------------ forward

    def _program_cfg(self, hw: tuple[int, int], kb: int, thr: float, max_det: int):
        return dataclasses.replace(self.dcfg, image_size=tuple(hw), num_classes=kb,
                                   test_score_threshold=thr, test_max_detections=max_det)

    def _run_batch(self, items: list, emb: np.ndarray, cvalid: np.ndarray, thr: float,
                   max_det: int) -> list[list[dict]]:
        """items: [(image uint8, info)] of one input bucket -> detections per item."""
        hw = tuple(items[0][1]["padded_hw"])
        dcfg = self._program_cfg(hw, emb.shape[0], thr, max_det)
        # a part batch: the full batch's program when compiled already, else the next
        # power of two (a single image does not pay for a whole batch)
        full = any(k[:2] == (dcfg, self.batch_size) for k in _COMPILED)
        b = self.batch_size if full else min(self.batch_size,
                                             1 << (len(items) - 1).bit_length())
        images = np.zeros((b,) + tuple(hw) + (3,), np.uint8)
        meta = {"image_id": np.arange(b), "scale": np.ones(b, np.float32),
                "orig_hw": np.ones((b, 2), np.int32), "valid": np.zeros(b, bool)}
        image_hw = np.ones((b, 2), np.int32)
        for i, (img, info) in enumerate(items):
            images[i] = buckets.prepare(img, info)
            image_hw[i] = info["resized_hw"]
            meta["scale"][i], meta["orig_hw"][i] = info["scale"], info["orig_hw"]
            meta["valid"][i] = True
        t0 = time.perf_counter()
        out = jax.device_get(_jitted_forward(dcfg)(
            self.variables, images, image_hw, meta["valid"], emb, cvalid, meta["scale"],
            meta["orig_hw"]))
        if (dcfg, b) not in _COMPILED:    # this call compiled it (+ one run)
            _COMPILED.add((dcfg, b))
            self.compile_seconds[(hw, emb.shape[0], b, thr, max_det)] = \
                time.perf_counter() - t0
        probs = out.pop("mask_probs", None)
        res = evaluate.to_coco_results(out, meta, cat_ids=range(emb.shape[0]))
        valid_idx = [np.nonzero(out["valid"][i])[0] for i in range(len(items))]
        per = [[] for _ in items]
        for r in res:                     # the k-th result of an image: its k-th valid row
            i = r["image_id"]
            r["_row"] = int(valid_idx[i][len(per[i])])
            per[i].append(r)
        if probs is not None:
            for i, dets in enumerate(per):
                for d in dets:
                    d["_mask"] = (probs[i, d["_row"]], out["boxes"][i, d["_row"]],
                                  float(meta["scale"][i]), tuple(int(v) for v in
                                                                 meta["orig_hw"][i]))
        return per

    def _paste(self, dets: list[dict]) -> None:
        """Adds 'segmentation' (COCO RLE at the original size) to the detections of one
        image, PASTE_CHUNK at a time (each chunk pasted on device and encoded before the
        next: memory bounded by the chunk, whatever the photo size and count)."""
        todo = [d for d in dets if "_mask" in d]
        if not todo:
            return
        h, w = todo[0]["_mask"][3]
        step = max(8, -(-self.bucket_step // 8) * 8)
        canvas = (-(-h // step) * step, -(-w // step) * step)
        paste = _jitted_paste(canvas)
        chunk = max(1, int(PASTE_CHUNK))
        for lo in range(0, len(todo), chunk):
            part = todo[lo:lo + chunk]
            probs = np.stack([d["_mask"][0] for d in part])
            boxes = np.stack([d["_mask"][1] for d in part])
            n = len(part)
            if n < chunk:                  # one program per canvas: pad the last chunk
                probs = np.concatenate([probs, np.zeros((chunk - n,) + probs.shape[1:],
                                                        probs.dtype)])
                boxes = np.concatenate([boxes, np.zeros((chunk - n, 4), boxes.dtype)])
            packed = np.asarray(paste(probs[None], boxes[None],
                                      np.float32([part[0]["_mask"][2]]),
                                      np.int32([[h, w]])))[0, :n]
            bits = np.unpackbits(packed, axis=-1)[:, :h, :w]
            for d, rle in zip(part, encode_masks(bits)):
                d["segmentation"] = rle

    # ------------------------------------------------------------------ detection

    def check_limits(self, score_threshold=None, max_detections=None) -> tuple[float, int]:
        """(threshold, cap) of a request, the model's defaults for None; ValueError naming
        the argument for a NaN / out-of-range threshold or a cap outside
        1..the model's candidate count: model.test_topk_candidates, or with 0 (every
        (box, class) pair) model.rpn_post_nms_topk_test, which any vocabulary reaches."""
        thr = float(self.dcfg.test_score_threshold) if score_threshold is None \
            else score_threshold
        if isinstance(thr, bool) or not isinstance(thr, (int, float, np.number)) \
                or not math.isfinite(float(thr)) or not 0.0 <= float(thr) <= 1.0:
            raise ValueError(f"score_threshold={score_threshold!r}: need a number in [0, 1] "
                             "(scores are probabilities)")
        cap = int(self.dcfg.test_topk_candidates) or int(self.dcfg.rpn_post_nms_topk_test)
        what = ("model.test_topk_candidates" if self.dcfg.test_topk_candidates
                else "model.rpn_post_nms_topk_test (boxes per image)")
        max_det = int(self.dcfg.test_max_detections) if max_detections is None \
            else max_detections
        if isinstance(max_det, bool) or not isinstance(max_det, (int, np.integer)) \
                or not 1 <= int(max_det) <= cap:
            raise ValueError(f"max_detections={max_detections!r}: need an integer in 1..{cap} "
                             f"(the model keeps at most {what}={cap} candidates per image)")
        return float(thr), int(max_det)

    def detect(self, image, names: Sequence[str], score_threshold: float | None = None,
               max_detections: int | None = None, prompts: str = "single") -> list[dict]:
        """One image (path, bytes, uint8 HxWx3 array or PIL image) -> [{'bbox': [x, y, w, h]
        (original upright pixels), 'score', 'name'}], best first. A file that is not a
        readable image raises data.coco.DataError naming it."""
        (_, dets), = self.detect_many([image], names, score_threshold, max_detections,
                                      prompts, on_error="raise", progress=False)
        return dets

    def detect_many(self, images: Iterable, names: Sequence[str],
                    score_threshold: float | None = None,
                    max_detections: int | None = None, prompts: str = "single",
                    on_error: str | Callable = "raise", progress: bool = True,
                    total: int | None = None) -> Iterator[tuple[int, list[dict]]]:
        """Images (paths / bytes / arrays) -> (index, detections) as batches finish, in
        input-bucket batches. on_error: 'raise', or a function(index, DataError) called
        for an unreadable file (then skipped). progress: images/s and ETA lines."""
        names_c = buckets.canonical_names(names)
        thr_m, max_m = float(self.dcfg.test_score_threshold), int(self.dcfg.test_max_detections)
        thr, max_det = self.check_limits(score_threshold, max_detections)
        kb = buckets.vocab_bucket(len(names_c))
        emb, cvalid = buckets.pad_vocabulary(self.embed_names(names_c, prompts), kb)
        # in-graph: the model's threshold/cap unless the request is looser; a stricter
        # request filters the output (top max_det by score), which gives the same
        # detections: NMS suppresses a box only by higher-scoring ones, and the cap keeps
        # the best survivors
        g_thr, g_max = min(thr, thr_m), max(max_det, max_m)
        m = self.dcfg
        short, long_ = int(self.cfg.data.short_side), int(self.cfg.data.max_side)
        if total is None and hasattr(images, "__len__"):
            total = len(images)
        pending: dict = {}
        prog = Progress(total or 1, unit="img", name="predict") if progress else None
        done = 0

        def finish(items_idx):
            idxs, items = zip(*items_idx)
            per = self._run_batch(list(items), emb, cvalid, g_thr, g_max)
            out = []
            for i, dets in zip(idxs, per):
                dets = [d for d in dets if thr <= g_thr or d["score"] > thr]
                dets.sort(key=lambda d: -d["score"])
                dets = dets[:max_det]          # top max_det by score, then the masks
                try:
                    self._paste(dets)
                except (MemoryError, jax.errors.JaxRuntimeError) as e:
                    if not isinstance(e, MemoryError) and "RESOURCE_EXHAUSTED" not in str(e):
                        raise
                    raise MemoryError(f"image {i}: out of memory pasting the masks of "
                                      f"{len(dets)} detections at the original size; lower "
                                      "max_detections or raise score_threshold") from None
                out.append((i, [dict({"bbox": d["bbox"], "score": d["score"],
                                      "name": names_c[d["category_id"]]},
                                     **({"segmentation": d["segmentation"]}
                                        if "segmentation" in d else {})) for d in dets]))
            return out

        for idx, src in enumerate(images):
            try:
                img = _as_image(src, idx)
            except DataError as e:
                if on_error == "raise":
                    raise
                on_error(idx, e)
                done += 1
                continue
            info = buckets.geometry(img.shape[0], img.shape[1], m.image_size, short, long_,
                                    self.bucket_step)
            group = pending.setdefault(info["padded_hw"], [])
            group.append((idx, (img, info)))
            if len(group) == self.batch_size:
                yield from finish(pending.pop(info["padded_hw"]))
                done += len(group)
                if prog is not None:
                    prog.tick(done)
        for hw in list(pending):
            group = pending.pop(hw)
            yield from finish(group)
            done += len(group)
            if prog is not None:
                prog.tick(done, force=True)

    def info(self) -> dict:
        return {"source": self.source, "step": self.step, "base": self.base,
                "novel": self.novel, "templates": list(self.templates),
                "image_size": list(self.dcfg.image_size)}


# ----------------------------------------------------------------------------- helpers

_FORWARDS: dict = {}
_PASTES: dict = {}
_COMPILED: set = set()                   # (detector config, batch size) compiled


def _jitted_forward(dcfg):
    """One jitted forward per detector config (input bucket, vocabulary bucket and
    thresholds are in it), shared by every Detector of this process: variables are an
    argument, so a second Detector (a bundle of the same run) reuses the programs. A Mask
    R-CNN's mask probabilities come back unpasted (Detector._paste)."""
    fn = _FORWARDS.get(dcfg)
    if fn is None:
        model = det.FasterRCNN(dcfg)

        def infer(variables, images, image_hw, valid, emb, class_valid, scale, orig_hw):
            batch = {"image": images, "image_hw": image_hw, "valid": valid, "scale": scale,
                     "orig_hw": orig_hw, "flipped": jnp.zeros(valid.shape, bool)}
            return det.forward_infer(model, variables, batch, emb, class_valid)
        fn = _FORWARDS[dcfg] = jax.jit(infer)
    return fn


def _jitted_paste(canvas: tuple[int, int]):
    """Mask pasting of one image's chunk on a [Hc, Wc] canvas: probs [1, C, m, m], boxes
    [1, C, 4] (input pixels), scale [1], orig_hw [1, 2] -> packed bits [1, C, Hc, Wc/8]."""
    fn = _PASTES.get(canvas)
    if fn is None:
        def paste(probs, boxes, scale, orig_hw):
            batch = {"scale": scale, "orig_hw": orig_hw,
                     "flipped": jnp.zeros(scale.shape, bool)}
            return det.paste_detection_masks({"boxes": boxes, "mask_probs": probs}, batch,
                                             canvas)
        fn = _PASTES[canvas] = jax.jit(paste)
    return fn


def _as_image(src, idx: int) -> np.ndarray:
    """A path, bytes, uint8 HxWx3 array or PIL image -> uint8 HxWx3 (DataError for an
    unreadable file or a wrong array; TypeError for any other kind of object)."""
    if isinstance(src, np.ndarray):
        img = src
    elif isinstance(src, (str, bytes, os.PathLike)):
        img = decode_image(os.fspath(src) if isinstance(src, os.PathLike) else src)
    elif hasattr(src, "save") and hasattr(src, "mode") and hasattr(src, "size"):
        from PIL import ImageOps           # a PIL image: upright, then through the one
        buf = io.BytesIO()                 # decoder (TIFF holds every mode: 16-bit, CMYK,
        ImageOps.exif_transpose(src).save(buf, format="TIFF")   # alpha handled the same)
        img = decode_image(buf.getvalue())
    else:
        raise TypeError(f"image {idx}: expected a file path, bytes, a uint8 HxWx3 numpy "
                        f"array or a PIL image, got {type(src).__name__}")
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise DataError(f"array input {idx}: need uint8 HxWx3, got {img.dtype} {img.shape}")
    return img


__all__ = ["Detector", "PROMPT_MODES", "VOCABULARIES"]
