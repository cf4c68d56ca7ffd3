"""A tiny random CLIP (+ its own BPE tokenizer) for tests, benchmarks and the demo.

No real run uses it: `make_tiny_clip` writes a `save_pretrained` directory that
`clip/loading.load_clip` reads like a real checkpoint, and the demo's `clip_pretrain` stage
(demo/stages.py) starts from `tiny_clip_config` + `make_tokenizer`. The tokenizer:
docs/code-notes.md.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import regex
from transformers import (CLIPConfig, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig,
                          FlaxCLIPModel)
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from ezsd_jax.clip.loading import load_clip, save_preprocessor
from ezsd_jax.core.io_utils import atomic_write_text

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# Words of the default prompt templates; always in a toy vocabulary.
TEMPLATE_WORDS = ("a", "an", "the", "photo", "of", "picture", "there", "is", "in", "scene",
                  "this", "crop", "object", "{}", ".")
# CLIPTokenizer's pre-tokenizer pattern (transformers/models/clip/tokenization_clip.py).
_PAT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
        r"""[^\s\p{L}\p{N}]+""")


def _pretokens(words: Iterable[str]) -> list[str]:
    """The byte-encoded pre-tokens CLIPTokenizer produces for `words` (lower-cased)."""
    pat = regex.compile(_PAT, regex.IGNORECASE)
    b2u = bytes_to_unicode()
    out, seen = [], set()
    for w in words:
        text = " ".join(str(w).replace("{}", " ").lower().split())
        for tok in pat.findall(text):
            enc = "".join(b2u[b] for b in tok.encode("utf-8"))
            if enc and enc not in seen:
                seen.add(enc)
                out.append(enc)
    return out


def _write_vocab(out_dir: str, merges: list[tuple[str, str]]) -> None:
    b2u = bytes_to_unicode()
    vocab = list(b2u.values())
    vocab = vocab + [v + "</w>" for v in vocab]
    seen = set(vocab)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            vocab.append(a + b)
    vocab += [SOT, EOT]
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "vocab.json"),
                  json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    atomic_write_text(os.path.join(out_dir, "merges.txt"),
                  "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def make_tokenizer(out_dir: str, words: Iterable[str]):
    """Writes vocab.json + merges.txt for `words` (names and prompt words; multi-word
    names are split like CLIP does) into `out_dir`; returns the loaded CLIPTokenizer.

    Merges are chained left to right per word; where an earlier word's merge splits a
    later word, a joining merge is appended (a few rounds) so whole words end up as one
    token. Unknown tokens cannot occur either way: every byte symbol is in the vocabulary.
    """
    pieces = _pretokens(list(TEMPLATE_WORDS) + list(words))
    merges: list[tuple[str, str]] = []
    have = set()

    def add(a: str, b: str) -> None:
        if (a, b) not in have:
            have.add((a, b))
            merges.append((a, b))

    for p in pieces:
        syms = list(p[:-1]) + [p[-1] + "</w>"]
        cur = syms[0]
        for s in syms[1:]:
            add(cur, s)
            cur = cur + s
    tok = None
    for _ in range(8):                     # join words split by other words' merges
        _write_vocab(out_dir, merges)
        tok = CLIPTokenizer(os.path.join(out_dir, "vocab.json"),
                            os.path.join(out_dir, "merges.txt"))
        n_before = len(merges)
        for p in pieces:
            parts = tok.bpe(p).split(" ")
            cur = parts[0]
            for s in parts[1:]:
                add(cur, s)
                cur = cur + s
        if len(merges) == n_before:
            break
    tok.save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)


def tiny_clip_config(vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 2,
                     image_size: int = 32, patch: int = 8, projection_dim: int = 32,
                     max_text_len: int = 32, intermediate: int | None = None,
                     bos_token_id: int | None = None, eos_token_id: int | None = None):
    """A small CLIPConfig (text and vision towers of the same width/depth)."""
    if image_size % patch:
        raise ValueError(f"tiny_clip_config: image_size {image_size} not divisible by "
                         f"patch {patch}")
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    bos = vocab_size - 2 if bos_token_id is None else bos_token_id
    inter = 4 * hidden if intermediate is None else intermediate
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          max_position_embeddings=max_text_len, projection_dim=projection_dim,
                          bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=inter,
                              num_hidden_layers=layers, num_attention_heads=heads,
                              image_size=image_size, patch_size=patch,
                              projection_dim=projection_dim)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                      projection_dim=projection_dim)


def vitb32_config(vocab_size: int = 49408):
    """The ViT-B/32 CLIP architecture (random init; for benchmarks without weights)."""
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=512, intermediate_size=2048,
                          num_hidden_layers=12, num_attention_heads=8,
                          max_position_embeddings=77, projection_dim=512,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                          pad_token_id=vocab_size - 1)
    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, image_size=224, patch_size=32,
                              projection_dim=512)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                      projection_dim=512)


def informative_init(params: dict, seed: int = 0) -> dict:
    """Re-draws a random CLIP's weights at unit-variance-preserving scales.

    transformers' Flax CLIP initializes with tiny fixed std (0.01-0.02), meant for
    training from scratch: a random tiny CLIP then maps every crop and every prompt to
    nearly the same feature. Kernels here get N(0, 1/fan_in), token/position/class
    embeddings N(0, 1), LayerNorm scales 1, biases 0; logit_scale is kept. Still random,
    but crops and names get distinct features, so tests of classification, scores and
    filters are not degenerate. `params` may hold jax.ShapeDtypeStruct leaves (then
    logit_scale gets CLIP's init value log(1/0.07))."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(seed)
    out = []
    for path, x in leaves:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        shape = tuple(x.shape)
        if name.endswith("kernel"):
            v = rng.normal(0, 1 / np.sqrt(int(np.prod(shape[:-1]))), shape)
        elif name.endswith(("embedding", "class_embedding")):
            v = rng.normal(0, 1, shape)
        elif name.endswith("scale") and name != "logit_scale":
            v = np.ones(shape)
        elif name.endswith("bias"):
            v = np.zeros(shape)
        elif name == "logit_scale":
            v = (np.full(shape, np.log(1 / 0.07)) if isinstance(x, jax.ShapeDtypeStruct)
                 else np.asarray(x))
        else:
            raise ValueError(f"informative_init: unexpected CLIP parameter {name}")
        out.append(np.asarray(v, np.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def _param_shapes(model, cfg):
    """Parameter shapes of a CLIP without running (compiling) its initializer."""
    ids = jnp.zeros((1, 1), jnp.int32)
    px = jnp.zeros((1, cfg.vision_config.image_size, cfg.vision_config.image_size, 3))
    return jax.eval_shape(lambda: model.module.init(
        {"params": jax.random.PRNGKey(0)}, ids, px, ids, ids)["params"])


def make_tiny_clip(out_dir: str, words: Iterable[str], seed: int = 0,
                   informative: bool = True, **config_kwargs):
    """Random-initialized tiny FlaxCLIPModel + toy tokenizer saved into `out_dir`
    (config.json, flax_model.msgpack, vocab/merges, tokenizer and preprocessor configs).
    `config_kwargs` go to `tiny_clip_config`; `informative`: see `informative_init`.
    Returns `load_clip(out_dir)`."""
    tok = make_tokenizer(out_dir, words)
    cfg = tiny_clip_config(len(tok.get_vocab()), bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, **config_kwargs)
    if informative:                      # shapes only: no compile of the initializer
        model = FlaxCLIPModel(cfg, seed=seed, _do_init=False)
        params = informative_init(_param_shapes(model, cfg), seed)
    else:
        model = FlaxCLIPModel(cfg, seed=seed)
        params = model.params
    model.save_pretrained(out_dir, params=params)
    save_preprocessor(out_dir, cfg.vision_config.image_size)
    return load_clip(out_dir)


__all__ = ["make_tokenizer", "tiny_clip_config", "vitb32_config", "informative_init",
           "make_tiny_clip"]
