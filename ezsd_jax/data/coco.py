"""COCO-format annotations -> validated per-image records (the first step of the data layer).

`load_coco` reads a COCO (or LVIS) annotation JSON, checks it, and returns a `CocoDataset`
of `ImageRecord`s (xyxy boxes in original pixels, class indices 0..C-1); restricting
`category_names` is the zero-shot split mechanism. Details: docs/code-notes.md.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ezsd_jax.core.config_check import ON_ERROR
from ezsd_jax.core.errors import DataError
from ezsd_jax.core.images import check_image
from ezsd_jax.data.segmentation import segmentation_rle
from ezsd_jax.core.io_utils import atomic_write_json

log = logging.getLogger(__name__)

_IMAGE_KEYS = ("id", "height", "width")
_ANN_KEYS = ("id", "image_id", "category_id", "bbox")
_MAX_ID = 2 ** 31 - 1  # image ids travel as int32 in batches (-1 = padding)


@dataclass
class ImageRecord:
    image_id: int
    path: str
    height: int
    width: int
    boxes: np.ndarray    # float32 [n, 4] xyxy, absolute pixels of the original image
    classes: np.ndarray  # int32 [n], contiguous 0..C-1
    # with_masks: each box's COCO 'segmentation' (validated), in box order; else None
    segmentations: list | None = None
    ann_ids: list | None = None   # with_masks: each box's annotation id (error messages)
    # the image's encoded bytes where it is no file (a tfds source); None: read `path`
    read: Callable[[], bytes] | None = field(default=None, repr=False, compare=False)


@dataclass
class CocoDataset:
    records: list[ImageRecord]
    cat_ids: list[int]    # contiguous index -> COCO category id
    cat_names: list[str]  # contiguous index -> name
    ann_file: str
    skipped: dict[str, int] = field(default_factory=dict)  # dropped items by reason
    clipped: int = 0      # boxes partially outside their image, clipped and kept
    _coco: Any = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.records)

    def coco(self):
        """The pycocotools COCO object of `ann_file` (loaded once, on first use).

        It holds the file as written, i.e. all of its categories; evaluate against a file
        written by `write_split` to restrict the categories.
        """
        if self._coco is None:
            if not self.ann_file:
                raise DataError("evaluation needs the split's annotation JSON (a tfds source "
                                "has none): set config.data.val_ann to the COCO/LVIS file "
                                "(instances_val2017.json, lvis_v1_val.json)")
            from pycocotools.coco import COCO
            data = read_json(self.ann_file)
            coco = COCO()
            coco.dataset = data
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco


def read_json(path: str) -> dict:
    """Reads an annotation JSON; a missing or malformed file is a DataError naming it."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} "
                        f"(char {e.pos}): {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    return data


def _require_list(data: dict, key: str, path: str) -> list:
    if key not in data:
        raise DataError(f"{path}: missing top-level key '{key}'")
    if not isinstance(data[key], list):
        raise DataError(f"{path}: top-level '{key}' must be a list")
    return data[key]


def _parse_categories(data: dict, path: str) -> tuple[dict[int, str], list[dict]]:
    cats = _require_list(data, "categories", path)
    id_to_name: dict[int, str] = {}
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DataError(f"{path}: categories[{i}] needs keys 'id' and 'name': {c!r:.200}")
        if not _is_int(c["id"]):
            raise DataError(f"{path}: category {c['name']!r} has a non-integer id {c['id']!r}")
        if c["id"] in id_to_name:
            raise DataError(f"{path}: duplicate category id {c['id']}")
        id_to_name[c["id"]] = str(c["name"])
    names = list(id_to_name.values())
    dup = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
    if dup:
        raise DataError(f"{path}: duplicate category names {dup}")
    return id_to_name, cats


def _select_categories(id_to_name: dict[int, str], category_names: Sequence[str] | None,
                       path: str) -> tuple[list[int], list[str]]:
    if category_names is None:
        ids = sorted(id_to_name)
        return ids, [id_to_name[i] for i in ids]
    if isinstance(category_names, str):
        raise DataError("category_names must be a sequence of names, not a single string")
    names = list(category_names)
    if len(set(names)) != len(names):
        raise DataError(f"category_names has duplicates: {names}")
    name_to_id = {n: i for i, n in id_to_name.items()}
    missing = [n for n in names if n not in name_to_id]
    if missing:
        raise DataError(f"{path}: categories not in the file: {missing}")
    return [name_to_id[n] for n in names], names


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return (isinstance(x, (int, float, np.number)) and not isinstance(x, bool)
            and math.isfinite(float(x)))


def _image_path(img: dict, image_dir: str) -> str | None:
    name = img.get("file_name")
    if name is None and isinstance(img.get("coco_url"), str):
        # LVIS v1 images carry only coco_url ".../train2017/000000xxxxxx.jpg": image_dir
        # is then the COCO root holding train2017/ and val2017/.
        name = "/".join(img["coco_url"].split("/")[-2:])
    if not isinstance(name, str) or not name:
        return None
    return os.path.join(image_dir, name)


def load_coco(ann_file: str, image_dir: str, category_names: Sequence[str] | None = None,
              on_error: str = "raise", keep_empty: bool = True,
              check_files: bool = True, num_threads: int = 8,
              with_masks: bool = False) -> CocoDataset:
    """Loads and validates a COCO-format annotation file.

    category_names: keep only these categories, in this order (index = class id); None ->
      all categories sorted by id. Annotations of other categories are dropped (counted
      as 'unselected_category'), but a category id absent from the file is bad input.
    on_error: 'raise' -> DataError at the first bad record; 'skip' -> a bad image is
      dropped, and an image with a bad annotation is dropped whole (a silently missing
      box would turn an object into background); each counted in `skipped` by reason.
    keep_empty: images with no kept box stay (as background-only images).
    check_files: every image file is checked (in `num_threads` threads) before any
      training: a missing, empty, truncated (JPEG/PNG end marker) or unreadable file, or
      one whose upright size (EXIF orientation applied) differs from the annotation's
      height/width, is bad input (reasons 'missing_file', 'unreadable_image',
      'image_size_mismatch'). Only headers and the last bytes are read, not the pixels.

    with_masks: every kept annotation's 'segmentation' (polygons, uncompressed or
      compressed RLE) is validated at the image's size (ops/masks.segmentation_rle:
      malformed polygon, empty RLE, mask of the wrong size -> reason 'bad_segmentation',
      naming the file and the annotation) and kept in ImageRecord.segmentations.

    Boxes partially outside their image are clipped (counted in `clipped`); boxes
    entirely outside, zero-area or negative boxes are bad input. iscrowd=1 annotations
    are ignored (counted as 'crowd').
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    data = read_json(ann_file)
    id_to_name, _ = _parse_categories(data, ann_file)
    cat_ids, cat_names = _select_categories(id_to_name, category_names, ann_file)
    issues = _Issues(ann_file, on_error)
    imgs, order, bad_images = _parse_images(_require_list(data, "images", ann_file),
                                            image_dir, issues)
    per_image, clipped = _parse_annotations(
        _require_list(data, "annotations", ann_file), imgs, bad_images, id_to_name,
        {cid: k for k, cid in enumerate(cat_ids)}, with_masks, issues)
    if check_files:  # after the cheap checks: only files of images still kept
        kept = [iid for iid in order if iid not in bad_images]
        unreadable = set()
        for iid, reason, msg in _check_image_files(imgs, kept, num_threads):
            issues.bad(reason, msg)        # counted by its file reason alone
            unreadable.add(iid)
        order = [iid for iid in order if iid not in unreadable]
    records = _index(order, imgs, per_image, bad_images, keep_empty, with_masks, issues)
    skipped = issues.skipped
    if clipped:
        log.info("%s: clipped %d boxes partially outside their image", ann_file, clipped)
    errors = {k: v for k, v in skipped.items()
              if k not in ("crowd", "unselected_category", "empty_image")}
    if errors:
        log.warning("%s: skipped bad input %s", ann_file, errors)
    return CocoDataset(records=records, cat_ids=cat_ids, cat_names=cat_names,
                       ann_file=ann_file, skipped=dict(skipped), clipped=clipped)


class _Issues:
    """Bad records of one annotation file: raise at the first ('raise') or count by reason
    ('skip')."""

    def __init__(self, ann_file: str, on_error: str):
        self.ann_file, self.on_error = ann_file, on_error
        self.skipped: dict[str, int] = defaultdict(int)

    def bad(self, reason: str, msg: str) -> None:
        if self.on_error == "raise":
            raise DataError(f"{self.ann_file}: {msg}")
        self.skipped[reason] += 1

    def never_skippable(self, msg: str) -> None:
        raise DataError(f"{self.ann_file}: {msg}")


def _parse_images(images: list, image_dir: str, issues: _Issues):
    """-> ({id: {path, h, w}}, ids in file order, ids of dropped images)."""
    imgs: dict[int, dict] = {}
    order: list[int] = []
    bad_images: set[int] = set()
    for i, img in enumerate(images):
        if not isinstance(img, dict):
            issues.bad("bad_image", f"images[{i}] is not an object")
            continue
        missing = [k for k in _IMAGE_KEYS if k not in img]
        path = _image_path(img, image_dir)
        if path is None:
            missing.append("file_name")
        iid = img.get("id")
        if missing:
            issues.bad("image_missing_keys",
                       f"image id={iid} (images[{i}]) is missing keys {missing}")
            if _is_int(iid):
                bad_images.add(int(iid))
            continue
        if not _is_int(iid) or not 0 <= iid <= _MAX_ID:
            issues.bad("bad_image", f"images[{i}] has id {iid!r}: must be an integer in "
                                    "[0, 2^31)")
            continue
        iid = int(iid)
        if iid in imgs or iid in bad_images:
            # A duplicate id makes annotations ambiguous: never skippable.
            issues.never_skippable(f"duplicate image id {iid} (images[{i}])")
        h, w = img["height"], img["width"]
        if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
            issues.bad("bad_image", f"image id={iid} has invalid size height={h!r} width={w!r}")
            bad_images.add(iid)
            continue
        imgs[iid] = {"path": path, "h": int(h), "w": int(w)}
        order.append(iid)
    return imgs, order, bad_images


def _parse_annotations(anns: list, imgs: dict, bad_images: set, id_to_name: dict,
                       cat_to_class: dict, with_masks: bool, issues: _Issues):
    """Validates every annotation; -> ({image id: {boxes, classes, segms, ann_ids}},
    number of boxes clipped to their image). A bad annotation adds its image to
    `bad_images` (an image with a silently missing box would teach background)."""
    ann_ids: set = set()
    per_image: dict[int, dict] = defaultdict(
        lambda: {"boxes": [], "classes": [], "segms": [], "ann_ids": []})
    clipped = 0
    for j, a in enumerate(anns):
        if not isinstance(a, dict):
            issues.bad("ann_missing_keys", f"annotations[{j}] is not an object")
            continue
        aid = a.get("id", f"<none> (annotations[{j}])")
        missing = [k for k in _ANN_KEYS if k not in a]
        if missing:
            issues.bad("ann_missing_keys", f"annotation id={aid} (image id="
                                           f"{a.get('image_id')}) is missing keys {missing}")
            if _is_int(a.get("image_id")):
                bad_images.add(int(a["image_id"]))
            continue
        iid, cid = a["image_id"], a["category_id"]
        where = f"annotation id={aid} (image id={iid})"
        if not isinstance(aid, (int, str)) or isinstance(aid, bool):
            issues.never_skippable(f"annotations[{j}] has id {aid!r}: must be an integer "
                                   "or a string")
        if aid in ann_ids:
            # Evaluation indexes annotations by id: a duplicate is never skippable.
            issues.never_skippable(f"duplicate annotation id {aid} (annotations[{j}])")
        ann_ids.add(aid)
        if not _is_int(iid) or (int(iid) not in imgs and int(iid) not in bad_images):
            issues.bad("unknown_image", f"{where}: image id not in 'images'")
            continue
        iid = int(iid)
        if iid in bad_images:
            continue  # its image is already dropped (and counted)
        if not _is_int(cid) or int(cid) not in id_to_name:
            issues.bad("unknown_category", f"{where}: category_id {cid!r} not in 'categories'")
            bad_images.add(iid)
            continue
        if a.get("iscrowd", 0):
            issues.skipped["crowd"] += 1
            continue
        if int(cid) not in cat_to_class:
            issues.skipped["unselected_category"] += 1
            continue
        box = _checked_box(a["bbox"], imgs[iid], where, issues)
        if box is None:
            bad_images.add(iid)
            continue
        if with_masks:
            try:
                segmentation_rle(a.get("segmentation"), imgs[iid]["h"], imgs[iid]["w"], where)
            except DataError as e:
                issues.bad("bad_segmentation", str(e))
                bad_images.add(iid)
                continue
        rec = per_image[iid]
        if with_masks:
            rec["segms"].append(a["segmentation"])
            rec["ann_ids"].append(aid)
        clipped += box[1]
        rec["boxes"].append(box[0])
        rec["classes"].append(cat_to_class[int(cid)])
    return per_image, clipped


def _checked_box(bb: Any, im: dict, where: str, issues: _Issues):
    """COCO xywh -> ((x1, y1, x2, y2) clipped to the image, whether it was clipped), or
    None (counted) for a malformed, degenerate or fully outside box."""
    if not (isinstance(bb, (list, tuple)) and len(bb) == 4 and all(_is_num(v) for v in bb)):
        issues.bad("bad_box", f"{where}: bbox must be 4 finite numbers [x, y, w, h], "
                              f"got {bb!r:.100}")
        return None
    x, y, bw, bh = (float(v) for v in bb)
    if bw <= 0 or bh <= 0:
        issues.bad("degenerate_box", f"{where}: zero-area or negative box [x,y,w,h]={bb}")
        return None
    H, W = im["h"], im["w"]
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + bw, float(W)), min(y + bh, float(H))
    if x2 <= x1 or y2 <= y1:
        issues.bad("box_outside_image", f"{where}: box [x,y,w,h]={bb} lies entirely outside "
                                        f"the {W}x{H} (WxH) image")
        return None
    return (x1, y1, x2, y2), int((x1, y1, x2, y2) != (x, y, x + bw, y + bh))


def _index(order: list, imgs: dict, per_image: dict, bad_images: set, keep_empty: bool,
           with_masks: bool, issues: _Issues) -> list[ImageRecord]:
    """The kept images in file order as ImageRecords."""
    records: list[ImageRecord] = []
    for iid in order:
        if iid in bad_images:
            issues.skipped["images_dropped"] += 1
            continue
        rec = per_image.get(iid, {"boxes": [], "classes": [], "segms": [], "ann_ids": []})
        if not rec["boxes"] and not keep_empty:
            issues.skipped["empty_image"] += 1
            continue
        im = imgs[iid]
        records.append(ImageRecord(
            image_id=iid, path=im["path"], height=im["h"], width=im["w"],
            boxes=np.asarray(rec["boxes"], np.float32).reshape(-1, 4),
            classes=np.asarray(rec["classes"], np.int32).reshape(-1),
            segmentations=rec["segms"] if with_masks else None,
            ann_ids=rec["ann_ids"] if with_masks else None))
    return records


def _check_image_files(imgs: dict[int, dict], order: list[int], num_threads: int):
    """(image id, reason, message) for every bad image file, in `order` (deterministic
    whatever the thread timing)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(iid: int):
        im = imgs[iid]
        if not os.path.isfile(im["path"]):
            return iid, "missing_file", f"image id={iid}: image file not found: {im['path']}"
        try:
            h, w = check_image(im["path"])
        except DataError as e:
            return iid, "unreadable_image", f"image id={iid}: {e}"
        if (h, w) != (im["h"], im["w"]):
            hint = (" (the stored pixels are that size before the EXIF rotation; "
                    "annotations must be in the upright frame)"
                    if (w, h) == (im["h"], im["w"]) else "")
            return iid, "image_size_mismatch", (
                f"image id={iid}: {im['path']} is {h}x{w} (HxW, upright) but the "
                f"annotation says height={im['h']} width={im['w']}{hint}")
        return None

    with ThreadPoolExecutor(max(1, int(num_threads)), thread_name_prefix="ezsd-check") as ex:
        return [r for r in ex.map(one, order) if r is not None]


def write_split(src_ann_file: str, dst_ann_file: str, category_names: Sequence[str],
                drop_images_without: bool = False) -> str:
    """Writes `src` restricted to `category_names` to `dst` (atomically); returns dst.

    Category ids and all other fields are kept as they are (crowd annotations of kept
    categories too: COCOeval uses them as ignore regions). drop_images_without: drop
    images left without any annotation.
    """
    data = read_json(src_ann_file)
    id_to_name, cats = _parse_categories(data, src_ann_file)
    keep_ids = set(_select_categories(id_to_name, category_names, src_ann_file)[0])
    images = _require_list(data, "images", src_ann_file)
    anns = _require_list(data, "annotations", src_ann_file)
    kept_anns = []
    for j, a in enumerate(anns):
        if not isinstance(a, dict) or "category_id" not in a or "image_id" not in a:
            raise DataError(f"{src_ann_file}: annotation id={_get(a, 'id')} "
                            f"(annotations[{j}]) is missing 'category_id' or 'image_id'")
        if a["category_id"] not in id_to_name:
            raise DataError(f"{src_ann_file}: annotation id={_get(a, 'id')}: category_id "
                            f"{a['category_id']!r} not in 'categories'")
        if a["category_id"] in keep_ids:
            kept_anns.append(a)
    if drop_images_without:
        with_anns = {a["image_id"] for a in kept_anns}
        images = [im for im in images if isinstance(im, dict) and im.get("id") in with_anns]
    out = dict(data)
    out["categories"] = [c for c in cats if c["id"] in keep_ids]
    out["images"] = images
    out["annotations"] = kept_anns
    atomic_write_json(dst_ann_file, out, indent=None)
    return dst_ann_file


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else None
