"""config.data.source='tfds': a TensorFlow Datasets detection builder (coco/2017, lvis, or
any builder with their features) read into the same CocoDataset records that data/coco.py
makes from a COCO JSON, so the same pipeline, splits and training run on it.

Reads prepared array_record files through `tfds.data_source` (no TensorFlow needed), the
images as their encoded bytes, decoded by core/images like image files. Boxes: tfds's
normalized [ymin, xmin, ymax, xmax] times the upright image size; crowd objects dropped;
masks from the builder's per-object 'segmentation' images (lvis), as COCO RLE; records
in image-id order. Category
ids: those of the split's annotation JSON by name (config.data.<split>_ann; evaluation
needs that file), else label index + 1. Details: docs/data.md.
"""
from __future__ import annotations

import functools
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from ezsd_jax.core.errors import DataError
from ezsd_jax.core.images import check_image
from ezsd_jax.data.coco import (CocoDataset, ImageRecord, _parse_categories,
                                _select_categories, read_json)
from ezsd_jax.data.segmentation import segmentation_rle

log = logging.getLogger(__name__)

SPLIT_FIELDS = {"train": "tfds_train_split", "val": "tfds_val_split"}


def open_source(name: str, split: str, data_dir: str | None):
    """tfds.data_source over the prepared builder, images left encoded (bytes)."""
    import tensorflow_datasets as tfds
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None,
                                decoders={"image": tfds.decode.SkipDecoding()},
                                try_gcs=False)
    except Exception as e:  # noqa: BLE001 -- tfds raises many types for a missing builder
        raise DataError(f"config.data.tfds_name={name!r} split {split!r} (data_dir "
                        f"{data_dir or 'default'}): cannot open the prepared dataset: "
                        f"{type(e).__name__}: {e}".splitlines()[0]) from None


def _image_bytes(source, index: int) -> bytes:
    return source[index]["image"]


def _category_ids(label_names: Sequence[str], ann_file: str) -> dict[int, int]:
    """tfds label index -> category id: the annotation JSON's id of the same name, or
    index + 1 without a JSON."""
    if not ann_file:
        return {k: k + 1 for k in range(len(label_names))}
    id_to_name, _ = _parse_categories(read_json(ann_file), ann_file)
    by_name = {n: i for i, n in id_to_name.items()}
    missing = [n for n in label_names if n not in by_name]
    if missing:
        raise DataError(f"{ann_file}: categories of the tfds builder not in the file: "
                        f"{missing[:10]}")
    return {k: by_name[n] for k, n in enumerate(label_names)}


def load_tfds(dcfg, split: str, category_names: Sequence[str] | None = None,
              with_masks: bool = False, source=None) -> CocoDataset:
    """The records of config.data's tfds builder for `split` ('train' | 'val'), the
    categories `category_names` in that order (None: all, by category id), like
    data/coco.load_coco. source: an opened data source (tests); default open_source."""
    name = dcfg.tfds_name
    tsplit = dcfg.get(SPLIT_FIELDS[split], split)
    if source is None:
        source = open_source(name, tsplit, dcfg.get("tfds_data_dir", ""))
    where = f"tfds {name}/{tsplit}"
    objects = source.dataset_info.features["objects"].feature
    label_names = list(objects["label"].names)
    if with_masks and "segmentation" not in objects:
        raise DataError(f"{where} has no per-object masks (objects: {sorted(objects.keys())})"
                        "; a Mask R-CNN (config.model.mask_on) needs them: use a builder "
                        "with masks (lvis) or --config.model.mask_on=False")
    ann_file = dcfg.get(f"{split}_ann", "") or ""
    label_to_id = _category_ids(label_names, ann_file)
    id_to_name = {label_to_id[k]: n for k, n in enumerate(label_names)}
    cat_ids, cat_names = _select_categories(id_to_name, category_names, where)
    cat_to_class = {cid: k for k, cid in enumerate(cat_ids)}
    on_error = dcfg.get("on_error", "raise")
    skipped: dict[str, int] = defaultdict(int)

    def one(i: int):
        ex = source[i]
        iid = int(ex["image/id"]) if "image/id" in ex else i
        path = f"{where}[{i}] (image id={iid})"
        try:
            h, w = check_image(ex["image"])
        except DataError as e:
            return None, ("unreadable_image", f"{path}: {e}")
        obj = ex["objects"]
        boxes_n = np.asarray(obj["bbox"], np.float32).reshape(-1, 4)
        labels = np.asarray(obj["label"], np.int64).reshape(-1)
        crowd = np.asarray(obj.get("is_crowd", np.zeros(len(labels), bool)), bool).reshape(-1)
        masks = obj.get("segmentation") if with_masks else None
        ids = np.asarray(obj["id"]).reshape(-1) if "id" in obj else np.arange(len(labels))
        lens = {len(boxes_n), len(labels), len(crowd), len(ids)} | (
            {len(masks)} if masks is not None else set())
        if len(lens) != 1:
            return None, ("bad_objects", f"{path}: object fields of different lengths")
        counts: dict[str, int] = defaultdict(int)
        boxes, classes, segms, aids = [], [], [], []
        for j in range(len(labels)):
            if crowd[j]:
                counts["crowd"] += 1
                continue
            cid = label_to_id.get(int(labels[j]))
            if cid is None:
                return None, ("unknown_category", f"{path}: label {int(labels[j])} outside "
                                                  f"the builder's {len(label_names)} labels")
            if cid not in cat_to_class:
                counts["unselected_category"] += 1
                continue
            y1, x1, y2, x2 = (float(v) for v in boxes_n[j])
            x1, x2 = max(x1 * w, 0.0), min(x2 * w, float(w))
            y1, y2 = max(y1 * h, 0.0), min(y2 * h, float(h))
            if not (x2 > x1 and y2 > y1):
                return None, ("degenerate_box", f"{path}: object {j} has an empty box "
                                                f"{boxes_n[j].tolist()} (normalized)")
            if masks is not None:
                from pycocotools import mask as mask_util
                m = np.asarray(masks[j]).reshape(np.asarray(masks[j]).shape[:2]) > 0
                rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                try:
                    segmentation_rle(rle, h, w, f"{path} object {j}")
                except DataError as e:
                    return None, ("bad_segmentation", str(e))
                segms.append(rle)
                aids.append(int(ids[j]))
            boxes.append((x1, y1, x2, y2))
            classes.append(cat_to_class[cid])
        rec = ImageRecord(
            image_id=iid, path=path, height=int(h), width=int(w),
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
            classes=np.asarray(classes, np.int32).reshape(-1),
            segmentations=segms if with_masks else None,
            ann_ids=aids if with_masks else None,
            read=functools.partial(_image_bytes, source, i))
        return rec, counts

    records: list[ImageRecord] = []
    seen: set[int] = set()
    with ThreadPoolExecutor(max(1, int(dcfg.get("num_threads", 8)))) as pool:
        for rec, info in pool.map(one, range(len(source))):
            if rec is None:
                reason, msg = info
                if on_error == "raise":
                    raise DataError(msg)
                skipped[reason] += 1
                continue
            if rec.image_id in seen:
                raise DataError(f"{where}: duplicate image id {rec.image_id}")
            seen.add(rec.image_id)
            for k, v in info.items():
                skipped[k] += v
            records.append(rec)
    records.sort(key=lambda r: r.image_id)      # tfds shuffles at preparation: id order
    errors = {k: v for k, v in skipped.items() if k not in ("crowd", "unselected_category")}
    if errors:
        log.warning("%s: skipped bad input %s", where, errors)
    return CocoDataset(records=records, cat_ids=cat_ids, cat_names=cat_names,
                       ann_file=ann_file, skipped=dict(skipped))


__all__ = ["load_tfds", "open_source", "SPLIT_FIELDS"]
