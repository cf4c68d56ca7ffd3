"""ISAL active learning for object detection on COCO 2017 (Faster R-CNN R50-FPN).

    python -m isal_jax.main --config=configs/isal_coco.py --workdir=DIR \
        --config.data.train_ann=coco/annotations/instances_train2017.json \
        --config.data.train_images=coco/train2017 \
        --config.data.val_ann=coco/annotations/instances_val2017.json \
        --config.data.val_images=coco/val2017 \
        --config.model.pretrained=/path/to/torchvision_resnet50.safetensors

Protocol (the reference's): pool = train2017, evaluation on val2017, 5000 random initial
labels (the same per seed for every strategy), +1000 per cycle, 6 cycles (5k..10k),
Faster R-CNN R50-FPN retrained every cycle with the '1x' schedule on the labeled set (12
epochs, lr x0.1 after epochs 8 and 11). Metric: COCO AP50 (primary) and AP.
"""
import ml_collections

from configs import isal_voc


def get_config() -> ml_collections.ConfigDict:
    c = isal_voc.get_config()
    c.al.initial = 5000
    c.al.budget = 1000
    c.al.cycles = 6
    c.budget = 1000
    c.init.num_labeled = 5000
    c.influence.shard_size = 4096
    return c
