"""What `python -m ezsd_jax.predict` writes into --out: the COCO results JSON
(detections.json), one overlay PNG per image (overlays/, drawn by demo/report.
draw_detections: novel names of the run's split in magenta with '*', others green), a
static index.html of the overlays, and summary.json (counts, skipped files, speed).
predict_files.json lists what predict wrote: a re-run into the same --out removes the
files of the earlier run that it does not rewrite (stale overlays), and never a file
predict did not write. Pure host code: no JAX.
"""
from __future__ import annotations

import html
import json
import os
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from ezsd_jax.demo import report
from ezsd_jax.core.io_utils import atomic_write_json, atomic_write_text

OVERLAY_DIR = "overlays"
FILES_MANIFEST = "predict_files.json"
FIXED_FILES = ("detections.json", "summary.json", "index.html")
MAX_OVERLAY_SIDE = 1024


def coco_results(image_id: int, file_name: str, dets: Sequence[Mapping],
                 name_ids: Mapping[str, int]) -> list[dict]:
    """detect() dicts of one image -> COCO result dicts (+ file_name, category_name; a
    Mask R-CNN's RLE 'segmentation' when the detections carry one)."""
    return [dict({"image_id": int(image_id), "file_name": file_name,
                  "category_id": int(name_ids[d["name"]]), "category_name": d["name"],
                  "bbox": [float(v) for v in d["bbox"]], "score": float(d["score"])},
                 **({"segmentation": d["segmentation"]} if "segmentation" in d else {}))
            for d in dets]


def coco_gt_ids(gt_file: str, files: Sequence[str], names: Sequence[str]
                ) -> tuple[list[int], dict[str, int]]:
    """(image id per file, category id per name) of a COCO ground-truth file, matched by
    file_name (its base name) and category name, so that detections.json loads with
    pycocotools' COCO(gt_file).loadRes. ValueError naming what does not match."""
    import json
    with open(gt_file, encoding="utf-8") as f:
        gt = json.load(f)
    if not isinstance(gt, dict) or not {"images", "categories"} <= set(gt):
        raise ValueError(f"{gt_file}: not a COCO annotation file (no 'images' and "
                         "'categories')")
    by_file: dict[str, int] = {}
    for im in gt["images"]:
        base = os.path.basename(str(im.get("file_name", "")))
        if base in by_file and by_file[base] != im["id"]:
            raise ValueError(f"{gt_file}: two images named {base!r}")
        by_file[base] = int(im["id"])
    cats = {str(c["name"]): int(c["id"]) for c in gt["categories"]}
    unknown = [n for n in names if n not in cats]
    if unknown:
        raise ValueError(f"{gt_file}: no category named {unknown[:5]} (its names: "
                         f"{sorted(cats)[:10]}{' ...' if len(cats) > 10 else ''})")
    missing = [p for p in files if os.path.basename(p) not in by_file]
    if missing:
        raise ValueError(f"{gt_file}: {len(missing)} image file(s) not in its images, "
                         f"e.g. {os.path.basename(missing[0])!r}")
    return [by_file[os.path.basename(p)] for p in files], {n: cats[n] for n in names}


def overlay_name(index: int, path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0] or "image"
    return f"{index:05d}_{stem}.png"


def write_overlay(out_dir: str, name: str, image: np.ndarray, results: Sequence[Mapping],
                  id_to_name: Mapping[int, str], novel_ids: set,
                  score_threshold: float, max_dets: int) -> str:
    """Draws `results` (COCO dicts of this image) on `image` (small images upscaled,
    large ones downscaled to MAX_OVERLAY_SIDE) and writes overlays/<name>."""
    h, w = image.shape[:2]
    long_side = max(h, w)
    scale = max(1, 384 // long_side)
    if long_side > MAX_OVERLAY_SIDE:
        f = MAX_OVERLAY_SIDE / long_side
        image = np.asarray(Image.fromarray(image).resize(
            (max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR))
        results = [dict(r, bbox=[v * f for v in r["bbox"]]) for r in results]
    im = report.draw_detections(image, results, dict(id_to_name), novel_ids, scale=scale,
                                score_threshold=score_threshold, max_dets=max_dets)
    path = os.path.join(out_dir, OVERLAY_DIR, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.png"
    im.save(tmp)
    os.replace(tmp, path)
    return path


def write_index(out_dir: str, rows: Sequence[Mapping], title: str) -> str:
    """index.html: one figure per image (overlay, file name, detections drawn)."""
    cells = []
    for r in rows:
        src = html.escape(f"{OVERLAY_DIR}/{r['overlay']}")
        cap = html.escape(f"{r['file_name']}: {r['shown']} shown / {r['detections']} "
                          "detections")
        cells.append(f'<figure><a href="{src}"><img src="{src}" loading="lazy"></a>'
                     f"<figcaption>{cap}</figcaption></figure>")
    page = ("<!doctype html><meta charset='utf-8'><title>ezsd_jax predict</title>"
            "<style>body{font-family:sans-serif;background:#222;color:#eee}"
            "figure{display:inline-block;margin:6px;vertical-align:top}"
            "img{max-width:384px;max-height:384px}</style>"
            f"<h1>{html.escape(title)}</h1>\n" + "\n".join(cells) + "\n")
    return atomic_write_text(os.path.join(out_dir, "index.html"), page)


def _listed(out_dir: str) -> list[str]:
    try:
        with open(os.path.join(out_dir, FILES_MANIFEST), encoding="utf-8") as f:
            files = json.load(f)["files"]
        return [str(p) for p in files]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def begin_outputs(out_dir: str, planned: Sequence[str]) -> list[str]:
    """Before a run writes into `out_dir`: removes the files an earlier predict run
    listed in FILES_MANIFEST that this run will not rewrite (only regular files inside
    out_dir: user files are never touched), then lists `planned` (relative paths) +
    the earlier entries still present. Returns the removed paths."""
    planned = list(dict.fromkeys(list(FIXED_FILES) + [str(p) for p in planned]))
    keep, removed = set(planned), []
    root = os.path.realpath(out_dir)
    for rel in _listed(out_dir):
        path = os.path.realpath(os.path.join(out_dir, rel))
        if rel in keep or os.path.commonpath([root, path]) != root:
            continue
        if os.path.isfile(path) and not os.path.islink(os.path.join(out_dir, rel)):
            os.remove(path)
            removed.append(rel)
    atomic_write_json(os.path.join(out_dir, FILES_MANIFEST), {"files": planned})
    return removed


def end_outputs(out_dir: str, written: Sequence[str]) -> None:
    """After the run: the manifest lists exactly what it wrote."""
    atomic_write_json(os.path.join(out_dir, FILES_MANIFEST),
                      {"files": list(dict.fromkeys(str(p) for p in written))})


def write_results(out_dir: str, results: list[dict], summary: dict) -> None:
    atomic_write_json(os.path.join(out_dir, "detections.json"), results)
    atomic_write_json(os.path.join(out_dir, "summary.json"), summary)


__all__ = ["coco_results", "coco_gt_ids", "overlay_name", "write_overlay", "write_index",
           "write_results", "begin_outputs", "end_outputs", "OVERLAY_DIR", "FILES_MANIFEST"]
