"""Detection ops for the JAX Faster R-CNN: box geometry, anchors, static-shape NMS,
(multi-level) RoIAlign, matching and balanced sampling. All device ops are pure and
jittable with static shapes; anchors are numpy, computed at trace time."""
from ezsd_jax.ops.anchors import anchor_grid, cell_anchors, fpn_anchors
from ezsd_jax.ops.boxes import (box_area, clip_boxes, decode, encode, flip_horizontal,
                                iou_matrix, xywh_to_xyxy, xyxy_to_xywh)
from ezsd_jax.ops.matching import match_boxes, sample_balanced
from ezsd_jax.ops.nms import batched_nms, nms
from ezsd_jax.ops.roi_align import assign_levels, multilevel_roi_align, roi_align

__all__ = [
    "anchor_grid", "cell_anchors", "fpn_anchors",
    "box_area", "clip_boxes", "decode", "encode", "flip_horizontal", "iou_matrix",
    "xywh_to_xyxy", "xyxy_to_xywh",
    "match_boxes", "sample_balanced",
    "batched_nms", "nms",
    "assign_levels", "multilevel_roi_align", "roi_align",
]
