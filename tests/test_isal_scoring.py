"""The one ISAL scoring path (isal_jax.scoring) runs every selection option on both tasks:
solver lissa / cg, damp_mode fixed / top_eig, diversity none / class_balanced, reference
labeled / heldout / ids_file / split, the reference's LiSSA mode (one sample per step in
order, per-block NaN reset, select when not converged) and allow_degenerate. Classification:
a tiny MLP on digits; detection: a tiny Faster R-CNN on generated images. Plus the LiSSA
reference options themselves on a toy loss."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from isal_jax import influence as infl
from isal_jax.scoring import isal_select
from isal_jax.selection_io import SelectError

OPTIONS = {
    "lissa": {},
    "cg": {"solver": "cg", "cg_maxiter": 5},
    "top_eig": {"damp_mode": "top_eig", "eig_iters": 3},
    "class_balanced": {"diversity": "class_balanced"},
    "reference_mode": {"hvp_order": "sequential", "hvp_batch_size": 1,
                       "nan_reset": "block", "on_unconverged": "select"},
}
REFERENCES = ("labeled", "heldout", "ids_file", "split:other")


def _cfg(influence: dict, source: str = "labeled", ids_file: str = "",
         allow: bool = False) -> ml_collections.ConfigDict:
    i = dict(damp=0.01, scale=50.0, depth=4, repeats=2, residual_batches=2, max_residual=1e9,
             solver="lissa", damp_mode="fixed", damp_fraction=0.1, eig_iters=0, cg_tol=1e-3,
             diversity="none", subset="ndim_gt1", fused=True, ref_batch_size=4,
             hvp_batch_size=4, pool_batch_size=4, shard_size=8, hvp_order="shuffled",
             nan_reset="chain", on_unconverged="stop")
    i.update(influence)
    return ml_collections.ConfigDict({
        "influence": i, "budget": 3, "seed": 0, "allow_degenerate": allow,
        "reference": {"source": source, "ids_file": ids_file, "heldout_fraction": 0.2,
                      "heldout_size": 0}})


def _run_all_options(src, labeled, pool, other_ids, tmp_path, sources=REFERENCES,
                     degenerate=True):
    ids_file = tmp_path / "ref_ids.json"
    ids_file.write_text(json.dumps([int(i) for i in pool[:5]]))
    heldout = labeled[:3]
    expect_ref = {"labeled": len(labeled), "heldout": 3, "ids_file": 5,
                  "split:other": len(other_ids)}
    for name, opts in OPTIONS.items():
        for source in sources:
            if name != "lissa" and source != "labeled":
                continue      # every option once; every reference source with the default
            wd = tmp_path / f"{name}_{source.replace(':', '_')}"
            sel, info = isal_select(_cfg(opts, source, str(ids_file)), str(wd), src, labeled,
                                    pool, "fp", heldout=heldout)
            assert len(sel.ids) == 3 and len(set(sel.ids.tolist())) == 3
            assert set(sel.ids.tolist()) <= set(pool.tolist())
            assert info["num_reference"] == expect_ref[source], (name, source)
            assert info["solver"] == opts.get("solver", "lissa")
            assert info["damp_mode"] == opts.get("damp_mode", "fixed")
            if name == "reference_mode":
                # one labeled sample per step, the first depth * repeats in order
                assert info["hvp_order"] == "sequential" and info["nan_reset"] == "block"
                assert info["num_hvp_samples"] == 4 * 2
            if name == "class_balanced":
                zs = [np.load(p) for p in sorted((wd / "isal_scores").glob("shard_*.npz"))]
                ids = np.concatenate([z["ids"] for z in zs])
                groups = dict(zip(ids.tolist(),
                                  np.concatenate([z["groups"] for z in zs]).tolist()))
                assert len(groups) == len(pool)
                # round 1 takes each pseudo class's best: no class twice before all have one
                picked = [groups[int(i)] for i in sel.ids]
                assert len(set(picked)) == min(3, len(set(groups.values())))
    if not degenerate:
        return
    # allow_degenerate: a diverging LiSSA (tiny scale) stops the selection unless allowed
    bad = {"scale": 1e-6, "max_residual": 1.0, "depth": 3}
    with pytest.raises(SelectError, match="allow_degenerate"):
        isal_select(_cfg(bad), str(tmp_path / "degenerate"), src, labeled, pool, "fp")
    sel, info = isal_select(_cfg(bad, allow=True), str(tmp_path / "allowed"), src, labeled,
                            pool, "fp")
    assert len(sel.ids) == 3


# ----------------------------------------------------------------------------- classification

def test_every_option_on_classification(tmp_path):
    from isal_jax.data import ClassificationData, load_digits
    from isal_jax.models import get_model
    from isal_jax.tasks import ClassificationTask
    from isal_jax.tasks.classification import ClassificationInfluence
    data = load_digits("train")
    other = ClassificationData.from_arrays(*[data.get(data.ids[-6:])[k]
                                             for k in ("image", "label")], split="other",
                                           num_classes=10)
    task = ClassificationTask(get_model("mlp", num_classes=10, features=(8,)))
    state = task.init(jax.random.PRNGKey(0), data.image_shape)
    labeled, pool = data.ids[:12], data.ids[12:36]
    src = ClassificationInfluence(task, state, data,
                                  lambda name: other if name == "other" else None,
                                  need_groups=True)
    _run_all_options(src, labeled, pool, other.ids, tmp_path)


# ----------------------------------------------------------------------------- detection

class _TinyDetectionData:
    """In-memory detection split in the pipeline's batch format (generated images)."""

    def __init__(self, ids, seed):
        rng = np.random.default_rng(seed)
        self.ids = np.asarray(ids, np.int64)
        self._img, self._box = {}, {}
        for i in self.ids:
            img = np.full((64, 64, 3), rng.integers(0, 80), np.uint8)
            x0, y0 = rng.integers(0, 30, 2)
            img[y0:y0 + 24, x0:x0 + 24] = rng.integers(120, 255, 3)
            self._img[int(i)] = img
            self._box[int(i)] = np.array([x0, y0, x0 + 24, y0 + 24], np.float32)

    def check(self, ids, what):
        bad = [int(i) for i in ids if int(i) not in self._img]
        if bad:
            raise ValueError(f"{what}: ids {bad[:5]} are not in this split")
        return np.asarray(ids, np.int64)

    def batches(self, ids, batch_size, what="ids"):
        ids = self.check(ids, what)
        for st in range(0, len(ids), batch_size):
            chunk = list(ids[st:st + batch_size])
            n = len(chunk)
            chunk += [chunk[0]] * (batch_size - n)
            boxes = np.zeros((batch_size, 2, 4), np.float32)
            boxes[:, 0] = [self._box[int(i)] for i in chunk]
            mask = np.zeros((batch_size, 2), bool)
            mask[:, 0] = True
            yield {"image": np.stack([self._img[int(i)] for i in chunk]),
                   "boxes": boxes, "classes": np.ones((batch_size, 2), np.int32),
                   "box_mask": mask, "image_id": np.asarray(chunk, np.int32),
                   "image_hw": np.full((batch_size, 2), 64, np.int32),
                   "valid": np.arange(batch_size) < n}


@pytest.mark.slow   # compiles of the detector's HVP / JVP
def test_every_option_on_detection(tmp_path):
    from configs import isal_det_synthetic
    from ezsd_jax.models import detector as det
    from isal_jax.tasks import detection as dt
    cfg = isal_det_synthetic.get_config()
    model = det.FasterRCNN(det.DetectorConfig.from_config(cfg.model, num_classes=3))
    variables = det.init_variables(model, jax.random.key(0))
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    rng = np.random.default_rng(0)
    cls = params["roi_head"]["classifier"]["cls_score"]
    cls["kernel"] = cls["kernel"] + rng.normal(0, 0.05, cls["kernel"].shape).astype(np.float32)
    state = {"params": params, "batch_stats": variables["batch_stats"]}
    task = dt.DetectionTask(model, score_threshold=0.0, max_pseudo_boxes=4)
    data = _TinyDetectionData(np.arange(100, 120), 0)
    other = _TinyDetectionData(np.arange(500, 504), 1)
    src = dt.DetectionInfluence(task, state, data,
                                lambda name: other if name == "other" else None)
    labeled, pool = data.ids[:8], data.ids[8:]
    OPTIONS["reference_mode"]["subset"] = dt.REFERENCE_SUBSET
    try:
        # every option, and the reference sources that reach the task's data (the labeled
        # set, a held-out part, another split); an id list and the degenerate-input stop
        # are resolved by the shared path alone (checked on classification)
        _run_all_options(src, labeled, pool, other.ids, tmp_path,
                         sources=("labeled", "heldout", "split:other"), degenerate=False)
    finally:
        OPTIONS["reference_mode"].pop("subset")


# ----------------------------------------------------------------------------- LiSSA options

def _toy():
    """loss = sum_i x_i (a . a) + y_i (b . b): the HVP of block b is NaN on a row with
    y = NaN, block a stays finite."""
    params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}

    def loss_fn(p, batch):
        return batch["x"] * jnp.sum(p["a"] ** 2) + batch["y"] * jnp.sum(p["b"] ** 2)
    return params, jax.tree_util.Partial(loss_fn)


def test_nan_reset_chain_vs_block_and_sequential_order():
    params, loss_fn = _toy()
    sub = infl.make_subset(params, "all")
    v = {k: jnp.full((2, 2), 1.0) for k in sub.keys}
    batches = [{"x": np.ones(1, np.float32), "y": np.ones(1, np.float32)},
               {"x": np.ones(1, np.float32), "y": np.full(1, np.nan, np.float32)}]
    out = {}
    for mode in ("chain", "block"):
        # sequential, depth 2, 1 chain: step 0 on batch 0 (finite), step 1 on batch 1 (NaN b)
        s, info = infl.lissa(loss_fn, params, sub, v, batches, damp=0.1, scale=10.0, depth=2,
                             repeats=1, hvp_order="sequential", nan_reset=mode, loop="python",
                             residual_batches=1)
        out[mode] = s
        assert info["nan_resets_total"] == 1 and info["nan_reset"] == mode
    np.testing.assert_allclose(out["chain"]["a"], v["a"])       # whole chain back to v
    np.testing.assert_allclose(out["chain"]["b"], v["b"])
    assert not np.allclose(out["block"]["a"], v["a"])            # block a kept its step
    np.testing.assert_allclose(out["block"]["b"], v["b"])        # only block b reset
    orders = infl._chain_orders(5, 3, 2, 0, "sequential")
    np.testing.assert_array_equal(orders, [[0, 1, 2], [3, 4, 0]])
