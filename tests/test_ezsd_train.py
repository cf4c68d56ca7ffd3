"""EZSD distillation and the EZSD stages: the distillation loss against numpy, weight
renormalization and proposal sampling, the pipeline extra_fn (box mapping with flip,
GT-only, missing images), per-image reads of the proposal store, and a short end-to-end
ezsd_train -> ezsd_eval run on the synthetic set with a fake proposal store and random
text embeddings."""
import csv
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import cocoeval_ap
from configs import coco as coco_cfg
from configs import synthetic_detection
from ezsd_jax.clip.store import ProposalStore
from ezsd_jax.clip.text import save_text_embeddings
from ezsd_jax.data.coco import ImageRecord
from ezsd_jax.data.transforms import example_info
from ezsd_jax.clip.text import text_embeddings_path
from ezsd_jax.ezsd import distill, stages

D = 32


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- loss

def _np_loss(r, t, w, mask, factor):
    m = mask.astype(np.float64)
    wn = np.zeros_like(m)
    for b in range(len(w)):
        n, s = m[b].sum(), (w[b] * m[b]).sum()
        wn[b] = w[b] * m[b] * n / s if s > 0 else m[b]
    elem = np.abs(r - t) * m[..., None]                     # [B,P,D]
    n_el = max(m.sum(), 1) * r.shape[-1]
    return (wn[..., None] * elem).sum() / n_el * r.shape[-1] * factor, wn


@pytest.mark.parametrize("b,p,factor", [(2, 7, 1.0), (3, 1, 0.5), (1, 12, 2.0)])
def test_distill_loss_matches_numpy(rng, b, p, factor):
    r = _unit(rng.normal(size=(b, p, D))).astype(np.float32)
    t = _unit(rng.normal(size=(b, p, D))).astype(np.float16)
    w = rng.uniform(0.05, 1.0, (b, p)).astype(np.float32)
    mask = rng.random((b, p)) < 0.7
    mask[0, 0] = True
    if b > 1:
        mask[-1] = False       # an image without targets
    wn = distill.normalize_weights(jnp.asarray(w), jnp.asarray(mask))
    want, want_wn = _np_loss(r, t.astype(np.float32), w, mask, factor)
    np.testing.assert_allclose(np.asarray(wn), want_wn, rtol=1e-5, atol=1e-6)
    for i in range(b):   # mean 1 over each image's valid entries
        if mask[i].any():
            assert np.asarray(wn)[i][mask[i]].mean() == pytest.approx(1.0, rel=1e-5)
    out = distill.distill_loss_terms(jnp.asarray(r), jnp.asarray(t), wn, jnp.asarray(mask),
                                     factor)
    np.testing.assert_allclose(float(out["loss_distill"]), want, rtol=1e-5)
    cos = (r * t.astype(np.float32)).sum(-1)
    assert float(out["distill_cos"]) == pytest.approx(cos[mask].mean(), rel=1e-4)


def test_normalize_weights_zero_sum_falls_back_to_ones():
    w = jnp.zeros((1, 4))
    mask = jnp.asarray([[True, True, False, True]])
    np.testing.assert_allclose(np.asarray(distill.normalize_weights(w, mask)),
                               [[1, 1, 0, 1]])


def test_sampling_keeps_gt_and_picks_valid_proposals(rng):
    b, slots, g, n = 3, 10, 4, 5
    mask = rng.random((b, slots + g)) < 0.6
    mask[2, :slots] = False
    mask[1, :slots] = True
    batch = {"distill_boxes": jnp.asarray(rng.uniform(0, 50, (b, slots + g, 4)), jnp.float32),
             "distill_emb": jnp.asarray(rng.normal(size=(b, slots + g, D)), jnp.float16),
             "distill_weight": jnp.asarray(np.arange(b * (slots + g)).reshape(b, -1),
                                           jnp.float32),
             "distill_mask": jnp.asarray(mask), "valid": jnp.asarray([True, True, True])}
    for mode in ("random", "first"):
        sel = distill.select_entries(jax.random.key(3), batch, slots, n, mode)
        assert sel["boxes"].shape == (b, n + g, 4) and sel["emb"].shape == (b, n + g, D)
        w, m = np.asarray(sel["weight"]), np.asarray(sel["mask"])
        np.testing.assert_array_equal(w[:, n:], np.asarray(batch["distill_weight"])[:, slots:])
        np.testing.assert_array_equal(m[:, n:], mask[:, slots:])
        for i in range(b):
            picked = w[i, :n][m[i, :n]].astype(int) - i * (slots + g)
            valid = np.flatnonzero(mask[i, :slots])
            assert len(set(picked)) == len(picked) == min(n, len(valid))
            assert set(picked) <= set(valid)
            if mode == "first":
                np.testing.assert_array_equal(picked, valid[:n])
    a = distill.select_entries(jax.random.key(1), batch, slots, n)["weight"]
    c = distill.select_entries(jax.random.key(2), batch, slots, n)["weight"]
    assert not np.array_equal(np.asarray(a), np.asarray(c))   # random differs per key
    batch["valid"] = jnp.asarray([True, False, True])
    assert not np.asarray(distill.select_entries(jax.random.key(1), batch, slots, n)
                          ["mask"])[1].any()


def test_extra_loss_fn_end_to_end_with_stub_module(rng):
    """extra_loss_fn = normalize(weights) . L1(embed(roi_align(boxes)), target), with the
    head's embed and RoIAlign stubbed by a fixed function of the box."""
    proj = jnp.asarray(rng.normal(size=(4, D)), jnp.float32)
    head = types.SimpleNamespace(embed=lambda x: x / jnp.linalg.norm(x, axis=-1,
                                                                     keepdims=True))
    module = types.SimpleNamespace(roi_head=head,
                                   roi_features=lambda feats, boxes: boxes @ proj + 1e-3)
    b, p = 2, 9
    boxes = rng.uniform(0, 100, (b, p, 4)).astype(np.float32)
    t = _unit(rng.normal(size=(b, p, D))).astype(np.float16)
    w = rng.uniform(0.1, 1, (b, p)).astype(np.float32)
    mask = rng.random((b, p)) < 0.8
    batch = {"distill_boxes": boxes, "distill_emb": t, "distill_weight": w,
             "distill_mask": mask, "valid": np.ones(b, bool)}
    fn = distill.make_distill_loss(factor=0.5, num_proposals=9, proposal_slots=9)
    out = fn(module, None, jax.tree_util.tree_map(jnp.asarray, batch), jax.random.key(0))
    r = np.asarray(head.embed(jnp.asarray(boxes) @ proj + 1e-3))
    want, _ = _np_loss(r, t.astype(np.float32), w, mask, 0.5)
    np.testing.assert_allclose(float(out["loss_distill"]), want, rtol=1e-5)
    assert float(out["distill_num"]) == pytest.approx(mask.sum() / b)


# ----------------------------------------------------------------------------- host side

def _record(iid, h=90, w=120):
    return ImageRecord(image_id=iid, path=f"/x/{iid}.jpg", height=h, width=w,
                       boxes=np.zeros((0, 4), np.float32), classes=np.zeros(0, np.int32))


def _rand_boxes(rng, n, h, w):
    xy = rng.uniform(0, [w - 10, h - 10], (n, 2))
    wh = rng.uniform(5, 40, (n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32)


def _write_store(directory, records, rng, n_props=(6, 0, 3), n_gt=(2, 1, 0)):
    store = ProposalStore(str(directory), manifest={"num_chunks": 2, "chunk_size": 2})
    data = {}
    for k, rec in enumerate(records):
        n, g = n_props[k % len(n_props)], n_gt[k % len(n_gt)]
        data[rec.image_id] = {
            "boxes": _rand_boxes(rng, n, rec.height, rec.width),
            "embeddings": _unit(rng.normal(size=(n, D))).astype(np.float16),
            "confidence": rng.uniform(0.1, 1, n).astype(np.float32),
            "category": rng.integers(0, 3, n).astype(np.int32),
            "score": rng.uniform(0, 1, n).astype(np.float32),
            "gt_boxes": _rand_boxes(rng, g, rec.height, rec.width),
            "gt_embeddings": _unit(rng.normal(size=(g, D))).astype(np.float16),
            "gt_classes": np.zeros(g, np.int32)}
    ids = list(data)
    store.write_shard(0, {i: data[i] for i in ids[:2]})
    store.write_shard(1, {i: data[i] for i in ids[2:]})
    return store, data


def test_reader_matches_store(tmp_path, rng):
    records = [_record(i) for i in (3, 7, 11, 20)]
    store, data = _write_store(tmp_path / "p", records, rng)
    reader = distill.ProposalReader(store)
    assert len(reader) == 4 and 7 in reader and 99 not in reader
    for rec in records:
        got, want = reader.get(rec.image_id), store.get(rec.image_id)
        for f in distill.FIELDS:
            assert got[f].dtype == want[f].dtype
            np.testing.assert_array_equal(got[f], want[f])
    with pytest.raises(KeyError, match="99"):
        reader.get(99)


@pytest.mark.parametrize("flip", [False, True])
def test_extra_fn_maps_boxes_with_the_image(tmp_path, rng, flip):
    records = [_record(i, h=90, w=100) for i in (1, 2, 3)]
    store, data = _write_store(tmp_path / "p", records, rng)
    fn = distill.make_extra_fn(store, embed_dim=D, proposal_slots=4, max_gt=3)
    rec = records[0]                                      # 6 proposals, 2 GT
    info = example_info(rec, (128, 128), 100, 128, flip)
    out = fn(rec, info)
    assert out["distill_boxes"].shape == (7, 4) and out["distill_emb"].dtype == np.float16
    s, (nh, nw) = info["scale"], info["resized_hw"]
    assert s == pytest.approx(100 / 90) and nw == 111

    def expect(b):
        b = b * s
        if flip:
            b = np.stack([nw - b[:, 2], b[:, 1], nw - b[:, 0], b[:, 3]], 1)
        return np.clip(b, 0, [nw, nh, nw, nh])   # clipped to the resized image
    d = data[1]
    np.testing.assert_allclose(out["distill_boxes"][:4], expect(d["boxes"][:4]), rtol=1e-5)
    np.testing.assert_allclose(out["distill_boxes"][4:6], expect(d["gt_boxes"]), rtol=1e-5)
    np.testing.assert_array_equal(out["distill_emb"][:4], d["embeddings"][:4])  # unflipped
    np.testing.assert_array_equal(out["distill_emb"][4:6], d["gt_embeddings"])
    np.testing.assert_allclose(out["distill_weight"][:4], d["confidence"][:4])
    np.testing.assert_allclose(out["distill_weight"][4:], [1, 1, 0])
    np.testing.assert_array_equal(out["distill_mask"], [1, 1, 1, 1, 1, 1, 0])
    # an image with no proposals and one GT: fixed shapes, padding masked
    out2 = fn(records[1], example_info(records[1], (128, 128), 100, 128, flip))
    np.testing.assert_array_equal(out2["distill_mask"], [0, 0, 0, 0, 1, 0, 0])
    assert all(out2[k].shape == out[k].shape for k in out)


def test_extra_fn_gt_only_and_missing_images(tmp_path, rng):
    records = [_record(i) for i in (1, 2, 3)]
    store, data = _write_store(tmp_path / "p", records, rng)
    fn = distill.make_extra_fn(store, embed_dim=D, proposal_slots=4, max_gt=2, gt_only=True)
    out = fn(records[0], example_info(records[0], (128, 128), 90, 128, False))
    assert out["distill_boxes"].shape == (2, 4)
    np.testing.assert_array_equal(out["distill_emb"], data[1]["gt_embeddings"])
    with pytest.raises(KeyError, match="image id 42"):
        fn(_record(42), example_info(_record(42), (128, 128), 90, 128, False))
    fn = distill.make_extra_fn(store, embed_dim=D, max_gt=2, on_missing="empty")
    out = fn(_record(42), example_info(_record(42), (128, 128), 90, 128, False))
    assert not out["distill_mask"].any()
    with pytest.raises(ValueError, match="embed_dim"):
        distill.make_extra_fn(store, embed_dim=D + 1)(
            records[0], example_info(records[0], (128, 128), 90, 128, False))


# ----------------------------------------------------------------------------- stages

def test_class_embeddings_lookup(tmp_path, rng):
    cfg = _ezsd_synthetic_config(["a", "b", "c"], ["a", "b"], ["c"])
    with pytest.raises(FileNotFoundError, match="renorm"):
        text_embeddings_path(cfg, str(tmp_path))
    emb = rng.normal(size=(3, D)).astype(np.float32)
    os.makedirs(tmp_path / "clip_renorm")
    save_text_embeddings(str(tmp_path / "clip_renorm" / "text_embeddings.npz"),
                         ["c", "a", "b"], emb)
    path = text_embeddings_path(cfg, str(tmp_path))
    got = stages.load_class_embeddings(path, ["a", "c"], D)
    np.testing.assert_allclose(got, _unit(emb[[1, 0]]), rtol=1e-6)
    with pytest.raises(ValueError, match="'z'"):
        stages.load_class_embeddings(path, ["a", "z"], D)
    with pytest.raises(ValueError, match="embed_dim"):
        stages.load_class_embeddings(path, ["a"], D * 2)
    cfg.model.roi_head = "standard"
    with pytest.raises(ValueError, match="roi_head='ezsd'"):
        stages.head_config(cfg, 2)


def _ezsd_synthetic_config(names, base, novel):
    cfg = synthetic_detection.get_config()
    cfg.synth.num_categories = len(names)
    cfg.synth.train_images = 16
    cfg.synth.val_images = 8
    cfg.model.roi_head = "ezsd"
    cfg.model.box_num_convs = 1
    cfg.model.ezsd = coco_cfg.ezsd_head_config(embed_dim=D)
    cfg.ezsd = coco_cfg.ezsd_config(split="names", base_names=base, novel_names=novel)
    cfg.ezsd.distill.update(dict(proposal_slots=6, num_proposals=4, max_gt=8))
    cfg.train.update(dict(steps=24, warmup_steps=4, lr=0.02, ckpt_every=24, log_every=1))
    cfg.eval.batch_size = 8
    return cfg


@pytest.mark.slow
def test_ezsd_train_and_eval_stages(tmp_path, rng):
    from ezsd_jax.data import synthetic_stage
    from ezsd_jax.data.synthetic import default_categories
    from ezsd_jax.train import load_dataset
    names = [c.name for c in default_categories(4)]
    base, novel = names[:3], names[3:]
    cfg = _ezsd_synthetic_config(names, base, novel)
    wd = str(tmp_path)
    synthetic_stage.run(cfg, wd)
    # what renorm and proposals would write: text embeddings of ALL names, and per train
    # image CLIP proposals (random boxes, a shared 'background' embedding) + base GT boxes
    # whose target is their class's text embedding (a learnable distillation target)
    text = _unit(rng.normal(size=(len(names), D))).astype(np.float32)
    save_text_embeddings(os.path.join(wd, "clip_renorm", "text_embeddings.npz"), names, text)
    train_ds = load_dataset(cfg.data, "train", category_names=base)
    bg = _unit(rng.normal(size=D)).astype(np.float16)
    store = ProposalStore(os.path.join(wd, "proposals"), manifest={"num_chunks": 1})
    recs = {}
    for r in train_ds.records:
        n = 5
        recs[r.image_id] = {
            "boxes": _rand_boxes(rng, n, r.height, r.width),
            "embeddings": np.tile(bg, (n, 1)), "confidence": rng.uniform(0.2, 1, n)
            .astype(np.float32),
            "gt_boxes": r.boxes, "gt_embeddings": text[r.classes].astype(np.float16)}
    store.write_shard(0, recs)

    out = stages.ezsd_train(cfg, wd)
    assert out["names"] == base
    with open(os.path.join(wd, "metrics", "ezsd.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24
    loss = np.array([float(r["loss_distill"]) for r in rows])
    assert np.all(np.isfinite([float(r["loss"]) for r in rows]))
    print("distill loss", np.round(loss, 2))
    assert loss[-5:].mean() < 0.8 * loss[:5].mean()
    cos = np.array([float(r["distill_cos"]) for r in rows])
    assert cos[-5:].mean() > cos[:5].mean()

    summary = stages.ezsd_eval(cfg, wd)
    assert summary["step"] == 24 and summary["protocol"] == "coco"
    with open(os.path.join(wd, "eval", "ezsd_eval_metrics.json")) as f:
        metrics = json.load(f)
    assert set(metrics) >= {"all", "novel", "base"} and metrics["num_images"] == 8
    dets = json.load(open(os.path.join(wd, "eval", "ezsd_eval_detections.json")))
    assert dets and {d["category_id"] for d in dets} <= set(range(1, 5))
    # every group's AP / AP50 is pycocotools' COCOeval of the written detections on that
    # group's categories (an independent evaluation of the same file)
    for g, group in (("all", names), ("novel", novel), ("base", base)):
        want = cocoeval_ap(cfg.data.val_ann, dets, group, "bbox")
        assert [summary[g]["AP"], summary[g]["AP50"]] == pytest.approx(want, abs=1e-12), g
    # both resume: training is done, the summary is of the latest checkpoint
    assert stages.ezsd_eval(cfg, wd) == json.load(open(os.path.join(wd, "eval",
                                                                    "ezsd_summary.json")))
    # the LVIS protocol branch on an LVIS-format copy of the val set (novel = rare)
    from ezsd_jax.data.synthetic import to_lvis_format
    val = to_lvis_format(json.load(open(cfg.data.val_ann)), "val",
                         {n: "r" if n in novel else "f" for n in names})
    assert all("file_name" not in im for im in val["images"])
    lvis_ann = os.path.join(wd, "lvis_val.json")
    json.dump(val, open(lvis_ann, "w"))
    cfg.data.val_ann = lvis_ann
    cfg.data.val_images = os.path.dirname(cfg.data.val_images.rstrip("/"))   # coco_url
    cfg.ezsd.eval.update(dict(protocol="lvis", force=True))
    summary = stages.ezsd_eval(cfg, wd)
    assert summary["protocol"] == "lvis" and summary["step"] == 24
    for k in ("APr", "APc", "APf"):
        assert -1.0 <= summary[k] <= 1.0
    assert summary["APc"] == -1.0     # no common categories
    m = json.load(open(os.path.join(wd, "eval", "ezsd_eval_metrics.json")))
    assert m["num_categories"] == {"r": 1, "c": 0, "f": 3} and 0 <= m["AP"] <= 1
