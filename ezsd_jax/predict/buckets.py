"""Static shapes for predict on arbitrary photos and vocabularies (detector_api.py): the
input-size bucket of an image, the vocabulary-size bucket of a name list, and the padding
of both, so that a folder of mixed-size photos and any vocabulary compile a handful of
programs instead of one per image or per name list.

  - images: resized like evaluation (data/transforms.example_info: short side to
    short_side, long side at most max_side, never beyond the model's image_size), then
    zero-padded bottom/right to the bucket: each side rounded up to a multiple of `step`
    (a multiple of 64, the FPN's coarsest stride), at most the model's image_size. An
    image that eval would pad to image_size gets the same pixels here when its bucket is
    image_size (always for the square demo model);
  - vocabularies: K names padded to the next power of two >= max(K, min_size); the pad
    rows repeat the first name's embedding (the EZSD head's semantic regression takes the
    argmax class, and a tie resolves to the lower, real index) and are masked out of the
    softmax (models/detector.mask_classes: probability exactly 0, never a detection).
"""
from __future__ import annotations

import types
import unicodedata
from typing import Sequence

import numpy as np

from ezsd_jax.data import transforms


def vocab_bucket(k: int, min_size: int = 8) -> int:
    """Padded vocabulary size for k names: the next power of two >= max(k, min_size)."""
    if k < 1:
        raise ValueError("vocabulary is empty: give at least one name")
    n = max(int(k), int(min_size))
    return 1 << (n - 1).bit_length()


def pad_vocabulary(emb: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """[K, D] embeddings -> ([size, D] (pad rows = row 0), valid [size] bool)."""
    emb = np.asarray(emb, np.float32)
    k = emb.shape[0]
    if emb.ndim != 2 or not 1 <= k <= size:
        raise ValueError(f"pad_vocabulary: {emb.shape} embeddings do not fit {size} rows")
    out = np.concatenate([emb, np.repeat(emb[:1], size - k, axis=0)])
    return out, np.arange(size) < k


def normalize_names(names: Sequence[str]) -> list[str]:
    """Names as the model sees them, in the user's order: a UTF-8 BOM dropped, Unicode
    NFC, whitespace collapsed to single spaces and stripped, exact duplicates dropped.
    ValueError for a single string (not a list of names), an empty name, or two names
    that differ only in letter case ("Cat" and "cat" would split one class's scores)."""
    if isinstance(names, (str, bytes)):
        raise ValueError(f"names must be a list of names, got one string {names!r} (e.g. "
                         f"[{names!r}] for one name)")
    out: dict[str, str] = {}                   # casefolded -> the first spelling
    for raw in names:
        n = " ".join(unicodedata.normalize("NFC", str(raw)).replace("\ufeff", "").split())
        if not n:
            raise ValueError(f"names: empty name in {list(names)[:20]!r}")
        prev = out.setdefault(n.casefold(), n)
        if prev != n:
            raise ValueError(f"names {prev!r} and {n!r} differ only in letter case: give "
                             "one of them")
    return list(out.values())


def canonical_names(names: Sequence[str]) -> list[str]:
    """normalize_names, sorted: the order the model sees, whatever order the user gave
    (results are then exactly order invariant)."""
    return sorted(normalize_names(names))


def geometry(h: int, w: int, image_size: Sequence[int], short_side: int, max_side: int,
             step: int = 64) -> dict:
    """Resize geometry of an h x w (upright) image, as evaluation computes it, plus its
    input bucket `padded_hw`; the dict is transforms.example_info's (scale, resized_hw,
    orig_hw, flipped=False, padded_hw)."""
    if step % 64:
        raise ValueError(f"bucket step {step} must be a multiple of 64 (FPN stride)")
    full = (int(image_size[0]), int(image_size[1]))
    rec = types.SimpleNamespace(height=int(h), width=int(w), image_id=0)
    info = transforms.example_info(rec, full, short_side, max_side, flip=False)
    nh, nw = info["resized_hw"]
    info["padded_hw"] = (min(-(-nh // step) * step, full[0]),
                         min(-(-nw // step) * step, full[1]))
    return info


def prepare(image: np.ndarray, info: dict) -> np.ndarray:
    """Decoded uint8 HxWx3 image -> resized and zero-padded to info['padded_hw']."""
    img = transforms.resize_image(image, info["scale"], info["resized_hw"])
    return transforms.pad_image(img, *info["padded_hw"])


__all__ = ["vocab_bucket", "pad_vocabulary", "normalize_names", "canonical_names", "geometry",
           "prepare"]
