"""The demo's final outputs: result tables (markdown, printed and written) and a PNG of
detections drawn on a few val images, base and novel labelled.

Place in the pipeline: the last stage ('demo_report', demo/stages.py) gathers what the
earlier stages wrote (eval/ezsd_summary.json, clip_renorm/crop_accuracy.json,
clip_pretrain/clean_accuracy.json, ablation/results.json) and calls these functions.
Pure formatting and drawing: no JAX.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

VARIANT_TITLES = {
    "full": "EZSD (full: re-norm + CLIP proposals + semantic regression)",
    "no_renorm": "without re-normalization",
    "no_proposals": "without CLIP proposals (GT-only distillation)",
    "no_semantic_regression": "without semantic regression",
    "no_distillation": "without distillation (base-only detector)",
}


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "nan" if math.isnan(v) else f"{v:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[str(h) for h in header]] + [[c if isinstance(c, str) else _f(c) for c in r]
                                          for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def detection_row(title: str, summary: Mapping, crop_acc: Mapping | None) -> list:
    """[title, base AP50, novel AP50, all AP50, crop acc base, crop acc novel]."""
    g = lambda k: (summary.get(k) or {}).get("AP50")  # noqa: E731
    ca = crop_acc or {}
    return [title, g("base"), g("novel"), g("all"), ca.get("acc_base"), ca.get("acc_novel")]


DET_HEADER = ("method", "base AP50", "novel AP50", "all AP50", "CLIP crop acc base",
              "CLIP crop acc novel")


def main_tables(summary: Mapping, crop_accuracy: Mapping | None,
                clean_accuracy: Mapping | None) -> str:
    """The headline table (detector) and the CLIP table (clean / before / after)."""
    after = (crop_accuracy or {}).get("after")
    det = markdown_table(DET_HEADER, [detection_row(VARIANT_TITLES["full"], summary, after)])
    masks = [(summary.get(g) or {}).get("mask_AP50") for g in ("base", "novel", "all")]
    if any(v is not None for v in masks):     # a Mask R-CNN run (model.mask_on)
        det += "\n\n" + markdown_table(
            ("instance masks", "base mask AP50", "novel mask AP50", "all mask AP50"),
            [[VARIANT_TITLES["full"], *masks]])
    rows = []
    if clean_accuracy:
        rows.append(["pretrained, held-out clean caption images", clean_accuracy.get(
            "acc_base"), clean_accuracy.get("acc_novel"), clean_accuracy.get("acc_all")])
    for key, title in (("before", "pretrained, val detection crops (before re-norm)"),
                       ("after", "re-normalized, val detection crops (after re-norm)")):
        a = (crop_accuracy or {}).get(key)
        if a:
            rows.append([title, a.get("acc_base"), a.get("acc_novel"), a.get("acc_all")])
    clip = markdown_table(("CLIP crop classification over all names", "base", "novel",
                           "all"), rows)
    return ("Generalized zero-shot detection (val, one classifier over base + novel "
            "names; the detector never saw a novel box):\n\n" + det +
            "\n\nCLIP teacher, classification accuracy over ALL names:\n\n" + clip)


def ablation_table(results: Mapping[str, Mapping]) -> str:
    """results: variant -> {'summary': ezsd summary, 'crop_accuracy': acc of its CLIP}."""
    order = [k for k in VARIANT_TITLES if k in results] + \
        [k for k in results if k not in VARIANT_TITLES]
    rows = [detection_row(VARIANT_TITLES.get(k, k), results[k]["summary"],
                          results[k].get("crop_accuracy")) for k in order]
    return "Ablation (same data and schedule; each row one trained detector):\n\n" + \
        markdown_table(DET_HEADER, rows)


# ----------------------------------------------------------------------------- drawing

BASE_COLOUR = (40, 220, 60)
NOVEL_COLOUR = (255, 60, 200)
GT_COLOUR = (235, 235, 235)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                       # Pillow < 10.1
        return ImageFont.load_default()


def _blend_masks(image: np.ndarray, dets: Sequence[Mapping], novel_ids: set,
                 alpha: float = 0.45) -> np.ndarray:
    """Detections' RLE 'segmentation' (a Mask R-CNN's; original pixels, resized to the
    image when it was rescaled) tinted into the image in their box colour."""
    with_masks = [r for r in dets if isinstance(r.get("segmentation"), dict)]  # RLE only
    if not with_masks:
        return image
    from pycocotools import mask as mask_utils
    out = image.astype(np.float32)
    h, w = image.shape[:2]
    for r in with_masks:
        seg = dict(r["segmentation"])
        if isinstance(seg["counts"], str):
            seg["counts"] = seg["counts"].encode("ascii")
        m = mask_utils.decode(seg)
        if m.shape != (h, w):
            m = np.asarray(Image.fromarray(m * 255).resize((w, h), Image.NEAREST))
        col = np.asarray(NOVEL_COLOUR if r["category_id"] in novel_ids else BASE_COLOUR,
                         np.float32)
        sel = m > 0
        out[sel] = (1.0 - alpha) * out[sel] + alpha * col
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def draw_detections(image: np.ndarray, detections: Sequence[Mapping], names: Mapping[int, str],
                    novel_ids: set, gt: Sequence[Mapping] = (), scale: int = 3,
                    score_threshold: float = 0.3, max_dets: int = 10) -> Image.Image:
    """One val image (uint8 HxWx3) upscaled `scale`x with its detections (COCO results
    of this image: xywh in original pixels) of score >= score_threshold (at most
    max_dets, best first): base classes in green, novel in magenta with a '*', masks
    (results with an RLE 'segmentation') tinted in the same colour. GT boxes thin and
    light grey."""
    h, w = image.shape[:2]
    dets = sorted((r for r in detections if r["score"] >= score_threshold),
                  key=lambda r: -r["score"])[:max_dets]
    image = _blend_masks(image, dets, novel_ids)
    im = Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST)
    d = ImageDraw.Draw(im)
    font = _font(11)
    for g in gt:
        x, y, bw, bh = (v * scale for v in g["bbox"])
        d.rectangle([x, y, x + bw, y + bh], outline=GT_COLOUR, width=1)
    for r in dets:
        novel = r["category_id"] in novel_ids
        col = NOVEL_COLOUR if novel else BASE_COLOUR
        x, y, bw, bh = (v * scale for v in r["bbox"])
        d.rectangle([x, y, x + bw, y + bh], outline=col, width=2)
        label = f"{'*' if novel else ''}{names.get(r['category_id'], r['category_id'])} " \
                f"{r['score']:.2f}"
        ty = max(y - 13, 0)
        tw = d.textlength(label, font=font)
        d.rectangle([x, ty, x + tw + 4, ty + 13], fill=(0, 0, 0))
        d.text((x + 2, ty), label, fill=col, font=font)
    return im


def detections_grid(panels: Sequence[Image.Image], columns: int = 3,
                    title: str = "") -> Image.Image:
    """Panels (same size) in a grid with a caption strip on top."""
    if not panels:
        raise ValueError("detections_grid: no panels")
    pw, ph = panels[0].size
    cols = min(columns, len(panels))
    rows = -(-len(panels) // cols)
    top = 40 if title else 0
    pad = 6
    out = Image.new("RGB", (cols * (pw + pad) + pad, rows * (ph + pad) + pad + top),
                    (25, 25, 25))
    d = ImageDraw.Draw(out)
    if title:
        font = _font(13)
        for i, line in enumerate(title.split("\n")[:2]):
            d.text((pad, 4 + 17 * i), line, fill=(240, 240, 240), font=font)
    for i, p in enumerate(panels):
        r, c = divmod(i, cols)
        out.paste(p, (pad + c * (pw + pad), top + pad + r * (ph + pad)))
    return out


__all__ = ["VARIANT_TITLES", "markdown_table", "detection_row", "main_tables",
           "ablation_table", "draw_detections", "detections_grid"]
