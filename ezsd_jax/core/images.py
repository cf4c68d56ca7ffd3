"""The one image decoder: file or bytes -> upright uint8 HxWx3 RGB (every stage reads this).

Training, evaluation, the CLIP stages and predict all decode through `decode_image`, so an
image looks the same to each; `image_size` reads only the header, `check_image` is the
cheap pre-training check. EXIF, bit depth, modes and failures: docs/code-notes.md.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from ezsd_jax.core.errors import DataError

Source = Union[str, os.PathLike, bytes]

_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 or 270 degrees
# Format -> the marker its last bytes must contain (some writers append data after it).
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}
_TAIL_BYTES = 4096


def _name(src: Source) -> str:
    return "<bytes>" if isinstance(src, (bytes, bytearray)) else os.fspath(src)


@contextlib.contextmanager
def _read_errors(name: str, what: str):
    """Whatever PIL or the file system raises while reading `name` -> one DataError."""
    try:
        yield
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{name}: image file not found") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{name}: image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as e:
        raise DataError(f"{name}: {what} ({type(e).__name__}: {e})") from None


def _open(src: Source) -> Image.Image:
    if isinstance(src, (bytes, bytearray)):
        if not src:
            raise DataError("<bytes>: empty image data")
        return Image.open(io.BytesIO(src))
    path = os.fspath(src)
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not an image file")
    if os.path.exists(path) and os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    return Image.open(path)


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16") or (a.size and np.nanmax(a) > 255.0):
            a = a / 257.0
        g = np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        return np.rint(rgba[..., :3] * alpha).astype(np.uint8)
    if mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def decode_image(src: Source) -> np.ndarray:
    """Decodes an image file (or its bytes) to upright uint8 [H, W, 3] RGB.

    Raises DataError naming the file for anything that is not a readable image.
    """
    name = _name(src)
    with _read_errors(name, "cannot decode image"), _open(src) as im:
        im.load()
        upright = ImageOps.exif_transpose(im)
        out = _to_rgb(upright)
    if out.ndim != 3 or out.shape[2] != 3 or min(out.shape[:2]) < 1:
        raise DataError(f"{name}: decoded to an unusable array of shape {out.shape}")
    return np.ascontiguousarray(out)


def image_size(src: Source) -> tuple[int, int]:
    """The upright (height, width) from the header alone; DataError if unreadable."""
    return _header(src, check_end=False)


def check_image(src: Source) -> tuple[int, int]:
    """Header + end marker: the upright (height, width), or DataError for a file that is
    missing, empty, not an image or (JPEG, PNG) truncated. Does not decode the pixels."""
    return _header(src, check_end=True)


def _header(src: Source, check_end: bool) -> tuple[int, int]:
    name = _name(src)
    with _read_errors(name, "not a readable image"), _open(src) as im:
        w, h = im.size
        marker = _END_MARKERS.get(im.format or "") if check_end else None
        if marker is not None and marker not in _tail(src):
            raise DataError(f"{name}: truncated {im.format} file (no end marker)")
        try:
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # a broken EXIF block: the decoder ignores it as well
            orientation = 1
    return (w, h) if orientation in _SWAPS_AXES else (h, w)


def _tail(src: Source) -> bytes:
    if isinstance(src, (bytes, bytearray)):
        return bytes(src[-_TAIL_BYTES:])
    with open(src, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - _TAIL_BYTES))
        return f.read()
