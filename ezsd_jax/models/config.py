"""Detector configuration: one frozen dataclass that the detector assembly
(models/detector.py) and every RoI head (models/ezsd_head.py) read; built from
config.model by `DetectorConfig.from_config` (ezsd_jax/train.detector_config)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections
import numpy as np

from ezsd_jax.ops.anchors import fpn_anchors


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    num_classes: int
    image_size: tuple[int, int] = (1024, 1024)   # padded input H, W (multiple of 64)
    dtype: str = "float32"                       # compute dtype; params stay float32
    # backbone
    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    bottleneck: bool = True
    frozen_stages: int = 1
    fpn_channels: int = 256
    # anchors / RPN
    strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    anchor_sizes: tuple[float, ...] = (32, 64, 128, 256, 512)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_topk_train: int = 2000
    rpn_post_nms_topk_train: int = 2000
    rpn_pre_nms_topk_test: int = 1000
    rpn_post_nms_topk_test: int = 1000
    rpn_nms_threshold: float = 0.7
    rpn_batch_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_loss_weight: float = 1.0
    # low-quality matches: a GT's best anchors / RoI candidates become positive when that
    # IoU is >= this (mmdet min_pos_iou: RPN 0.3, RoI 0.5); < 0 = none (ops/matching.py)
    rpn_low_quality_min_iou: float = 0.3
    roi_low_quality_min_iou: float = 0.5
    # the padded canvas after normalization: 'mean' = 0 (mmdet: Normalize, then Pad with 0,
    # i.e. the mean pixel) | 'black' = normalized uint8 0 (earlier; a dark border)
    input_padding: str = "mean"
    # RoI head
    roi_head: str = "standard"                   # 'standard' | 'ezsd'
    roi_batch_per_image: int = 512
    roi_positive_fraction: float = 0.25
    roi_fg_iou: float = 0.5
    roi_output_size: int = 7
    roi_sampling_ratio: int = 2
    box_num_convs: int = 0
    box_conv_dim: int = 256
    box_num_fcs: int = 2
    box_fc_dim: int = 1024
    # mmdet ConvFCBBoxHead counts as six digits ('301212', models/box_head.parse_box_head_spec);
    # '' = the layout of box_num_convs / box_num_fcs (EZSD: shared convs, box_num_fcs FCs
    # per branch; standard: one shared stack)
    box_head_spec: str = ""
    bbox_reg_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
    box_loss_weight: float = 1.0
    # weights of the REGRESSION terms alone (the reference's loss_bbox.loss_weight; LVIS 2)
    rpn_reg_loss_weight: float = 1.0
    box_reg_loss_weight: float = 1.0
    # RoI classification loss: 'softmax' (CE) | 'seesaw' (mmdet SeesawLoss; EZSD head only:
    # K class logits + a 2-way objectness, models/losses.seesaw_box_losses)
    box_cls_loss: str = "softmax"
    seesaw_p: float = 0.8
    seesaw_q: float = 2.0
    # Mask R-CNN branch (models/mask_head.py; off = Faster R-CNN)
    mask_on: bool = False
    mask_roi_size: int = 14                      # RoIAlign output; the head doubles it
    mask_num_convs: int = 4
    mask_conv_dim: int = 256
    mask_num_classes: int = 1                    # 1 = class-agnostic (the reference)
    mask_loss_weight: float = 1.0
    mask_max_positives: int = 128                # static positives per image (512 x 0.25)
    mask_crop_size: int = 56                     # batch's box crops (data/segmentation.py)
    mask_sampling_ratio: int = 2
    # inference
    test_score_threshold: float = 0.05
    test_nms_threshold: float = 0.5
    test_max_detections: int = 100
    # (box, class) pairs kept for class-wise NMS: 0 = every pair over the score threshold
    # (the reference; exact, on the shared R x R IoU of the class-agnostic boxes,
    # models/postprocess.py); K > 0 = the K highest-scoring pairs (earlier; a cap)
    test_topk_candidates: int = 0
    # RoI-head-specific options as hashable (key, value) pairs (config.model.ezsd for the
    # EZSD head; read by ezsd_jax.models.ezsd_head.EZSDHeadConfig). () = head defaults.
    ezsd: tuple = ()

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, **overrides) -> "DetectorConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in cfg.to_dict().items() if k in fields}
        unknown = set(cfg.keys()) - fields - {"pretrained", "ezsd"}
        if unknown:
            raise ValueError(f"config.model: unknown fields {sorted(unknown)}")
        d.update(overrides)
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        if isinstance(d.get("ezsd"), dict):
            d["ezsd"] = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                     for k, v in d["ezsd"].items()))
        return cls(**d)

    def __post_init__(self):
        if self.box_cls_loss not in ("softmax", "seesaw"):
            raise ValueError(f"model.box_cls_loss: {self.box_cls_loss!r} is not 'softmax' or "
                             "'seesaw'")
        if self.box_cls_loss == "seesaw" and self.roi_head != "ezsd":
            raise ValueError("model.box_cls_loss='seesaw' needs model.roi_head='ezsd' (the "
                             "plain linear classifier has no objectness output)")
        if self.input_padding not in ("mean", "black"):
            raise ValueError(f"model.input_padding: {self.input_padding!r} is not 'mean' or "
                             "'black'")
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
