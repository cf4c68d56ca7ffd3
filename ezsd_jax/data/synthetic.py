"""Synthetic COCO-format detection datasets: coloured, textured shapes on varied backgrounds.

Used by the tests and the built-in demo in place of COCO (no photos ship offline):
`write_coco_dataset` writes image files + a COCO JSON, `to_lvis_format` its LVIS v1 form.
Categories, boxes and determinism: docs/code-notes.md.
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageColor, ImageDraw

from ezsd_jax.data.segmentation import exact_segmentation
from ezsd_jax.core.io_utils import atomic_write_json
from ezsd_jax.ops.boxes import iou_matrix

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon",
          "ellipse", "pentagon", "rectangle", "crescent", "semicircle")
TEXTURES = ("solid", "stripes", "dots", "checker")
BACKGROUNDS = ("noise", "gradient", "stripes", "checker", "solid")
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "purple",
          "white", "black")


@dataclass
class CategorySpec:
    name: str
    shape: str
    color: tuple[int, int, int] | str
    texture: str = "solid"

    def rgb(self) -> np.ndarray:
        if isinstance(self.color, str):
            try:
                return np.asarray(ImageColor.getrgb(self.color)[:3], np.uint8)
            except ValueError:
                raise ValueError(f"category {self.name!r}: unknown colour {self.color!r}")
        c = tuple(self.color)
        if len(c) != 3 or not all(0 <= int(v) <= 255 for v in c):
            raise ValueError(f"category {self.name!r}: colour must be 3 values in 0..255")
        return np.asarray(c, np.uint8)

    def validate(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"category {self.name!r}: unknown shape {self.shape!r}; "
                             f"one of {SHAPES}")
        if self.texture not in TEXTURES:
            raise ValueError(f"category {self.name!r}: unknown texture {self.texture!r}; "
                             f"one of {TEXTURES}")
        self.rgb()


@dataclass
class SyntheticSpec:
    categories: list[CategorySpec]
    backgrounds: Sequence[str] = BACKGROUNDS
    image_hw_range: tuple[tuple[int, int], tuple[int, int]] = ((160, 240), (160, 240))
    objects_per_image: tuple[int, int] = (1, 5)   # inclusive range
    object_size: tuple[int, int] = (24, 96)       # inclusive range of the longer side
    clutter: int = 0          # distractor lines/blobs per image that are not objects
    max_overlap_iou: float = 0.3
    jpeg: bool = False        # else PNG (lossless)

    def validate(self) -> None:
        if not self.categories:
            raise ValueError("SyntheticSpec needs at least one category")
        names = [c.name for c in self.categories]
        if len(set(names)) != len(names):
            raise ValueError(f"category names must be unique: {names}")
        for c in self.categories:
            c.validate()
        bad = [b for b in self.backgrounds if b not in BACKGROUNDS]
        if bad or not self.backgrounds:
            raise ValueError(f"unknown backgrounds {bad}; choose from {BACKGROUNDS}")
        (h0, h1), (w0, w1) = self.image_hw_range
        s0, s1 = self.object_size
        if not (0 < h0 <= h1 and 0 < w0 <= w1):
            raise ValueError(f"bad image_hw_range {self.image_hw_range}")
        if not 4 <= s0 <= s1 or s0 > min(h0, w0):
            raise ValueError(f"object_size {self.object_size} must be >= 4 and fit the "
                             f"smallest image {h0}x{w0}")
        if not 0 <= self.objects_per_image[0] <= self.objects_per_image[1]:
            raise ValueError(f"bad objects_per_image {self.objects_per_image}")


def default_categories(n: int) -> list[CategorySpec]:
    """n distinct (shape, colour[, texture]) categories; consecutive ones differ in shape
    and colour. Names like 'red circle' or 'striped blue star'."""
    total = len(SHAPES) * len(COLORS) * len(TEXTURES)
    if not 0 < n <= total:
        raise ValueError(f"default_categories: n must be in 1..{total}, got {n}")
    prefix = {"solid": "", "stripes": "striped ", "dots": "dotted ", "checker": "checkered "}
    out = []
    for t in TEXTURES:
        for k in range(len(COLORS)):
            for s_idx, shape in enumerate(SHAPES):
                color = COLORS[(s_idx + k) % len(COLORS)]
                out.append(CategorySpec(f"{prefix[t]}{color} {shape}", shape, color, t))
                if len(out) == n:
                    return out
    return out


# ---- rendering -----------------------------------------------------------------------
def _regular(n: int, phase: float = -math.pi / 2) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], 1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    a = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


_CROSS = np.array([[-1, -1 / 3], [-1 / 3, -1 / 3], [-1 / 3, -1], [1 / 3, -1], [1 / 3, -1 / 3],
                   [1, -1 / 3], [1, 1 / 3], [1 / 3, 1 / 3], [1 / 3, 1], [-1 / 3, 1],
                   [-1 / 3, 1 / 3], [-1, 1 / 3]])
_POLYGONS = {"square": _regular(4, math.pi / 4), "rectangle": _regular(4, math.pi / 4),
             "triangle": _regular(3), "diamond": _regular(4, 0.0), "pentagon": _regular(5),
             "hexagon": _regular(6, 0.0), "star": _star(), "cross": _CROSS}


def shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """bool mask [h, w] of one shape whose longer side is about `size` pixels."""
    if shape in ("ellipse", "rectangle"):
        aspect = rng.uniform(0.45, 0.7)
        w, h = size, max(3, int(round(size * aspect)))
        if rng.random() < 0.5:
            w, h = h, w
    elif shape == "diamond":
        w, h = max(3, int(round(size * 0.7))), size
    else:
        w = h = size
    img = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(img)
    box = [0, 0, w - 1, h - 1]
    if shape in ("circle", "ellipse"):
        d.ellipse(box, fill=255)
    elif shape == "ring":
        d.ellipse(box, fill=255)
        t = 0.22 * w
        d.ellipse([t, t, w - 1 - t, h - 1 - t], fill=0)
    elif shape == "crescent":
        d.ellipse(box, fill=255)
        off = 0.35 * w
        d.ellipse([off, -0.1 * h, w - 1 + off, 0.9 * h], fill=0)
    elif shape == "semicircle":
        d.pieslice([0, 0, w - 1, 2 * h - 1], 180, 360, fill=255)
    else:
        v = _POLYGONS[shape].copy()
        if shape not in ("diamond",):
            ang = rng.uniform(-15, 15) * math.pi / 180
            c, s = math.cos(ang), math.sin(ang)
            v = v @ np.array([[c, s], [-s, c]])
        v = (v - v.min(0)) / np.maximum(v.max(0) - v.min(0), 1e-6)
        v = v * [w - 1, h - 1]
        d.polygon([tuple(p) for p in v], fill=255)
    return np.asarray(img) > 0


def _texture(texture: str, rgb: np.ndarray, h: int, w: int, period: int) -> np.ndarray:
    """uint8 [h, w, 3] pattern of a category: its colour and a dark/light variant."""
    base = np.broadcast_to(rgb, (h, w, 3))
    if texture == "solid":
        return base
    alt = (rgb * 0.35).astype(np.uint8) if int(rgb.max()) > 90 else np.full(3, 200, np.uint8)
    y, x = np.mgrid[0:h, 0:w]
    p = max(4, period)
    if texture == "stripes":
        sel = ((x + y) // (p // 2)) % 2 == 1
    elif texture == "dots":
        sel = ((x % p - p / 2) ** 2 + (y % p - p / 2) ** 2) < (p / 4) ** 2
    else:  # checker
        sel = ((x // (p // 2)) + (y // (p // 2))) % 2 == 1
    return np.where(sel[..., None], alt, base)


def _muted(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(70, 190, 3).astype(np.float32)


def render_background(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "solid":
        img = np.broadcast_to(_muted(rng), (h, w, 3))
    elif kind == "noise":
        img = _muted(rng) + rng.normal(0, rng.uniform(10, 30), (h, w, 3))
    elif kind == "gradient":
        a, b = _muted(rng), _muted(rng)
        ang = rng.uniform(0, 2 * math.pi)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        t = x * math.cos(ang) + y * math.sin(ang)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = a + (b - a) * t[..., None]
    else:
        a, b = _muted(rng), _muted(rng)
        p = int(rng.integers(8, 25))
        y, x = np.mgrid[0:h, 0:w]
        if kind == "stripes":
            coord = [x, y, x + y][int(rng.integers(3))]
            sel = (coord // p) % 2 == 1
        else:
            sel = ((x // p) + (y // p)) % 2 == 1
        img = np.where(sel[..., None], b, a)
    return np.clip(img, 0, 255).astype(np.uint8)


def add_clutter(img: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if n <= 0:
        return img
    h, w = img.shape[:2]
    pil = Image.fromarray(img)
    d = ImageDraw.Draw(pil)
    for _ in range(n):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(2)]
            d.line(pts, fill=color, width=int(rng.integers(1, 4)))
        else:
            r = rng.uniform(2, 6)
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            d.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r], fill=color)
    return np.asarray(pil)


def place_shape(mask: np.ndarray, occupied: np.ndarray, placed, max_overlap_iou: float,
                rng: np.random.Generator):
    """One try at a random position for `mask` on the canvas of `occupied` ([H, W] bool,
    marked in place on success): its tight box may overlap no box of `placed` by more
    than max_overlap_iou and its pixels no occupied pixel. -> (y0, x0, box xyxy) or None."""
    h, w = occupied.shape
    mh, mw = mask.shape
    y0 = int(rng.integers(0, h - mh + 1))
    x0 = int(rng.integers(0, w - mw + 1))
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return None
    box = (x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1)
    if len(placed) and (iou_matrix(np.float64([box]), np.float64(placed), xp=np)
                        > max_overlap_iou).any():
        return None
    taken = occupied[y0:y0 + mh, x0:x0 + mw]
    if (taken & mask).any():
        return None
    taken |= mask
    return y0, x0, box


def append_coco_image(images: list, anns: list, image_id: int, file_name: str, hw,
                      objects) -> None:
    """Appends one generated image and its objects (object_record dicts; category index
    k -> COCO category id k + 1) to COCO `images` / `annotations` lists."""
    images.append({"id": image_id, "file_name": file_name, "height": int(hw[0]),
                   "width": int(hw[1])})
    for o in objects:
        ann_id = len(anns) + 1
        ann = {"id": ann_id, "image_id": image_id, "category_id": o["category"] + 1,
               "bbox": o["bbox"], "area": o["area"], "iscrowd": 0}
        if "mask" in o:   # odd ids: polygons, even ids: compressed RLE (both formats)
            ann["segmentation"] = exact_segmentation(
                o["mask"], o["origin"], hw, "polygon" if ann_id % 2 else "rle")
        anns.append(ann)


def object_record(category: int, mask: np.ndarray, box, origin=None) -> dict:
    """An object of a generated image: category index, pixel area, COCO xywh box; with
    origin (y0, x0), the drawn pixels `mask` placed there (append_coco_image writes
    them as the annotation's exact segmentation)."""
    rec = {"category": category, "area": int(mask.sum()),
           "bbox": [int(box[0]), int(box[1]), int(box[2] - box[0]), int(box[3] - box[1])]}
    if origin is not None:
        rec.update(mask=np.asarray(mask, bool), origin=(int(origin[0]), int(origin[1])))
    return rec


def render_image(spec: SyntheticSpec, rng: np.random.Generator
                 ) -> tuple[np.ndarray, list[dict]]:
    """One random image: uint8 [H, W, 3] and its objects as dicts(category index,
    bbox [x, y, w, h] tight around the drawn pixels, area = drawn pixel count). An
    object that finds no free place in 20 tries is left out."""
    (h0, h1), (w0, w1) = spec.image_hw_range
    H, W = int(rng.integers(h0, h1 + 1)), int(rng.integers(w0, w1 + 1))
    kind = spec.backgrounds[int(rng.integers(len(spec.backgrounds)))]
    img = add_clutter(render_background(kind, H, W, rng), spec.clutter, rng)
    img = np.array(img)  # writable
    n_obj = int(rng.integers(spec.objects_per_image[0], spec.objects_per_image[1] + 1))
    objects: list[dict] = []
    placed: list[tuple[float, float, float, float]] = []
    occupied = np.zeros((H, W), bool)
    for _ in range(n_obj):
        for _try in range(20):
            k = int(rng.integers(len(spec.categories)))
            cat = spec.categories[k]
            size = int(rng.integers(spec.object_size[0], spec.object_size[1] + 1))
            size = min(size, H, W)
            mask = shape_mask(cat.shape, size, rng)
            spot = place_shape(mask, occupied, placed, spec.max_overlap_iou, rng)
            if spot is None:  # no occlusion: every box stays tight and visible
                continue
            y0, x0, box = spot
            mh, mw = mask.shape
            pattern = _texture(cat.texture, cat.rgb(), mh, mw, max(4, size // 6))
            region = img[y0:y0 + mh, x0:x0 + mw]
            region[mask] = pattern[mask]
            placed.append(box)
            objects.append(object_record(k, mask, box, (y0, x0)))
            break
    return img, objects


def write_coco_dataset(out_dir: str, spec: SyntheticSpec, num_images: int, seed: int,
                       split: str = "train") -> str:
    """Writes out_dir/{split}/*.png|jpg and out_dir/annotations/instances_{split}.json
    (written last, atomically); returns the annotation path. Deterministic for
    (spec, num_images, seed, split). Category ids are 1..C in the spec's order.

    Objects never occlude each other (their pixels are disjoint; their boxes may overlap
    up to max_overlap_iou), so every box is tight around visible pixels of its object.
    """
    spec.validate()
    img_dir = os.path.join(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    split_key = zlib.crc32(split.encode("utf-8"))
    ext = "jpg" if spec.jpeg else "png"
    images, anns = [], []
    for i in range(num_images):
        rng = np.random.default_rng((int(seed), split_key, i))
        img, objects = render_image(spec, rng)
        image_id = i + 1
        name = f"{image_id:012d}.{ext}"
        pil = Image.fromarray(img)
        if spec.jpeg:
            pil.save(os.path.join(img_dir, name), quality=90)
        else:
            pil.save(os.path.join(img_dir, name), compress_level=1)
        append_coco_image(images, anns, image_id, name, img.shape[:2], objects)
    data = {
        "info": {"description": f"ezsd_jax synthetic shapes, split={split}, seed={seed}"},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [{"id": k + 1, "name": c.name, "supercategory": c.shape}
                       for k, c in enumerate(spec.categories)],
    }
    path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
    atomic_write_json(path, data, indent=None)
    return path


def to_lvis_format(coco: dict, split: str, frequency: dict[str, str]) -> dict:
    """An LVIS v1 annotation dict of a COCO-format synthetic set written by
    `write_coco_dataset` (the same images and annotations), as LVIS ships it: each image
    names its file by `coco_url` only (".../<split>/<file>", so the image directory is
    the folder above <split>/, as the COCO root is for LVIS), every category has a
    `frequency` ('r' / 'c' / 'f', from `frequency` by name), and each image's
    `neg_category_ids` are the categories it does not contain (every object is annotated:
    `not_exhaustive_category_ids` is empty)."""
    missing = sorted({c["name"] for c in coco["categories"]} - set(frequency))
    bad = sorted(f for f in frequency.values() if f not in ("r", "c", "f"))
    if missing or bad:
        raise ValueError(f"to_lvis_format: frequency needs 'r', 'c' or 'f' for every "
                         f"category (missing {missing}, bad {bad})")
    present: dict[int, set] = {}
    for a in coco["annotations"]:
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    cat_ids = [c["id"] for c in coco["categories"]]
    images = []
    for im in coco["images"]:
        rec = {k: v for k, v in im.items() if k != "file_name"}
        rec["coco_url"] = f"http://images.cocodataset.org/{split}/{im['file_name']}"
        have = present.get(im["id"], set())
        rec["neg_category_ids"] = [c for c in cat_ids if c not in have]
        rec["not_exhaustive_category_ids"] = []
        images.append(rec)
    cats = [dict(c, frequency=frequency[c["name"]]) for c in coco["categories"]]
    return dict(coco, images=images, categories=cats)
