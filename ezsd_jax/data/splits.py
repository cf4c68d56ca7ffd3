"""Zero-shot category splits (docs/ezsd-method.md section 0): COCO 48/17, LVIS base/novel by
frequency, explicit name lists; split annotation files; evaluation groups.

Every EZSD stage asks `zeroshot_names(cfg.ezsd, ann_file)` for the base / novel names, in
the annotation file's category-id order, so class indices are stable across stages.
Which stage uses which names, and the training images kept: docs/code-notes.md.
"""
from __future__ import annotations

import os
from typing import Sequence

from ezsd_jax.data.coco import DataError, read_json, write_split
from ezsd_jax.core.config_check import SPLITS

# COCO 48/17 (Bansal et al.; OVR-CNN, ViLD, Detic, EZSD), names as in COCO 2017's JSON.
COCO_NOVEL_17 = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard",
    "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors")
COCO_BASE_48 = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird",
    "horse", "sheep", "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase",
    "frisbee", "skis", "kite", "surfboard", "bottle", "fork", "spoon", "bowl", "banana",
    "apple", "sandwich", "orange", "broccoli", "carrot", "pizza", "donut", "chair", "bed",
    "toilet", "tv", "laptop", "mouse", "remote", "microwave", "oven", "toaster",
    "refrigerator", "book", "clock", "vase", "toothbrush")

# The 80 COCO 2017 categories in id order (predict's --vocabulary=coco).
COCO_80 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush")


def _categories(ann_file: str) -> list[dict]:
    data = read_json(ann_file)
    cats = data.get("categories")
    if not isinstance(cats, list):
        raise DataError(f"{ann_file}: missing top-level list 'categories'")
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DataError(f"{ann_file}: categories[{i}] needs 'id' and 'name'")
    return sorted(cats, key=lambda c: c["id"])


def category_names(ann_file: str) -> list[str]:
    """Every category name of `ann_file`, in category-id order."""
    return [c["name"] for c in _categories(ann_file)]


def order_by_file(names: Sequence[str], ann_file: str) -> list[str]:
    """`names` sorted by their category id in `ann_file`; a name absent from the file is
    a DataError listing them."""
    pos = {c["name"]: i for i, c in enumerate(_categories(ann_file))}
    missing = [n for n in names if n not in pos]
    if missing:
        raise DataError(f"{ann_file}: categories not in the file: {missing}")
    return sorted(names, key=lambda n: pos[n])


def lvis_names(ann_file: str) -> tuple[list[str], list[str]]:
    """LVIS: base = frequent + common, novel = rare, from each category's 'frequency'."""
    base, novel = [], []
    for c in _categories(ann_file):
        f = c.get("frequency")
        if f in ("f", "c"):
            base.append(c["name"])
        elif f == "r":
            novel.append(c["name"])
        else:
            raise DataError(f"{ann_file}: category {c['name']!r} (id {c['id']}) has "
                            f"frequency {f!r}; LVIS categories need 'r', 'c' or 'f'")
    return base, novel


# LVIS v1 (lvis_v1_train.json / lvis_v1_val.json): 1203 categories, 337 of them rare
LVIS_V1_BASE, LVIS_V1_ALL = 866, 1203


def split_sizes(ecfg) -> tuple[int, int, int]:
    """(base names, base + novel names, categories of the training file) of config.ezsd
    without reading an annotation file (for deviceless compilation): COCO 48/17 ->
    (48, 65, 80); 'lvis' -> LVIS v1's (866, 1203, 1203); 'names' -> the configured lists."""
    if ecfg.split == "coco48_17":
        n = len(COCO_BASE_48) + len(COCO_NOVEL_17)
        return len(COCO_BASE_48), n, len(COCO_80)
    if ecfg.split == "lvis":
        return LVIS_V1_BASE, LVIS_V1_ALL, LVIS_V1_ALL
    if ecfg.split == "names":
        n = len(ecfg.base_names) + len(ecfg.novel_names)
        return len(ecfg.base_names), n, n
    raise ValueError(f"config.ezsd.split: unknown split {ecfg.split!r}; one of {SPLITS}")


def zeroshot_names(ecfg, ann_file: str) -> tuple[list[str], list[str]]:
    """(base, novel) names in `ann_file`'s category-id order.

    ecfg.split: 'coco48_17' (the fixed lists above), 'lvis' (frequency field of
    `ann_file`), or 'names' (ecfg.base_names / ecfg.novel_names, e.g. synthetic sets)."""
    split = ecfg.split
    if split == "coco48_17":
        base, novel = list(COCO_BASE_48), list(COCO_NOVEL_17)
    elif split == "lvis":
        return lvis_names(ann_file)
    elif split == "names":
        base, novel = list(ecfg.base_names), list(ecfg.novel_names)
        if not base:
            raise ValueError("config.ezsd.base_names is empty (split='names')")
    else:
        raise ValueError(f"config.ezsd.split: unknown split {split!r}; one of {SPLITS}")
    both = set(base) & set(novel)
    if both:
        raise ValueError(f"config.ezsd: names both base and novel: {sorted(both)}")
    return order_by_file(base, ann_file), order_by_file(novel, ann_file)


def all_names(base: Sequence[str], novel: Sequence[str], ann_file: str) -> list[str]:
    """The joint (generalized) vocabulary in `ann_file`'s category-id order."""
    return order_by_file(list(base) + list(novel), ann_file)


def category_groups(ann_file: str, base: Sequence[str], novel: Sequence[str]
                    ) -> dict[str, list[int]]:
    """Category ids for generalized evaluation: {'all': base+novel, 'novel', 'base'}."""
    name_to_id = {c["name"]: c["id"] for c in _categories(ann_file)}
    missing = [n for n in list(base) + list(novel) if n not in name_to_id]
    if missing:
        raise DataError(f"{ann_file}: categories not in the file: {missing}")
    b = sorted(name_to_id[n] for n in base)
    n_ = sorted(name_to_id[n] for n in novel)
    return {"all": sorted(b + n_), "novel": n_, "base": b}


def make_coco_zeroshot_files(train_ann: str, val_ann: str, out_dir: str,
                             base: Sequence[str] = COCO_BASE_48,
                             novel: Sequence[str] = COCO_NOVEL_17,
                             drop_val_images_without: bool = False) -> dict[str, str]:
    """Writes the zero-shot annotation files (atomically) and returns their paths:

    train: `train_ann` with only base categories and their annotations; EVERY image stays
      (images whose only objects are novel become background-only images).
    val: `val_ann` with the base + novel categories (65 for COCO 48/17); every image stays
      unless drop_val_images_without (then images without any of them are dropped).
    """
    os.makedirs(out_dir, exist_ok=True)
    stem = lambda p: os.path.splitext(os.path.basename(p))[0]  # noqa: E731
    nb, nn_ = len(base), len(novel)
    train_out = os.path.join(out_dir, f"{stem(train_ann)}_base{nb}.json")
    val_out = os.path.join(out_dir, f"{stem(val_ann)}_base{nb}_novel{nn_}.json")
    write_split(train_ann, train_out, order_by_file(base, train_ann))
    write_split(val_ann, val_out, all_names(base, novel, val_ann),
                drop_images_without=drop_val_images_without)
    return {"train": train_out, "val": val_out}


__all__ = ["split_sizes", "LVIS_V1_BASE", "LVIS_V1_ALL", "COCO_BASE_48", "COCO_NOVEL_17", "COCO_80", "SPLITS", "category_names",
           "order_by_file", "lvis_names",
           "zeroshot_names", "all_names", "category_groups", "make_coco_zeroshot_files"]
