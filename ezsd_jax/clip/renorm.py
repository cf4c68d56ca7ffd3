"""CLIP re-normalization: tune only CLIP's LayerNorms on base-class GT crops.

Place in the pipeline (docs/ezsd-method.md section 1): first stage. Detection training
batches with BASE annotations -> the adapted CLIP (a `save_pretrained` directory for
`loading.load_clip`) and the adapted text embeddings of ALL names, used by the proposal
stage and the detector. Trained parameters, crops, loss: docs/code-notes.md.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ezsd_jax.core import train_loop
from ezsd_jax.clip import crops as crops_lib
from ezsd_jax.clip.loading import CLIP_MEAN, CLIP_STD, save_preprocessor
from ezsd_jax.clip.text import (DEFAULT_TEMPLATES, encode_image, ensemble_text_embeddings,
                                prompt_tokens, save_text_embeddings, text_embeddings)
from ezsd_jax.ops.vectors import l2_normalize
from ezsd_jax.core.optim import count_params
from ezsd_jax.core.tree_paths import path_str

log = logging.getLogger(__name__)

_VISION_LN = re.compile(
    r"^vision_model/(pre_layrnorm|post_layernorm|encoder/layers/\d+/layer_norm[12])/"
    r"(scale|bias)$")
_TEXT_LN = re.compile(
    r"^text_model/(final_layer_norm|encoder/layers/\d+/layer_norm[12])/(scale|bias)$")


# ----------------------------------------------------------------------------- params

def layernorm_mask(params: Any, text_layernorms: bool = True, verbose: bool = True) -> Any:
    """Pytree of bool like `params`: True exactly on the LayerNorm scales/biases to tune."""
    params = flax.core.unfreeze(params)

    def one(path, _):
        name = path_str(path)
        return bool(_VISION_LN.match(name) or (text_layernorms and _TEXT_LN.match(name)))

    mask = jax.tree_util.tree_map_with_path(one, params)
    n = count_params(params, mask)
    if n == 0:
        raise ValueError("layernorm_mask: no LayerNorm parameters found - is this a "
                         "FlaxCLIPModel parameter tree?")
    if verbose:
        msg = (f"renorm: {n} trainable LayerNorm parameters of {count_params(params)} "
               f"(text LayerNorms {'on' if text_layernorms else 'off'})")
        log.info(msg)
    return mask


def make_optimizer(mask: Any, lr: float = 1e-4, weight_decay: float = 1e-4,
                   grad_clip: float = 0.1) -> optax.GradientTransformation:
    """AdamW with global-norm clipping on the masked leaves; exact zeros elsewhere."""
    inner = optax.chain(optax.clip_by_global_norm(grad_clip),
                        optax.adamw(lr, weight_decay=weight_decay))
    labels = jax.tree_util.tree_map(lambda m: "train" if m else "frozen", mask)
    return optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)


def init_state(params: Any, tx: optax.GradientTransformation) -> dict:
    params = flax.core.unfreeze(params)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": tx.init(params)}


# ----------------------------------------------------------------------------- step

def classification_loss(logits: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray,
                        kind: str = "sigmoid", weight: jnp.ndarray | None = None
                        ) -> jnp.ndarray:
    """Mean loss over valid rows. sigmoid: BCE on one-hot targets averaged over classes
    (mmdet's use_sigmoid CrossEntropyLoss); softmax: cross-entropy. `weight` [K] scales
    each row (size weights, mean 1 per image); the divisor stays the valid count."""
    mask = mask.astype(jnp.float32)
    denom = jnp.maximum(mask.sum(), 1.0)
    if weight is not None:
        mask = mask * weight.astype(jnp.float32)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if kind == "sigmoid":
        per = optax.sigmoid_binary_cross_entropy(logits, onehot).mean(axis=-1)
    elif kind == "softmax":
        per = optax.softmax_cross_entropy(logits, onehot)
    else:
        raise ValueError(f"renorm: loss must be 'sigmoid' or 'softmax', got {kind!r}")
    return (per * mask).sum() / denom


def _batch_crops(batch: Mapping[str, jnp.ndarray], crop_kw: dict, groups: int):
    if "crops" in batch:
        return jnp.asarray(batch["crops"])
    for k in ("image", "boxes", "box_image"):
        if k not in batch:
            raise KeyError(f"renorm batch: needs 'crops' or image/boxes/box_image; missing "
                           f"{k!r} (have {sorted(batch)})")
    return crops_lib.crop_flat(batch["image"], batch["boxes"], batch["box_image"],
                               batch.get("image_hw"), groups=groups, **crop_kw)


def make_renorm_train_step(model, tx: optax.GradientTransformation, *,
                           text_emb: np.ndarray | None = None,
                           text_ids: np.ndarray | None = None,
                           text_mask: np.ndarray | None = None, num_templates: int = 1,
                           train_text: bool = False, loss: str = "sigmoid",
                           enlarge: float = 1.2, out_size: int | None = None,
                           mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                           method: str = "bicubic", window: int | None = None,
                           flip_prob: float = 0.5, seed: int = 0, groups: int = 1,
                           mask: Any = None) -> Callable[[dict, dict], tuple[dict, dict]]:
    """-> renorm_train_step(state, batch) -> (state, metrics), pure and jittable.

    batch: either {'crops' [K, S, S, 3] (cropped + normalized), 'labels' [K], 'mask' [K]}
    or {'image' [B, H, W, 3], 'image_hw' [B, 2], 'boxes' [K, 4], 'box_image' [K] (index
    of the crop's image; within its group when groups > 1), 'labels' [K], 'mask' [K]}.
    labels index the base classes. Text side: with `train_text` the base-name embeddings
    are recomputed from `text_ids`/`text_mask` ([C*T, L], name-major) every step (their
    LayerNorms train); otherwise the fixed `text_emb` [C, D] is used. `mask` (the
    layernorm_mask), when given, adds the trained parameters' gradient norm to the metrics
    (gradients of frozen parameters are never used, so XLA does not compute them).
    """
    if train_text and (text_ids is None or text_mask is None):
        raise ValueError("renorm: train_text needs text_ids and text_mask")
    if not train_text and text_emb is None:
        raise ValueError("renorm: give text_emb (fixed text side) or train_text=True")
    size = int(out_size or model.config.vision_config.image_size)
    crop_kw = dict(enlarge=enlarge, out_size=size, mean=mean, std=std, method=method,
                   window=window, out_dtype=model.dtype)
    fixed = None if text_emb is None else jnp.asarray(text_emb, jnp.float32)
    ids = None if text_ids is None else jnp.asarray(text_ids, jnp.int32)
    tmask = None if text_mask is None else jnp.asarray(text_mask, jnp.int32)
    base_key = jax.random.PRNGKey(seed)

    def renorm_train_step(state, batch):
        crops = _batch_crops(batch, crop_kw, groups)
        labels = jnp.asarray(batch["labels"], jnp.int32)
        valid = jnp.asarray(batch["mask"], bool) & (labels >= 0)
        key = jax.random.fold_in(base_key, state["step"])
        flip = jax.random.bernoulli(key, flip_prob, (crops.shape[0],))
        crops = jnp.where(flip[:, None, None, None], crops[:, :, ::-1], crops)

        def loss_fn(params):
            img = l2_normalize(encode_image(model, params, crops))
            if train_text:
                txt = ensemble_text_embeddings(model, params, ids, tmask, num_templates)
            else:
                txt = fixed
            scale = jnp.exp(jax.lax.stop_gradient(params["logit_scale"]))
            logits = scale * img @ txt.T
            return classification_loss(logits, jnp.maximum(labels, 0), valid, loss,
                                       batch.get("weight")), logits

        (value, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        correct = (jnp.argmax(logits, -1) == labels) & valid
        n = valid.sum()
        metrics = {"loss": value,
                   "accuracy": correct.sum() / jnp.maximum(n, 1),
                   "crops": n.astype(jnp.float32)}
        if mask is not None:
            metrics["grad_norm"] = optax.global_norm(jax.tree_util.tree_map(
                lambda g, m: g if m else jnp.zeros((), g.dtype), grads, mask))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return renorm_train_step


# ----------------------------------------------------------------------------- eval

def crop_predictions(model, params, text_emb: np.ndarray, batch: Mapping[str, Any], *,
                     enlarge: float = 1.2, out_size: int | None = None,
                     mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                     method: str = "bicubic", window: int | None = None) -> np.ndarray:
    """argmax over `text_emb` rows for every crop of a step-format batch -> [K] int."""
    size = int(out_size or model.config.vision_config.image_size)
    crop_kw = dict(enlarge=enlarge, out_size=size, mean=mean, std=std, method=method,
                   window=window, out_dtype=model.dtype)
    txt = jnp.asarray(text_emb, jnp.float32)
    keys = ("crops",) if "crops" in batch else ("image", "image_hw", "boxes", "box_image")
    arrays = {k: jnp.asarray(batch[k]) for k in keys if k in batch}
    return np.asarray(_predict(model, crop_kw, arrays, params, txt))


def _predict(model, crop_kw, arrays, params, txt):
    key = (id(model), tuple(sorted((k, str(v)) for k, v in crop_kw.items())))
    hit = _PREDICT_CACHE.get(key)
    if hit is None or hit[0] is not model:
        def fn(arrays, params, txt):
            c = _batch_crops(arrays, crop_kw, 1)
            img = l2_normalize(encode_image(model, params, c))
            return jnp.argmax(img @ txt.T, axis=-1)
        hit = _PREDICT_CACHE[key] = (model, jax.jit(fn))
    return hit[1](arrays, params, txt)


_PREDICT_CACHE: dict = {}


def crop_accuracy(model, params, batches: Mapping[str, Any] | Iterable[Mapping[str, Any]],
                  text_emb: np.ndarray, is_base: np.ndarray | None = None,
                  **crop_kw) -> dict:
    """Crop classification accuracy over all `text_emb` names (generalized), split by the
    label's kind. batches: one step-format batch or an iterable of them, with 'labels'
    indexing text_emb rows and 'mask'. is_base [C] bool (None: all base).
    Returns acc_all / acc_base / acc_novel (nan when no such crop) and the counts."""
    if isinstance(batches, Mapping):
        batches = [batches]
    c = np.asarray(text_emb).shape[0]
    is_base = np.ones(c, bool) if is_base is None else np.asarray(is_base, bool)
    n = {"base": 0, "novel": 0}
    ok = {"base": 0, "novel": 0}
    for batch in batches:
        pred = crop_predictions(model, params, text_emb, batch, **crop_kw)
        labels = np.asarray(batch["labels"])
        valid = np.asarray(batch.get("mask", np.ones_like(labels, bool)), bool) & (labels >= 0)
        base = is_base[np.clip(labels, 0, c - 1)]
        for kind, sel in (("base", valid & base), ("novel", valid & ~base)):
            n[kind] += int(sel.sum())
            ok[kind] += int((sel & (pred == labels)).sum())

    def acc(a, b):
        return a / b if b else float("nan")
    return {"acc_all": acc(ok["base"] + ok["novel"], n["base"] + n["novel"]),
            "acc_base": acc(ok["base"], n["base"]), "acc_novel": acc(ok["novel"], n["novel"]),
            "n_base": n["base"], "n_novel": n["novel"]}


# ----------------------------------------------------------------------------- saving

def save_adapted_clip(out_dir: str, model, params: Any, tokenizer,
                      mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> str:
    """Writes a `save_pretrained` directory (config, flax weights, tokenizer, preprocessor
    config) that `load_clip` reads exactly like the original. Atomic: written next to
    `out_dir` and renamed into place."""
    out_dir = os.path.abspath(out_dir)
    tmp = f"{out_dir}.tmp.{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    host = jax.tree_util.tree_map(np.asarray, jax.device_get(flax.core.unfreeze(params)))
    model.save_pretrained(tmp, params=host)
    tokenizer.save_pretrained(tmp)
    save_preprocessor(tmp, int(model.config.vision_config.image_size), mean, std)
    old = f"{out_dir}.old.{os.getpid()}"
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if os.path.exists(old):
        shutil.rmtree(old)
    return out_dir


# ----------------------------------------------------------------------------- driver

def valid_hw(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """[B, 2] valid (h, w) of each padded image: 'image_hw', else round(orig_hw * scale)
    (the pipeline's `resized_hw` rule), clipped to the padded size."""
    img = batch["image"]
    if "image_hw" in batch:
        hw = np.asarray(batch["image_hw"], np.int64)
    elif "orig_hw" in batch and "scale" in batch:
        s = np.asarray(batch["scale"], np.float64).reshape(-1, 1)
        hw = np.maximum(np.floor(np.asarray(batch["orig_hw"], np.float64) * s + 0.5), 1)
        hw = hw.astype(np.int64)
    else:
        hw = np.broadcast_to(np.asarray(img.shape[1:3]), (img.shape[0], 2))
    return np.minimum(hw, np.asarray(img.shape[1:3])).astype(np.int32)


def size_weights(boxes: np.ndarray, image_hw) -> np.ndarray:
    """The reference's LVIS renorm box weights (ClipEncoderHead use_size_weight):
    exp(-sqrt(box area) / sqrt(image area)) over one image's boxes [n, 4] (image_hw: the
    resized image), normalized to mean 1 over those boxes."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not len(boxes):
        return np.zeros((0,), np.float32)
    h, w = (float(v) for v in image_hw)
    side = np.sqrt(np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] -
                                                                          boxes[:, 1], 0))
    wt = np.exp(-side / np.sqrt(h * w))
    return (wt * len(wt) / wt.sum()).astype(np.float32)


def flatten_gt_boxes(batch: Mapping[str, np.ndarray], crops_per_step: int,
                     label_map: np.ndarray, rng: np.random.Generator,
                     groups: int = 1, size_weight: bool = False) -> tuple[dict, dict]:
    """Pipeline batch -> step batch with a fixed number K of GT crops.

    Valid GT boxes (box_mask & image valid & label_map[class] >= 0) of the batch are
    listed; if more than K/groups fall in one group, a random subset is kept (counted in
    `dropped`); slots left over are masked. label_map maps dataset class ids to base
    indices (-1: not trained on, e.g. a novel class). With `size_weight` the step batch
    also holds 'weight' [K]: `size_weights` of each image's boxes (before the subset).
    Returns (step batch, stats {'available', 'dropped'}).
    """
    image = np.asarray(batch["image"])
    b = image.shape[0]
    k = int(crops_per_step)
    if b % groups or k % groups:
        raise ValueError(f"renorm: batch {b} and crops_per_step {k} must be divisible by "
                         f"groups={groups}")
    boxes = np.asarray(batch["boxes"], np.float32)
    classes = np.asarray(batch["classes"], np.int64)
    mask = np.asarray(batch["box_mask"], bool)
    if "valid" in batch:
        mask &= np.asarray(batch["valid"], bool).reshape(b, 1)
    if classes.size and (classes[mask].max(initial=-1) >= len(label_map)):
        raise ValueError(f"renorm: batch class id {classes[mask].max()} outside the label "
                         f"map of {len(label_map)} classes")
    labels = np.where(mask, np.asarray(label_map)[np.clip(classes, 0, len(label_map) - 1)], -1)
    bg, kg = b // groups, k // groups
    out_boxes = np.zeros((k, 4), np.float32)
    out_img = np.zeros((k,), np.int32)
    out_lab = np.zeros((k,), np.int32)
    out_mask = np.zeros((k,), bool)
    out_w = np.zeros((k,), np.float32)
    if size_weight:
        hw = valid_hw(batch)
        img_w = np.zeros(labels.shape, np.float32)
        for i in range(b):
            sel = labels[i] >= 0
            img_w[i, sel] = size_weights(boxes[i, sel], hw[i])
    available = dropped = 0
    for g in range(groups):
        ii, jj = np.nonzero(labels[g * bg:(g + 1) * bg] >= 0)
        available += len(ii)
        if len(ii) > kg:
            sel = np.sort(rng.choice(len(ii), kg, replace=False))
            dropped += len(ii) - kg
            ii, jj = ii[sel], jj[sel]
        s = slice(g * kg, g * kg + len(ii))
        out_boxes[s] = boxes[g * bg + ii, jj]
        out_img[s] = ii
        out_lab[s] = labels[g * bg + ii, jj]
        out_mask[s] = True
        if size_weight:
            out_w[s] = img_w[g * bg + ii, jj]
    step_batch = {"image": image, "image_hw": valid_hw(batch), "boxes": out_boxes,
                  "box_image": out_img, "labels": out_lab, "mask": out_mask}
    if size_weight:
        step_batch["weight"] = out_w
    return step_batch, {"available": available, "dropped": dropped}


def label_map_for(class_names: Sequence[str], base_names: Sequence[str]) -> np.ndarray:
    """Dataset class id -> base index (-1 for names not among the base names)."""
    pos = {n: i for i, n in enumerate(base_names)}
    return np.asarray([pos.get(n, -1) for n in class_names], np.int32)


_DEFAULTS = dict(lr=1e-4, weight_decay=1e-4, grad_clip=0.1, text_layernorms=True,
                 loss="sigmoid", templates=DEFAULT_TEMPLATES, enlarge=1.2,
                 crops_per_step=64, flip_prob=0.5, seed=0, ckpt_every=1000, keep=3,
                 log_every=50, method="bicubic", window=None, out_size=None,
                 size_weight=False)


def settings(cfg: Any) -> dict:
    out = dict(_DEFAULTS)
    if cfg is None:
        return out
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d: getattr(cfg, k, d))
    for k in _DEFAULTS:
        v = get(k, None)
        if v is not None:
            out[k] = v
    unknown = set(cfg.keys() if hasattr(cfg, "keys") else []) - set(_DEFAULTS)
    if unknown:
        raise ValueError(f"renorm config: unknown fields {sorted(unknown)}; known: "
                         f"{sorted(_DEFAULTS)}")
    return out


def jitted_train_step(model, params, c: dict, ids, tmask, text_emb, groups: int,
                      mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
    """-> (jitted renorm step (state donated), its optimizer) for settings `c` (settings()
    dict), prompt tokens ids/tmask [C*T, L] and, with the text side fixed, text_emb [C, D].
    `params` may be abstract (jax.ShapeDtypeStruct leaves)."""
    mask = layernorm_mask(params, bool(c["text_layernorms"]))
    tx = make_optimizer(mask, c["lr"], c["weight_decay"], c["grad_clip"])
    step_fn = make_renorm_train_step(
        model, tx, text_emb=text_emb, text_ids=ids, text_mask=tmask,
        num_templates=len(tuple(c["templates"])), train_text=bool(c["text_layernorms"]),
        loss=c["loss"], enlarge=c["enlarge"], out_size=c["out_size"], mean=mean, std=std,
        method=c["method"], window=c["window"], flip_prob=c["flip_prob"], seed=c["seed"],
        groups=groups, mask=mask)
    return jax.jit(step_fn, donate_argnums=(0,)), tx


def run_renorm(model, params, tokenizer,
               batch_iterator: Iterable[dict] | Callable[[int], Iterator[dict]],
               base_names: Sequence[str], all_names: Sequence[str], steps: int, cfg: Any,
               workdir: str, *, class_names: Sequence[str] | None = None,
               mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
               mesh=None) -> dict:
    """Trains the LayerNorms for `steps` steps and writes the stage outputs.

    batch_iterator: pipeline batches (image, boxes, classes, box_mask, valid, scale,
    orig_hw or image_hw, ...), either an iterable or a function start_step -> iterator
    (preferred: a resumed run then sees the batches an uninterrupted run would).
    class_names: names of the batches' class ids (default: `all_names`); classes that
    are not base names are not trained on. cfg fields (defaults): see `_DEFAULTS`.
    Resumes from `workdir/ckpt_renorm`; metrics in `workdir/metrics/renorm.csv`.
    Writes `workdir/adapted_clip/` and `workdir/text_embeddings.npz` (all names, adapted
    text tower, cfg.templates). Returns {'params', 'clip_dir', 'text_embeddings', 'rows'}.
    """

    c = settings(cfg)
    # Crops are split in groups, one per data shard, each reading only its own images.
    groups = 1 if mesh is None else int(mesh.shape["data"])
    local_groups = max(groups // jax.process_count(), 1)
    label_map = label_map_for(class_names if class_names is not None else all_names,
                              base_names)
    if (label_map >= 0).sum() == 0:
        raise ValueError("renorm: none of the dataset's class names is a base name")
    params = flax.core.unfreeze(params)
    templates = tuple(c["templates"])
    ids, tmask = prompt_tokens(tokenizer, model, base_names, templates)
    text_emb = None
    if not c["text_layernorms"]:
        text_emb = text_embeddings(model, params, tokenizer, base_names, templates)
    step_fn, tx = jitted_train_step(model, params, c, ids, tmask, text_emb, groups, mean, std)
    rng_base = int(c["seed"])
    counts = {"available": 0, "dropped": 0}

    def batches(start: int) -> Iterator[dict]:
        it = batch_iterator(start) if callable(batch_iterator) else iter(batch_iterator)
        for i, b in enumerate(it):
            rng = np.random.default_rng([rng_base, start + i])
            sb, st = flatten_gt_boxes(b, c["crops_per_step"], label_map, rng,
                                      groups=local_groups, size_weight=bool(c["size_weight"]))
            for k in counts:
                counts[k] += st[k]
            yield sb

    state = init_state(params, tx)
    state, rows = train_loop.fit(state=state, step_fn=step_fn, batches=batches,
                                 num_steps=int(steps), workdir=workdir, name="renorm",
                                 mesh=mesh, ckpt_every=int(c["ckpt_every"]),
                                 keep=int(c["keep"]), log_every=int(c["log_every"]),
                                 items_per_step=float(c["crops_per_step"]), unit="crop")
    if counts["available"]:
        log.info(f"[renorm] {counts['dropped']} of {counts['available']} base boxes seen in "
                 f"this run were left out of full steps (crops_per_step="
                 f"{c['crops_per_step']})")
    params = state["params"]
    clip_dir = save_adapted_clip(os.path.join(workdir, "adapted_clip"), model, params,
                                 tokenizer, mean, std)
    emb = text_embeddings(model, params, tokenizer, all_names, templates)
    emb_path = os.path.join(workdir, "text_embeddings.npz")
    save_text_embeddings(emb_path, all_names, emb, templates)
    return {"params": params, "clip_dir": clip_dir, "text_embeddings": emb_path,
            "rows": rows}


__all__ = ["layernorm_mask", "make_optimizer", "init_state", "classification_loss",
           "make_renorm_train_step", "jitted_train_step", "settings", "crop_predictions", "crop_accuracy", "save_adapted_clip",
           "valid_hw", "size_weights", "flatten_gt_boxes", "label_map_for", "run_renorm"]
