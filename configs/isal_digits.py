"""ISAL active learning on scikit-learn digits: the CIFAR-10 experiment shrunk to a CPU.

    python -m isal_jax.main --config=configs/isal_digits.py --workdir=DIR

Same code path as configs/isal_cifar10.py (both start from configs/isal_base.py): a small CNN
(BatchNorm) on the 8x8 digits, pool = the 1437-image train split, accuracy on the 360-image
test split; initial 30 random labels, +30 per cycle, 6 cycles (30..180 labels),
6 strategies x 3 seeds, retrained from scratch every cycle. Offline.
"""
import ml_collections

from configs import isal_base


def get_config() -> ml_collections.ConfigDict:
    c = isal_base.classification_experiment()
    c.al.initial = 30
    c.al.budget = 30
    c.al.cycles = 6
    c.al.seeds = (0, 1, 2)

    c.data.dataset = "digits"
    c.data.pool_split = "train"
    c.data.eval_split = "test"

    isal_base.small_cnn_training(c, eval_batch_size=360)
    # augment 'none': measured, pad-1 crops of 8x8 digits cost 2-7 points
    c.train.crop_pad = 1
    c.train.log_every = 100
    c.influence.ref_batch_size = 64
    c.influence.hvp_batch_size = 32
    c.influence.pool_batch_size = 256
    c.influence.shard_size = 2048
    return c
