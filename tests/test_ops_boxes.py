"""Tests for ezsd_jax.ops.boxes and ezsd_jax.ops.anchors against plain numpy references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ezsd_jax.ops import anchors as A
from ezsd_jax.ops import boxes as B

jiou = jax.jit(B.iou_matrix)


def rand_boxes(rng, n, lo=0.0, hi=200.0, max_wh=80.0, zero_frac=0.1):
    xy = rng.uniform(lo, hi, (n, 2))
    wh = rng.uniform(0.0, max_wh, (n, 2))
    b = np.concatenate([xy, xy + wh], axis=1)
    z = rng.random(n) < zero_frac
    b[z, 2] = b[z, 0]                       # zero-width boxes
    if n > 3:
        b[-1] = 0.0                          # padded all-zero box
    return b.astype(np.float32)


def np_iou(a, b):
    out = np.zeros((len(a), len(b)), np.float64)
    for i, p in enumerate(a.astype(np.float64)):
        for j, q in enumerate(b.astype(np.float64)):
            iw = max(min(p[2], q[2]) - max(p[0], q[0]), 0)
            ih = max(min(p[3], q[3]) - max(p[1], q[1]), 0)
            inter = iw * ih
            ap = max(p[2] - p[0], 0) * max(p[3] - p[1], 0)
            aq = max(q[2] - q[0], 0) * max(q[3] - q[1], 0)
            u = ap + aq - inter
            out[i, j] = inter / u if u > 0 else 0.0
    return out


def np_encode(g, a, w=(1.0, 1.0, 1.0, 1.0)):
    g = g.astype(np.float64)
    a = a.astype(np.float64)
    aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    ax, ay = a[:, 0] + 0.5 * aw, a[:, 1] + 0.5 * ah
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    gx, gy = g[:, 0] + 0.5 * gw, g[:, 1] + 0.5 * gh
    return np.stack([w[0] * (gx - ax) / aw, w[1] * (gy - ay) / ah,
                     w[2] * np.log(gw / aw), w[3] * np.log(gh / ah)], axis=1)


def np_decode(d, a, w=(1.0, 1.0, 1.0, 1.0), clamp=math.log(1000 / 16)):
    d = d.astype(np.float64)
    a = a.astype(np.float64)
    aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    ax, ay = a[:, 0] + 0.5 * aw, a[:, 1] + 0.5 * ah
    dx, dy = d[:, 0] / w[0], d[:, 1] / w[1]
    dw, dh = np.minimum(d[:, 2] / w[2], clamp), np.minimum(d[:, 3] / w[3], clamp)
    cx, cy = dx * aw + ax, dy * ah + ay
    pw, ph = np.exp(dw) * aw, np.exp(dh) * ah
    return np.stack([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2], axis=1)


@pytest.mark.parametrize("n,m", [(1, 1), (7, 13), (40, 25)])
def test_iou_matrix_random(rng, n, m):
    a, b = rand_boxes(rng, n), rand_boxes(rng, m)
    got = np.asarray(jax.jit(B.iou_matrix)(a, b))
    assert got.shape == (n, m)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, np_iou(a, b), atol=2e-6)


def test_iou_matrix_edge_cases_and_batch(rng):
    z = np.array([[5, 5, 5, 5], [0, 0, 0, 0], [3, 3, 10, 3], [10, 10, 2, 2]], np.float32)
    got = np.asarray(jiou(z, z))
    assert np.all(got == 0.0)                  # zero-area / inverted: 0, never NaN
    a = np.array([[0, 0, 10, 10]], np.float32)
    np.testing.assert_allclose(jiou(a, a), [[1.0]])
    np.testing.assert_allclose(jiou(a, a + np.float32([5, 0, 5, 0])), [[1 / 3]],
                               rtol=1e-6)
    # leading batch axes
    a3 = np.stack([rand_boxes(rng, 6) for _ in range(3)])
    b3 = np.stack([rand_boxes(rng, 4) for _ in range(3)])
    got = np.asarray(jiou(a3, b3))
    for i in range(3):
        np.testing.assert_allclose(got[i], np_iou(a3[i], b3[i]), atol=2e-6)


def test_area_and_conversions(rng):
    b = rand_boxes(rng, 30)
    np.testing.assert_allclose(B.box_area(b), (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]),
                               rtol=1e-6)
    assert float(B.box_area(np.float32([5, 5, 1, 9]))) == 0.0
    xywh = np.asarray(B.xyxy_to_xywh(b))
    np.testing.assert_allclose(xywh[:, 2:], b[:, 2:] - b[:, :2], rtol=1e-6)
    np.testing.assert_allclose(B.xywh_to_xyxy(xywh), b, rtol=1e-6, atol=1e-5)


def test_clip_boxes(rng):
    b = rand_boxes(rng, 50, lo=-100, hi=300, max_wh=200)
    got = np.asarray(B.clip_boxes(b, 150, 250))
    ref = b.copy()
    ref[:, [0, 2]] = np.clip(ref[:, [0, 2]], 0, 250)
    ref[:, [1, 3]] = np.clip(ref[:, [1, 3]], 0, 150)
    np.testing.assert_array_equal(got, ref)
    # per-image sizes broadcast against [B, R]
    bb = np.stack([b[:25], b[25:]])
    hw = np.array([[100.0], [60.0]], np.float32)
    got = np.asarray(jax.jit(B.clip_boxes)(bb, hw, hw * 2))
    for i in range(2):
        np.testing.assert_array_equal(got[i], np.asarray(B.clip_boxes(bb[i], hw[i, 0],
                                                                      2 * hw[i, 0])))
    # boxes already on the border are unchanged
    border = np.float32([[0, 0, 250, 150], [249, 149, 250, 150]])
    np.testing.assert_array_equal(B.clip_boxes(border, 150, 250), border)
    vis = np.asarray(B.box_area(B.clip_boxes(np.float32([[0, 0, 10, 10], [-20, -20, 0, 5],
                                                         [250, 0, 260, 10],
                                                         [240, 140, 300, 300]]), 150, 250)))
    np.testing.assert_array_equal(vis > 0, [True, False, False, True])


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_random(rng, weights):
    n = 64
    anc = rand_boxes(rng, n, zero_frac=0.0)
    anc[:, 2:] = anc[:, :2] + rng.uniform(4, 100, (n, 2))
    gt = rand_boxes(rng, n, zero_frac=0.0)
    gt[:, 2:] = gt[:, :2] + rng.uniform(2, 150, (n, 2))
    d = np.asarray(jax.jit(B.encode, static_argnums=2)(gt, anc, weights))
    np.testing.assert_allclose(d, np_encode(gt, anc, weights), rtol=1e-4, atol=1e-4)
    back = np.asarray(jax.jit(B.decode, static_argnums=2)(d, anc, weights))
    np.testing.assert_allclose(back, gt, rtol=1e-5, atol=2e-3)
    # random deltas incl. huge dw/dh (clamped)
    dr = rng.normal(0, 2, (n, 4)).astype(np.float32) * np.float32(weights)
    dr[:5, 2:] = 50.0
    got = np.asarray(B.decode(dr, anc, weights))
    np.testing.assert_allclose(got, np_decode(dr, anc, weights), rtol=1e-5, atol=1e-2)
    assert np.all(np.isfinite(got))


def test_encode_padded_boxes_finite_and_decode_bf16():
    gt = np.zeros((3, 4), np.float32)
    anc = np.float32([[0, 0, 10, 10], [0, 0, 0, 0], [5, 5, 20, 8]])
    assert np.all(np.isfinite(np.asarray(B.encode(gt, anc))))
    d = jnp.zeros((3, 4), jnp.bfloat16)
    out = B.decode(d, anc)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, anc)


def test_flip_horizontal(rng):
    b = rand_boxes(rng, 20)
    f = np.asarray(B.flip_horizontal(b, 300.0))
    np.testing.assert_allclose(f[:, 0], 300 - b[:, 2])
    np.testing.assert_allclose(f[:, 2], 300 - b[:, 0])
    np.testing.assert_array_equal(f[:, [1, 3]], b[:, [1, 3]])
    np.testing.assert_allclose(B.flip_horizontal(f, 300.0), b, atol=1e-4)
    np.testing.assert_allclose(B.box_area(f), B.box_area(b), rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(B.flip_horizontal(np.float32([0, 1, 300, 2]), 300.0),
                                  [0, 1, 300, 2])


# ------------------------------------------------------------------ anchors

def np_anchor_grid(fh, fw, stride, sizes, ratios, offset=0.0):
    out = []
    for y in range(fh):
        for x in range(fw):
            cx, cy = (x + offset) * stride, (y + offset) * stride
            for s in sizes:
                for r in ratios:
                    w = math.sqrt(s * s / r)
                    h = r * w
                    out.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return np.asarray(out, np.float32).reshape(-1, 4)


@pytest.mark.parametrize("fhw,stride,sizes,ratios,offset", [
    ((3, 5), 8, (32,), (0.5, 1.0, 2.0), 0.0),
    ((4, 2), 16, (16, 40), (1.0, 3.0), 0.5),
    ((1, 1), 4, (8,), (1.0,), 0.0),
])
def test_anchor_grid_vs_loop(fhw, stride, sizes, ratios, offset):
    got = A.anchor_grid(fhw, stride, sizes, ratios, offset=offset)
    assert got.dtype == np.float32
    ref = np_anchor_grid(*fhw, stride, sizes, ratios, offset)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-4)
    a = len(sizes) * len(ratios)
    w, h = got[:, 2] - got[:, 0], got[:, 3] - got[:, 1]
    np.testing.assert_allclose(h / w, np.tile(np.tile(ratios, len(sizes)), fhw[0] * fhw[1]),
                               rtol=1e-5)
    np.testing.assert_allclose(w * h, np.tile(np.repeat(np.float32(sizes) ** 2,
                                                        len(ratios)), fhw[0] * fhw[1]),
                               rtol=1e-5)
    assert got.shape == (fhw[0] * fhw[1] * a, 4)


def test_fpn_anchors_shapes_and_sizes():
    lv = A.fpn_anchors((100, 150))
    assert len(lv) == 5
    for arr, s, size in zip(lv, (4, 8, 16, 32, 64), (32, 64, 128, 256, 512)):
        assert arr.shape == (math.ceil(100 / s) * math.ceil(150 / s) * 3, 4)
        area = (arr[:, 2] - arr[:, 0]) * (arr[:, 3] - arr[:, 1])
        np.testing.assert_allclose(area, size * size, rtol=1e-5)
        # second location is one stride to the right of the first
        np.testing.assert_allclose(arr[3] - arr[0], [s, 0, s, 0], atol=1e-4)
    with pytest.raises(ValueError):
        A.fpn_anchors((64, 64), strides=(4, 8), sizes=(32,))
