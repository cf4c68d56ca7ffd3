"""Toy CLIP contrastive pretraining (clip/pretrain.py): the multi-positive InfoNCE against
numpy, deterministic resumable batches, and a short run on the demo world's clean caption
images that lowers the loss, beats chance on held-out images and saves a checkpoint
that load_clip reads back exactly."""
import csv
import os

import jax.numpy as jnp
import numpy as np
import pytest

from ezsd_jax.clip import pretrain
from ezsd_jax.demo import world


def _np_loss(img, txt, scale, group):
    logits = scale * img @ txt.T
    same = (group[:, None] == group[None, :]).astype(np.float64)
    t = same / same.sum(1, keepdims=True)

    def xent(lg, tg):
        lg = lg - lg.max(1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
        return -(tg * logp).sum(1).mean()
    acc = same[np.arange(len(group)), logits.argmax(1)].mean()
    return 0.5 * (xent(logits, t) + xent(logits.T, t.T)), acc


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("b,d,groups", [(6, 8, 6), (16, 4, 3), (9, 16, 1), (12, 8, 5)])
def test_contrastive_loss_matches_numpy(rng, b, d, groups):
    img = _unit(rng.normal(size=(b, d)))
    txt = _unit(rng.normal(size=(b, d)))
    group = rng.permutation(b) if groups >= b else rng.integers(0, groups, b)
    scale = float(rng.uniform(1, 30))
    loss, acc = pretrain.contrastive_loss(jnp.asarray(img, jnp.float32),
                                          jnp.asarray(txt, jnp.float32),
                                          jnp.float32(scale), jnp.asarray(group))
    want, want_acc = _np_loss(img, txt, scale, group)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    assert float(acc) == pytest.approx(want_acc)
    if groups >= b:        # all distinct: the plain CLIP loss (one-hot targets)
        logits = scale * img @ txt.T
        lse = np.log(np.exp(logits).sum(1))
        plain = 0.5 * ((lse - np.diag(logits)).mean() +
                       (np.log(np.exp(logits.T).sum(1)) - np.diag(logits)).mean())
        np.testing.assert_allclose(float(loss), plain, rtol=2e-5)


def test_caption_batches_are_a_function_of_the_step():
    n = 20
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3),
                                                                         np.uint8)
    ids = np.arange(n)[:, None].repeat(3, 1)
    fn = pretrain.caption_batches(images, ids, np.ones_like(ids), np.arange(n) % 4, 8, 3)
    it = fn(0)
    seq = [next(it) for _ in range(5)]
    resumed = next(fn(3))
    for k in seq[3]:
        np.testing.assert_array_equal(seq[3][k], resumed[k])
    b = seq[0]
    assert len(set(b["pixels"][:, 0, 0, 0].tolist())) == 8          # distinct examples
    np.testing.assert_array_equal(b["input_ids"][:, 0], b["pixels"][:, 0, 0, 0])
    assert not np.array_equal(seq[0]["pixels"], seq[1]["pixels"])


def test_pretrain_config_rejects_unknown_fields():
    assert pretrain.pretrain_config({"steps": 3})["steps"] == 3
    with pytest.raises(ValueError, match="stepz"):
        pretrain.pretrain_config({"stepz": 3})


@pytest.mark.slow
def test_toy_pretraining_learns_clean_categories(tmp_path):
    from ezsd_jax.clip.text import text_embeddings
    from ezsd_jax.clip.loading import load_clip
    spec = world.WorldSpec(base=("red circle", "green square", "blue triangle"),
                           novel=("orange diamond",), caption_background=(40, 250),
                           caption_object_frac=(0.5, 0.9), caption_empty_frac=0.1)
    tr = world.load_caption_set(world.write_caption_set(str(tmp_path / "tr.npz"), spec, 48,
                                                        0, "train"))
    ho = world.load_caption_set(world.write_caption_set(str(tmp_path / "ho.npz"), spec, 16,
                                                        0, "heldout"))
    assert (tr["labels"] == -1).sum() == round(0.1 * 48 * 4)       # object-free images
    assert tr["captions"][0] == "a photo of a red circle."
    cfg = dict(hidden=32, layers=1, heads=2, image_size=32, patch=8, projection_dim=32,
               max_text_len=16, steps=80, batch_size=64, lr=2e-3, warmup_steps=10,
               log_every=10, ckpt_every=40)
    wd = str(tmp_path / "wd")
    os.makedirs(wd)
    out_dir = str(tmp_path / "clip")
    res = pretrain.run_pretrain(tr["images"], tr["captions"], tr["labels"], tr["names"],
                                out_dir, wd, cfg)
    with open(os.path.join(wd, "metrics", "clip_pretrain.csv")) as f:
        rows = list(csv.DictReader(f))
    loss = [float(r["loss"]) for r in rows]
    print("contrastive loss", np.round(loss, 3))
    assert loss[-1] < 0.9 * loss[0]
    keep = ho["labels"] >= 0
    acc = pretrain.clean_accuracy(res["model"], res["params"], res["tokenizer"],
                                  ho["images"][keep], ho["labels"][keep], ho["names"],
                                  is_base=~spec.is_novel)
    print("held-out clean accuracy", acc)
    assert acc["n_base"] + acc["n_novel"] == 64
    assert acc["acc_all"] > 0.6          # chance: 0.25
    # the saved directory is a CLIP checkpoint like any other, with identical weights
    model, params, tok, size, mean, std = load_clip(out_dir)
    assert size == 32
    np.testing.assert_allclose(text_embeddings(model, params, tok, ho["names"]),
                               text_embeddings(res["model"], res["params"],
                                               res["tokenizer"], ho["names"]), atol=1e-6)
    # resume: a finished run restores its last checkpoint and trains no further
    again = pretrain.run_pretrain(tr["images"], tr["captions"], tr["labels"], tr["names"],
                                  out_dir, wd, cfg)
    assert again["rows"] == []
