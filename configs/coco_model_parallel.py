"""configs/coco.py with a model axis of 2: the EZSD detector's heavy RoI-head layers (the
two 12544x1024 fc_0 kernels of the classification and regression branches, 42 % of the
detector's parameters) and the ResNet's layer4 convolutions are split over 'model'
(config.train.sharding_rules; ezsd_jax.core.sharding.param_shardings), the batch over
'data'. Compiles deviceless with `python -m ezsd_jax.aot --topology=v5e:2x4` (docs/aot.md).
"""
from configs import coco

# (regex on the '/'-joined parameter path, PartitionSpec entries): first match wins
MODEL_PARALLEL_RULES = (
    (r"roi_head/(cls|reg)_head/fc_0/kernel$", (None, "model")),
    (r"backbone/layer4_\d+/conv[123]/kernel$", (None, None, None, "model")),
)


def get_config():
    cfg = coco.get_config()
    cfg.mesh.model = 2
    cfg.train.sharding_rules = MODEL_PARALLEL_RULES
    return cfg
