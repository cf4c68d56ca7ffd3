"""CLIP towers as plain jittable functions, and prompt-ensembled text embeddings.

Place in the pipeline: re-normalization classifies crops against the base names' text
embeddings; after it, `text_embeddings` of ALL names from the adapted text tower are saved
(`save_text_embeddings`) and become the detector's frozen classifier weights and the
proposal classifier. Image/text features here are the projected (joint-space) features.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ezsd_jax.core import cli
from ezsd_jax.core.io_utils import atomic_savez
from ezsd_jax.ops.vectors import l2_normalize

DEFAULT_TEMPLATES = ("a photo of a {}.",)
# predict's --prompts=ensemble (added to the training templates): ViLD-style variants
ENSEMBLE_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a picture of a {}.",
                      "there is a {} in the scene.", "this is a photo of a {}.",
                      "a photo of a small {}.", "a photo of a large {}.")

# what the renorm stage (clip/stages.py) writes, read by the EZSD stages and predict
RENORM_DIR = "clip_renorm"
DEFAULT_TEXT_EMBEDDINGS = RENORM_DIR + "/text_embeddings.npz"


def text_embeddings_path(cfg, workdir: str) -> str:
    p = cfg.ezsd.get("text_embeddings", "")
    if p:
        if not os.path.exists(p):
            raise cli.MissingInput(f"config.ezsd.text_embeddings: {p} does not exist")
        return p
    p = os.path.join(workdir, DEFAULT_TEXT_EMBEDDINGS)
    if not os.path.exists(p):
        raise cli.MissingInput(f"no text embeddings: {p} does not exist; run the 'renorm' "
                                "stage first or set config.ezsd.text_embeddings")
    return p


def _vision(module, pixel_values):
    pooled = module.vision_model(pixel_values=pixel_values, deterministic=True)[1]
    return module.visual_projection(pooled)


def _text(module, input_ids, attention_mask, position_ids):
    pooled = module.text_model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, deterministic=True)[1]
    return module.text_projection(pooled)


def encode_image(model, params, pixels: jnp.ndarray) -> jnp.ndarray:
    """pixels [N, S, S, 3] (NHWC, CLIP-normalized) -> projected features [N, D] float32
    (not normalized). Jittable; `model` only supplies the module (closed over)."""
    out = model.module.apply({"params": params}, pixels.astype(model.dtype), method=_vision)
    return out.astype(jnp.float32)


def encode_text(model, params, input_ids: jnp.ndarray, attention_mask: jnp.ndarray
                ) -> jnp.ndarray:
    """token ids [N, L], mask [N, L] -> projected features [N, D] float32 (not normalized)."""
    ids = jnp.asarray(input_ids, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)
    out = model.module.apply({"params": params}, ids, jnp.asarray(attention_mask, jnp.int32),
                             pos, method=_text)
    return out.astype(jnp.float32)


def prompts(names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[str]:
    """Name-major prompt list: [name0/template0, name0/template1, ..., name1/template0 ...]."""
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"prompt template {t!r} has no '{{}}' placeholder")
    return [t.format(n) for n in names for t in templates]


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (input_ids [N, max_length] int32, attention_mask [N, max_length] int32); padded
    with the tokenizer's pad token, truncated (the end-of-text token is kept last)."""
    enc = tokenizer(list(texts), padding="max_length", max_length=max_length,
                    truncation=True, return_tensors="np")
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.asarray(enc["attention_mask"], np.int32)
    # Truncation may cut the EOT token; put it back so pooling reads the right position.
    eot = tokenizer.eos_token_id
    cut = mask[:, -1].astype(bool) & (ids[:, -1] != eot)
    ids[cut, -1] = eot
    return ids, mask


def prompt_tokens(tokenizer, model, names: Sequence[str],
                  templates: Sequence[str] = DEFAULT_TEMPLATES
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids/mask for every (name, template) prompt: [C * T, L] (name-major)."""
    max_len = int(model.config.text_config.max_position_embeddings)
    return tokenize(tokenizer, prompts(names, templates), max_len)


def ensemble_text_embeddings(model, params, input_ids: jnp.ndarray,
                             attention_mask: jnp.ndarray, num_templates: int) -> jnp.ndarray:
    """Jittable: prompt tokens [C*T, L] (name-major) -> [C, D] unit-norm embeddings, the
    mean of the normalized per-template embeddings, renormalized."""
    f = l2_normalize(encode_text(model, params, input_ids, attention_mask))
    f = f.reshape(-1, num_templates, f.shape[-1]).mean(axis=1)
    return l2_normalize(f)


def text_embeddings(model, params, tokenizer, names: Sequence[str],
                    templates: Sequence[str] = DEFAULT_TEMPLATES,
                    batch_size: int = 256) -> np.ndarray:
    """np.float32 [C, D] L2-normalized text embeddings (template ensemble) of `names`.

    The prompts are encoded in fixed-size padded batches by one jitted function."""
    names = list(names)
    if not names:
        raise ValueError("text_embeddings: empty name list")
    ids, mask = prompt_tokens(tokenizer, model, names, templates)
    n = ids.shape[0]
    bs = min(int(batch_size), n)
    pad = (-n) % bs
    ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)])
    mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
    enc = _text_encoder(model)
    feats = np.concatenate([np.asarray(enc(params, ids[s:s + bs], mask[s:s + bs]))
                            for s in range(0, ids.shape[0], bs)])[:n]
    feats = feats.reshape(len(names), len(templates), -1).mean(axis=1)
    return np.asarray(l2_normalize(feats))


_ENCODERS: dict = {}


def _text_encoder(model):
    """One jitted prompt encoder per model object (compiled once per batch shape)."""
    key = id(model)
    hit = _ENCODERS.get(key)
    if hit is None or hit[0] is not model:
        fn = jax.jit(lambda p, i, m: l2_normalize(encode_text(model, p, i, m)))
        hit = _ENCODERS[key] = (model, fn)
    return hit[1]


def save_text_embeddings(path: str, names: Sequence[str], emb: np.ndarray,
                         templates: Sequence[str] | None = None) -> None:
    """Atomic .npz with `names` [C] (str), `embeddings` [C, D] float32 (+ `templates`)."""
    names = [str(n) for n in names]
    emb = np.asarray(emb, np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(names):
        raise ValueError(f"save_text_embeddings({path}): {len(names)} names but embeddings "
                         f"of shape {emb.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {"names": np.asarray(names), "embeddings": emb}
    if templates is not None:
        arrays["templates"] = np.asarray(list(templates))
    atomic_savez(path, **arrays)


def load_text_embeddings(path: str) -> tuple[list[str], np.ndarray]:
    """-> (names, embeddings [C, D] float32)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"text embeddings file {path} does not exist")
    with np.load(path, allow_pickle=False) as z:
        if "names" not in z or "embeddings" not in z:
            raise ValueError(f"{path}: not a text-embeddings file (keys {list(z.keys())}, "
                             f"need 'names' and 'embeddings')")
        names = [str(n) for n in z["names"]]
        emb = np.asarray(z["embeddings"], np.float32)
    if emb.shape[0] != len(names):
        raise ValueError(f"{path}: {len(names)} names but embeddings {emb.shape}")
    return names, emb


__all__ = ["DEFAULT_TEMPLATES", "ENSEMBLE_TEMPLATES", "encode_image", "encode_text", "prompts",
           "tokenize", "prompt_tokens", "ensemble_text_embeddings", "text_embeddings",
           "save_text_embeddings", "load_text_embeddings", "text_embeddings_path",
           "RENORM_DIR", "DEFAULT_TEXT_EMBEDDINGS"]
