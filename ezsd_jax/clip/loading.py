"""Loading a CLIP checkpoint: the EZSD teacher for every CLIP stage.

Place in the pipeline: re-normalization, text embeddings and proposals get their model
through `load_clip`, from a real checkpoint directory / hub name (offline:
HF_HUB_OFFLINE=1 reads the local cache only), from the adapted CLIP that re-normalization
writes (`renorm.save_adapted_clip`), or from a toy directory (`toy.make_tiny_clip`, the
demo's `clip_pretrain`). `save_preprocessor` writes the preprocessing config it reads.
"""
from __future__ import annotations

import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
from transformers import CLIPTokenizer, FlaxCLIPModel
from transformers.utils import cached_file

from ezsd_jax.core.io_utils import atomic_write_text

# OpenAI CLIP preprocessing constants (used when a checkpoint has no preprocessor config).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipLoadError(FileNotFoundError):
    """A CLIP checkpoint that is missing or incomplete (reported as one line)."""


def save_preprocessor(out_dir: str, image_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> None:
    """preprocessor_config.json of a CLIP directory (size, mean/std that load_clip reads)."""
    cfg = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
           "size": {"shortest_edge": int(image_size)}, "do_center_crop": True,
           "crop_size": {"height": int(image_size), "width": int(image_size)},
           "do_normalize": True, "image_mean": [float(v) for v in mean],
           "image_std": [float(v) for v in std],
           "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
           "do_convert_rgb": True}
    atomic_write_text(os.path.join(out_dir, "preprocessor_config.json"),
                      json.dumps(cfg, indent=2))


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


# the default teacher: CLIPConfig's defaults are exactly ViT-B/32's
DEFAULT_CLIP = "openai/clip-vit-base-patch32"


def clip_config_of(name_or_dir: str):
    """The CLIPConfig of a checkpoint directory / hub name (config.json only, no weights);
    DEFAULT_CLIP without a cached copy -> transformers' CLIPConfig defaults, which are
    ViT-B/32's."""
    from transformers import CLIPConfig
    path = os.fspath(name_or_dir)
    try:
        return CLIPConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        if path != DEFAULT_CLIP:
            raise ClipLoadError(f"no CLIP config for {path!r}: {e}") from e
        return CLIPConfig()


def abstract_clip(config, dtype=jnp.float32):
    """-> (model, abstract params) of a CLIPConfig: parameter SHAPES only (jax.eval_shape
    of the init, nothing allocated), for deviceless compilation."""
    model = FlaxCLIPModel(config, dtype=dtype, _do_init=False)
    params = jax.eval_shape(lambda k: model.init_weights(k, model.input_shape),
                            jax.random.PRNGKey(0))
    return model, flax.core.unfreeze(params)


__all__ = ["abstract_clip", "clip_config_of", "DEFAULT_CLIP", "CLIP_MEAN", "CLIP_STD", "ClipLoadError", "load_clip", "save_preprocessor"]
