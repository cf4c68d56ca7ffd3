"""configs/coco.py with a model axis of 2, Megatron-style: in each pair of layers the first
is split on its output features and the second on its input features over 'model', so the
activations between them stay split and one all-reduce joins the partial sums. Split: the
EZSD RoI head's fc_0 (12544x1024, both branches: 42 % of the detector's parameters) /
fc_1 and ResNet layer4's 1x1 conv1 / 3x3 conv2 (config.train.sharding_rules,
ezsd_jax.core.sharding.param_shardings; the optimizer state follows its parameter); the
batch over 'data'. Compile it deviceless: python -m ezsd_jax.aot --topology=v5e:2x4
(docs/aot.md).
"""
from configs import coco

# (regex on the '/'-joined parameter path, PartitionSpec entries): first match wins
MODEL_PARALLEL_RULES = (
    (r"roi_head/(cls|reg)_head/fc_0/kernel$", (None, "model")),
    (r"roi_head/(cls|reg)_head/fc_0/bias$", ("model",)),
    (r"roi_head/(cls|reg)_head/fc_1/kernel$", ("model", None)),
    (r"backbone/layer4_\d+/conv1/kernel$", (None, None, None, "model")),
    (r"backbone/layer4_\d+/conv2/kernel$", (None, None, "model", None)),
)


def get_config():
    cfg = coco.get_config()
    cfg.mesh.model = 2
    cfg.train.sharding_rules = MODEL_PARALLEL_RULES
    return cfg
