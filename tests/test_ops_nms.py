"""Tests for ezsd_jax.ops.nms: tiled static-shape NMS vs a plain numpy greedy NMS."""
from functools import partial

import jax
import numpy as np
import pytest

from ezsd_jax.ops.nms import batched_nms, nms

# one compiled function per static config, shared by the tests (threshold is traced)
jnms = jax.jit(nms, static_argnames=("max_output", "tile_size"))
jbnms = jax.jit(batched_nms, static_argnames=("max_output", "tile_size"))


def np_iou32(a, b):
    """Same float32 formula as ops.boxes.iou_matrix."""
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    area = lambda x: (np.maximum(x[:, 2] - x[:, 0], 0) * np.maximum(x[:, 3] - x[:, 1], 0))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.maximum(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = area(a)[:, None] + area(b)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), 0).astype(np.float32)


def np_nms(boxes, scores, thr, max_out, valid=None, classes=None):
    n = len(boxes)
    valid = np.ones(n, bool) if valid is None else valid.copy()
    valid &= ~np.isnan(scores)
    classes = np.zeros(n, np.int64) if classes is None else classes
    iou = np_iou32(boxes, boxes)
    order = np.argsort(-scores.astype(np.float64), kind="stable")
    suppressed = np.zeros(n, bool)
    keep = []
    for i in order:
        if not valid[i] or suppressed[i]:
            continue
        keep.append(i)
        suppressed |= (iou[i] > thr) & (classes == classes[i])
    return np.asarray(keep[:max_out], np.int64)


def clustered(rng, n, n_clusters=None, size=300.0):
    """Boxes jittered around a few centres: many overlaps and suppression chains."""
    k = n_clusters or max(1, n // 8)
    centres = rng.uniform(0, size, (k, 2))
    c = centres[rng.integers(0, k, n)] + rng.normal(0, 6, (n, 2))
    wh = rng.uniform(5, 60, (n, 2))
    b = np.concatenate([c - wh / 2, c + wh / 2], axis=1).astype(np.float32)
    s = rng.random(n).astype(np.float32)
    return b, s


def check(out, ref, max_out):
    idx, ok = map(np.asarray, out)
    assert idx.shape == (max_out,) and ok.shape == (max_out,)
    assert idx.dtype == np.int32 and ok.dtype == bool
    k = len(ref)
    np.testing.assert_array_equal(ok, np.arange(max_out) < k)
    np.testing.assert_array_equal(idx[:k], ref)
    assert np.all(idx[k:] == 0)


@pytest.mark.parametrize("n,tile,max_out", [(1, 64, 4), (37, 16, 50), (300, 64, 40),
                                            (1000, 128, 1000)])
def test_nms_matches_numpy(rng, n, tile, max_out):
    for thr in (0.3, 0.5, 0.7, 0.9):
        b, s = clustered(rng, n)
        valid = rng.random(n) > 0.1
        ref = np_nms(b, s, thr, max_out, valid)
        check(jnms(b, s, thr, max_output=max_out, valid=valid, tile_size=tile), ref,
              max_out)
    if n == 1000:   # no valid mask, default tile size
        check(jnms(b, s, 0.5, max_output=max_out), np_nms(b, s, 0.5, max_out), max_out)


def test_nms_ties_duplicates_and_exact_threshold(rng):
    n = 90
    b, _ = clustered(rng, n, n_clusters=5)
    b = np.round(b)                           # integer coords: exact IoU values
    b[10:20] = b[0]                           # duplicates
    s = rng.integers(0, 4, n).astype(np.float32) / 4   # many tied scores
    s[10:20] = s[0]
    s[5] = -0.0
    s[6] = 0.0
    for thr in (0.3, 0.5, 0.7, 0.9):
        check(jnms(b, s, thr, max_output=n, tile_size=32), np_nms(b, s, thr, n), n)
    # IoU exactly equal to the threshold does not suppress (IoU > thr suppresses)
    two = np.float32([[0, 0, 10, 10], [0, 0, 10, 5]])          # IoU = 0.5 exactly
    check(jnms(two, np.float32([1, 0.5]), 0.5, max_output=2), [0, 1], 2)
    check(jnms(two, np.float32([1, 0.5]), 0.49, max_output=2), [0], 2)


def test_nms_edge_cases(rng):
    b, s = clustered(rng, 50)
    # all invalid
    idx, ok = jnms(b, s, 0.5, max_output=20, valid=np.zeros(50, bool))
    assert not np.any(ok) and np.all(np.asarray(idx) == 0)
    # zero-area / padded boxes never suppress, NaN scores are never kept
    z = b.copy()
    z[:10] = 0.0
    s2 = s.copy()
    s2[3] = np.nan
    check(jnms(z, s2, 0.5, max_output=50, tile_size=16), np_nms(z, s2, 0.5, 50), 50)
    # max_output == 0 and N == 0
    idx, ok = nms(b, s, 0.5, 0)
    assert idx.shape == (0,) and ok.shape == (0,)
    idx, ok = nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), 0.5, 3)
    assert idx.shape == (3,) and not np.any(ok)


def test_nms_vmap(rng):
    n, max_out = 70, 30
    data = [clustered(rng, n) for _ in range(3)]
    bb = np.stack([d[0] for d in data])
    ss = np.stack([d[1] for d in data])
    vv = rng.random((3, n)) > 0.2
    vv[2] = False
    f = jax.jit(jax.vmap(partial(nms, iou_threshold=0.6, max_output=max_out, tile_size=32)))
    idx, ok = f(bb, ss, valid=vv)
    for i in range(3):
        check((idx[i], ok[i]), np_nms(bb[i], ss[i], 0.6, max_out, vv[i]), max_out)


def test_batched_nms(rng):
    n, max_out = 200, 120
    b, s = clustered(rng, n, n_clusters=10)
    cls = rng.integers(0, 4, n).astype(np.int32)
    valid = rng.random(n) > 0.1
    for thr in (0.3, 0.5, 0.7, 0.9):
        check(jbnms(b, s, cls, thr, max_output=max_out, valid=valid, tile_size=64),
              np_nms(b, s, thr, max_out, valid, cls), max_out)
    # identical boxes of different classes both survive
    two = np.float32([[0, 0, 10, 10], [0, 0, 10, 10]])
    check(jbnms(two, np.float32([1, 0.9]), np.int32([0, 1]), 0.5, max_output=2), [0, 1], 2)
    check(jbnms(two, np.float32([1, 0.9]), np.int32([1, 1]), 0.5, max_output=2), [0], 2)
