"""CLIP proposals (scores, NMS, GT filter, feature pass) and the on-disk proposal store."""
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ezsd_jax.clip import proposals as P
from ezsd_jax.clip import stages as clip_stages
from ezsd_jax.clip.crops import crop_boxes
from ezsd_jax.clip.store import ProposalStore, StoreError
from ezsd_jax.clip.text import encode_image, text_embeddings
from ezsd_jax.clip.toy import make_tiny_clip
from ezsd_jax.core.config_check import ConfigError
from ezsd_jax.ops import anchors as A

BASE = ["person", "car", "dog"]
NOVEL = ["cat", "kite", "cup"]
ALL = BASE + NOVEL
IS_BASE = np.array([n in BASE for n in ALL])
SMALL = dict(stride=16, sizes=(16, 32, 64), ratios=(0.5, 1.0, 2.0), num_nms=40, keep=12,
             chunk=64)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tinyclip"))
    model, params, tok, size, mean, std = make_tiny_clip(d, ALL, seed=0, image_size=32,
                                                         patch=8)
    emb = text_embeddings(model, params, tok, ALL)
    fn = P.make_proposal_fn(model, emb, IS_BASE, mean=mean, std=std, **SMALL)
    return {"model": model, "params": params, "emb": emb, "mean": mean, "std": std,
            "fn": fn}


def _batch(seed, b=2, h=64, w=96, g=4, ids=None):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
    x1 = rng.uniform(0, w - 30, (b, g))
    y1 = rng.uniform(0, h - 30, (b, g))
    boxes = np.stack([x1, y1, x1 + rng.uniform(8, 30, (b, g)),
                      y1 + rng.uniform(8, 30, (b, g))], -1).astype(np.float32)
    classes = rng.integers(0, len(ALL), (b, g)).astype(np.int32)
    classes[:, 0] = 0                                   # at least one base GT per image
    box_mask = np.ones((b, g), bool)
    box_mask[-1, -1] = False
    scale = np.array([0.5, 0.8], np.float32)[:b]
    return {"image": image, "boxes": boxes, "classes": classes, "box_mask": box_mask,
            "image_id": np.arange(b) if ids is None else np.asarray(ids),
            "scale": scale, "orig_hw": np.array([[128, 192], [70, 100]])[:b],
            "flipped": np.zeros(b, bool), "valid": np.ones(b, bool)}


def test_sliding_candidates_layout_and_clipping():
    boxes, valid = P.sliding_candidates((64, 96), jnp.array([50, 70]), 16, (16, 32), (0.5, 1, 2))
    boxes, valid = np.asarray(boxes), np.asarray(valid)
    assert boxes.shape == (4 * 6 * 6, 4)
    assert (boxes[:, [0, 2]] <= 70).all() and (boxes[:, [1, 3]] <= 50).all()
    assert (boxes >= 0).all()
    np.testing.assert_array_equal(valid, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
    # the reference layout on 1333x800: ~15.7k boxes, every one inside and valid
    full, fv = P.sliding_candidates((800, 1333), jnp.array([800, 1333]))
    full, fv = np.asarray(full), np.asarray(fv)
    assert full.shape == (25 * 42 * 15, 4) and fv.all()
    raw = A.anchor_grid((25, 42), 32, (32, 64, 128, 256, 512), (0.5, 1, 2))
    ref = np.stack([np.clip(raw[:, 0], 0, 1333), np.clip(raw[:, 1], 0, 800),
                    np.clip(raw[:, 2], 0, 1333), np.clip(raw[:, 3], 0, 800)], -1)
    np.testing.assert_array_equal(full, ref)
    # a box clipped to nothing is invalid (centre offset 0.5 on a tiny image)
    small, sv = P.sliding_candidates((10, 10), jnp.array([10, 10]), 32, (8, 64), (1.0,),
                                     offset=0.5)
    np.testing.assert_allclose(np.asarray(small)[np.asarray(sv)], [[0, 0, 10, 10]])
    assert not np.asarray(sv)[0]


def test_entropy_score_matches_numpy():
    rng = np.random.default_rng(0)
    for c in (2, 7, 65):
        logits = rng.normal(scale=5, size=(3, 11, c)).astype(np.float32)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ent = -(p * np.log(np.maximum(p, 1e-30))).sum(-1)
        np.testing.assert_allclose(np.asarray(P.entropy_score(jnp.asarray(logits))),
                                   math.log(c) - ent, atol=1e-4)
    onehot = np.full((1, 5), -1e4, np.float32)
    onehot[0, 2] = 0
    np.testing.assert_allclose(np.asarray(P.entropy_score(jnp.asarray(onehot))), math.log(5),
                               atol=1e-5)


def test_score_candidates_against_direct_crops(env):
    m, p = env["model"], env["params"]
    b = _batch(1)
    hw = np.array([[64, 96], [56, 80]], np.int32)
    f = jax.jit(lambda pp, im, s: P.score_candidates(
        m, pp, env["emb"], im, s, stride=16, sizes=(16, 32), chunk=32, return_logits=True,
        mean=env["mean"], std=env["std"]))
    cand, valid, score, logits = f(p, b["image"], hw)
    cand, score, logits = np.asarray(cand), np.asarray(score), np.asarray(logits)
    assert cand.shape == (2, 4 * 6 * 6, 4) and logits.shape == cand.shape[:2] + (len(ALL),)
    lp = logits - logits.max(-1, keepdims=True)
    pr = np.exp(lp) / np.exp(lp).sum(-1, keepdims=True)
    ent = -(pr * np.log(np.maximum(pr, 1e-30))).sum(-1)
    np.testing.assert_allclose(score, math.log(len(ALL)) - ent, atol=1e-4)
    # logits = exp(logit_scale) * cos(CLIP(crop), text) for a few candidates, direct path
    pick = np.array([0, 5, 77, 140])
    crops = crop_boxes(b["image"], cand[:, pick], hw, out_size=32, mean=env["mean"],
                       std=env["std"])
    e = np.array(encode_image(m, p, jnp.asarray(crops).reshape(-1, 32, 32, 3)))
    e /= np.linalg.norm(e, axis=-1, keepdims=True)
    ref = float(np.exp(p["logit_scale"])) * e @ env["emb"].T
    np.testing.assert_allclose(logits[:, pick].reshape(-1, len(ALL)), ref, rtol=1e-4, atol=1e-3)


def _np_iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    aa = np.prod(a[:, 2:] - a[:, :2], -1)
    ab = np.prod(b[:, 2:] - b[:, :2], -1)
    u = aa[:, None] + ab[None] - inter
    return np.where(u > 0, inter / np.where(u > 0, u, 1), 0)


def test_select_proposals_matches_numpy():
    rng = np.random.default_rng(2)
    for trial in range(5):
        n, g = 30, 4
        xy = rng.uniform(0, 80, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (n, 2))], 1).astype(np.float32)
        gxy = rng.uniform(0, 80, (g, 2))
        gt = np.concatenate([gxy, gxy + rng.uniform(5, 40, (g, 2))], 1).astype(np.float32)
        gt[0] = boxes[3]                                       # guaranteed overlap
        gv = rng.random(g) < 0.8
        gv[0] = True
        valid = rng.random(n) < 0.9
        cat = rng.integers(0, len(ALL), n)
        keep = 10 if trial % 2 else 40
        idx, ok = P.select_proposals(jnp.asarray(boxes), jnp.asarray(valid), jnp.asarray(gt),
                                     jnp.asarray(gv), jnp.asarray(cat), jnp.asarray(IS_BASE),
                                     keep, 0.3)
        near = ((_np_iou(boxes, gt) >= 0.3) & gv[None]).any(1)
        surv = np.nonzero(valid & ~near & ~IS_BASE[cat])[0][:keep]
        assert not (valid[3] and ok[np.asarray(idx) == 3].any())
        np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], surv)
        assert np.asarray(ok).sum() == len(surv) and np.asarray(idx).shape == (keep,)


def test_select_proposals_lvis_mode_matches_numpy():
    """drop_base=False + priority: a uniform sample of the IoU-filter survivors, base
    categories included, taken in priority order."""
    rng = np.random.default_rng(7)
    for trial in range(4):
        n, g = 40, 3
        xy = rng.uniform(0, 80, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (n, 2))], 1).astype(np.float32)
        gt = boxes[[1, 5, 9]] + rng.uniform(-1, 1, (g, 4)).astype(np.float32)
        gv = np.array([True, True, trial % 2 == 0])
        valid = rng.random(n) < 0.9
        cat = rng.integers(0, len(ALL), n)
        prio = rng.random(n).astype(np.float32)
        keep = 12 if trial % 2 else 50
        idx, ok = P.select_proposals(jnp.asarray(boxes), jnp.asarray(valid), jnp.asarray(gt),
                                     jnp.asarray(gv), jnp.asarray(cat), jnp.asarray(IS_BASE),
                                     keep, 0.3, drop_base=False, priority=jnp.asarray(prio))
        near = ((_np_iou(boxes, gt) >= 0.3) & gv[None]).any(1)
        surv = np.nonzero(valid & ~near)[0]
        want = surv[np.argsort(prio[surv], kind="stable")][:keep]
        np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], want)
        assert IS_BASE[cat[want]].any()                    # base categories are kept
    assert P.image_seeds([3, np.int64(3), "a.jpg"]).tolist()[:2] == [3, 3]
    assert P.image_seeds(["a.jpg"])[0] == P.image_seeds(["a.jpg"])[0] != \
        P.image_seeds(["b.jpg"])[0]


@pytest.mark.slow  # > 20 CPU-s: in make test, not make test-fast
def test_proposal_fn_random_selection_is_per_image(env):
    """selection='random' (LVIS mode): an image's sample depends on its own seed only,
    not on the batch it is in, and changes with the seed."""
    fn = P.make_proposal_fn(env["model"], env["emb"], IS_BASE, mean=env["mean"],
                            std=env["std"], **dict(SMALL, selection="random",
                                                   drop_base=False, keep=6))
    inp = P.batch_inputs(_batch(3), IS_BASE)
    keys = ("images", "image_hw", "gt_boxes", "gt_valid", "scale")
    seeds = np.array([11, 12], np.int32)
    out = fn(env["params"], *(inp[k] for k in keys), seeds)
    alone = fn(env["params"], *(inp[k][:1] for k in keys), seeds[:1])
    other = fn(env["params"], *(inp[k] for k in keys), seeds + 100)
    v = np.asarray(out["valid"][0])
    assert v.sum() == 6
    np.testing.assert_allclose(np.asarray(out["boxes"][0])[v],
                               np.asarray(alone["boxes"][0])[v], rtol=1e-6)
    assert not np.array_equal(np.asarray(out["boxes"]), np.asarray(other["boxes"]))
    with pytest.raises(ValueError, match="selection"):
        P.make_proposal_fn(env["model"], env["emb"], IS_BASE, selection="best")


def _np_nms(boxes, scores, valid, thr, m):
    order = [i for i in np.argsort(-scores, kind="stable") if valid[i]]
    kept = []
    for i in order:
        if all(_np_iou(boxes[i:i + 1], boxes[j:j + 1])[0, 0] <= thr for j in kept):
            kept.append(i)
        if len(kept) == m:
            break
    return np.asarray(kept)


@pytest.mark.slow  # > 20 CPU-s: in make test, not make test-fast
def test_proposal_fn_end_to_end_against_numpy(env):
    m, p = env["model"], env["params"]
    batch = _batch(3)
    inp = P.batch_inputs(batch, IS_BASE)
    out = env["fn"](p, inp["images"], inp["image_hw"], inp["gt_boxes"], inp["gt_valid"],
                    inp["scale"])
    out = {k: np.asarray(v) for k, v in out.items()}
    k = SMALL["keep"]
    assert out["boxes"].shape == (2, k, 4) and out["embeddings"].shape == (2, k, 32)
    assert out["embeddings"].dtype == np.float16 and out["gt_embeddings"].dtype == np.float16
    assert out["valid"].any()
    assert (out["num_after_gt"] <= out["num_nms"]).all()
    assert (out["num_nms"] <= out["num_candidates"]).all()
    np.testing.assert_array_equal(out["gt_valid"], inp["gt_valid"])
    # independent recomputation: scores -> numpy NMS -> numpy filters -> direct crops
    cand, cvalid, score = jax.jit(lambda pp, im, hw: P.score_candidates(
        m, pp, env["emb"], im, hw, stride=16, sizes=(16, 32, 64), chunk=64,
        mean=env["mean"], std=env["std"]))(p, inp["images"], inp["image_hw"])
    cand, cvalid, score = np.asarray(cand), np.asarray(cvalid), np.asarray(score)
    dropped_base = 0
    for i in range(2):
        s = inp["scale"][i]
        kept = _np_nms(cand[i], score[i], cvalid[i], 0.7, SMALL["num_nms"])
        assert len(kept) == out["num_nms"][i]
        gt, gv = inp["gt_boxes"][i], inp["gt_valid"][i]
        near = ((_np_iou(cand[i][kept], gt) >= 0.3) & gv[None]).any(1)
        cands = kept[~near]
        assert len(cands) == out["num_after_gt"][i]
        crops = crop_boxes(inp["images"][i:i + 1], cand[i][cands][None], inp["image_hw"][i:i + 1],
                           enlarge=1.2, out_size=32, mean=env["mean"], std=env["std"])
        e = np.array(encode_image(m, p, jnp.asarray(crops)[0]))
        e /= np.linalg.norm(e, axis=-1, keepdims=True)
        lg = float(np.exp(p["logit_scale"])) * e @ env["emb"].T
        cat = lg.argmax(-1)
        novel = ~IS_BASE[cat]
        dropped_base += int((~novel).sum())
        take = np.nonzero(novel)[0][:k]
        v = out["valid"][i]
        assert v.sum() == len(take)
        np.testing.assert_allclose(out["boxes"][i][v] * s, cand[i][cands[take]], atol=1e-3)
        np.testing.assert_array_equal(out["category"][i][v], cat[take])
        np.testing.assert_allclose(out["score"][i][v], score[i][cands[take]], atol=1e-6)
        pr = np.exp(lg - lg.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        np.testing.assert_allclose(out["confidence"][i][v], pr.max(-1)[take], atol=1e-4)
        np.testing.assert_allclose(out["embeddings"][i][v].astype(np.float32), e[take],
                                   atol=2e-3)
        assert (np.diff(out["score"][i][v]) <= 1e-6).all()          # score order
        # properties: no base argmax, no overlap with base GT, inside the original image
        assert not IS_BASE[out["category"][i][v]].any()
        ob = out["boxes"][i][v]
        if gv.any():
            assert (_np_iou(ob * s, gt[gv]) < 0.3).all()
        hw = inp["image_hw"][i]
        assert (ob[:, 2] <= hw[1] / s + 1e-3).all() and (ob[:, 3] <= hw[0] / s + 1e-3).all()
        np.testing.assert_allclose(out["gt_boxes"][i] * s, gt, atol=1e-4)
        gcrops = crop_boxes(inp["images"][i:i + 1], gt[None], inp["image_hw"][i:i + 1],
                            enlarge=1.2, out_size=32, mean=env["mean"], std=env["std"])
        ge = np.array(encode_image(m, p, jnp.asarray(gcrops)[0]))
        ge /= np.linalg.norm(ge, axis=-1, keepdims=True)
        np.testing.assert_allclose(out["gt_embeddings"][i].astype(np.float32), ge, atol=2e-3)
    # both filters had something to remove in this batch
    assert dropped_base > 0 and (out["num_after_gt"] < out["num_nms"]).any()


def test_flipped_batch_refused():
    b = _batch(0)
    b["flipped"][1] = True
    with pytest.raises(ValueError, match="flip"):
        P.batch_inputs(b, IS_BASE)


def test_store_roundtrip_bit_exact(tmp_path):
    rng = np.random.default_rng(4)
    man = {"num_chunks": 3, "chunk_size": 2, "names": ALL, "settings": {"keep": 12}}
    st = ProposalStore(str(tmp_path / "s"), man)
    recs = {}
    for iid in (7, 9):
        n = 0 if iid == 9 else 5                                  # an empty image too
        recs[iid] = {"boxes": rng.normal(size=(n, 4)).astype(np.float32),
                     "embeddings": rng.normal(size=(n, 32)).astype(np.float16),
                     "category": rng.integers(0, 6, n).astype(np.int32),
                     "gt_boxes": rng.normal(size=(2, 4)).astype(np.float32),
                     "gt_embeddings": rng.normal(size=(2, 32)).astype(np.float16)}
    path = st.write_shard(1, recs)
    assert os.path.basename(path) == "shard_00001-of-00003.npz"
    assert st.finished_shards() == [1]
    back = ProposalStore(str(tmp_path / "s"))                    # reader needs no manifest
    for iid, rec in recs.items():
        got = back.get(iid)
        for f, a in rec.items():
            assert got[f].dtype == a.dtype and got[f].shape == a.shape
            assert got[f].tobytes() == a.tobytes()                 # bit-exact (fp16 too)
    assert set(back.load_all()) == {7, 9} and 7 in back and len(back) == 2
    with pytest.raises(KeyError):
        back.get(8)
    with pytest.raises(StoreError, match="different manifest"):
        ProposalStore(str(tmp_path / "s"), dict(man, settings={"keep": 300}))
    with pytest.raises(StoreError, match="fields"):
        st.write_shard(0, {1: {"a": np.zeros(2)}, 2: {"b": np.zeros(2)}})


def test_run_proposals_resumes_without_recomputing(env, tmp_path):
    batches = {c: _batch(10 + c, ids=[100 + 2 * c, 101 + 2 * c]) for c in range(4)}
    calls = []

    def load_chunk(c):
        calls.append(c)
        if c == 2 and fail["on"]:
            raise KeyboardInterrupt("simulated kill")
        yield batches[c]

    fail = {"on": True}
    man = {"num_chunks": 4, "chunk_size": 2, "names": ALL, "settings": SMALL}
    store = ProposalStore(str(tmp_path / "props"), man)
    # job 1 of 2 takes chunks 1 and 3
    s1 = P.run_proposals(env["model"], env["params"], env["emb"], IS_BASE, load_chunk, 4,
                         store, shard_index=1, num_shards=2, proposal_fn=env["fn"])
    assert s1["processed"] == [1, 3] and s1["images"] == 4 and s1["crops_per_s"] > 0
    # a single job over everything, killed while at chunk 2
    with pytest.raises(KeyboardInterrupt):
        P.run_proposals(env["model"], env["params"], env["emb"], IS_BASE, load_chunk, 4,
                        store, proposal_fn=env["fn"], workdir=str(tmp_path / "wd"))
    assert store.finished_shards() == [0, 1, 3]
    mtimes = {c: os.stat(store.shard_path(c)).st_mtime_ns for c in (0, 1, 3)}
    calls.clear()
    fail["on"] = False
    s2 = P.run_proposals(env["model"], env["params"], env["emb"], IS_BASE, load_chunk, 4,
                         store, proposal_fn=env["fn"])
    assert calls == [2] and s2["processed"] == [2] and s2["skipped"] == [0, 1, 3]
    assert {c: os.stat(store.shard_path(c)).st_mtime_ns for c in (0, 1, 3)} == mtimes
    allrec = ProposalStore(str(tmp_path / "props")).load_all()
    assert sorted(allrec) == list(range(100, 108))
    r = allrec[100]
    assert r["embeddings"].dtype == np.float16 and r["boxes"].shape[1] == 4
    assert len(r["boxes"]) == len(r["score"]) == len(r["category"]) <= SMALL["keep"]
    assert r["gt_embeddings"].shape[0] == r["gt_boxes"].shape[0] == len(r["gt_classes"])
    assert not IS_BASE[r["category"]].any() and IS_BASE[r["gt_classes"]].all()


@pytest.mark.parametrize("value,want", [("", (0, 1)), ("0/1", (0, 1)), ("1/3", (1, 3)),
                                        (" 2/3 ", (2, 3))])
def test_proposal_shard_parses_i_of_n(value, want):
    cfg = ml_collections.ConfigDict({"clip": {"proposal_shard": value}})
    assert clip_stages.proposal_shard(cfg) == want      # '' = this process of 1


@pytest.mark.parametrize("value", ["3/3", "-1/2", "1/0", "1", "a/b", "1/2/3", "1/"])
def test_proposal_shard_rejects_bad_values(value):
    cfg = ml_collections.ConfigDict({"clip": {"proposal_shard": value}})
    with pytest.raises(ConfigError, match="config.clip.proposal_shard"):
        clip_stages.proposal_shard(cfg)
