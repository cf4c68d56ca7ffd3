"""Data layer: COCO-format loading and zero-shot splits (coco), host transforms
(transforms), the per-process input pipeline (pipeline) and synthetic datasets (synthetic).
"""
from ezsd_jax.data.coco import (CocoDataset, DataError, ImageRecord, load_coco, read_json,
                                write_split)
from ezsd_jax.core.images import decode_image, image_size
from ezsd_jax.data.pipeline import DetectionPipeline
from ezsd_jax.data.synthetic import (CategorySpec, SyntheticSpec, default_categories,
                                     write_coco_dataset)
from ezsd_jax.data.transforms import (boxes_to_input, boxes_to_original, example_info,
                                      prepare_example, resize_scale)

__all__ = [
    "CocoDataset", "DataError", "ImageRecord", "load_coco", "read_json", "write_split",
    "decode_image", "image_size", "DetectionPipeline",
    "CategorySpec", "SyntheticSpec", "default_categories", "write_coco_dataset",
    "boxes_to_input", "boxes_to_original", "example_info", "prepare_example",
    "resize_scale",
]
