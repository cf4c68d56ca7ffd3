"""CLIP loading, and a tiny random CLIP (+ its own BPE tokenizer) for tests and demos.

Place in the pipeline: every CLIP stage (re-normalization, text embeddings, proposals)
gets its model through `load_clip`, from a real checkpoint directory / hub name (offline:
HF_HUB_OFFLINE=1 reads the local cache only) or from a toy directory written by
`make_tiny_clip`. No pretrained weights ship with the project; the toy CLIP is random.

The toy tokenizer is a genuine CLIP BPE vocabulary, only small: all 256 byte symbols, each
also with the end-of-word marker '</w>', the merges that assemble every pre-token of the
given words (whole words become single tokens), '<|startoftext|>' and '<|endoftext|>'.
Any text therefore tokenizes without unknown tokens (unknown pieces fall back to bytes).
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import jax.numpy as jnp
import numpy as np

# OpenAI CLIP preprocessing constants (used when a checkpoint has no preprocessor config).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# Words of the default prompt templates; always in a toy vocabulary.
TEMPLATE_WORDS = ("a", "an", "the", "photo", "of", "picture", "there", "is", "in", "scene",
                  "this", "crop", "object", "{}", ".")
# CLIPTokenizer's pre-tokenizer pattern (transformers/models/clip/tokenization_clip.py).
_PAT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
        r"""[^\s\p{L}\p{N}]+""")


class ClipLoadError(FileNotFoundError):
    pass


def _bytes_to_unicode() -> dict[int, str]:
    from transformers.models.clip.tokenization_clip import bytes_to_unicode
    return bytes_to_unicode()


def _pretokens(words: Iterable[str]) -> list[str]:
    """The byte-encoded pre-tokens CLIPTokenizer produces for `words` (lower-cased)."""
    import regex
    pat = regex.compile(_PAT, regex.IGNORECASE)
    b2u = _bytes_to_unicode()
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
    b2u = _bytes_to_unicode()
    vocab = list(b2u.values())
    vocab = vocab + [v + "</w>" for v in vocab]
    seen = set(vocab)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            vocab.append(a + b)
    vocab += [SOT, EOT]
    os.makedirs(out_dir, exist_ok=True)
    _atomic_write(os.path.join(out_dir, "vocab.json"),
                  json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    _atomic_write(os.path.join(out_dir, "merges.txt"),
                  "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def make_tokenizer(out_dir: str, words: Iterable[str]):
    """Writes vocab.json + merges.txt for `words` (names and prompt words; multi-word
    names are split like CLIP does) into `out_dir`; returns the loaded CLIPTokenizer.

    Merges are chained left to right per word; where an earlier word's merge splits a
    later word, a joining merge is appended (a few rounds) so whole words end up as one
    token. Unknown tokens cannot occur either way: every byte symbol is in the vocabulary.
    """
    from transformers import CLIPTokenizer

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
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

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
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

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


def _save_preprocessor(out_dir: str, image_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> None:
    cfg = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
           "size": {"shortest_edge": int(image_size)}, "do_center_crop": True,
           "crop_size": {"height": int(image_size), "width": int(image_size)},
           "do_normalize": True, "image_mean": [float(v) for v in mean],
           "image_std": [float(v) for v in std],
           "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
           "do_convert_rgb": True}
    _atomic_write(os.path.join(out_dir, "preprocessor_config.json"), json.dumps(cfg, indent=2))


def informative_init(params: dict, seed: int = 0) -> dict:
    """Re-draws a random CLIP's weights at unit-variance-preserving scales.

    transformers' Flax CLIP initializes with tiny fixed std (0.01-0.02), meant for
    training from scratch: a random tiny CLIP then maps every crop and every prompt to
    nearly the same feature. Kernels here get N(0, 1/fan_in), token/position/class
    embeddings N(0, 1), LayerNorm scales 1, biases 0; logit_scale is kept. Still random,
    but crops and names get distinct features, so tests of classification, scores and
    filters are not degenerate. `params` may hold jax.ShapeDtypeStruct leaves (then
    logit_scale gets CLIP's init value log(1/0.07))."""
    import jax

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
    import jax

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
    from transformers import FlaxCLIPModel

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
    _save_preprocessor(out_dir, cfg.vision_config.image_size)
    return load_clip(out_dir)


def _weights_present(d: str) -> bool:
    names = os.listdir(d)
    return any(n in ("flax_model.msgpack", "model.safetensors",
                     "flax_model.msgpack.index.json", "model.safetensors.index.json")
               for n in names)


def load_clip(name_or_dir: str, dtype=jnp.float32):
    """-> (model, params, tokenizer, image_size, mean, std).

    `name_or_dir`: a local directory (config.json + flax_model.msgpack or model.safetensors
    + vocab.json/merges.txt; loads without torch) or a hub name (from the local cache when
    HF_HUB_OFFLINE=1). `dtype` is the computation dtype (e.g. jnp.bfloat16); parameters
    stay float32. mean/std: the checkpoint's preprocessor config, else OpenAI CLIP's.
    """
    from transformers import CLIPTokenizer, FlaxCLIPModel

    path = os.fspath(name_or_dir)
    if os.path.isdir(path):
        missing = [f for f in ("config.json", "vocab.json", "merges.txt")
                   if not os.path.exists(os.path.join(path, f))]
        if not _weights_present(path):
            missing.append("flax_model.msgpack or model.safetensors")
        if missing:
            raise ClipLoadError(f"load_clip: {path} is not a CLIP checkpoint directory: "
                                f"missing {', '.join(missing)} (have: "
                                f"{sorted(os.listdir(path))})")
    elif (path.startswith((os.path.sep, ".", "~")) or path.count("/") > 1
          or os.path.exists(path)):
        raise ClipLoadError(f"load_clip: {path} is not a directory (expected a CLIP "
                            f"checkpoint directory or a hub name like 'openai/clip-vit-base-"
                            f"patch32')")
    try:
        # _do_init=False: no throw-away random init (seconds for ViT-B/32); the weights are
        # returned separately and passed explicitly everywhere (model.params stays unset).
        model, params = FlaxCLIPModel.from_pretrained(path, dtype=dtype, _do_init=False)
        tokenizer = CLIPTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = " (HF_HUB_OFFLINE is set: only the local cache is read)" if offline else ""
        raise ClipLoadError(f"load_clip: cannot load CLIP from {path!r}{hint}: {e}") from e
    image_size = int(model.config.vision_config.image_size)
    mean, std = CLIP_MEAN, CLIP_STD
    pp = os.path.join(path, "preprocessor_config.json") if os.path.isdir(path) else None
    if pp is None:
        try:
            from transformers.utils import cached_file
            pp = cached_file(path, "preprocessor_config.json",
                             _raise_exceptions_for_missing_entries=False)
        except Exception:  # noqa: BLE001 - optional file
            pp = None
    if pp and os.path.exists(pp):
        with open(pp) as f:
            pc = json.load(f)
        mean = tuple(float(v) for v in pc.get("image_mean", mean))
        std = tuple(float(v) for v in pc.get("image_std", std))
    return (model, params, tokenizer, image_size, np.asarray(mean, np.float32),
            np.asarray(std, np.float32))


__all__ = ["CLIP_MEAN", "CLIP_STD", "ClipLoadError", "make_tokenizer", "tiny_clip_config",
           "vitb32_config", "informative_init", "make_tiny_clip", "load_clip"]
