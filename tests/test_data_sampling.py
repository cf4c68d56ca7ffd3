"""Class-balanced repeat-factor sampling (data/sampling.py, mmdet ClassBalancedDataset)
against a numpy incidence-matrix reference on random label sets; the train stream with
repeat factors (each image ceil(r) times per epoch, deterministic per seed, the same
after a resume); multi-scale 'range' training (short side in lo..hi, static padded
shape, boxes follow the scale)."""
import math

import numpy as np
import pytest

from ezsd_jax.data.sampling import repeat_factors, repeat_index
from helpers import small_pipeline as _pipe, synthetic_dataset as _dataset


def _np_repeat_factors(labels, num_classes, t):
    inc = np.zeros((len(labels), num_classes), bool)
    for i, l in enumerate(labels):
        inc[i, l] = True
    f = inc.mean(0)
    with np.errstate(divide="ignore"):
        rc = np.maximum(1.0, np.sqrt(t / f))
    return np.where(inc.any(1), np.where(inc, rc[None], 0).max(1), 1.0)


@pytest.mark.parametrize("t", [0.02, 0.3])   # f(c) >= 1/300 here
def test_repeat_factors_match_reference(rng, t):
    c, n = 40, 300
    p = rng.dirichlet(np.full(c, 0.3))         # long-tailed class frequencies
    labels = [rng.choice(c, rng.integers(0, 6), p=p) for _ in range(n)]
    got = repeat_factors(labels, t)
    np.testing.assert_allclose(got, _np_repeat_factors(labels, c, t), rtol=1e-12)
    assert (got >= 1).all() and (got > 1).any()
    idx = repeat_index(got)
    np.testing.assert_array_equal(np.bincount(idx, minlength=n),
                                  [math.ceil(r) for r in got])
    with pytest.raises(ValueError, match="threshold"):
        repeat_factors(labels, 0.0)


def test_repeat_sampled_stream_is_deterministic_and_resumable(tmp_path):
    ds = _dataset(tmp_path, n=5, objects=(1, 3))
    factors = np.array([1.0, 2.5, 1.0, 1.0, 3.0])      # epoch: 1 + 3 + 1 + 1 + 3 = 9
    kw = dict(train=True, batch_size=3, max_boxes=3, seed=5, repeat_factors=factors)
    with _pipe(ds, **kw) as p:
        assert p.epoch_length == 9 and p.steps_per_epoch == 3
        it = p.train_iterator()
        full = [next(it) for _ in range(5)]
    with _pipe(ds, num_threads=1, prefetch=0, **kw) as p:
        it = p.train_iterator(start_step=3)
        resumed = [next(it) for _ in range(2)]
    for a, b in zip(full[3:], resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ids = np.concatenate([b["image_id"] for b in full[:3]])     # one epoch
    order = [r.image_id for r in ds.records]
    np.testing.assert_array_equal(np.bincount([order.index(i) for i in ids], minlength=5),
                                  [1, 3, 1, 1, 3])
    with pytest.raises(ValueError, match="repeat_factors"):
        _pipe(ds, **dict(kw, repeat_factors=factors[:3]))


def test_short_side_range_draws_scales_per_item(tmp_path):
    ds = _dataset(tmp_path, n=6, objects=(1, 3))
    kw = dict(train=True, batch_size=3, flip_prob=0.0, seed=2, short_side_range=(30, 48))
    with _pipe(ds, **kw) as p:
        it = p.train_iterator()
        batches = [next(it) for _ in range(4)]
    with _pipe(ds, num_threads=1, prefetch=0, **kw) as p:
        again = next(p.train_iterator(start_step=3))
    np.testing.assert_array_equal(batches[3]["scale"], again["scale"])
    recs = {r.image_id: r for r in ds.records}
    shorts = []
    for b in batches:
        assert b["image"].shape[1:3] == (64, 80)      # static padded shape
        for i in range(3):
            r = recs[int(b["image_id"][i])]
            s = float(b["scale"][i])
            short = min(r.height, r.width) * s
            # scale = min(short/min, 80/max, fits the 64x80 canvas)
            cap = min(80 / max(r.height, r.width), 64 / r.height, 80 / r.width)
            if s < cap - 1e-6:
                shorts.append(round(short))
            assert s <= cap + 1e-6
            m = b["box_mask"][i]
            np.testing.assert_allclose(b["boxes"][i][m], r.boxes[: m.sum()] * s, rtol=1e-4,
                                       atol=1e-3)
    assert shorts and min(shorts) >= 30 and max(shorts) <= 48 and len(set(shorts)) > 1
    with pytest.raises(ValueError, match="short_side_range"):
        _pipe(ds, **dict(kw, short_side_range=(50, 40)))
