"""Toy CLIP + tokenizer, text embeddings, and LayerNorm-only re-normalization (tiny CLIP)."""
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ezsd_jax.clip import renorm, text
from ezsd_jax.clip.loading import ClipLoadError, load_clip
from ezsd_jax.clip.toy import make_tiny_clip, make_tokenizer
from ezsd_jax.core.tree_paths import path_str

BASE = ["person", "teddy bear", "hot dog", "tv"]
NOVEL = ["cell phone", "airplane"]
ALL = BASE + NOVEL
TEMPLATES = ("a photo of a {}.", "a picture of the {}.")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tinyclip"))
    model, params, tok, size, mean, std = make_tiny_clip(d, ALL, seed=0, image_size=32,
                                                         patch=8)
    return {"dir": d, "model": model, "params": params, "tok": tok, "size": size,
            "mean": mean, "std": std}


def _leaves(tree):
    return {path_str(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(flax.core.unfreeze(tree))}


def test_tokenizer_has_no_unknown_tokens(clip, tmp_path):
    tok = clip["tok"]
    vocab = tok.get_vocab()
    for t in TEMPLATES + ("a photo of a {}.",):
        for n in ALL:
            pieces = tok.tokenize(t.format(n))
            assert pieces and all(p in vocab for p in pieces), (t, n, pieces)
            ids = tok(t.format(n))["input_ids"]
            assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
            assert tok.eos_token_id not in ids[1:-1]            # unk == eos: none inside
    # whole words are single tokens; unseen text still falls back to byte symbols
    assert tok.tokenize("teddy bear") == ["teddy</w>", "bear</w>"]
    assert all(p in vocab for p in tok.tokenize("zebra-crossing 42, Ünïcode!"))
    tok2 = make_tokenizer(str(tmp_path / "tok"), ["photo", "photograph", "to"])
    assert tok2.tokenize("photo photograph to") == ["photo</w>", "photograph</w>", "to</w>"]


def test_load_clip_errors(tmp_path):
    with pytest.raises(ClipLoadError, match="missing"):
        load_clip(str(tmp_path))
    with pytest.raises(ClipLoadError, match="not a directory"):
        load_clip(str(tmp_path / "nope"))


def test_text_embeddings_unit_norm_ensemble_and_roundtrip(clip, tmp_path):
    m, p, tok = clip["model"], clip["params"], clip["tok"]
    e1 = text.text_embeddings(m, p, tok, ALL, TEMPLATES[:1], batch_size=4)
    e2 = text.text_embeddings(m, p, tok, ALL, TEMPLATES[1:], batch_size=4)
    ens = text.text_embeddings(m, p, tok, ALL, TEMPLATES, batch_size=5)
    assert ens.shape == (len(ALL), 32) and ens.dtype == np.float32
    for e in (e1, e2, ens):
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    ref = e1 + e2
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(ens, ref, atol=1e-5)
    # jittable in-step version gives the same
    ids, mask = text.prompt_tokens(tok, m, ALL, TEMPLATES)
    jitted = jax.jit(lambda pp: text.ensemble_text_embeddings(m, pp, ids, mask, 2))(p)
    np.testing.assert_allclose(np.asarray(jitted), ens, atol=1e-5)
    path = str(tmp_path / "emb.npz")
    text.save_text_embeddings(path, ALL, ens, TEMPLATES)
    names, back = text.load_text_embeddings(path)
    assert names == ALL
    np.testing.assert_array_equal(back, ens)
    with pytest.raises(ValueError, match="names"):
        text.save_text_embeddings(path, ALL[:2], ens)


def _pipeline_batch(rng, b=2, h=48, w=64, m=5):
    """A batch in the data pipeline's format (classes index ALL)."""
    image = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
    x1 = rng.uniform(0, w - 20, (b, m))
    y1 = rng.uniform(0, h - 20, (b, m))
    boxes = np.stack([x1, y1, x1 + rng.uniform(6, 20, (b, m)),
                      y1 + rng.uniform(6, 20, (b, m))], -1).astype(np.float32)
    classes = rng.integers(0, len(ALL), (b, m)).astype(np.int32)
    box_mask = np.ones((b, m), bool)
    box_mask[1, 3:] = False
    return {"image": image, "boxes": boxes, "classes": classes, "box_mask": box_mask,
            "image_id": np.arange(b), "scale": np.full((b,), 0.5, np.float32),
            "orig_hw": np.array([[96, 128], [80, 100]]), "flipped": np.zeros(b, bool),
            "valid": np.ones(b, bool)}


@pytest.mark.slow  # > 20 CPU-s: in make test, not make test-fast
def test_renorm_changes_only_layernorms_and_reloads(clip, tmp_path):
    m, p0 = clip["model"], flax.core.unfreeze(clip["params"])
    mask = renorm.layernorm_mask(p0, text_layernorms=True)
    n_train = renorm.count_params(p0, mask)
    # vision: pre + 2 layers x 2 + post LNs; text: 2 layers x 2 + final; 2 x 32 each
    assert n_train == (1 + 4 + 1) * 64 + (4 + 1) * 64
    n_vision = renorm.count_params(p0, renorm.layernorm_mask(p0, False, verbose=False))
    assert n_vision == 6 * 64
    tx = renorm.make_optimizer(mask, lr=1e-2)
    base_names = BASE
    ids, tmask = text.prompt_tokens(clip["tok"], m, base_names)
    step = jax.jit(renorm.make_renorm_train_step(
        m, tx, text_ids=ids, text_mask=tmask, train_text=True, flip_prob=0.0, mask=mask,
        mean=clip["mean"], std=clip["std"]))
    rng = np.random.default_rng(0)
    sb, stats = renorm.flatten_gt_boxes(_pipeline_batch(rng), 8,
                                        renorm.label_map_for(ALL, BASE), rng)
    assert sb["mask"].sum() == min(stats["available"], 8)
    state = renorm.init_state(p0, tx)
    losses = []
    for _ in range(6):
        state, met = step(state, sb)
        losses.append(float(met["loss"]))
    assert float(met["grad_norm"]) > 0
    assert losses[-1] < losses[0], losses
    before, after = _leaves(p0), _leaves(state["params"])
    flat_mask = {path_str(k): v for k, v in
                 jax.tree_util.tree_leaves_with_path(mask)}
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert changed and all(flat_mask[k] for k in changed)
    assert {k for k in flat_mask if flat_mask[k]} >= set(changed)
    for k, v in before.items():
        if not flat_mask[k]:
            assert np.array_equal(v, after[k]) and v.dtype == after[k].dtype, k
    assert np.array_equal(before["logit_scale"], after["logit_scale"])
    # adapted CLIP reloads like the original and gives identical embeddings
    out = renorm.save_adapted_clip(str(tmp_path / "adapted"), m, state["params"],
                                   clip["tok"], clip["mean"], clip["std"])
    m2, p2, tok2, size2, mean2, std2 = load_clip(out)
    assert size2 == clip["size"] and np.allclose(mean2, clip["mean"])
    assert tok2.get_vocab() == clip["tok"].get_vocab()
    px = jnp.asarray(rng.normal(size=(3, 32, 32, 3)), jnp.float32)
    a = jax.jit(lambda pp, x: text.encode_image(m, pp, x))(state["params"], px)
    b = jax.jit(lambda pp, x: text.encode_image(m2, pp, x))(p2, px)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # fixed text side + softmax option, on pre-cut crops (crops mode)
    emb = text.text_embeddings(m, p0, clip["tok"], base_names)
    vmask = renorm.layernorm_mask(p0, False, verbose=False)
    tx2 = renorm.make_optimizer(vmask)
    step2 = jax.jit(renorm.make_renorm_train_step(m, tx2, text_emb=emb, loss="softmax"))
    crops = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3)))
    st2, met2 = step2(renorm.init_state(p0, tx2),
                      {"crops": crops, "labels": np.array([0, 1, 2, 3]),
                       "mask": np.array([1, 1, 1, 0], bool)})
    assert np.isfinite(float(met2["loss"])) and float(met2["crops"]) == 3
    st2p = _leaves(st2["params"])
    assert all(np.array_equal(before[k], st2p[k]) for k in before
               if k.startswith("text_model"))
    assert any(not np.array_equal(before[k], st2p[k]) for k in before
               if k.startswith("vision_model"))


@pytest.mark.slow  # > 20 CPU-s: in make test, not make test-fast
def test_crop_accuracy_and_driver(clip, tmp_path):
    m, p = clip["model"], clip["params"]
    rng = np.random.default_rng(3)
    emb_all = text.text_embeddings(m, p, clip["tok"], ALL)
    sb, _ = renorm.flatten_gt_boxes(_pipeline_batch(rng), 8,
                                    renorm.label_map_for(ALL, ALL), rng)
    is_base = np.array([n in BASE for n in ALL])
    acc = renorm.crop_accuracy(m, p, [sb, sb], emb_all, is_base, mean=clip["mean"],
                               std=clip["std"])
    assert acc["n_base"] + acc["n_novel"] == 2 * int(sb["mask"].sum())
    assert 0.0 <= acc["acc_all"] <= 1.0
    pred = renorm.crop_predictions(m, p, emb_all, sb)
    want = (np.asarray(sb["labels"]) == pred)[sb["mask"]].mean()
    assert abs(acc["acc_all"] - want) < 1e-9

    batches = [_pipeline_batch(np.random.default_rng(i)) for i in range(6)]
    cfg = {"crops_per_step": 8, "lr": 1e-3, "ckpt_every": 2, "log_every": 1,
           "templates": ("a photo of a {}.",)}
    wd = str(tmp_path / "wd")
    r1 = renorm.run_renorm(m, p, clip["tok"], lambda s: iter(batches[s:]), BASE, ALL, 3,
                           cfg, wd, mean=clip["mean"], std=clip["std"])
    assert [row["step"] for row in r1["rows"]] == [1, 2, 3]
    names, emb = text.load_text_embeddings(r1["text_embeddings"])
    assert names == ALL and emb.shape == (len(ALL), 32)
    m3, p3, *_ = load_clip(r1["clip_dir"])
    np.testing.assert_allclose(text.text_embeddings(m3, p3, clip["tok"], ALL), emb,
                               atol=1e-6)
    assert os.path.exists(os.path.join(wd, "metrics", "renorm.csv"))
    # a finished run restarted: restores the final checkpoint, trains nothing, same outputs
    r2 = renorm.run_renorm(m, p, clip["tok"], lambda s: iter(batches[s:]), BASE, ALL, 3,
                           cfg, wd, mean=clip["mean"], std=clip["std"])
    assert r2["rows"] == []
    np.testing.assert_array_equal(text.load_text_embeddings(r2["text_embeddings"])[1], emb)
    with pytest.raises(ValueError, match="unknown fields"):
        renorm.run_renorm(m, p, clip["tok"], batches, BASE, ALL, 1, {"lrr": 1}, wd)
