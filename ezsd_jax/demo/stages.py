"""Stages of the zero-shot demo (configs/demo.py) for `python -m ezsd_jax.main`:
demo_data (the demo world, demo/world.py), clip_pretrain (the toy CLIP teacher,
clip/pretrain.py), ablation (one detector per variant) and demo_report (tables and a
detections PNG). Every stage skips work whose outputs exist, so the demo command can be
re-run. Outputs and ablation variants: docs/code-notes.md.
"""
from __future__ import annotations

import io
import json
import logging
import os

import jax
import numpy as np
import ml_collections
from jax.experimental import multihost_utils

from ezsd_jax.core import cli
from ezsd_jax.clip import pretrain
from ezsd_jax.clip import stages as clip_stages
from ezsd_jax.clip.loading import load_clip
from ezsd_jax.clip.text import (load_text_embeddings, save_text_embeddings, text_embeddings,
                              text_embeddings_path)
from ezsd_jax.core.images import decode_image
from ezsd_jax.data.synthetic_stage import dataset_paths, point_data_config
from ezsd_jax.demo import report, world
from ezsd_jax.ezsd import stages as ezsd_stages
from ezsd_jax.core.io_utils import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

ABLATION_DIR = "ablation"
VARIANTS = ("no_renorm", "no_proposals", "no_semantic_regression", "no_distillation")


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _main_run_summary(cfg, workdir: str, stage: str) -> dict:
    """Points config.data at the world (also when a stage is called directly) and returns
    the main run's eval/ezsd_summary.json; missing -> an error naming what to run."""
    if "synth" in cfg:
        point_data_config(cfg, workdir)
    summary = _read_json(os.path.join(workdir, "eval", "ezsd_summary.json"))
    if summary is None:
        raise cli.MissingInput(f"{workdir}/eval/ezsd_summary.json missing: run the stages "
                                f"through ezsd_eval before '{stage}'")
    return summary


def _is_main() -> bool:
    return jax.process_index() == 0


# ----------------------------------------------------------------------------- data

def demo_data(cfg, workdir: str) -> dict:
    """Stage 'demo_data' (see module docstring). Returns the world's paths."""
    s = cfg.synth
    root = dataset_paths(cfg, workdir)["root"]
    spec = world.spec_from_config(s)
    if jax.process_index() > 0:     # process 0 writes first (shared disks), then the rest
        _barrier("ezsd_demo_data_0")
    paths = world.write_world(root, spec, train_images=s.train_images,
                              val_images=s.val_images,
                              captions_per_category=s.captions_per_category,
                              heldout_per_category=s.heldout_per_category, seed=s.seed,
                              log=log.info)
    if jax.process_index() == 0 and jax.process_count() > 1:
        _barrier("ezsd_demo_data_0")
    point_data_config(cfg, workdir)
    return paths


def _barrier(name: str) -> None:
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- clip_pretrain

def clip_pretrain(cfg, workdir: str) -> dict:
    """Stage 'clip_pretrain' (demo): toy CLIP on the caption set of config.clip.captions
    ('' = the demo world's <synth root>/captions/{train,heldout}.npz). Skipped when the
    model and its clean accuracy exist. Returns the clean accuracy dict."""

    if "synth" in cfg:
        point_data_config(cfg, workdir)
    out = os.path.join(workdir, clip_stages.PRETRAIN_DIR)
    model_dir = os.path.join(out, "model")
    acc_path = os.path.join(out, "clean_accuracy.json")
    if all(os.path.exists(p) for p in (os.path.join(model_dir, "config.json"), acc_path)):
        log.info(f"[clip_pretrain] {model_dir} exists, skipping")
        with open(acc_path) as f:
            return json.load(f)
    tr_path, ho_path = _caption_paths(cfg, workdir)
    train = world.load_caption_set(tr_path)
    base, novel, names = clip_stages.split_names(cfg)
    missing = sorted(set(names) - set(train["names"]))
    if missing:
        raise ValueError(f"{tr_path}: the caption set has no category {missing} of the "
                         "zero-shot split (config.ezsd)")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        pretrain.run_pretrain(train["images"], train["captions"], train["labels"],
                              train["names"], model_dir, workdir, cfg.clip.pretrain, log=log.info)
    model, params, tok, _, mean, std = load_clip(model_dir)
    templates = clip_stages.prompt_templates(cfg)
    held = world.load_caption_set(ho_path)
    pos = {n: i for i, n in enumerate(names)}
    labels = np.asarray([pos.get(held["names"][k], -1) if k >= 0 else -1
                         for k in held["labels"]], np.int32)
    keep = labels >= 0
    acc = pretrain.clean_accuracy(model, params, tok, held["images"][keep], labels[keep],
                                  names, is_base=np.asarray([n in base for n in names]),
                                  templates=templates, mean=mean, std=std)
    acc["images"] = int(keep.sum())
    if _is_main():
        atomic_write_json(acc_path, acc)
    log.info(f"[clip_pretrain] held-out clean images, accuracy over all {len(names)} names: "
             f"all {acc['acc_all']:.3f}, base {acc['acc_base']:.3f}, novel {acc['acc_novel']:.3f}")
    return acc


def _caption_paths(cfg, workdir: str) -> tuple[str, str]:
    c = cfg.clip.get("captions", "")
    if c:
        return os.path.join(c, "train.npz"), os.path.join(c, "heldout.npz")
    p = world.detection_paths(dataset_paths(cfg, workdir)["root"])
    return p["captions_train"], p["captions_heldout"]


# ----------------------------------------------------------------------------- ablation

def variant_config(cfg, variant: str, workdir: str, vdir: str):
    """A copy of `cfg` for one ablation variant (its own workdir `vdir`)."""
    c = cfg.copy_and_resolve_references()
    with c.unlocked():
        c.ezsd.text_embeddings = c.ezsd.text_embeddings or _main_text_embeddings(workdir)
        c.ezsd.proposals_dir = c.ezsd.proposals_dir or os.path.join(workdir, "proposals")
        if variant == "no_renorm":
            c.ezsd.text_embeddings = os.path.join(vdir, "text_embeddings.npz")
            c.ezsd.proposals_dir = os.path.join(vdir, "proposals")
        elif variant == "no_proposals":
            c.ezsd.distill.gt_only = True
        elif variant == "no_semantic_regression":
            c.model.ezsd.semantic_regression = False
        elif variant == "no_distillation":
            c.ezsd.distill.enabled = False
        else:
            raise ValueError(f"config.ablation.variants: unknown variant {variant!r}; "
                             f"known: {VARIANTS}")
    return c


def _main_text_embeddings(workdir: str) -> str:
    return text_embeddings_path(ml_collections.ConfigDict({"ezsd": {}}), workdir)


def _prepare_no_renorm(cfg, vcfg, workdir: str, vdir: str) -> None:
    """Text embeddings and proposals of the teacher BEFORE re-normalization."""
    src = clip_stages.clip_source(cfg, workdir)
    emb_path = vcfg.ezsd.text_embeddings
    if not os.path.exists(emb_path):
        model, params, tok, _, _, _ = load_clip(src)
        _, _, names = clip_stages.split_names(cfg)
        templates = tuple(cfg.clip.renorm.get("templates", ("a photo of a {}.",)))
        save_text_embeddings(emb_path, names, text_embeddings(model, params, tok, names,
                                                              templates), templates)
    clip_stages.generate_proposals(vcfg, vdir, src, emb_path, vcfg.ezsd.proposals_dir)


def run_variant(cfg, variant: str, workdir: str) -> dict:
    """Trains + evaluates one variant (skipped when its summary is of the final step);
    returns {'summary', 'crop_accuracy'}."""
    vdir = os.path.join(workdir, ABLATION_DIR, variant)
    os.makedirs(vdir, exist_ok=True)
    vcfg = variant_config(cfg, variant, workdir, vdir)
    summary = _read_json(os.path.join(vdir, "eval", "ezsd_summary.json"))
    if summary is None or summary.get("step") != int(cfg.train.steps):
        log.info(f"=== ablation variant {variant} ===")
        if variant == "no_renorm":
            _prepare_no_renorm(cfg, vcfg, workdir, vdir)
        ezsd_stages.ezsd_train(vcfg, vdir)
        summary = ezsd_stages.ezsd_eval(vcfg, vdir)
    else:
        log.info(f"[ablation] {variant}: {vdir} is done, skipping")
    acc = _read_json(os.path.join(workdir, "clip_renorm", "crop_accuracy.json")) or {}
    return {"summary": summary,
            "crop_accuracy": acc.get("before" if variant == "no_renorm" else "after")}


def shuffled_novel_text_control(cfg, workdir: str) -> dict:
    """The trained detector of `workdir` evaluated with the novel names' text embeddings
    permuted among themselves (a derangement): if the novel detections really come from
    the right names' embeddings (and not from a leak of novel boxes or labels), novel AP
    collapses. Writes <workdir>/control_shuffled_text/; returns its eval summary."""
    names, emb = load_text_embeddings(os.path.join(workdir, "clip_renorm",
                                                   "text_embeddings.npz"))
    novel = [names.index(n) for n in cfg.ezsd.novel_names]
    perm = emb.copy()
    perm[novel] = emb[novel[1:] + novel[:1]]
    sub = os.path.join(workdir, "control_shuffled_text")
    os.makedirs(sub, exist_ok=True)
    link = os.path.join(sub, "ckpt_ezsd")
    if not os.path.lexists(link):
        os.symlink(os.path.join(workdir, "ckpt_ezsd"), link)
    path = os.path.join(sub, "text_embeddings.npz")
    save_text_embeddings(path, names, perm)
    c = cfg.copy_and_resolve_references()
    c.ezsd.text_embeddings = path
    return ezsd_stages.ezsd_eval(c, sub)


def ablation(cfg, workdir: str) -> dict | None:
    """Stage 'ablation' (see module docstring); a no-op unless config.ablation.enabled."""
    a = cfg.get("ablation")
    if a is None or not a.enabled:
        log.info("[ablation] config.ablation.enabled is False: skipping (--config.ablation."
                 "enabled=True runs it)")
        return None
    full = _main_run_summary(cfg, workdir, "ablation")
    acc = _read_json(os.path.join(workdir, "clip_renorm", "crop_accuracy.json")) or {}
    results = {"full": {"summary": full, "crop_accuracy": acc.get("after")}}
    for v in a.variants:
        results[v] = run_variant(cfg, v, workdir)
    if _is_main():
        atomic_write_json(os.path.join(workdir, ABLATION_DIR, "results.json"), results)
    print(report.ablation_table(results), flush=True)  # the stage's result, to stdout
    return results


# ----------------------------------------------------------------------------- report

def _val_images_to_draw(val: dict, novel_ids: set, n: int) -> list[int]:
    """The first n val image ids holding a novel object (then others, to fill)."""
    has_novel = {a["image_id"] for a in val["annotations"] if a["category_id"] in novel_ids}
    ids = [im["id"] for im in val["images"]]
    return ([i for i in ids if i in has_novel] + [i for i in ids if i not in has_novel])[:n]


def draw_val_detections(cfg, workdir: str, out_path: str, title: str = "") -> str | None:
    dets = _read_json(os.path.join(workdir, "eval", "ezsd_eval_detections.json"))
    if dets is None:
        log.info("[demo_report] no eval/ezsd_eval_detections.json: no detections PNG")
        return None
    with open(cfg.data.val_ann) as f:
        val = json.load(f)
    names = {c["id"]: c["name"] for c in val["categories"]}
    novel_ids = {i for i, n in names.items() if n in set(cfg.ezsd.novel_names)}
    r = cfg.get("report", {})
    n = int(r.get("num_images", 6))
    by_image: dict[int, list] = {}
    for d in dets:
        by_image.setdefault(d["image_id"], []).append(d)
    gt: dict[int, list] = {}
    for a in val["annotations"]:
        gt.setdefault(a["image_id"], []).append(a)
    files = {im["id"]: im["file_name"] for im in val["images"]}
    panels = []
    for iid in _val_images_to_draw(val, novel_ids, n):
        img = decode_image(os.path.join(cfg.data.val_images, files[iid]))
        panels.append(report.draw_detections(
            img, by_image.get(iid, []), names, novel_ids, gt.get(iid, []),
            score_threshold=float(r.get("score_threshold", 0.3)),
            max_dets=int(r.get("max_detections", 10))))
    grid = report.detections_grid(panels, int(r.get("columns", 3)), title)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(out_path, buf.getvalue())
    return out_path


def demo_report(cfg, workdir: str) -> dict:
    """Stage 'demo_report' (see module docstring). Returns the gathered results."""
    summary = _main_run_summary(cfg, workdir, "demo_report")
    crop = _read_json(os.path.join(workdir, "clip_renorm", "crop_accuracy.json"))
    clean = _read_json(os.path.join(workdir, "clip_pretrain", "clean_accuracy.json"))
    abl = _read_json(os.path.join(workdir, ABLATION_DIR, "results.json"))
    text = report.main_tables(summary, crop, clean)
    if abl:
        text += "\n\n" + report.ablation_table(abl)
    novel_ap = (summary.get("novel") or {}).get("AP50", float("nan"))
    title = (f"EZSD demo, val detections (score >= "
             f"{float(cfg.get('report', {}).get('score_threshold', 0.3)):.2f}); green = base, "
             f"magenta * = novel (never annotated in training)\n"
             f"novel AP50 {novel_ap:.3f}, base AP50 "
             f"{(summary.get('base') or {}).get('AP50', float('nan')):.3f}; grey = GT")
    png = draw_val_detections(cfg, workdir, os.path.join(workdir, "detections.png"), title)
    out = {"summary": summary, "crop_accuracy": crop, "clean_accuracy": clean,
           "ablation": abl, "detections_png": png}
    if _is_main():
        atomic_write_text(os.path.join(workdir, "report.md"), text + "\n")
        atomic_write_json(os.path.join(workdir, "report.json"), out)
    print("\n" + text + "\n", flush=True)  # the report is the demo's output, to stdout
    if png:
        log.info(f"[demo_report] wrote {os.path.join(workdir, 'report.md')} and {png}")
    return out



__all__ = ["demo_data", "ablation", "demo_report", "run_variant", "variant_config",
           "draw_val_detections", "VARIANTS"]
