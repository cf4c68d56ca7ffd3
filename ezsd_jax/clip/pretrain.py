"""Toy CLIP pretraining: contrastive image-caption training of a small FlaxCLIPModel.

The demo's stand-in for OpenAI's CLIP pretraining (stage 'clip_pretrain', demo/stages.py):
no real CLIP weights exist offline, so the demo trains its own teacher on the caption set of
demo/world.py and saves it like a real checkpoint for `loading.load_clip`. Loss and
schedule: docs/code-notes.md.
"""
from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from transformers import FlaxCLIPModel

from ezsd_jax.core import train_loop
from ezsd_jax.clip.loading import CLIP_MEAN, CLIP_STD
from ezsd_jax.clip.renorm import crop_accuracy, save_adapted_clip
from ezsd_jax.clip.text import encode_image, encode_text, text_embeddings, tokenize
from ezsd_jax.clip.toy import make_tokenizer, tiny_clip_config
from ezsd_jax.ops.vectors import l2_normalize

MAX_LOGIT_SCALE = math.log(100.0)

_DEFAULTS = dict(hidden=64, layers=2, heads=2, image_size=32, patch=8, projection_dim=64,
                 max_text_len=16, steps=600, batch_size=128, lr=1e-3, weight_decay=1e-2,
                 warmup_steps=50, grad_clip=1.0, flip_prob=0.5, seed=0, ckpt_every=200,
                 keep=2, log_every=50)


def pretrain_config(cfg: Any = None) -> dict:
    """config.clip.pretrain (or a dict) -> all fields with defaults; unknown -> error."""
    out = dict(_DEFAULTS)
    if cfg is None:
        return out
    keys = list(cfg.keys()) if hasattr(cfg, "keys") else []
    unknown = sorted(set(keys) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"config.clip.pretrain: unknown fields {unknown}; known: "
                         f"{sorted(_DEFAULTS)}")
    for k in keys:
        out[k] = cfg[k]
    return out


# ----------------------------------------------------------------------------- model

def init_clip(tokenizer, c: Mapping[str, Any]):
    """A fresh FlaxCLIPModel of the `pretrain_config` sizes for `tokenizer`'s vocabulary,
    with transformers' standard (train-from-scratch) init -> (model, params)."""

    cfg = tiny_clip_config(len(tokenizer.get_vocab()), hidden=int(c["hidden"]),
                           layers=int(c["layers"]), heads=int(c["heads"]),
                           image_size=int(c["image_size"]), patch=int(c["patch"]),
                           projection_dim=int(c["projection_dim"]),
                           max_text_len=int(c["max_text_len"]),
                           bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    model = FlaxCLIPModel(cfg, seed=int(c["seed"]), dtype=jnp.float32)
    params = jax.tree_util.tree_map(jnp.asarray, model.params)
    return model, params


def normalize_pixels(pixels: jnp.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> jnp.ndarray:
    """uint8 / 0..255 [..., 3] -> CLIP-normalized float32."""
    x = jnp.asarray(pixels, jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# ----------------------------------------------------------------------------- loss

def contrastive_loss(img: jnp.ndarray, txt: jnp.ndarray, scale: jnp.ndarray,
                     group: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Symmetric multi-positive InfoNCE. img, txt [B, D] unit norm (pair i = image i,
    caption i), group [B] (pairs of the same group are positives of each other).
    Returns (loss, image->text retrieval accuracy: the top caption is a positive)."""
    logits = scale * img @ txt.T
    same = (group[:, None] == group[None, :]).astype(jnp.float32)
    target = same / same.sum(axis=1, keepdims=True)      # symmetric: rows == columns
    l_i2t = -(target * jax.nn.log_softmax(logits, axis=1)).sum(axis=1).mean()
    l_t2i = -(target * jax.nn.log_softmax(logits.T, axis=1)).sum(axis=1).mean()
    top = jnp.argmax(logits, axis=1)
    acc = jnp.take_along_axis(same, top[:, None], axis=1).mean()
    return 0.5 * (l_i2t + l_t2i), acc


def make_optimizer(c: Mapping[str, Any]) -> optax.GradientTransformation:
    steps = max(int(c["steps"]), 1)
    warm = min(int(c["warmup_steps"]), steps - 1) if steps > 1 else 0
    sched = optax.warmup_cosine_decay_schedule(0.0, float(c["lr"]), max(warm, 1), steps,
                                               end_value=0.05 * float(c["lr"]))
    return optax.chain(optax.clip_by_global_norm(float(c["grad_clip"])),
                       optax.adamw(sched, weight_decay=float(c["weight_decay"])))


def make_pretrain_step(model, tx: optax.GradientTransformation, *, mean=CLIP_MEAN,
                       std=CLIP_STD, flip_prob: float = 0.5, seed: int = 0):
    """-> step(state, batch) -> (state, metrics), pure and jittable. batch: pixels uint8
    [B, S, S, 3], input_ids / attention_mask [B, L], group [B] int32."""
    base_key = jax.random.PRNGKey(seed)

    def step(state, batch):
        x = normalize_pixels(batch["pixels"], mean, std)
        key = jax.random.fold_in(base_key, state["step"])
        flip = jax.random.bernoulli(key, flip_prob, (x.shape[0],))
        x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
        group = jnp.asarray(batch["group"], jnp.int32)

        def loss_fn(params):
            img = l2_normalize(encode_image(model, params, x))
            txt = l2_normalize(encode_text(model, params, batch["input_ids"],
                                           batch["attention_mask"]))
            scale = jnp.exp(params["logit_scale"])
            return contrastive_loss(img, txt, scale, group)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params = dict(params)
        params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE)
        metrics = {"loss": loss, "retrieval_acc": acc,
                   "logit_scale": jnp.exp(params["logit_scale"]),
                   "grad_norm": optax.global_norm(grads)}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return step


# ----------------------------------------------------------------------------- data

def caption_batches(images: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray,
                    groups: np.ndarray, batch_size: int, seed: int):
    """-> batches(start_step): step s draws `batch_size` distinct examples with a generator
    seeded by (seed, s), so a resumed run sees the batches an uninterrupted one would."""
    n = len(images)
    b = min(int(batch_size), n)

    def batches(start: int):
        s = int(start)
        while True:
            idx = np.random.default_rng([int(seed), s]).choice(n, b, replace=False)
            yield {"pixels": images[idx], "input_ids": input_ids[idx],
                   "attention_mask": attention_mask[idx],
                   "group": groups[idx].astype(np.int32)}
            s += 1
    return batches


# ----------------------------------------------------------------------------- eval

def clean_accuracy(model, params, tokenizer, images: np.ndarray, labels: np.ndarray,
                   names: Sequence[str], is_base: np.ndarray | None = None,
                   templates: Sequence[str] = ("a photo of a {}.",), mean=CLIP_MEAN,
                   std=CLIP_STD, batch_size: int = 256) -> dict:
    """Zero-shot classification of whole (clean) images over ALL `names` (prompt
    embeddings of `templates`), as renorm.crop_accuracy reports it: acc_all / acc_base /
    acc_novel and counts. images uint8 [N, S, S, 3] at the CLIP input size."""
    emb = text_embeddings(model, params, tokenizer, names, templates)
    n = len(images)
    bs = min(int(batch_size), n)

    def batches():
        for s in range(0, n, bs):
            sl = slice(s, min(s + bs, n))
            pix = np.zeros((bs,) + images.shape[1:], np.uint8)
            lab = np.full((bs,), -1, np.int32)
            pix[:sl.stop - s] = images[sl]
            lab[:sl.stop - s] = labels[sl]
            crops = np.asarray(normalize_pixels(pix, mean, std))
            yield {"crops": crops, "labels": lab, "mask": lab >= 0}
    return crop_accuracy(model, params, batches(), emb, is_base=is_base)


# ----------------------------------------------------------------------------- driver

def run_pretrain(images: np.ndarray, captions: Sequence[str], groups: np.ndarray,
                 words: Sequence[str], out_dir: str, workdir: str, cfg: Any = None,
                 log=print) -> dict:
    """Trains a toy CLIP on (images uint8 [N, S, S, 3], captions [N]) and saves it to
    `out_dir` (a load_clip-readable directory). groups [N]: the category each caption
    names (positives of each other). words: vocabulary words (names + caption words)
    for the toy tokenizer. Resumes from <workdir>/ckpt_clip_pretrain.
    Returns {'model', 'params', 'tokenizer', 'rows', 'clip_dir'}."""

    c = pretrain_config(cfg)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (int(c["image_size"]),) * 2 + (3,):
        raise ValueError(f"clip pretraining: images must be [N, {c['image_size']}, "
                         f"{c['image_size']}, 3] (the CLIP input size), got {images.shape}")
    if len(captions) != len(images) or len(groups) != len(images):
        raise ValueError(f"clip pretraining: {len(images)} images, {len(captions)} "
                         f"captions, {len(groups)} groups")
    with tempfile.TemporaryDirectory(dir=workdir) as tok_dir:
        tokenizer = make_tokenizer(tok_dir, list(words) + list(captions))
    model, params = init_clip(tokenizer, c)
    ids, mask = tokenize(tokenizer, list(captions), int(c["max_text_len"]))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    log(f"[clip_pretrain] toy CLIP {n_params / 1e6:.2f}M parameters, vocab "
        f"{len(tokenizer.get_vocab())}; {len(images)} caption images, "
        f"{len(set(np.asarray(groups).tolist()))} categories, {c['steps']} steps of "
        f"{c['batch_size']}")
    tx = make_optimizer(c)
    step = jax.jit(make_pretrain_step(model, tx, flip_prob=float(c["flip_prob"]),
                                      seed=int(c["seed"])), donate_argnums=(0,))
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": tx.init(params)}
    batches = caption_batches(images, ids, mask, np.asarray(groups), int(c["batch_size"]),
                              int(c["seed"]))
    state, rows = train_loop.fit(state=state, step_fn=step, batches=batches,
                                 num_steps=int(c["steps"]), workdir=workdir,
                                 name="clip_pretrain", ckpt_every=int(c["ckpt_every"]),
                                 keep=int(c["keep"]), log_every=int(c["log_every"]),
                                 items_per_step=float(c["batch_size"]), unit="img")
    params = state["params"]
    clip_dir = save_adapted_clip(os.path.abspath(out_dir), model, params, tokenizer)
    return {"model": model, "params": params, "tokenizer": tokenizer, "rows": rows,
            "clip_dir": clip_dir}


__all__ = ["pretrain_config", "init_clip", "normalize_pixels", "contrastive_loss",
           "make_optimizer", "make_pretrain_step", "caption_batches", "clean_accuracy",
           "run_pretrain", "MAX_LOGIT_SCALE"]
