"""Toy config: a sharded MLP regression through the shared training loop (infrastructure check)."""
import ml_collections

from configs import common


def get_config():
    cfg = common.base_config()
    cfg.stages = ("toy",)
    cfg.toy = ml_collections.ConfigDict(dict(
        seed=0, in_dim=16, hidden=64, out_dim=4, batch_size=32, lr=3e-3, steps=200,
        ckpt_every=50, log_every=25,
        # regex on the state path -> PartitionSpec entries (None or a mesh axis name)
        sharding_rules=(("Dense_0/kernel", (None, "model")),),
    ))
    return cfg
