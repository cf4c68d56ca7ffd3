"""Detector building blocks (Flax linen): ResNet backbone, FPN, RPN head, box head.

Pipeline: image -> ResNet {'C2'..'C5'} -> FPN [P2..P6] -> RPNHead (objectness, deltas) ->
(ops: anchors, NMS, RoIAlign) -> BoxHead -> LinearClassifier / BoxRegressor. The full
detector with losses is assembled elsewhere; `pretrained` converts torchvision weights.
"""
from ezsd_jax.models.box_head import BoxHead, BoxRegressor, LinearClassifier
from ezsd_jax.models.fpn import FPN, upsample_nearest
from ezsd_jax.models.resnet import FrozenBatchNorm, ResNet, trainable_mask
from ezsd_jax.models.rpn import RPNHead

__all__ = [
    "BoxHead", "BoxRegressor", "FPN", "FrozenBatchNorm", "LinearClassifier", "RPNHead",
    "ResNet", "trainable_mask", "upsample_nearest",
]
