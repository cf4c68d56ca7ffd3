"""Host-side (numpy/PIL) image and box transforms: resize, horizontal flip, pad.

`prepare_example` takes one example from the original image to the static padded input
(boxes follow, so they are in padded-input pixels); `boxes_to_input` / `boxes_to_original`
map other boxes in and predictions back. The uint8 padding is 0; the detector zeroes the
padded canvas after normalization (model.input_padding='mean'). Steps: docs/code-notes.md.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ezsd_jax.data.coco import DataError


def resize_scale(h: int, w: int, short_side: int, max_side: int) -> float:
    """Scale taking the short side to `short_side` unless the long side would then exceed
    `max_side` (then the long side goes to `max_side`)."""
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    scale = short_side / min(h, w)
    if max(h, w) * scale > max_side:
        scale = max_side / max(h, w)
    return float(scale)


def resized_hw(h: int, w: int, scale: float) -> tuple[int, int]:
    """Integer size of an h x w image resized by `scale` (round half up, at least 1)."""
    return max(1, int(np.floor(h * scale + 0.5))), max(1, int(np.floor(w * scale + 0.5)))


def resize_image(img: np.ndarray, scale: float,
                 size_hw: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 HxWx3 -> resized uint8 (PIL bilinear); size_hw overrides the rounded size."""
    h, w = img.shape[:2]
    nh, nw = resized_hw(h, w, scale) if size_hw is None else size_hw
    if (nh, nw) == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))


def hflip_image(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img[:, ::-1])


def pad_image(img: np.ndarray, out_h: int, out_w: int,
              out: np.ndarray | None = None) -> np.ndarray:
    """Zero-pads at the bottom/right to out_h x out_w (writes into `out` if given)."""
    h, w = img.shape[:2]
    if h > out_h or w > out_w:
        raise ValueError(f"image {h}x{w} does not fit the padded size {out_h}x{out_w}")
    if out is None:
        out = np.zeros((out_h, out_w) + img.shape[2:], img.dtype)
    else:
        if out.shape[:2] != (out_h, out_w):
            raise ValueError(f"out has shape {out.shape}, expected ({out_h}, {out_w}, ...)")
        out[h:] = 0
        out[:h, w:] = 0
    out[:h, :w] = img
    return out


def transform_boxes(boxes: np.ndarray, scale: float, flip: bool,
                    width_after_resize: float) -> np.ndarray:
    """xyxy boxes in original pixels -> resized (and flipped within the resized width)."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4) * np.float32(scale)
    if flip:
        w = np.float32(width_after_resize)
        b = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1)
    return b.astype(np.float32)


def example_info(record: Any, image_hw_out: tuple[int, int], short_side: int,
                 max_side: int, flip: bool) -> dict:
    """Geometry of one example, computed from the record's size alone (no decoding).

    The scale is the usual short/max-side rule, lowered if needed so that the resized
    image fits the padded input `image_hw_out` (never cropped)."""
    h, w = int(record.height), int(record.width)
    out_h, out_w = image_hw_out
    scale = min(resize_scale(h, w, short_side, max_side), out_h / h, out_w / w)
    nh, nw = resized_hw(h, w, scale)
    nh, nw = min(nh, out_h), min(nw, out_w)
    return {"image_id": int(record.image_id), "scale": float(scale), "flipped": bool(flip),
            "resized_hw": (nh, nw), "orig_hw": (h, w), "padded_hw": (int(out_h), int(out_w))}


def boxes_to_input(boxes: np.ndarray, info: dict) -> np.ndarray:
    """Original-image xyxy boxes -> pixels of the prepared (resized, flipped, padded)
    input, clipped to the resized image. For extra_fn: stored proposals follow the image."""
    nh, nw = info["resized_hw"]
    b = transform_boxes(boxes, info["scale"], info["flipped"], nw)
    b[:, 0::2] = np.clip(b[:, 0::2], 0, nw)
    b[:, 1::2] = np.clip(b[:, 1::2], 0, nh)
    return b


def boxes_to_original(boxes: np.ndarray, info: dict) -> np.ndarray:
    """Inverse of `boxes_to_input` (without the clipping): input pixels -> original."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    if info["flipped"]:
        w = np.float32(info["resized_hw"][1])
        b = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1)
    return (b / np.float32(info["scale"])).astype(np.float32)


def prepare_example(record: Any, image: np.ndarray, image_hw_out: tuple[int, int],
                    short_side: int, max_side: int, flip: bool,
                    out: np.ndarray | None = None) -> dict:
    """Decoded original image + its record -> dict(image, boxes, classes, info).

    image: uint8 [out_h, out_w, 3] (resized, flipped if `flip`, zero-padded; written into
    `out` if given); boxes float32 [n, 4] in its pixels; classes int32 [n]; info from
    `example_info`. The decoded size must match the record (else boxes would be wrong).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{record.path}: expected a uint8 HxWx3 image, got "
                         f"{image.dtype} {image.shape}")
    if image.shape[:2] != (record.height, record.width):
        raise DataError(f"{record.path} (image id={record.image_id}): decoded size "
                        f"{image.shape[0]}x{image.shape[1]} (HxW) differs from the "
                        f"annotation's {record.height}x{record.width}")
    info = example_info(record, image_hw_out, short_side, max_side, flip)
    img = resize_image(image, info["scale"], info["resized_hw"])
    if flip:
        img = hflip_image(img)
    img = pad_image(img, *image_hw_out, out=out)
    boxes = boxes_to_input(record.boxes, info)
    return {"image": img, "boxes": boxes, "classes": np.asarray(record.classes, np.int32),
            "info": info}
