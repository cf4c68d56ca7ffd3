"""ISAL active learning on CIFAR-10: the reference protocol (ICCV 2021, pycls setting).

    python -m isal_jax.main --config=configs/isal_cifar10.py --workdir=DIR \
        --config.data.data_dir=/path/to/tfds

CIFAR ResNet-18, 1000 random initial labels (the same per seed for every strategy), +1000
per cycle, 10 cycles (1k..10k labels), retrained from scratch every cycle: SGD lr 0.1,
momentum 0.9, weight decay 5e-4, batch 128, 200 epochs, lr x0.1 at epoch 160, flip + pad-4
crop, BatchNorm. Strategies: isal and the baselines, 3 seeds. Needs CIFAR-10 prepared as
tfds array_record files (never downloaded; see isal_jax.data.CIFAR10_HOWTO).
configs/isal_digits.py is the same experiment shrunk to run on a CPU in minutes.
"""
import ml_collections

from configs import isal_base


def get_config() -> ml_collections.ConfigDict:
    c = isal_base.classification_experiment()   # the reference's protocol values ...
    i = c.influence                             # ... and its own ISAL choices:
    i.solver, i.damp_mode, i.diversity = "lissa", "fixed", "none"
    return c
