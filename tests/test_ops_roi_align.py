"""Tests for ezsd_jax.ops.roi_align vs a straightforward numpy port of torchvision's
ROIAlign forward (CPU kernel), on random features and random boxes."""
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ezsd_jax.ops.roi_align import assign_levels, multilevel_roi_align, roi_align
from helpers import np_roi_align

jroi = jax.jit(roi_align, static_argnames=("output_size", "sampling_ratio", "aligned"))


def rand_boxes(rng, n, img_h, img_w):
    """Mix of ordinary, tiny, huge, partly outside, zero-area and border boxes (pixels)."""
    c = rng.uniform(-0.2, 1.2, (n, 2)) * [img_w, img_h]
    size = np.exp(rng.uniform(np.log(0.5), np.log(2.5 * max(img_h, img_w)), (n, 2)))
    b = np.concatenate([c - size / 2, c + size / 2], axis=1)
    b[0] = [0, 0, img_w, img_h]                    # whole image (border)
    b[1] = [img_w - 3, img_h - 3, img_w, img_h]    # bottom-right corner
    b[2] = [5, 5, 5, 9]                            # zero width
    b[3] = 0.0                                     # padded box
    b[4] = [-30, -30, -12, -8]                     # fully outside
    return b.astype(np.float32)


@pytest.mark.parametrize("hw,scale,out,sr,aligned", [
    ((9, 13), 0.25, 7, 2, True),
    ((6, 5), 0.125, 4, 1, True),
    ((12, 10), 0.5, 3, 3, False),
    ((1, 7), 0.25, 2, 2, True),
])
def test_roi_align_matches_torchvision_reference(rng, hw, scale, out, sr, aligned):
    h, w = hw
    c = 3
    feat = rng.normal(size=(h, w, c)).astype(np.float32)
    boxes = rand_boxes(rng, 24, h / scale, w / scale)
    f = jax.jit(partial(roi_align, spatial_scale=scale, output_size=out, sampling_ratio=sr,
                        aligned=aligned))
    got = np.asarray(f(feat, boxes))
    assert got.shape == (24, out, out, c) and got.dtype == np.float32
    ref = np_roi_align(feat, boxes, scale, out, sr, aligned)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
    assert np.all(got[4] == 0)                     # fully outside the map -> 0


def test_roi_align_bf16_and_grad(rng):
    feat = rng.normal(size=(8, 8, 4)).astype(np.float32)
    boxes = rand_boxes(rng, 6, 32, 32)
    out = jroi(jnp.asarray(feat, jnp.bfloat16), boxes, 0.25)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np_roi_align(feat, boxes, 0.25), atol=0.05, rtol=0.05)
    g = jax.jit(jax.grad(lambda x: roi_align(x, boxes, 0.25).sum()))(jnp.asarray(feat))
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0
    with pytest.raises(ValueError):
        roi_align(feat, boxes, 0.25, sampling_ratio=0)


def np_level(b, canonical_level=4, canonical_size=224.0, lo=2, hi=5):
    s = math.sqrt(max(b[2] - b[0], 0) * max(b[3] - b[1], 0))
    lvl = math.floor(canonical_level + math.log2(s / canonical_size + 1e-8))
    return min(max(lvl, lo), hi) - lo


def test_multilevel_roi_align(rng):
    bsz, img_h, img_w, c, r = 2, 96, 128, 3, 20
    strides = (4, 8, 16, 32)
    feats = [rng.normal(size=(bsz, math.ceil(img_h / s), math.ceil(img_w / s), c))
             .astype(np.float32) for s in strides]
    boxes = np.stack([rand_boxes(rng, r, img_h, img_w) for _ in range(bsz)])
    # make sure every level is used: sizes around the level boundaries
    for k, side in enumerate([20, 130, 300, 700]):
        boxes[:, 5 + k] = [10, 10, 10 + side, 10 + side]
    f = jax.jit(partial(multilevel_roi_align, strides=strides, output_size=5))
    got = np.asarray(f(feats, boxes))
    assert got.shape == (bsz, r, 5, 5, c)
    lv = np.asarray(assign_levels(boxes, 4, 2))
    ref_lv = np.array([[np_level(b) for b in bb] for bb in boxes])
    np.testing.assert_array_equal(lv, ref_lv)
    assert set(ref_lv.ravel()) == {0, 1, 2, 3}
    for i in range(bsz):
        for j in range(r):
            k = ref_lv[i, j]
            ref = np_roi_align(feats[k][i], boxes[i, j:j + 1], 1.0 / strides[k], 5)
            np.testing.assert_allclose(got[i, j], ref[0], atol=2e-5, rtol=1e-4)


def test_multilevel_roi_align_errors(rng):
    feats = [np.zeros((1, 8, 8, 2), np.float32), np.zeros((1, 4, 4, 2), np.float32)]
    boxes = np.zeros((1, 3, 4), np.float32)
    with pytest.raises(ValueError):
        multilevel_roi_align(feats, boxes, strides=(4, 8, 16))
    with pytest.raises(ValueError):
        multilevel_roi_align(feats, boxes, strides=(4, 16))
    out = jax.jit(partial(multilevel_roi_align, strides=(8, 16)))(feats, boxes)
    assert out.shape == (1, 3, 7, 7, 2)


def test_roi_align_analytic_linear_ramp():
    # f(y, x) = x: each aligned bin averages its sample x-coordinates (pixel centres at
    # integer + 0.5 in image space, hence the -0.5 shift).
    feat = np.tile(np.arange(10, dtype=np.float32)[None, :, None], (10, 1, 1))
    out = np.asarray(jroi(feat, np.float32([[2, 2, 6, 6]]), 1.0, output_size=2))
    np.testing.assert_allclose(out[0, :, :, 0], [[2.5, 4.5], [2.5, 4.5]], atol=1e-6)
    const = np.full((5, 6, 2), 3.0, np.float32)
    out = np.asarray(jroi(const, np.float32([[1, 1, 20, 15]]), 0.25))
    np.testing.assert_allclose(out, 3.0, atol=1e-6)
