"""The synthetic zero-shot world of the built-in demo: what exists, and two ways of seeing it.

Stage 'demo_data' (demo/stages.py) writes a cluttered, dimly lit DETECTION set (COCO format)
and a clean CAPTION set (the toy CLIP's pretraining data); the gap between the two styles is
the domain gap that CLIP re-normalization bridges. Scenes, categories and the choices behind
them: docs/code-notes.md.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from ezsd_jax.core import cli
from ezsd_jax.data.synthetic import (CategorySpec, add_clutter, append_coco_image,
                                     object_record, place_shape, render_background,
                                     shape_mask)
from ezsd_jax.data.synthetic_stage import coco_layout
from ezsd_jax.core.io_utils import atomic_savez, atomic_write_json

# name -> (shape, rgb). Colours and shapes are pairwise distinct within the catalogue.
CATALOG: dict[str, tuple[str, tuple[int, int, int]]] = {
    "red circle": ("circle", (220, 30, 30)),
    "green square": ("square", (30, 170, 40)),
    "blue triangle": ("triangle", (40, 60, 230)),
    "yellow star": ("star", (235, 215, 30)),
    "magenta cross": ("cross", (220, 40, 220)),
    "cyan ring": ("ring", (40, 210, 220)),
    "orange diamond": ("diamond", (245, 140, 20)),
    "purple hexagon": ("hexagon", (120, 40, 160)),
    "black crescent": ("crescent", (20, 20, 20)),
    "white pentagon": ("pentagon", (245, 245, 245)),
    "brown semicircle": ("semicircle", (130, 75, 30)),
    "pink ellipse": ("ellipse", (250, 150, 190)),
}
DEFAULT_BASE = ("red circle", "green square", "blue triangle", "yellow star",
                "magenta cross", "cyan ring")
DEFAULT_NOVEL = ("orange diamond", "purple hexagon", "white pentagon")
DETECTION_BACKGROUNDS = ("noise", "gradient", "stripes", "checker")
CAPTION_TEMPLATES = ("a photo of a {}.",)
EMPTY_CAPTION = "a photo of an empty background."
CAPTION_BACKGROUNDS = ("solid", "noise", "gradient", "stripes", "checker")


@dataclass
class WorldSpec:
    base: Sequence[str] = DEFAULT_BASE
    novel: Sequence[str] = DEFAULT_NOVEL
    image_size: int = 128                        # detection scenes are square
    objects_per_image: tuple[int, int] = (2, 5)  # inclusive
    object_size: tuple[int, int] = (18, 44)      # longer side, inclusive
    clutter: int = 6                             # strokes / blobs per scene
    novel_weight_train: float = 0.5              # novel vs base object frequency (train)
    max_overlap_iou: float = 0.2
    colour_jitter: int = 20                      # per-object, per-channel
    contrast: tuple[float, float] = (0.55, 0.8)  # detection "lighting", per scene
    brightness: tuple[float, float] = (-25.0, 5.0)
    colour_cast: float = 12.0
    noise: float = 6.0
    caption_size: int = 32                       # stored caption image size (CLIP input)
    caption_render: int = 64                     # rendered, then resized (bicubic)
    caption_object_frac: tuple[float, float] = (0.55, 0.85)
    caption_background: tuple[int, int] = (205, 246)   # plain colour, per channel
    caption_templates: Sequence[str] = CAPTION_TEMPLATES
    caption_empty_frac: float = 0.1              # object-free images, EMPTY_CAPTION
    categories: list[CategorySpec] = field(init=False)

    def __post_init__(self):
        names = list(self.base) + list(self.novel)
        unknown = [n for n in names if n not in CATALOG]
        if unknown:
            raise ValueError(f"world: unknown categories {unknown}; known: {sorted(CATALOG)}")
        if len(set(names)) != len(names):
            raise ValueError(f"world: a name is listed twice in base + novel: {names}")
        if not self.base or not self.novel:
            raise ValueError("world: needs at least one base and one novel category")
        self.categories = [CategorySpec(n, CATALOG[n][0], CATALOG[n][1]) for n in names]
        for c in self.categories:
            c.validate()
        s0, s1 = self.object_size
        if not 4 <= s0 <= s1 <= self.image_size:
            raise ValueError(f"world: object_size {self.object_size} must lie in "
                             f"4..{self.image_size}")
        for t in self.caption_templates:
            if "{}" not in t:
                raise ValueError(f"world: caption template {t!r} has no '{{}}'")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def is_novel(self) -> np.ndarray:
        return np.asarray([n in set(self.novel) for n in self.names])

    def weights(self, split: str) -> np.ndarray:
        """Category sampling probabilities of the objects of a detection split."""
        w = np.where(self.is_novel, self.novel_weight_train if split == "train" else 1.0,
                     1.0)
        return w / w.sum()


def spec_from_config(w) -> WorldSpec:
    """config.synth (the demo's world block) -> WorldSpec."""
    t = lambda v: tuple(v)  # noqa: E731
    return WorldSpec(
        base=t(w.base), novel=t(w.novel), image_size=int(w.image_size),
        objects_per_image=t(w.objects_per_image), object_size=t(w.object_size),
        clutter=int(w.clutter), novel_weight_train=float(w.novel_weight_train),
        contrast=t(w.contrast), brightness=t(w.brightness),
        colour_cast=float(w.colour_cast), noise=float(w.noise),
        caption_size=int(w.caption_size), caption_render=int(w.caption_render),
        caption_object_frac=t(w.caption_object_frac),
        caption_background=t(w.caption_background),
        caption_templates=t(w.caption_templates),
        caption_empty_frac=float(w.caption_empty_frac))


# ----------------------------------------------------------------------------- rendering

def _jitter(rgb: np.ndarray, amount: int, rng: np.random.Generator) -> np.ndarray:
    j = rng.integers(-amount, amount + 1, 3) if amount > 0 else 0
    return np.clip(rgb.astype(np.int32) + j, 0, 255).astype(np.uint8)


def render_scene(spec: WorldSpec, rng: np.random.Generator, split: str = "train"
                 ) -> tuple[np.ndarray, list[dict]]:
    """One detection scene: uint8 [S, S, 3] and its objects (category index, bbox xywh
    tight around the drawn pixels, area). Objects never occlude each other."""
    s = spec.image_size
    kind = DETECTION_BACKGROUNDS[int(rng.integers(len(DETECTION_BACKGROUNDS)))]
    img = np.array(add_clutter(render_background(kind, s, s, rng), spec.clutter, rng))
    p = spec.weights(split)
    occupied = np.zeros((s, s), bool)
    placed, objects = [], []
    for _ in range(int(rng.integers(spec.objects_per_image[0],
                                    spec.objects_per_image[1] + 1))):
        for _try in range(20):
            k = int(rng.choice(len(p), p=p))
            cat = spec.categories[k]
            mask = shape_mask(cat.shape, int(rng.integers(spec.object_size[0],
                                                           spec.object_size[1] + 1)), rng)
            spot = place_shape(mask, occupied, placed, spec.max_overlap_iou, rng)
            if spot is None:
                continue
            y0, x0, box = spot
            mh, mw = mask.shape
            img[y0:y0 + mh, x0:x0 + mw][mask] = _jitter(cat.rgb(), spec.colour_jitter, rng)
            placed.append(box)
            objects.append(object_record(k, mask, box, (y0, x0)))
            break
    return _lighting(img, spec, rng), objects


def _lighting(img: np.ndarray, spec: WorldSpec, rng: np.random.Generator) -> np.ndarray:
    """The detection domain's look: lower contrast, darker, a colour cast, noise."""
    c = rng.uniform(*spec.contrast)
    b = rng.uniform(*spec.brightness)
    cast = rng.uniform(-spec.colour_cast, spec.colour_cast, 3)
    out = (img.astype(np.float32) - 128.0) * c + 128.0 + b + cast
    if spec.noise > 0:
        out = out + rng.normal(0.0, spec.noise, out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def render_caption_image(spec: WorldSpec, k: int, rng: np.random.Generator) -> np.ndarray:
    """Clean style: category k centred on a plain background, uint8
    [caption_size, caption_size, 3] (rendered at caption_render, resized bicubic)."""
    r = spec.caption_render
    cat = spec.categories[k]
    lo, hi = spec.caption_background
    bg = rng.integers(lo, hi + 1, 3)
    img = np.broadcast_to(bg.astype(np.uint8), (r, r, 3)).copy()
    size = int(round(rng.uniform(*spec.caption_object_frac) * r))
    mask = shape_mask(cat.shape, max(size, 4), rng)
    mh, mw = mask.shape
    jit = int(0.12 * r)
    y0 = int(np.clip((r - mh) // 2 + rng.integers(-jit, jit + 1), 0, r - mh))
    x0 = int(np.clip((r - mw) // 2 + rng.integers(-jit, jit + 1), 0, r - mw))
    img[y0:y0 + mh, x0:x0 + mw][mask] = _jitter(cat.rgb(), 10, rng)
    if spec.caption_size != r:
        img = np.asarray(Image.fromarray(img).resize((spec.caption_size,) * 2,
                                                     Image.BICUBIC))
    return img


# ----------------------------------------------------------------------------- writing

def detection_paths(root: str) -> dict:
    """The synthetic sets' COCO layout under `root` + the caption sets."""
    return dict(coco_layout(root),
                captions_train=os.path.join(root, "captions", "train.npz"),
                captions_heldout=os.path.join(root, "captions", "heldout.npz"))


def _split_rng(seed: int, split: str, i: int) -> np.random.Generator:
    return np.random.default_rng((int(seed), zlib.crc32(split.encode("utf-8")), i))


def write_detection_split(root: str, spec: WorldSpec, num_images: int, seed: int,
                          split: str) -> str:
    """root/{split}/*.png + root/annotations/instances_{split}.json (written last,
    atomically); every object of every category annotated. Deterministic."""
    img_dir = os.path.join(root, split)
    os.makedirs(img_dir, exist_ok=True)
    images, anns = [], []
    for i in range(int(num_images)):
        img, objects = render_scene(spec, _split_rng(seed, split, i), split)
        image_id = i + 1
        name = f"{image_id:012d}.png"
        Image.fromarray(img).save(os.path.join(img_dir, name), compress_level=1)
        append_coco_image(images, anns, image_id, name, img.shape[:2], objects)
    data = {"info": {"description": f"ezsd_jax zero-shot demo world, split={split}, "
                                    f"seed={seed}"},
            "licenses": [], "images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": c.name, "supercategory": c.shape}
                           for k, c in enumerate(spec.categories)]}
    path = os.path.join(root, "annotations", f"instances_{split}.json")
    atomic_write_json(path, data, indent=None)
    return path


def render_empty_image(spec: WorldSpec, rng: np.random.Generator) -> np.ndarray:
    """An object-free caption image: a plain, gradient or patterned background (no
    lighting change, no clutter), uint8 [caption_size, caption_size, 3]."""
    r = spec.caption_render
    kind = CAPTION_BACKGROUNDS[int(rng.integers(len(CAPTION_BACKGROUNDS)))]
    img = render_background(kind, r, r, rng)
    return np.asarray(Image.fromarray(img).resize((spec.caption_size,) * 2, Image.BICUBIC))


def write_caption_set(path: str, spec: WorldSpec, per_category: int, seed: int,
                      split: str) -> str:
    """.npz: images uint8 [N, S, S, 3], labels [N] (category index; -1 for the
    object-free images captioned EMPTY_CAPTION), captions [N] (str, templates cycled),
    names [C]. Classes interleaved; deterministic.

    The object-free images (caption_empty_frac of the object images) show the teacher
    backgrounds without objects, as a real CLIP has seen plenty of: without them a toy
    CLIP maps any background crop confidently to some category, and the CLIP proposals
    (ranked by confidence) fill up with background."""
    imgs, labels, caps = [], [], []
    templates = list(spec.caption_templates)
    n_obj = int(per_category) * len(spec.categories)
    for i in range(n_obj):
        k = i % len(spec.categories)
        rng = _split_rng(seed, "caption_" + split, i)
        imgs.append(render_caption_image(spec, k, rng))
        labels.append(k)
        caps.append(templates[(i // len(spec.categories)) % len(templates)]
                    .format(spec.names[k]))
    for i in range(int(round(spec.caption_empty_frac * n_obj))):
        imgs.append(render_empty_image(spec, _split_rng(seed, "empty_" + split, i)))
        labels.append(-1)
        caps.append(EMPTY_CAPTION)
    return atomic_savez(path, images=np.stack(imgs), labels=np.asarray(labels, np.int32),
                        captions=np.asarray(caps), names=np.asarray(spec.names))


def load_caption_set(path: str) -> dict:
    """-> {'images' uint8 [N,S,S,3], 'labels' [N] (-1: no object), 'captions' list,
    'names' list}."""
    if not os.path.exists(path):
        raise cli.MissingInput(f"caption set {path} does not exist (run stage demo_data)")
    with np.load(path, allow_pickle=False) as z:
        missing = {"images", "labels", "captions", "names"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: not a caption set, missing {sorted(missing)}")
        out = {"images": np.asarray(z["images"]), "labels": np.asarray(z["labels"]),
               "captions": [str(c) for c in z["captions"]],
               "names": [str(n) for n in z["names"]]}
    if out["images"].ndim != 4 or out["images"].shape[0] != len(out["labels"]):
        raise ValueError(f"{path}: images {out['images'].shape} do not match "
                         f"{len(out['labels'])} labels")
    return out


def _has_segmentations(ann_file: str) -> bool:
    """Whether a written split carries masks (files of versions before the Mask R-CNN
    branch have boxes only: they stay loadable, and demo_data rewrites them)."""
    with open(ann_file) as f:
        anns = json.load(f).get("annotations", [])
    return all("segmentation" in a for a in anns)


def write_world(root: str, spec: WorldSpec, *, train_images: int, val_images: int,
                captions_per_category: int, heldout_per_category: int, seed: int = 0,
                log=print) -> dict:
    """Writes whatever of the world is missing under `root`; returns detection_paths."""
    p = detection_paths(root)
    for split, n in (("train", train_images), ("val", val_images)):
        if os.path.exists(p[f"{split}_ann"]) and _has_segmentations(p[f"{split}_ann"]):
            log(f"[demo_data] {p[f'{split}_ann']} exists, skipping")
            continue
        write_detection_split(root, spec, n, seed, split)
        log(f"[demo_data] wrote {n} {split} scenes to {root}")
    for split, n in (("train", captions_per_category), ("heldout", heldout_per_category)):
        path = p[f"captions_{split}"]
        if os.path.exists(path):
            log(f"[demo_data] {path} exists, skipping")
            continue
        write_caption_set(path, spec, n, seed, split)
        log(f"[demo_data] wrote {split} caption images ({n} per category + object-free "
            f"ones) to {path}")
    return p


__all__ = ["CATALOG", "DEFAULT_BASE", "DEFAULT_NOVEL", "CAPTION_TEMPLATES", "EMPTY_CAPTION",
           "WorldSpec", "spec_from_config", "render_scene", "render_caption_image",
           "render_empty_image", "detection_paths",
           "write_detection_split", "write_caption_set", "load_caption_set", "write_world"]
