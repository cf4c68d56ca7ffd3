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
the original pixels is evaluate.to_coco_results. A Mask R-CNN (model.mask_on) pastes its
masks in the same jitted program, on a canvas of the batch's largest original size
rounded up to the bucket step (one more static shape per program), and each detection
dict gains 'segmentation' (COCO RLE, original pixels).
"""
from __future__ import annotations

import dataclasses
import json
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
from ezsd_jax.predict.trained_run import load_text_tower, read_config, split_names, to_device

PROMPT_MODES = ("single", "ensemble")
VOCABULARIES = ("base", "novel", "all", "coco")


class Detector:
    """A trained EZSD detector + its adapted CLIP text tower. Use `Detector.load`."""

    def __init__(self, cfg, variables, clip, *, step: int, source: str, base: Sequence[str],
                 novel: Sequence[str], batch_size: int = 8, bucket_step: int = 64,
                 fixed_embeddings: dict | None = None, clip_dir: str | None = None):
        self.cfg = cfg
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
        base, novel = split_names(cfg)
        if not os.path.isdir(os.path.join(workdir, f"ckpt_{CKPT_NAME}")):
            raise cli.MissingInput(f"{workdir}: no ckpt_{CKPT_NAME}/ (run the ezsd_train "
                                   "stage first)")
        dcfg, hcfg = head_config(cfg, len(base) + len(novel))
        consts = {"class_embeddings": np.zeros((dcfg.num_classes, hcfg.embed_dim),
                                               np.float32)}
        variables, step = evaluate.restore_variables(cfg, workdir, det.FasterRCNN(dcfg),
                                                     consts, name=CKPT_NAME)
        variables = to_device(jax.device_get(variables))
        clip_dir = os.path.join(workdir, RENORM_DIR, "adapted_clip")
        return cls(cfg, variables, load_text_tower(clip_dir), step=step, source=workdir,
                   base=base, novel=novel, batch_size=batch_size, bucket_step=bucket_step,
                   clip_dir=clip_dir)

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
        canvas = None
        if dcfg.mask_on:
            step = max(8, -(-self.bucket_step // 8) * 8)
            canvas = tuple(int(-(-int(v) // step) * step) for v in meta["orig_hw"].max(0))
        out = jax.device_get(_jitted_forward(dcfg, canvas)(
            self.variables, images, image_hw, meta["valid"], emb, cvalid, meta["scale"],
            meta["orig_hw"]))
        if (dcfg, b, canvas) not in _COMPILED:    # this call compiled it (+ one run)
            _COMPILED.add((dcfg, b, canvas))
            self.compile_seconds[(hw, emb.shape[0], b, thr, max_det)] = \
                time.perf_counter() - t0
        res = evaluate.to_coco_results(out, meta, cat_ids=range(emb.shape[0]))
        per = [[] for _ in items]
        for r in res:
            per[r["image_id"]].append(r)
        return per

    # ------------------------------------------------------------------ detection

    def detect(self, image, names: Sequence[str], score_threshold: float | None = None,
               max_detections: int | None = None, prompts: str = "single") -> list[dict]:
        """One image (path, bytes or uint8 HxWx3 array) -> [{'bbox': [x, y, w, h]
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
        kb = buckets.vocab_bucket(len(names_c))
        emb, cvalid = buckets.pad_vocabulary(self.embed_names(names_c, prompts), kb)
        thr_m, max_m = float(self.dcfg.test_score_threshold), int(self.dcfg.test_max_detections)
        thr = thr_m if score_threshold is None else float(score_threshold)
        max_det = max_m if max_detections is None else int(max_detections)
        if max_det < 1:
            raise ValueError(f"max_detections must be >= 1, got {max_det}")
        # in-graph: the model's threshold/cap unless the request is looser; a stricter
        # request filters the output, which gives the same detections: NMS suppresses a
        # box only by higher-scoring ones, and the cap keeps the best survivors
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
                dets = [dict({"bbox": d["bbox"], "score": d["score"],
                              "name": names_c[d["category_id"]]},
                             **({"segmentation": d["segmentation"]}
                                if "segmentation" in d else {}))
                        for d in dets if thr <= g_thr or d["score"] > thr]
                dets.sort(key=lambda d: -d["score"])
                out.append((i, dets[:max_det]))
            return out

        for idx, src in enumerate(images):
            try:
                img = src if isinstance(src, np.ndarray) else decode_image(src)
                if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                    raise DataError(f"array input {idx}: need uint8 HxWx3, got {img.dtype} "
                                    f"{img.shape}")
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
_COMPILED: set = set()                   # (detector config, batch size) compiled


def _jitted_forward(dcfg, canvas=None):
    """One jitted forward per detector config (input bucket, vocabulary bucket and
    thresholds are in it) and mask canvas (a Mask R-CNN's; None otherwise), shared by
    every Detector of this process: variables are an argument, so a second Detector (a
    bundle of the same run) reuses the programs."""
    fn = _FORWARDS.get((dcfg, canvas))
    if fn is None:
        model = det.FasterRCNN(dcfg)

        def infer(variables, images, image_hw, valid, emb, class_valid, scale, orig_hw):
            batch = {"image": images, "image_hw": image_hw, "valid": valid, "scale": scale,
                     "orig_hw": orig_hw, "flipped": jnp.zeros(valid.shape, bool)}
            out = det.forward_infer(model, variables, batch, emb, class_valid)
            if canvas is not None:
                out["masks"] = det.paste_detection_masks(out, batch, canvas)
            out.pop("mask_probs", None)
            return out
        fn = _FORWARDS[(dcfg, canvas)] = jax.jit(infer)
    return fn


__all__ = ["Detector", "PROMPT_MODES", "VOCABULARIES"]
