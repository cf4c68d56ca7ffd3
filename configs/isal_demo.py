"""ISAL selection demo on scikit-learn digits (offline, CPU, about a minute).

  python -m isal_jax.select --config=configs/isal_demo.py --workdir=/tmp/isal_demo

With init_checkpoint_if_missing=True (the demo default) the first run draws
`init.num_labeled` random labeled ids into workdir/labeled_ids.json and trains a tiny CNN
into workdir/model; later runs reuse both. Any field can be overridden, e.g.
  --config.strategy=entropy --config.budget=100 --config.influence.depth=100
Output: workdir/selection_<strategy>.json; ISAL per-shard scores in workdir/isal_scores/.
"""
import ml_collections


def loader_settings() -> ml_collections.ConfigDict:
    """Options of the generic loaders (isal_jax.data.load_dataset): dataset 'tfds:<name>'
    (any image-classification set prepared by tfds as array_record under data_dir) uses all
    of them, 'folder' (<data_dir>/<split>/<class>/<image>) mean, std and image_size; the
    named sets (digits, cifar10, registered ones) have their own."""
    return ml_collections.ConfigDict({
        "image_key": "image",    # tfds feature of the uint8 [H, W, C] image
        "label_key": "label",    # tfds ClassLabel feature
        "mean": (0.5,),          # per channel (or one for all), after scaling to [0, 1]
        "std": (0.5,),
        "image_size": (),        # (h, w) to resize to; () = as stored (folder: 32x32)
    })


def add_isal_settings(c: ml_collections.ConfigDict, *, ref_batch_size: int,
                      hvp_batch_size: int, pool_batch_size: int, shard_size: int) -> None:
    """c.reference + c.influence: the reference's classification settings (shared by the
    ISAL classification configs); the batch sizes and shard size are per machine."""
    # Reference set R for v = sum grad L(R) (isal_jax.selection_io.reference_source):
    # 'labeled', 'heldout' (AL loop: a seeded part of each cycle's labeled set, kept out of
    # the training of the model that scores the pool; our addition), 'ids_file' (an id list
    # of the pool's split, e.g. a labeled part kept out of training) or 'split:<name>' (a
    # whole split; the ISAL reference code uses the test split, which LEAKS the evaluation
    # labels: only configs/isal_cifar10.py does that).
    c.reference = ml_collections.ConfigDict()
    c.reference.source = "labeled"   # labeled | heldout | ids_file | split:<name>
    c.reference.ids_file = ""
    c.reference.heldout_fraction = 0.2   # heldout: this part of the labeled ids ...
    c.reference.heldout_size = 0         # ... or exactly this many (when > 0)

    c.influence = ml_collections.ConfigDict()
    c.influence.damp = 0.01
    c.influence.scale = 1e4
    c.influence.depth = 250
    c.influence.repeats = 4
    c.influence.residual_batches = 8
    # LiSSA must converge by its own residual (1.0 = what s_test = 0 gives); a larger or
    # non-finite residual stops the selection (see isal_jax/degenerate.py).
    c.influence.max_residual = 1.0
    # Our additions (off / the reference's behaviour by default; see README "ISAL"):
    c.influence.solver = "lissa"         # lissa | cg (same fixed point, fewer HVPs)
    c.influence.cg_tol = 1e-3
    c.influence.stop_residual = 0.0      # > 0: LiSSA stops once its residual is below this
    c.influence.damp_mode = "fixed"      # fixed (damp) | top_eig (damp*scale = fraction*top)
    c.influence.damp_fraction = 0.1
    c.influence.eig_iters = 10           # power iterations for the top eigenvalue (0: off)
    c.influence.diversity = "none"       # none | class_balanced (top-k per pseudo class)
    c.influence.subset = "ndim_gt1"     # ndim_gt1 (convs + FC weights) | all | regex:<pat>
    c.influence.pseudo_label = "argmax"  # argmax | expected
    c.influence.topk = 3                 # classes of the expected gradient
    c.influence.fused = True             # pseudo label + loss in one forward pass
    c.influence.ref_batch_size = ref_batch_size
    c.influence.hvp_batch_size = hvp_batch_size
    c.influence.pool_batch_size = pool_batch_size
    c.influence.shard_size = shard_size  # pool samples per resumable score shard


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.strategy = "isal"           # random | entropy | margin | least_confidence | coreset | isal
    c.budget = 50

    c.model = ml_collections.ConfigDict()
    c.model.name = "cnn"          # mlp | cnn | resnet18
    c.model.num_classes = 10
    c.model.features = (64,)      # mlp
    c.model.channels = (16, 32)   # cnn
    c.model.widths = (64, 128, 256, 512)  # resnet18
    c.model.dtype = "float32"

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

    c.debug = ml_collections.ConfigDict()
    c.debug.kill_after_shard = -1        # tests: SIGKILL self after writing this shard
    return c
