"""EZSD detector stages for `python -m ezsd_jax.main` (after the CLIP stages renorm ->
proposals, which write the text embeddings and the proposal store into the workdir):

  ezsd_train  base-only training data (novel annotations dropped, every image kept), the
              adapted text embeddings of the BASE names as the frozen classifier, the
              EZSD head (model.roi_head='ezsd'), the distillation loss on stored CLIP
              proposals + base GT boxes. Resumes from <workdir>/ckpt_ezsd.
  ezsd_eval   generalized zero-shot evaluation: one joint classifier over ALL names
              (base + novel); COCO: COCOeval on all / novel / base (AP50 headline, AP);
              LVIS: the LVIS protocol (AP, APr, APc, APf; 300 detections per image).
              A Mask R-CNN (model.mask_on) adds mask AP next to each box AP (COCOeval
              'segm' / LVIS with mask IoU): summary keys mask_AP, mask_AP50.
              Writes <workdir>/eval/ezsd_eval_{metrics,detections}.json and the headline
              <workdir>/eval/ezsd_summary.json; skips when the summary is of the latest
              checkpoint (config.ezsd.eval.force re-runs).

Inputs (config.ezsd): split ('coco48_17' | 'lvis' | 'names' + base_names/novel_names),
text_embeddings (.npz of the renorm stage; '' = <workdir>/clip_renorm/text_embeddings.npz), proposals_dir ('' = <workdir>/proposals), distill (loss/sampling options),
eval (protocol, force, reference_max_dets: COCO maxDets reported alongside the standard
1/10/100, e.g. the reference's (100, 300, 1000)).
"""
from __future__ import annotations

import dataclasses

import json
import logging
import os

import jax
import numpy as np

from ezsd_jax.core import cli
from ezsd_jax import evaluate
from ezsd_jax.core.checkpoint import Checkpointer
from ezsd_jax.clip.store import ProposalStore, StoreError
from ezsd_jax.clip.text import load_text_embeddings, text_embeddings_path
from ezsd_jax.ezsd import distill
from ezsd_jax.data import splits
from ezsd_jax.lvis_eval import lvis_evaluate, nonempty_image_ids
from ezsd_jax.core.io_utils import atomic_write_json
from ezsd_jax.models import detector as det
from ezsd_jax.models.ezsd_head import EZSDHeadConfig
from ezsd_jax.ops.vectors import l2_normalize
from ezsd_jax.train import detector_config, load_dataset, masks_on, train_detector

log = logging.getLogger(__name__)

DEFAULT_PROPOSALS = "proposals"
CKPT_NAME = "ezsd"
EVAL_NAME = "ezsd_eval"


# ----------------------------------------------------------------------------- inputs

def load_class_embeddings(path: str, names, embed_dim: int) -> np.ndarray:
    """Rows of the text-embeddings file for `names`, in that order: [K, D] float32,
    L2-normalized. A missing name or a dim other than the head's is an error."""
    file_names, emb = load_text_embeddings(path)
    pos = {n: i for i, n in enumerate(file_names)}
    missing = [n for n in names if n not in pos]
    if missing:
        raise ValueError(f"{path}: no text embedding for {len(missing)} names, e.g. "
                         f"{missing[:10]} (re-run the renorm stage with these names)")
    out = emb[[pos[n] for n in names]].astype(np.float32)
    if out.shape[1] != embed_dim:
        raise ValueError(f"{path}: embeddings are {out.shape[1]}-d but the EZSD head's "
                         f"model.ezsd.embed_dim is {embed_dim}")
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    if not np.all(np.isfinite(out)) or np.any(norm == 0):
        raise ValueError(f"{path}: non-finite or zero text embeddings")
    return np.asarray(l2_normalize(out))


def head_config(cfg, num_classes: int):
    if cfg.model.roi_head != "ezsd":
        raise ValueError(f"EZSD stages need config.model.roi_head='ezsd', got "
                         f"{cfg.model.roi_head!r}")
    dcfg = detector_config(cfg, num_classes)
    return dcfg, EZSDHeadConfig.from_detector(dcfg)


def open_store(cfg, workdir: str):
    d = cfg.ezsd.get("proposals_dir", "") or os.path.join(workdir, DEFAULT_PROPOSALS)
    try:
        store = ProposalStore(d)
    except StoreError as e:
        raise cli.MissingInput(f"{e}: run the 'proposals' stage first or set "
                                "config.ezsd.proposals_dir") from None
    return store


def distill_fns(cfg, workdir: str, dataset, embed_dim: int):
    """(extra_fn, extra_loss_fn) of config.ezsd.distill, or (None, None) when disabled."""
    dc = cfg.ezsd.distill
    if not dc.enabled:
        return None, None
    reader = distill.ProposalReader(open_store(cfg, workdir))
    missing = [r.image_id for r in dataset.records if r.image_id not in reader]
    if missing:
        msg = (f"proposal store {reader.store.directory} has no record for {len(missing)} of "
               f"{len(dataset.records)} training images (e.g. ids {missing[:5]})")
        if dc.on_missing == "raise":
            raise ValueError(msg + ": finish the proposals stage, or set "
                             "config.ezsd.distill.on_missing='empty'")
        log.warning(f"[ezsd_train] {msg}; they get no distillation targets")
    extra_fn = distill.make_extra_fn(
        reader, embed_dim=embed_dim, proposal_slots=dc.proposal_slots, max_gt=dc.max_gt,
        gt_only=dc.gt_only, min_size=dc.min_size, on_missing=dc.on_missing)
    return extra_fn, distill_loss(dc)


def distill_loss(dc):
    """The train step's extra_loss_fn of config.ezsd.distill (enabled)."""
    return distill.make_distill_loss(
        factor=dc.factor, num_proposals=dc.num_proposals, proposal_slots=dc.proposal_slots,
        sample=dc.sample, gt_only=dc.gt_only, norm_images=dc.get("norm_images", 0))


def distill_batch_spec(dc, embed_dim: int) -> dict:
    """Per-image {key: (shape, dtype)} that distill_fns' extra_fn adds to each batch."""
    return distill.distill_spec(embed_dim=embed_dim, proposal_slots=dc.proposal_slots,
                                max_gt=dc.max_gt, gt_only=dc.gt_only)


# ----------------------------------------------------------------------------- stages

def ezsd_train(cfg, workdir: str) -> dict:
    """Stage 'ezsd_train' (see module docstring). Returns {'model', 'state', 'names'}."""
    base, novel = splits.zeroshot_names(cfg.ezsd, cfg.data.train_ann)
    dataset = load_dataset(cfg.data, "train", category_names=base, with_masks=masks_on(cfg))
    _, hcfg = head_config(cfg, len(base))
    emb = load_class_embeddings(text_embeddings_path(cfg, workdir), dataset.cat_names,
                                hcfg.embed_dim)
    n_bg = sum(1 for r in dataset.records if len(r.boxes) == 0)
    log.info(f"[ezsd_train] {len(base)} base / {len(novel)} novel names; {len(dataset.records)} "
             f"training images ({n_bg} without base objects, kept as background)")
    extra_fn, loss_fn = distill_fns(cfg, workdir, dataset, hcfg.embed_dim)
    model, state = train_detector(cfg, workdir, dataset, {"class_embeddings": emb},
                                  extra_loss_fn=loss_fn, extra_fn=extra_fn, name=CKPT_NAME)
    return {"model": model, "state": state, "names": dataset.cat_names}


def _summary_path(workdir: str) -> str:
    return os.path.join(workdir, "eval", "ezsd_summary.json")


def ezsd_eval(cfg, workdir: str) -> dict:
    """Stage 'ezsd_eval' (see module docstring). Returns the summary dict."""
    ec = cfg.ezsd.eval
    val_ann = cfg.data.val_ann
    base, novel = splits.zeroshot_names(cfg.ezsd, val_ann)
    names = splits.all_names(base, novel, val_ann)
    dataset = load_dataset(cfg.data, "val", category_names=names)
    dcfg, hcfg = head_config(cfg, len(names))
    consts = {"class_embeddings": load_class_embeddings(
        text_embeddings_path(cfg, workdir), names, hcfg.embed_dim)}
    model = det.FasterRCNN(dcfg)
    latest = None
    if os.path.isdir(os.path.join(workdir, f"ckpt_{CKPT_NAME}")):
        with Checkpointer(os.path.join(workdir, f"ckpt_{CKPT_NAME}"), read_only=True) as ck:
            latest = ck.latest_step()
    spath = _summary_path(workdir)
    if not ec.force and latest is not None and os.path.exists(spath):
        with open(spath) as f:
            done = json.load(f)
        if done.get("step") == latest:
            log.info(f"[ezsd_eval] {spath} is of checkpoint step {latest}: skipping "
                     "(config.ezsd.eval.force=True re-runs)")
            return done
    variables, step = evaluate.restore_variables(cfg, workdir, model, consts, name=CKPT_NAME,
                                                 stage="ezsd_train")
    log.info(f"[ezsd_eval] checkpoint step {step}; {len(dataset.records)} images, "
             f"{len(names)} names ({len(base)} base + {len(novel)} novel), protocol "
             f"{ec.protocol}")
    groups = splits.category_groups(val_ann, base, novel)
    if ec.protocol == "coco":
        also = tuple(ec.get("reference_max_dets", ()) or ())
        metrics = evaluate.evaluate_detector(cfg, workdir, model, variables, dataset, consts,
                                             groups=groups, name=EVAL_NAME,
                                             also_max_dets=also)
        summary = {g: {"AP50": metrics[g]["AP50"], "AP": metrics[g]["AP"]} for g in groups}
        if also:   # the reference's maxDets, reported alongside the standard ones
            key = evaluate.max_dets_key(also)
            summary[key] = {g: {"AP50": metrics[key][g]["AP50"], "AP": metrics[key][g]["AP"]}
                            for g in groups}
        for g in metrics.get("segm", {}):
            summary[g].update(mask_AP50=metrics["segm"][g]["AP50"],
                              mask_AP=metrics["segm"][g]["AP"])
    elif ec.protocol == "lvis":
        if ec.get("filter_empty_gt", False):   # the reference's eval_filter_empty_gt=True
            keep = set(nonempty_image_ids(val_ann, [r.image_id for r in dataset.records],
                                          groups["all"]))
            log.info(f"[ezsd_eval] filter_empty_gt: {len(keep)} of {len(dataset.records)} "
                     "images have an annotation (and a side >= 32 px)")
            dataset = dataclasses.replace(
                dataset, records=[r for r in dataset.records if r.image_id in keep])
        results = evaluate.infer_dataset(cfg, model, variables, dataset, consts, EVAL_NAME)
        img_ids = [r.image_id for r in dataset.records]
        metrics = lvis_evaluate(val_ann, results, max_dets=cfg.model.test_max_detections,
                                img_ids=img_ids, cat_ids=groups["all"])
        if dcfg.mask_on:
            metrics["segm"] = lvis_evaluate(
                val_ann, results, max_dets=cfg.model.test_max_detections, img_ids=img_ids,
                cat_ids=groups["all"], iou_type="segm")
        metrics["num_images"] = len(img_ids)
        metrics["num_detections"] = len(results)
        evaluate.write_eval_outputs(workdir, EVAL_NAME, results, metrics)
        summary = {"all": {"AP": metrics["AP"], "AP50": metrics["AP50"]},
                   "novel": {"AP": metrics["APr"]},
                   "APr": metrics["APr"], "APc": metrics["APc"], "APf": metrics["APf"]}
        if "segm" in metrics:
            summary["all"].update(mask_AP=metrics["segm"]["AP"],
                                  mask_AP50=metrics["segm"]["AP50"])
            summary["novel"]["mask_AP"] = metrics["segm"]["APr"]
            summary.update({f"mask_{k}": metrics["segm"][k] for k in ("APr", "APc", "APf")})
    else:
        raise ValueError(f"config.ezsd.eval.protocol: unknown {ec.protocol!r} (coco | lvis)")
    summary.update({"step": int(step), "protocol": ec.protocol,
                    "num_images": len(dataset.records)})
    if jax.process_index() == 0:
        atomic_write_json(spath, summary)
    print("[ezsd_eval] " + json.dumps(summary), flush=True)  # the stage's result line
    return summary


# name -> function, for ezsd_jax.stages.STAGES ("ezsd_jax.ezsd.stages:<function>")
STAGES = {"ezsd_train": "ezsd_jax.ezsd.stages:ezsd_train",
          "ezsd_eval": "ezsd_jax.ezsd.stages:ezsd_eval"}

__all__ = ["ezsd_train", "ezsd_eval", "STAGES", "load_class_embeddings", "distill_fns",
           "distill_loss", "distill_batch_spec", "open_store", "DEFAULT_PROPOSALS"]
