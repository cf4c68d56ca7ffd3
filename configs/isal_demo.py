"""ISAL selection demo on scikit-learn digits (offline, CPU, about a minute).

  python -m isal_jax.select --config=configs/isal_demo.py --workdir=/tmp/isal_demo

With init_checkpoint_if_missing=True (the demo default) the first run draws
`init.num_labeled` random labeled ids into workdir/labeled_ids.json and trains a tiny CNN
into workdir/model; later runs reuse both. Any field can be overridden, e.g.
  --config.strategy=entropy --config.budget=100 --config.influence.depth=100
Output: workdir/selection_<strategy>.json; ISAL per-shard scores in workdir/isal_scores/.
"""
import ml_collections

from configs.isal_base import add_isal_settings, loader_settings, model_settings


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.strategy = "isal"           # random | entropy | margin | least_confidence | coreset | isal
    c.budget = 50

    c.model = model_settings("cnn")

    # Orbax checkpoint written by ezsd_jax.core.checkpoint.Checkpointer with the dict state
    # {'params', 'batch_stats'}. '' -> <workdir>/model. step -1 -> latest.
    c.checkpoint_dir = ""
    c.checkpoint_step = -1
    c.init_checkpoint_if_missing = True   # demo only: train a tiny model if there is none
    c.init = ml_collections.ConfigDict()
    c.init.num_labeled = 100
    c.init.train_steps = 300
    c.init.batch_size = 64
    c.init.lr = 3e-3

    # Degenerate inputs (NaN/constant model outputs or scores, LiSSA not converged) stop the
    # selection with one line naming the cause; True selects anyway.
    c.allow_degenerate = False

    c.labeled_ids_file = ""       # JSON list of ids; '' -> <workdir>/labeled_ids.json

    c.pool = ml_collections.ConfigDict()
    c.pool.dataset = "digits"     # digits | cifar10 | tfds:<name> | folder | a registered name
    c.pool.split = "train"
    c.pool.ids_file = ""          # optional JSON list restricting the pool ('' = whole split)
    c.pool.data_dir = ""          # tfds data_dir (prepared files only) or the folder's root
    c.pool.loader = loader_settings()

    add_isal_settings(c, ref_batch_size=128, hvp_batch_size=64, pool_batch_size=128,
                      shard_size=512)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.model = 1

    return c
