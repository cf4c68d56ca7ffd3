"""Detector configuration: one frozen dataclass that the detector assembly
(models/detector.py) and every RoI head (models/ezsd_head.py) read; built from
config.model over models/defaults.py by `DetectorConfig.from_config`."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections
import numpy as np

from ezsd_jax.core.config_check import BOX_CLS_LOSSES, DTYPES, INPUT_PADDINGS, ROI_HEADS
from ezsd_jax.models.defaults import default_model_config
from ezsd_jax.ops.anchors import fpn_anchors


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Every field of config.model (defaults and their meaning: models/defaults.py) plus
    num_classes; build it with `from_config`."""
    num_classes: int
    image_size: tuple[int, int]
    dtype: str
    stage_sizes: tuple[int, ...]
    width: int
    bottleneck: bool
    frozen_stages: int
    fpn_channels: int
    strides: tuple[int, ...]
    anchor_sizes: tuple[float, ...]
    anchor_ratios: tuple[float, ...]
    rpn_pre_nms_topk_train: int
    rpn_post_nms_topk_train: int
    rpn_pre_nms_topk_test: int
    rpn_post_nms_topk_test: int
    rpn_nms_threshold: float
    rpn_batch_per_image: int
    rpn_positive_fraction: float
    rpn_fg_iou: float
    rpn_bg_iou: float
    rpn_loss_weight: float
    rpn_low_quality_min_iou: float
    roi_low_quality_min_iou: float
    input_padding: str
    roi_head: str
    roi_batch_per_image: int
    roi_positive_fraction: float
    roi_fg_iou: float
    roi_output_size: int
    roi_sampling_ratio: int
    box_num_convs: int
    box_conv_dim: int
    box_num_fcs: int
    box_fc_dim: int
    box_head_spec: str
    bbox_reg_weights: tuple[float, ...]
    box_loss_weight: float
    rpn_reg_loss_weight: float
    box_reg_loss_weight: float
    box_cls_loss: str
    seesaw_p: float
    seesaw_q: float
    mask_on: bool
    mask_roi_size: int
    mask_num_convs: int
    mask_conv_dim: int
    mask_num_classes: int
    mask_loss_weight: float
    mask_max_positives: int
    mask_crop_size: int
    mask_sampling_ratio: int
    test_score_threshold: float
    test_nms_threshold: float
    test_max_detections: int
    test_topk_candidates: int
    ezsd: tuple

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, **overrides) -> "DetectorConfig":
        """config.model over the defaults (a stored config of an earlier version gets the
        defaults of fields it lacks), then `overrides` (num_classes at least)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(cfg.keys()) - fields - {"pretrained"}
        if unknown:
            raise ValueError(f"config.model: unknown fields {sorted(unknown)}")
        given = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        d = {k: v for k, v in {**default_model_config().to_dict(), "ezsd": (), **given}.items()
             if k in fields}
        d.update(overrides)
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        if isinstance(d.get("ezsd"), dict):
            d["ezsd"] = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                     for k, v in d["ezsd"].items()))
        return cls(**d)

    def __post_init__(self):
        for field, allowed in (("box_cls_loss", BOX_CLS_LOSSES), ("roi_head", ROI_HEADS),
                               ("input_padding", INPUT_PADDINGS), ("dtype", DTYPES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"model.{field}: {getattr(self, field)!r} is not one of "
                                 f"{allowed}")
        if self.box_cls_loss == "seesaw" and self.roi_head != "ezsd":
            raise ValueError("model.box_cls_loss='seesaw' needs model.roi_head='ezsd' (the "
                             "plain linear classifier has no objectness output)")
        if self.test_topk_candidates < 0:
            raise ValueError(f"model.test_topk_candidates must be >= 0 (0 = no cap), got "
                             f"{self.test_topk_candidates}")
        h, w = self.image_size
        if h % 64 or w % 64:
            raise ValueError(f"model.image_size {self.image_size} must be multiples of 64 "
                             "(FPN P6 stride)")

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def anchors(self) -> list[np.ndarray]:
        return fpn_anchors(self.image_size, self.strides, self.anchor_sizes,
                           self.anchor_ratios)


__all__ = ["DetectorConfig"]
