"""Batched on-device crops (ezsd_jax.clip.crops) against the reference's per-box PIL path.

Reference (as EZAD's ClsProposalGenerator.crop_img_to_patches, with W instead of W-1):
enlarge around the centre, floor/ceil to pixels, clip to the valid image, paste into a
zero square at ((S-w)//2, (S-h)//2), PIL resize (bicubic or bilinear), /255, normalize.

Achieved error (grey levels of 0..255, random uint8 noise images, PIL rounds to uint8
after each of its two passes, we do not): max |diff| <= ~1.0, mean ~0.3 when the square
fits the window (S <= P). Squares larger than the window use block averages (box
prefilter): on smooth images mean |diff| ~1-3 levels, max tens of levels at sharp edges.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ezsd_jax.clip.crops import crop_bounds, crop_boxes, crop_flat, map_crops, square_of
from ezsd_jax.clip.loading import CLIP_MEAN, CLIP_STD

MEAN = np.asarray(CLIP_MEAN, np.float32)
STD = np.asarray(CLIP_STD, np.float32)


def ref_crop(img, box, hw, enlarge, out, method):
    h, w = int(hw[0]), int(hw[1])
    x1, y1, x2, y2 = [float(np.float32(v)) for v in box]
    e = (enlarge - 1) / 2
    bw, bh = x2 - x1, y2 - y1
    x0 = math.floor(min(max(x1 - e * bw, 0), w))
    y0 = math.floor(min(max(y1 - e * bh, 0), h))
    xe = math.ceil(min(max(x2 + e * bw, 0), w))
    ye = math.ceil(min(max(y2 + e * bh, 0), h))
    x0, y0 = min(x0, w - 1), min(y0, h - 1)
    xe, ye = max(xe, x0 + 1), max(ye, y0 + 1)
    patch = img[y0:ye, x0:xe]
    ch, cw = patch.shape[:2]
    s = max(ch, cw)
    sq = np.zeros((s, s, 3), np.uint8)
    oy, ox = (s - ch) // 2, (s - cw) // 2
    sq[oy:oy + ch, ox:ox + cw] = patch
    resample = Image.BICUBIC if method == "bicubic" else Image.BILINEAR
    r = np.asarray(Image.fromarray(sq).resize((out, out), resample), np.float32)
    return (r / 255.0 - MEAN) / STD


def random_boxes(rng, b, n, h, w, max_side):
    x1 = rng.uniform(-8, w, (b, n))
    y1 = rng.uniform(-8, h, (b, n))
    bw = rng.uniform(0.3, max_side, (b, n))
    bh = rng.uniform(0.3, max_side, (b, n))
    boxes = np.stack([x1, y1, x1 + bw, y1 + bh], -1)
    # edge cases: touching every border, thin/flat boxes, whole image, degenerate
    boxes[0, 0] = [0, 0, 5.5, 9.2]
    boxes[0, 1] = [w - 7.3, h - 4.1, w + 3.0, h + 3.0]
    boxes[0, 2] = [10.2, 3.0, 11.0, 30.7]          # thin
    boxes[0, 3] = [2.0, 20.1, 40.9, 20.6]          # flat
    boxes[0, 4] = [0, 0, w, h]
    boxes[0, 5] = [12.0, 12.0, 12.0, 12.0]         # zero area
    return boxes.astype(np.float32)


def _to_levels(c):
    return (np.asarray(c, np.float32) * STD + MEAN) * 255.0


def _sides(boxes, hw, enlarge):
    bd = crop_bounds(jnp.asarray(boxes), jnp.asarray(hw)[:, None, :], enlarge)
    return np.asarray(square_of(bd)[2])


@pytest.mark.parametrize("method,enlarge", [("bicubic", 1.0), ("bicubic", 1.2),
                                            ("bilinear", 1.0), ("bilinear", 1.2)])
def test_crops_match_pil_reference(method, enlarge):
    rng = np.random.default_rng(1)
    b, h, w, n, out = 2, 61, 83, 24, 16
    imgs = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
    hw = np.array([[55, 83], [61, 70]], np.int32)
    boxes = random_boxes(rng, b, n, h, w, 40)
    window = 96                                    # every square here fits (S <= 83)
    got = _to_levels(crop_boxes(imgs, boxes, hw, enlarge=enlarge, out_size=out,
                                method=method, chunk=7, window=window))
    assert got.shape == (b, n, out, out, 3)
    assert (_sides(boxes, hw, enlarge) <= window).all()
    errs = np.stack([np.abs(got[i, j] - _to_levels(ref_crop(imgs[i], boxes[i, j], hw[i],
                                                            enlarge, out, method)))
                     for i in range(b) for j in range(n)])
    assert errs.max() <= 1.5, errs.max()           # PIL's per-pass uint8 rounding
    assert errs.mean() <= 0.5, errs.mean()


def test_upsampling_and_identity_sizes():
    """Small boxes are enlarged (upsampling path) and S == out is an exact copy."""
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (1, 40, 40, 3), dtype=np.uint8)
    hw = np.array([[40, 40]], np.int32)
    boxes = np.array([[[3, 4, 19, 20], [10.5, 2.2, 14.1, 9.9], [0, 0, 40, 40]]], np.float32)
    got = _to_levels(crop_boxes(imgs, boxes, hw, out_size=16, window=40))
    np.testing.assert_allclose(got[0, 0], imgs[0, 4:20, 3:19].astype(np.float32), atol=1e-3)
    for j in (1, 2):
        ref = _to_levels(ref_crop(imgs[0], boxes[0, j], hw[0], 1.0, 16, "bicubic"))
        assert np.abs(got[0, j] - ref).max() <= 1.5


def test_large_squares_use_block_averages():
    """Squares larger than the window: box-prefiltered approximation on smooth images."""
    rng = np.random.default_rng(3)
    b, h, w, n, out = 2, 96, 128, 16, 16
    small = rng.integers(0, 256, (b, h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    imgs = np.stack([np.asarray(Image.fromarray(s).resize((w, h), Image.BICUBIC))
                     for s in small])
    hw = np.array([[96, 128], [90, 100]], np.int32)
    boxes = random_boxes(rng, b, n, h, w, 120)
    window = 2 * out
    got = _to_levels(crop_boxes(imgs, boxes, hw, enlarge=1.2, out_size=out, window=window))
    sides = _sides(boxes, hw, 1.2)
    big = sides > window
    assert big.sum() >= 8                          # the approximate path is exercised
    errs = np.stack([np.abs(got[i, j] - _to_levels(ref_crop(imgs[i], boxes[i, j], hw[i],
                                                            1.2, out, "bicubic")))
                     for i in range(b) for j in range(n)]).reshape(b, n, -1)
    assert errs[big].mean() <= 4.0, errs[big].mean()
    assert errs[~big].max() <= 1.5


def test_padding_outside_valid_region_is_never_read():
    rng = np.random.default_rng(4)
    imgs = rng.integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    hw = np.array([[30, 40], [48, 50]], np.int32)
    boxes = random_boxes(rng, 2, 12, 48, 64, 50)
    other = imgs.copy()
    for i, (hh, ww) in enumerate(hw):
        other[i, hh:] = 255
        other[i, :, ww:] = 255
    a = np.asarray(crop_boxes(imgs, boxes, hw, out_size=12, window=24))
    c = np.asarray(crop_boxes(other, boxes, hw, out_size=12, window=24))
    np.testing.assert_array_equal(a, c)


def test_chunks_flat_groups_float_and_jit_agree():
    rng = np.random.default_rng(5)
    b, h, w, n = 4, 40, 52, 10
    imgs = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
    hw = np.array([[40, 52], [33, 52], [40, 41], [20, 30]], np.int32)
    boxes = random_boxes(rng, b, n, h, w, 45)
    kw = dict(out_size=8, window=16, enlarge=1.2)
    ref = np.asarray(crop_boxes(imgs, boxes, hw, chunk=n, **kw))
    for chunk in (3, 64):
        np.testing.assert_allclose(np.asarray(crop_boxes(imgs, boxes, hw, chunk=chunk, **kw)),
                                   ref, atol=1e-5)
    jitted = jax.jit(lambda i, bx, s: crop_boxes(i, bx, s, chunk=4, **kw))
    np.testing.assert_allclose(np.asarray(jitted(imgs, boxes, hw)), ref, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(crop_boxes(imgs.astype(np.float32), boxes, hw, chunk=4, **kw)), ref,
        atol=1e-5)
    # flat list with image indices (any order), and split in 2 groups of 2 images
    flat_img = np.repeat(np.arange(b), n)
    perm = rng.permutation(b * n)
    flat = np.asarray(crop_flat(imgs, boxes.reshape(-1, 4)[perm], flat_img[perm], hw, **kw))
    np.testing.assert_allclose(flat, ref.reshape((b * n,) + ref.shape[2:])[perm], atol=1e-5)
    local = flat_img % 2                          # index within its group of 2 images
    grouped = np.asarray(crop_flat(imgs, boxes.reshape(-1, 4), local, hw, groups=2, **kw))
    np.testing.assert_allclose(grouped, ref.reshape((b * n,) + ref.shape[2:]), atol=1e-5)


def test_map_crops_applies_fn_per_chunk():
    rng = np.random.default_rng(6)
    imgs = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    boxes = random_boxes(rng, 2, 9, 32, 32, 30)
    seen = []

    def fn(c):
        seen.append(c.shape)
        return {"mean": c.mean(axis=(2, 3, 4)), "px": c[:, :, 0, 0]}

    out = jax.jit(lambda i, b: map_crops(fn, i, b, None, out_size=8, chunk=4))(imgs, boxes)
    full = np.asarray(crop_boxes(imgs, boxes, None, out_size=8))
    assert seen[0] == (2, 4, 8, 8, 3)
    np.testing.assert_allclose(np.asarray(out["mean"]), full.mean(axis=(2, 3, 4)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["px"]), full[:, :, 0, 0], atol=1e-5)


def test_bad_inputs_raise():
    imgs = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="boxes"):
        crop_boxes(imgs, np.zeros((3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="image_hw"):
        crop_boxes(imgs, np.zeros((2, 4, 4), np.float32), np.zeros((3, 2), np.int32))
    with pytest.raises(ValueError, match="method"):
        crop_boxes(imgs, np.zeros((2, 4, 4), np.float32), method="nearest")
