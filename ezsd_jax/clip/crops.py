"""Batched box crops for CLIP, on device: enlarge, clip, zero-pad to a square, resize,
normalize - the reference's per-box PIL preprocessing as one jittable function.

Called inside the jitted steps of CLIP re-normalization (GT crops at 1.2x) and CLIP
proposals (candidate crops at 1.0x, feature crops at 1.2x); nothing is cropped on the host.
Crop convention and the summed-area-table implementation: docs/code-notes.md.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ezsd_jax.clip.loading import CLIP_MEAN, CLIP_STD

METHODS = ("bicubic", "bilinear")


def _kernel(x: jnp.ndarray, method: str) -> jnp.ndarray:
    ax = jnp.abs(x)
    if method == "bicubic":          # PIL / Keys cubic, a = -0.5
        a = -0.5
        near = ((a + 2.0) * ax - (a + 3.0)) * ax * ax + 1.0
        far = (((ax - 5.0) * ax + 8.0) * ax - 4.0) * a
        return jnp.where(ax < 1.0, near, jnp.where(ax < 2.0, far, 0.0))
    if method == "bilinear":
        return jnp.maximum(1.0 - ax, 0.0)
    raise ValueError(f"crops: method must be one of {METHODS}, got {method!r}")


class CropSpec:
    """Static settings of one crop configuration."""

    def __init__(self, out_size: int = 224, enlarge: float = 1.0, method: str = "bicubic",
                 window: int | None = None, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD,
                 clip_range: tuple[float, float] | None = (0.0, 255.0),
                 out_dtype: Any = jnp.float32):
        if method not in METHODS:
            raise ValueError(f"crops: method must be one of {METHODS}, got {method!r}")
        if enlarge <= 0:
            raise ValueError(f"crops: enlarge must be > 0, got {enlarge}")
        self.out = int(out_size)
        self.enlarge = float(enlarge)
        self.method = method
        self.P = int(window) if window is not None else 2 * self.out
        if self.P < 1 or self.out < 1:
            raise ValueError(f"crops: out_size and window must be >= 1, got {self.out}, "
                             f"{self.P}")
        self.mean = np.asarray(mean, np.float32).reshape(3)
        self.std = np.asarray(std, np.float32).reshape(3)
        self.clip_range = clip_range
        self.out_dtype = out_dtype


# ----------------------------------------------------------------------------- integral

def integral_image(image: jnp.ndarray) -> jnp.ndarray:
    """[H, W, 3] -> [H+1, W+1, 3] int32 summed-area table (I[y, x] = sum of image[:y, :x]).

    Integer so that block sums are exact; float images are rounded to integer levels
    first (the pipeline's images are uint8)."""
    h, w = image.shape[0], image.shape[1]
    if h * w * 255 >= 2 ** 31:
        raise ValueError(f"crops: image {h}x{w} too large for an int32 integral image")
    x = image if jnp.issubdtype(image.dtype, jnp.integer) else jnp.round(image)
    x = x.astype(jnp.int32)
    x = jnp.cumsum(jnp.cumsum(x, axis=0), axis=1)
    return jnp.pad(x, ((1, 0), (1, 0), (0, 0)))


# ----------------------------------------------------------------------------- geometry

def crop_bounds(boxes: jnp.ndarray, hw: jnp.ndarray, enlarge: float) -> jnp.ndarray:
    """boxes [..., 4] xyxy, hw [..., 2] (valid h, w) -> integer-valued float32 crop bounds
    [..., 4] (X0, Y0, X1, Y1): enlarged, snapped outwards, clipped to the valid region,
    at least one pixel."""
    b = jnp.nan_to_num(jnp.asarray(boxes, jnp.float32))
    hw = jnp.asarray(hw, jnp.float32)
    H, W = hw[..., 0], hw[..., 1]
    e = (enlarge - 1.0) / 2.0
    bw, bh = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    x0 = jnp.floor(jnp.clip(b[..., 0] - e * bw, 0.0, W))
    y0 = jnp.floor(jnp.clip(b[..., 1] - e * bh, 0.0, H))
    x1 = jnp.ceil(jnp.clip(b[..., 2] + e * bw, 0.0, W))
    y1 = jnp.ceil(jnp.clip(b[..., 3] + e * bh, 0.0, H))
    x0 = jnp.minimum(x0, jnp.maximum(W - 1.0, 0.0))
    y0 = jnp.minimum(y0, jnp.maximum(H - 1.0, 0.0))
    x1 = jnp.maximum(x1, x0 + 1.0)
    y1 = jnp.maximum(y1, y0 + 1.0)
    return jnp.stack([x0, y0, x1, y1], axis=-1)


def square_of(bounds: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """crop bounds [..., 4] -> (square origin x, origin y, side S) in pixels."""
    cw = bounds[..., 2] - bounds[..., 0]
    ch = bounds[..., 3] - bounds[..., 1]
    s = jnp.maximum(cw, ch)
    return (bounds[..., 0] - jnp.floor((s - cw) / 2.0),
            bounds[..., 1] - jnp.floor((s - ch) / 2.0), s)


def _axis_plan(sq, side, c0, c1, f, spec: CropSpec):
    """One axis of one box: block edges [P+1] (clamped to the crop, for the integral image),
    weights [out, P] mapping block averages to output pixels, and 1 / pixels per block."""
    P, out = spec.P, spec.out
    p = jnp.arange(P + 1, dtype=jnp.float32)
    edges = sq + p * f                                          # block p: [e_p, e_p+1)
    idx = jnp.clip(edges, c0, c1).astype(jnp.int32)             # crop pixels only
    n = jnp.clip(jnp.minimum(edges[1:], sq + side) - edges[:-1], 0.0, f)  # in-square pixels
    centre = edges[:-1] + n / 2.0
    scale = side / out
    fs = jnp.maximum(scale, 1.0)
    c_o = sq + (jnp.arange(out, dtype=jnp.float32) + 0.5) * scale
    w = _kernel((centre[None, :] - c_o[:, None]) / fs, spec.method) * n[None, :]
    tot = w.sum(axis=1, keepdims=True)
    w = w / jnp.where(tot != 0.0, tot, 1.0)
    return idx, w, 1.0 / jnp.maximum(n, 1.0)


def _crop_one(ii: jnp.ndarray, box: jnp.ndarray, hw: jnp.ndarray, spec: CropSpec):
    """Integral image [H+1, W+1, 3] of one image, box [4], hw [2] -> crop [out, out, 3].

    The square is cut into P x P blocks of f x f pixels (f = ceil(S / P), 1 when the
    square fits the window); block sums of the crop's pixels come from the integral image
    (zero outside the crop = the zero padding), so for f = 1 the blocks are the pixels and
    the result is PIL's resampling of the padded square; for f > 1 the kernel is applied to
    block averages at their centres (a box prefilter; crop and square edges stay exact).
    """
    bounds = crop_bounds(box, hw, spec.enlarge)
    sx, sy, s = square_of(bounds)
    f = jnp.maximum(jnp.ceil(s / spec.P), 1.0)
    iy, wy, ny = _axis_plan(sy, s, bounds[1], bounds[3], f, spec)
    ix, wx, nx = _axis_plan(sx, s, bounds[0], bounds[2], f, spec)
    g = ii[iy[:, None], ix[None, :]]                            # [P+1, P+1, 3] int32
    sums = g[1:, 1:] - g[:-1, 1:] - g[1:, :-1] + g[:-1, :-1]    # exact block sums
    avg = sums.astype(jnp.float32) * (ny[:, None, None] * nx[None, :, None])
    # fp32 output: exact fp32 matmuls; bf16 output (bf16 CLIP): default precision, whose
    # error (~1/256 of a value) is below the bf16 output's own rounding.
    hi = (jax.lax.Precision.HIGHEST if jnp.dtype(spec.out_dtype) == jnp.float32
          else jax.lax.Precision.DEFAULT)
    tmp = jnp.einsum("rpc,op->roc", avg, wx, precision=hi)     # horizontal pass
    if spec.clip_range is not None:
        tmp = jnp.clip(tmp, *spec.clip_range)
    out = jnp.einsum("qr,roc->qoc", wy, tmp, precision=hi)     # vertical pass
    if spec.clip_range is not None:
        out = jnp.clip(out, *spec.clip_range)
    out = (out / 255.0 - spec.mean) / spec.std
    return out.astype(spec.out_dtype)


# ----------------------------------------------------------------------------- public

def _check_inputs(images, boxes, image_hw):
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"crops: images must be [B, H, W, 3], got {images.shape}")
    if image_hw is None:
        image_hw = jnp.broadcast_to(jnp.asarray(images.shape[1:3], jnp.int32),
                                    (images.shape[0], 2))
    image_hw = jnp.asarray(image_hw)
    if image_hw.shape != (images.shape[0], 2):
        raise ValueError(f"crops: image_hw must be [B, 2] = {(images.shape[0], 2)}, got "
                         f"{image_hw.shape}")
    return image_hw


def map_crops(fn: Callable[[jnp.ndarray], Any], images: jnp.ndarray, boxes: jnp.ndarray,
              image_hw: jnp.ndarray | None = None, *, enlarge: float = 1.0,
              out_size: int = 224, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD, method: str = "bicubic", chunk: int = 64,
              window: int | None = None, out_dtype: Any = jnp.float32) -> Any:
    """Crops boxes chunk by chunk and applies `fn` to each chunk of crops.

    images [B, H, W, 3] (uint8 or float in 0..255, the padded batch), boxes [B, N, 4] xyxy
    pixels, image_hw [B, 2] valid (h, w) of each image (None: the whole array).
    fn(crops [B, c, out, out, 3]) -> pytree of arrays with leading axes [B, c]; the
    result is that pytree with leading axes [B, N]. Only one chunk of crops
    (c = min(chunk, N)) exists at a time, so `fn` can be e.g. the CLIP image tower and
    memory stays bounded for any N. Meant to be called inside a jitted function (all
    settings are static); eagerly it runs op by op.
    """
    images = jnp.asarray(images)
    boxes = jnp.asarray(boxes, jnp.float32)
    image_hw = _check_inputs(images, boxes, image_hw)
    if boxes.ndim != 3 or boxes.shape[0] != images.shape[0] or boxes.shape[-1] != 4:
        raise ValueError(f"crops: boxes must be [B={images.shape[0]}, N, 4], got "
                         f"{boxes.shape}")
    spec = CropSpec(out_size, enlarge, method, window, mean, std, out_dtype=out_dtype)
    b, n = boxes.shape[0], boxes.shape[1]
    iis = jax.vmap(integral_image)(images)
    one = jax.vmap(jax.vmap(lambda ii, bx, hw: _crop_one(ii, bx, hw, spec),
                            in_axes=(None, 0, None)), in_axes=(0, 0, 0))
    c = max(1, min(int(chunk), n))
    nc = -(-n // c)
    if nc == 1:
        return fn(one(iis, boxes, image_hw))
    padded = jnp.pad(boxes, ((0, 0), (0, nc * c - n), (0, 0)))
    xs = jnp.moveaxis(padded.reshape(b, nc, c, 4), 1, 0)              # [nc, B, c, 4]
    ys = lax.map(lambda bx: fn(one(iis, bx, image_hw)), xs)          # [nc, B, c, ...]

    def unchunk(y):
        y = jnp.moveaxis(y, 0, 1)
        return y.reshape((b, nc * c) + y.shape[3:])[:, :n]
    return jax.tree_util.tree_map(unchunk, ys)


def crop_boxes(images: jnp.ndarray, boxes: jnp.ndarray, image_hw: jnp.ndarray | None = None,
               enlarge: float = 1.0, out_size: int = 224,
               mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
               method: str = "bicubic", chunk: int = 64, window: int | None = None,
               out_dtype: Any = jnp.float32) -> jnp.ndarray:
    """images [B, H, W, 3], boxes [B, N, 4], image_hw [B, 2] -> [B, N, out, out, 3]
    CLIP-normalized crops (see the module docstring for the exact convention).
    Compiled once per shape/setting (a jitted function; inlined under an outer jit)."""
    images = jnp.asarray(images)
    image_hw = _check_inputs(images, boxes, image_hw)
    return _crop_boxes_jit(images, jnp.asarray(boxes, jnp.float32), image_hw,
                           float(enlarge), int(out_size), _tuple3(mean), _tuple3(std), method,
                           int(chunk), window, out_dtype)


def _tuple3(v) -> tuple:
    return tuple(float(x) for x in np.asarray(v, np.float64).reshape(3))


def _identity(x):
    return x


@partial(jax.jit, static_argnums=tuple(range(3, 11)))
def _crop_boxes_jit(images, boxes, image_hw, enlarge, out_size, mean, std, method, chunk,
                    window, out_dtype):
    return map_crops(_identity, images, boxes, image_hw, enlarge=enlarge, out_size=out_size,
                     mean=mean, std=std, method=method, chunk=chunk, window=window,
                     out_dtype=out_dtype)


def crop_flat(images: jnp.ndarray, boxes: jnp.ndarray, image_index: jnp.ndarray,
              image_hw: jnp.ndarray | None = None, *, groups: int = 1, enlarge: float = 1.0,
              out_size: int = 224, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD, method: str = "bicubic",
              window: int | None = None, out_dtype: Any = jnp.float32) -> jnp.ndarray:
    """A flat list of crops from a batch: boxes [K, 4], image_index [K] -> [K, out, out, 3].

    With `groups` = G > 1 the batch and the crop list are split into G equal consecutive
    groups and crop k of group g must come from an image of group g (image_index is then
    the index within the group): with images and crops both sharded over G devices on
    their leading axis, every crop reads only its own device's images.
    """
    images = jnp.asarray(images)
    image_hw = _check_inputs(images, boxes, image_hw)
    boxes = jnp.asarray(boxes, jnp.float32)
    image_index = jnp.asarray(image_index, jnp.int32)
    return _crop_flat_jit(images, boxes, image_index, image_hw, int(groups), float(enlarge),
                          int(out_size), _tuple3(mean), _tuple3(std), method, window,
                          out_dtype)


@partial(jax.jit, static_argnums=tuple(range(4, 12)))
def _crop_flat_jit(images, boxes, image_index, image_hw, groups, enlarge, out_size, mean, std,
                   method, window, out_dtype):
    k, b = boxes.shape[0], images.shape[0]
    if boxes.shape != (k, 4) or image_index.shape != (k,):
        raise ValueError(f"crop_flat: boxes must be [K, 4] and image_index [K], got "
                         f"{boxes.shape} and {image_index.shape}")
    if b % groups or k % groups:
        raise ValueError(f"crop_flat: batch {b} and crop count {k} must be divisible by "
                         f"groups={groups}")
    spec = CropSpec(out_size, enlarge, method, window, mean, std, out_dtype=out_dtype)
    iis = jax.vmap(integral_image)(images)
    iis = iis.reshape((groups, b // groups) + iis.shape[1:])
    hw_g = image_hw.reshape(groups, b // groups, 2)

    def group(ii, hw, bx, idx):
        return jax.vmap(lambda bb, i: _crop_one(ii[i], bb, hw[i], spec))(bx, idx)

    out = jax.vmap(group)(iis, hw_g, boxes.reshape(groups, k // groups, 4),
                          image_index.reshape(groups, k // groups))
    return out.reshape((k,) + out.shape[2:])


def crop_flops(out_size: int = 224, window: int | None = None) -> float:
    """Multiply-adds per crop of the resampling matmuls (for cost estimates)."""
    p = 2 * out_size if window is None else window
    return 3.0 * (p * p * out_size + out_size * out_size * p)


__all__ = ["METHODS", "CropSpec", "integral_image", "crop_bounds", "square_of", "map_crops",
           "crop_boxes", "crop_flat", "crop_flops"]
