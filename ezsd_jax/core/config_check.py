"""The one config validator: the whole resolved config, checked before any work is done.

`cli.get_config()` runs `validate(cfg)` for every entry point, plus the rules other
packages register with `register_schema` (isal_jax.config_schema); a bad value is one line
naming the field (exit status 2). It imports nothing of the project's, so a rejected value
costs no jax import. How rules match fields: docs/code-notes.md.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

# data.on_error: 'raise' -> DataError at the first bad record or file; 'skip' -> dropped
# and counted (coco.CocoDataset.skipped, pipeline.DetectionPipeline.num_unreadable).
ON_ERROR = ("raise", "skip")

# Leaf names that are counts, sizes or schedule periods: integers >= 1.
POSITIVE_INT = frozenset({
    "steps", "train_steps", "batch_size", "eval_batch_size", "renorm_batch_size",
    "proposal_batch_size", "log_every", "ckpt_every", "keep", "keep_checkpoints",
    "max_boxes", "num_threads", "short_side", "max_side", "crops_per_step", "chunk",
    "proposal_images_per_chunk", "repeats",
})
# Leaf names that may be 0 (0 = off / derived from another field): integers >= 0.
NON_NEGATIVE_INT = frozenset({"prefetch", "warmup_steps", "min_steps", "renorm_steps",
                              "accuracy_images", "test_topk_candidates", "norm_images"})
# Leaf names that are IoU thresholds where a negative value means "off": numbers <= 1.
IOU_OR_OFF = frozenset({"rpn_low_quality_min_iou", "roi_low_quality_min_iou"})
NON_NEGATIVE_NUM = frozenset({"epochs", "renorm_epochs"})
PROBABILITY = frozenset({"flip_prob"})
# "<leaf> = 0 means: use <sibling>": the leaf may be 0 only when the sibling is > 0.
ZERO_MEANS = {"steps": "epochs", "renorm_steps": "renorm_epochs"}

# Enums of the detector's config, defined here once; the modules that read a field import
# its tuple from here (a consumer named in the comment of ENUMS).
DATA_SOURCES = ("coco", "tfds")
DTYPES = ("float32", "bfloat16", "float16")
SPLITS = ("coco48_17", "lvis", "names")
EVAL_PROTOCOLS = ("coco", "lvis")
DISTILL_ON_MISSING = ("raise", "empty")
DISTILL_SAMPLES = ("replacement", "random", "first")
PROPOSAL_SELECTIONS = ("top", "random")
SCORE_NAMES = ("split", "dataset")
RENORM_EPOCH_UNITS = ("boxes", "images")
ROI_HEADS = ("standard", "ezsd")
BOX_CLS_LOSSES = ("softmax", "seesaw")
INPUT_PADDINGS = ("mean", "black")
BACKGROUND_INITS = ("xavier", "normal")

# Full path -> allowed values (the consumer named in the comment reads the field).
ENUMS: dict[str, tuple] = {
    "data.on_error": ON_ERROR,                                  # data.coco, data.pipeline
    "data.source": DATA_SOURCES,                                # train.load_dataset
    "model.dtype": DTYPES,                                      # models.config, isal models
    "ezsd.split": SPLITS,                                       # data.splits
    "ezsd.eval.protocol": EVAL_PROTOCOLS,                       # ezsd.stages
    "ezsd.distill.on_missing": DISTILL_ON_MISSING,              # ezsd.distill
    "clip.proposals.selection": PROPOSAL_SELECTIONS,            # clip.proposals
    "clip.score_names": SCORE_NAMES,                            # clip.stages.scoring_names
    "clip.renorm_epoch_unit": RENORM_EPOCH_UNITS,               # clip.stages.renorm_steps
    "ezsd.distill.sample": DISTILL_SAMPLES,                     # ezsd.distill
    "model.roi_head": ROI_HEADS,                                # models.config
    "model.input_padding": INPUT_PADDINGS,                      # models.config, detector
    "model.ezsd.background_init": BACKGROUND_INITS,             # models.ezsd_head
    "model.box_cls_loss": BOX_CLS_LOSSES,                       # models.config, losses
}


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def parse_shard(value: Any) -> tuple[int, int] | None:
    """config.clip.proposal_shard: 'i/n' with 0 <= i < n -> (i, n); '' -> None (one shard
    per process); anything else -> ConfigError naming the field."""
    s = str(value or "").strip()
    if not s:
        return None
    i, _, n = s.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise ConfigError(f"config.clip.proposal_shard={value!r}: must be 'i/n' with "
                          "0 <= i < n, or '' (one shard per process)")
    return int(i), int(n)


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    for key in node.keys():
        value = node[key]
        path = f"{prefix}{key}"
        if hasattr(value, "keys"):
            yield from _leaves(value, path + ".")
        else:
            yield path, value, node


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _get(cfg: Any, path: str) -> tuple[bool, Any]:
    node = cfg
    for part in path.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False, None
        node = node[part]
    return True, node


# Schemas that other packages add (isal_jax.config_schema registers ISAL's on import; the
# ISAL configs import it): leaf names that are counts, full-path enums, whole-config checks.
_EXTRA_POSITIVE_INT: set = set()
_EXTRA_ENUMS: dict = {}
_EXTRA_CHECKS: list = []


def register_schema(*, positive_int=(), enums=None, check=None) -> None:
    """Adds a package's rules to `validate` (idempotent): `positive_int` leaf names
    (integers >= 1), `enums` {full path: allowed values}, `check(cfg)` raising ConfigError."""
    _EXTRA_POSITIVE_INT.update(positive_int)
    _EXTRA_ENUMS.update(enums or {})
    if check is not None and check not in _EXTRA_CHECKS:
        _EXTRA_CHECKS.append(check)


def validate(cfg: Any) -> None:
    """Raises ConfigError naming the first bad field of `cfg` (an ml_collections
    ConfigDict or any nested mapping)."""
    for path, value, parent in _leaves(cfg):
        leaf = path.rsplit(".", 1)[-1]
        where = f"config.{path}={value!r}"
        if leaf in POSITIVE_INT or leaf in _EXTRA_POSITIVE_INT:
            other = ZERO_MEANS.get(leaf)
            if other and other in parent and _is_int(value) and value == 0:
                if not (_is_num(parent[other]) and parent[other] > 0):
                    raise ConfigError(f"{where}: set it > 0, or {path[:-len(leaf)]}{other} "
                                      f"> 0 (got {parent[other]!r}); nothing would run")
                continue
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{where}: must be an integer >= 1")
        elif leaf in NON_NEGATIVE_INT:
            if not _is_int(value) or value < 0:
                raise ConfigError(f"{where}: must be an integer >= 0")
            other = ZERO_MEANS.get(leaf)
            if other and value == 0 and other in parent and not (
                    _is_num(parent[other]) and parent[other] > 0):
                raise ConfigError(f"{where}: set it > 0, or {path[:-len(leaf)]}{other} > 0 "
                                  f"(got {parent[other]!r}); nothing would run")
        elif leaf in NON_NEGATIVE_NUM:
            if not _is_num(value) or value < 0:
                raise ConfigError(f"{where}: must be a finite number >= 0")
        elif leaf in IOU_OR_OFF:
            if not _is_num(value) or value > 1.0:
                raise ConfigError(f"{where}: must be a number <= 1 (an IoU; < 0: off)")
        elif leaf in PROBABILITY:
            if not _is_num(value) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{where}: must be a probability in [0, 1]")
    present, group = _get(cfg, "ezsd.distill.norm_images")     # ezsd.distill
    _, batch = _get(cfg, "train.batch_size")
    if present and _is_int(group) and group > 0 and _is_int(batch) and batch % group:
        raise ConfigError(f"config.ezsd.distill.norm_images={group!r}: must divide "
                          f"train.batch_size={batch} (0: one mean over the batch)")
    present, shard = _get(cfg, "clip.proposal_shard")
    if present and shard:
        parse_shard(shard)
    for path, allowed in {**ENUMS, **_EXTRA_ENUMS}.items():
        present, value = _get(cfg, path)
        if present and value not in allowed:
            raise ConfigError(f"config.{path}={value!r}: must be one of "
                              f"{', '.join(repr(a) for a in allowed)}")
    for check in _EXTRA_CHECKS:
        check(cfg)
