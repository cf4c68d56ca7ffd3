"""Tests for ezsd_jax.ops.matching: matcher vs a numpy reference, balanced sampling."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ezsd_jax.ops.boxes import iou_matrix
from ezsd_jax.ops.matching import match_boxes, sample_balanced

jmatch = jax.jit(match_boxes, static_argnames=("allow_low_quality",))
jsample = jax.jit(sample_balanced, static_argnames=("num_samples", "positive_fraction"))


def np_match(iou, gt_valid, fg, bg, low=True):
    n, _ = iou.shape
    if not gt_valid.any():
        return np.zeros(n, np.int64), np.zeros(n, np.int64)
    q = np.where(gt_valid[None, :], iou, -1.0)
    matched = q.argmax(1)
    best = q.max(1)
    labels = np.full(n, -1)
    labels[best < bg] = 0
    labels[best >= fg] = 1
    if low:
        for j in np.flatnonzero(gt_valid):
            hq = q[:, j].max()
            if hq > 0:
                labels[q[:, j] == hq] = 1
    return matched, labels


def rand_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(2, 40, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


@pytest.mark.parametrize("n,m", [(50, 1), (200, 7), (300, 20)])
@pytest.mark.parametrize("fg,bg,low", [(0.7, 0.3, True), (0.5, 0.5, False),
                                       (0.5, 0.4, True)])
def test_match_boxes_vs_numpy(rng, n, m, fg, bg, low):
    anchors = rand_boxes(rng, n)
    anchors[n // 2:n // 2 + 5] = anchors[0]            # duplicate anchors -> ties
    gt = rand_boxes(rng, m)
    iou = np.asarray(iou_matrix(anchors, gt))
    gt_valid = rng.random(m) > 0.3
    gt_valid[0] = True
    f = jax.jit(partial(match_boxes, fg_threshold=fg, bg_threshold=bg,
                        allow_low_quality=low))
    mg, lab = map(np.asarray, f(iou, gt_valid))
    rm, rl = np_match(iou, gt_valid, fg, bg, low)
    assert mg.dtype == np.int32 and lab.dtype == np.int32
    np.testing.assert_array_equal(lab, rl)
    np.testing.assert_array_equal(mg, rm)
    assert np.all(gt_valid[mg])                         # never matches a padded column


def test_match_boxes_edge_cases(rng):
    iou = rng.random((30, 4)).astype(np.float32)
    # no valid GT: everything background
    mg, lab = jmatch(iou, np.zeros(4, bool), 0.7, 0.3)
    assert np.all(np.asarray(lab) == 0) and np.all(np.asarray(mg) == 0)
    # an invalid column with high IoU never matches
    iou2 = iou * 0.2
    iou2[:, 2] = 0.99
    mg, lab = jmatch(iou2, np.array([True, True, False, True]), 0.7, 0.3, False)
    assert not np.any(np.asarray(mg) == 2) and np.all(np.asarray(lab) == 0)
    # low quality: all tied best anchors of a GT become fg, GT with best IoU 0 adds none
    iou3 = np.zeros((6, 2), np.float32)
    iou3[[1, 4], 0] = 0.2
    iou3[2, 0] = 0.1
    _, lab = jmatch(iou3, np.array([True, True]), 0.7, 0.3, True)
    np.testing.assert_array_equal(lab, [0, 1, 0, 0, 1, 0])
    _, lab = match_boxes(np.zeros((5, 0), np.float32), np.zeros(0, bool), 0.7, 0.3)
    assert np.all(np.asarray(lab) == 0)


def check_sample(labels, valid, idx, sl, sv, ns, pf):
    idx, sl, sv = map(np.asarray, (idx, sl, sv))
    assert idx.shape == sl.shape == sv.shape == (ns,)
    assert idx.dtype == np.int32 and sl.dtype == np.int32 and sv.dtype == bool
    npos = min(int(((labels == 1) & valid).sum()), int(ns * pf))
    nneg = min(int(((labels == 0) & valid).sum()), ns - npos)
    np.testing.assert_array_equal(sl, [1] * npos + [0] * nneg + [-1] * (ns - npos - nneg))
    np.testing.assert_array_equal(sv, sl >= 0)
    np.testing.assert_array_equal(labels[idx[sv]], sl[sv])
    assert np.all(valid[idx[sv]])
    assert len(np.unique(idx[sv])) == sv.sum()
    assert np.all(idx[~sv] == 0)


@pytest.mark.parametrize("n,ns,pf,pos_p", [(1000, 256, 0.5, 0.02), (600, 512, 0.25, 0.3),
                                           (40, 64, 0.5, 0.2), (300, 128, 0.25, 0.0)])
def test_sample_balanced_counts_and_reference(rng, n, ns, pf, pos_p):
    u = rng.random(n)
    labels = np.where(u < pos_p, 1, np.where(u < 0.85, 0, -1)).astype(np.int32)
    valid = rng.random(n) > 0.1
    key = jax.random.key(int(rng.integers(1 << 30)))
    f = jax.jit(partial(sample_balanced, num_samples=ns, positive_fraction=pf))
    idx, sl, sv = f(key, labels, valid=valid)
    check_sample(labels, valid, idx, sl, sv, ns, pf)
    # numpy reference given the same random priorities: highest priorities win
    prio = np.asarray(jax.random.bits(key, (n,), jnp.uint32) >> 1).astype(np.int64)
    npos = int((sl == 1).sum())
    nneg = int((np.asarray(sl) == 0).sum())
    pos_c = np.flatnonzero((labels == 1) & valid)
    neg_c = np.flatnonzero((labels == 0) & valid)
    ref_pos = pos_c[np.argsort(-prio[pos_c], kind="stable")][:npos]
    ref_neg = neg_c[np.argsort(-prio[neg_c], kind="stable")][:nneg]
    np.testing.assert_array_equal(np.asarray(idx)[:npos + nneg],
                                  np.concatenate([ref_pos, ref_neg]))
    # deterministic per key, different for another key
    idx2, _, _ = f(key, labels, valid=valid)
    np.testing.assert_array_equal(idx, idx2)
    idx3, _, _ = f(jax.random.key(12345), labels, valid=valid)
    assert not np.array_equal(np.asarray(idx), np.asarray(idx3))


def test_sample_balanced_edge_cases():
    labels = np.array([1, 0, -1, 1, 0], np.int32)
    # nothing valid
    idx, sl, sv = jsample(jax.random.key(0), labels, 4, 0.5, np.zeros(5, bool))
    assert not np.any(np.asarray(sv)) and np.all(np.asarray(sl) == -1)
    # default valid, more slots than candidates
    idx, sl, sv = jsample(jax.random.key(1), labels, 8, 0.5)
    check_sample(labels, np.ones(5, bool), idx, sl, sv, 8, 0.5)
    # positive_fraction 0 -> negatives only
    idx, sl, sv = jsample(jax.random.key(2), labels, 3, 0.0)
    np.testing.assert_array_equal(sl, [0, 0, -1])


def test_sample_balanced_roughly_uniform():
    n = 40
    labels = np.zeros(n, np.int32)
    labels[:10] = 1                      # 10 positives, 30 negatives
    labels[35:] = -1                     # 25 usable negatives
    keys = jax.random.split(jax.random.key(7), 2000)
    f = jax.jit(jax.vmap(lambda k: sample_balanced(k, labels, 8, 0.5)))
    idx, sl, sv = map(np.asarray, f(keys))
    counts = np.zeros(n)
    np.add.at(counts, idx[sv], 1)
    pos_freq = counts[:10] / 2000        # expected 4/10
    neg_freq = counts[10:35] / 2000      # expected 4/25
    assert np.all(np.abs(pos_freq - 0.4) < 0.05), pos_freq
    assert np.all(np.abs(neg_freq - 0.16) < 0.04), neg_freq
    assert counts[35:].sum() == 0
    assert np.all((sl == 1).sum(1) == 4) and np.all((sl == 0).sum(1) == 4)
