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

from configs import isal_demo


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "classification"

    c.al = ml_collections.ConfigDict()
    c.al.strategies = ("isal", "random", "entropy", "margin", "least_confidence", "coreset")
    c.al.seeds = (0, 1, 2)
    c.al.initial = 1000
    c.al.budget = 1000
    c.al.cycles = 10
    c.al.plot = True
    # Fault injection for resume tests: '<strategy>/<seed>/<cycle>[/train|eval|select]'
    c.al.debug_kill_after = ""

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "cifar10"      # digits | cifar10 | tfds:<name> | folder | registered
    c.data.pool_split = "train"     # the unlabeled pool (50k)
    c.data.eval_split = "test"      # accuracy is measured here (10k)
    c.data.data_dir = ""            # tfds data_dir with prepared files ('' = $TFDS_DATA_DIR)
    c.data.pool_ids_file = ""       # optional JSON id list restricting the pool
    c.data.loader = isal_demo.loader_settings()   # tfds:<name> / folder only

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet18"       # mlp | cnn | resnet18
    c.model.num_classes = 10
    c.model.features = (64,)        # mlp
    c.model.channels = (16, 32)     # cnn
    c.model.widths = (64, 128, 256, 512)  # resnet18
    c.model.dtype = "float32"

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128
    c.train.epochs = 200.0          # steps = ceil(epochs * num_labeled / batch_size) ...
    c.train.min_steps = 0           # ... but at least this many
    c.train.steps = 0               # > 0: a fixed number of steps instead
    c.train.lr = 0.1
    c.train.momentum = 0.9
    c.train.weight_decay = 5e-4
    c.train.decay_fractions = (0.8,)   # lr x gamma at epoch 160 of 200
    c.train.gamma = 0.1
    c.train.warmup_steps = 0
    c.train.augment = "flip_crop"   # flip_crop | crop | flip | none
    c.train.crop_pad = 4
    c.train.ckpt_every = 1000
    c.train.keep_checkpoints = 1
    c.train.log_every = 100
    c.train.eval_batch_size = 500

    # ISAL settings (the reference's classification settings)
    isal_demo.add_isal_settings(c, ref_batch_size=256, hvp_batch_size=128,
                                pool_batch_size=512, shard_size=8192)
    # The reference's reference set: the CIFAR-10 TEST split (leaks the evaluation labels
    # into the selection; configs/isal_digits.py uses the labeled set instead).
    c.reference.source = "split:test"

    c.allow_degenerate = False      # see configs/isal_demo.py

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.model = 1

    c.debug = ml_collections.ConfigDict()
    c.debug.kill_at_step = -1        # SIGKILL after this training step ...
    c.debug.kill_at_train_run = 0    # ... of the N-th task.train call of the process (-1: any)
    c.debug.kill_during_save = False
    c.debug.kill_after_shard = -1    # SIGKILL after this ISAL score shard
    return c
