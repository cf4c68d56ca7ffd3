"""ISAL active learning on Fashion-MNIST (or any MNIST-format idx files): a real 10-class
image set on a CPU.

    apt-get install dataset-fashion-mnist      # Debian: the four idx .gz files
    python -m isal_jax.main --config=configs/isal_fashion.py --workdir=DIR

Pool = the 60k train split, accuracy on the 10k test split (dataset 'idx', data_dir below;
MNIST, KMNIST, EMNIST or a user's own idx files work the same way). A small CNN, 20 random
initial labels, +20 per cycle up to 200 (the low-label regime of
benchmarks/isal_regimes.py, which also runs the reference's 1k..10k schedule).
"""
import ml_collections

from configs import isal_base


def get_config() -> ml_collections.ConfigDict:
    c = isal_base.classification_experiment()
    c.al.initial, c.al.budget, c.al.cycles = 20, 20, 10

    c.data.dataset = "idx"
    c.data.data_dir = "/usr/share/datasets/fashion-mnist"
    c.data.pool_split = "train"
    c.data.eval_split = "test"
    c.data.loader.mean = (0.286,)     # Fashion-MNIST train statistics
    c.data.loader.std = (0.353,)

    isal_base.small_cnn_training(c, eval_batch_size=1000)
    c.train.crop_pad = 2
    c.train.log_every = 1000
    c.influence.ref_batch_size = 256
    c.influence.hvp_batch_size = 32
    c.influence.pool_batch_size = 500
    c.influence.shard_size = 10000
    # influence on the last layers only (the small CNN's last conv + classifier; the
    # reference's commented-out alternative to every weight): the best and the fastest ISAL
    # setting of the regime study (benchmarks/RESULTS.md). Change it with model.channels.
    c.influence.subset = r"regex:^(Conv_1|Dense_0)/kernel$"
    return c
