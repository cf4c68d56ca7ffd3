"""Detector building blocks (Flax linen): ResNet backbone, FPN, RPN head, box head.

Pipeline: image -> ResNet {'C2'..'C5'} -> FPN [P2..P6] -> RPNHead (objectness, deltas) ->
(ops: anchors, NMS, RoIAlign) -> BoxHead -> LinearClassifier / BoxRegressor. The full
detector with losses is assembled elsewhere; `pretrained` converts torchvision weights.
"""
