"""Evaluation stage ("eval"): batched jitted inference -> detections in ORIGINAL image
coordinates (COCO ids, xywh) -> pycocotools COCOeval, optionally per category group
(all / novel / base: generalized zero-shot detection), box AP and, for a Mask R-CNN, mask
AP. Process 0 writes
<workdir>/eval/<name>_detections.json and <name>_metrics.json. Masks and multi-process
gathering: docs/code-notes.md.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from pycocotools.cocoeval import COCOeval

from ezsd_jax.core import cli, sharding
from ezsd_jax.core.checkpoint import Checkpointer
from ezsd_jax.core.io_utils import atomic_write_json
from ezsd_jax.core.metrics import Progress
from ezsd_jax.models import detector as det
from ezsd_jax.ops.masks import encode_masks
from ezsd_jax.train import detector_config, init_train_state, load_dataset, make_pipeline

log = logging.getLogger(__name__)

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                   "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(det: dict, meta: dict, cat_ids: Sequence[int]) -> list[dict]:
    """Host arrays of one batch -> COCO result dicts (xywh in original image pixels)."""
    out = []
    for b in range(det["boxes"].shape[0]):
        if not meta["valid"][b]:
            continue
        first = len(out)
        scale = float(meta["scale"][b])
        h, w = (float(v) for v in meta["orig_hw"][b])
        keep = det["valid"][b]
        boxes = det["boxes"][b][keep] / scale
        if meta.get("flipped") is not None and meta["flipped"][b]:
            boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], -1)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
        for bx, s, c in zip(boxes, det["scores"][b][keep], det["classes"][b][keep]):
            out.append({"image_id": int(meta["image_id"][b]), "category_id": int(cat_ids[int(c)]),
                        "bbox": [round(float(bx[0]), 2), round(float(bx[1]), 2),
                                 round(float(bx[2] - bx[0]), 2), round(float(bx[3] - bx[1]), 2)],
                        "score": round(float(s), 5)})
        if "masks" in det:
            h, w = (int(v) for v in meta["orig_hw"][b])
            bits = np.unpackbits(det["masks"][b][det["valid"][b]], axis=-1)[:, :h, :w]
            for r, rle in zip(out[first:], encode_masks(bits)):
                r["segmentation"] = rle
    return out


def mask_canvas(dataset) -> tuple[int, int]:
    """Static paste canvas (H, W) of a dataset: its largest original height and width,
    rounded up to multiples of 8 (the packed bits)."""
    h = max((r.height for r in dataset.records), default=8)
    w = max((r.width for r in dataset.records), default=8)
    return -(-h // 8) * 8, -(-w // 8) * 8


def coco_eval(coco_gt, results: list[dict], img_ids: Sequence[int],
              cat_ids: Sequence[int] | None = None, verbose: bool = False,
              iou_type: str = "bbox", max_dets: Sequence[int] = (1, 10, 100)) -> dict:
    """COCOeval `iou_type` ('bbox', or 'segm' for RLE 'segmentation' results; GT crowd
    regions are ignore regions) on `img_ids` (and `cat_ids` when given). Empty results ->
    all zeros.

    The standard protocol: maxDets 1/10/100 (per image and category). pycocotools reads
    the summary AP at 100 and AP50 / AP75 / APs/m/l at max_dets[2]: the EZSD reference's
    (100, 300, 1000) reports AP at 100 and AP50 at 1000 (REFERENCE_MAX_DETS). A model's
    test_max_detections only caps what it outputs."""
    if len(max_dets) != 3 or 100 not in max_dets:
        raise ValueError(f"coco_eval: max_dets needs 3 values including 100 (pycocotools "
                         f"reads AP at 100), got {tuple(max_dets)}")
    if cat_ids is not None:
        results = [r for r in results if r["category_id"] in set(cat_ids)]
    if not results:
        return {k: 0.0 for k in COCO_STAT_NAMES}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        # loadRes edits its input in place (adds 'area', 'id' and, for boxes, a box
        # polygon as 'segmentation'): hand it copies, the caller's results stay as written
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = list(img_ids)
        if cat_ids is not None:
            ev.params.catIds = list(cat_ids)
        ev.params.maxDets = [int(m) for m in max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if verbose:
        print(buf.getvalue(), flush=True)  # the COCOeval table is the result
    return {k: float(max(v, 0.0)) for k, v in zip(COCO_STAT_NAMES, ev.stats)}


REFERENCE_MAX_DETS = (100, 300, 1000)   # EZSD reference (mmdet coco.py _evaluate_by_class_split)


def max_dets_key(max_dets: Sequence[int]) -> str:
    return "maxDets_" + "_".join(str(int(m)) for m in max_dets)


def run_inference(infer_fn: Callable, pipeline, mesh, cat_ids: Sequence[int],
                  name: str = "eval") -> list[dict]:
    """infer_fn(global_batch) -> detections dict; returns COCO results from all processes."""
    results: list[dict] = []
    n = pipeline.num_eval_batches
    progress = Progress(n, unit="img", per_step=pipeline.global_batch_size, name=name)
    meta_keys = ("image_id", "scale", "orig_hw", "flipped", "valid")
    for i, batch in enumerate(pipeline):
        gbatch = sharding.host_to_global(batch, mesh)
        det = infer_fn(gbatch)
        host = sharding.to_host({"det": det, "meta": {k: gbatch[k] for k in meta_keys}})
        results.extend(to_coco_results(host["det"], host["meta"], cat_ids))
        progress.tick(i + 1)
    return results


def write_eval_outputs(workdir: str, name: str, results: list[dict], metrics: dict) -> None:
    if jax.process_index() != 0:
        return
    d = os.path.join(workdir, "eval")
    atomic_write_json(os.path.join(d, f"{name}_detections.json"), results, indent=None)
    atomic_write_json(os.path.join(d, f"{name}_metrics.json"), metrics)
    print(f"[{name}] " + json.dumps(metrics), flush=True)  # the eval result line


# jitted inference per (detector config, mesh, variable shardings): evaluating another
# checkpoint or other class embeddings of the same detector reuses the compiled program
_INFER_FNS: dict = {}
_INFER_FNS_MAX = 8


def infer_program(model, variables_sh, mesh, canvas: tuple[int, int] | None = None):
    """The jitted inference step infer(variables, batch, consts) -> detections of a global
    batch (split on 'data'; cached per detector config, mesh and variable shardings); with
    a Mask R-CNN and `canvas` (mask_canvas) also 'masks' (bit-packed pasted masks,
    original pixels)."""
    rep = sharding.replicated(mesh)
    leaves, treedef = jax.tree_util.tree_flatten(variables_sh)
    canvas = tuple(canvas) if canvas is not None and model.cfg.mask_on else None
    key = (type(model), model.cfg, mesh, treedef, tuple(leaves), canvas)
    jitted = _INFER_FNS.get(key)
    if jitted is None:
        def infer(variables, batch, c):
            out = det.forward_infer(model, variables, batch, c.get("class_embeddings"))
            if canvas is not None:
                out["masks"] = det.paste_detection_masks(out, batch, canvas)
            out.pop("mask_probs", None)
            return out

        # detections stay split on 'data' like the batch (every output leads with it): a
        # replicated output made XLA all-gather every chip's detections -- and the pasted
        # masks, 1 GB a step for configs/coco.py on a v5e-8 (docs/aot.md) -- onto every
        # chip; sharding.to_host assembles them on the host instead
        data = sharding.data_sharding(mesh)
        jitted = jax.jit(infer, in_shardings=(variables_sh, data, rep), out_shardings=data)
        if len(_INFER_FNS) >= _INFER_FNS_MAX:
            _INFER_FNS.pop(next(iter(_INFER_FNS)))
        _INFER_FNS[key] = jitted
    return jitted


def make_infer_fn(model, variables_sh, mesh, consts: dict | None = None,
                  canvas: tuple[int, int] | None = None):
    """infer_program with `consts` bound: fn(variables, batch) -> detections."""
    jitted = infer_program(model, variables_sh, mesh, canvas)
    consts_dev = jax.device_put(consts or {}, sharding.replicated(mesh))
    return lambda variables, batch: jitted(variables, batch, consts_dev)


def place_on_mesh(tree, mesh):
    """Leaves already sharded over `mesh` stay; anything else is replicated on it."""

    def one(x):
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding) and sh.mesh == mesh:
            return x
        return jax.device_put(x, sharding.replicated(mesh))
    return jax.tree_util.tree_map(one, tree)


def evaluate_detector(cfg, workdir: str, model, variables, dataset, consts=None,
                      groups: dict[str, Sequence[int]] | None = None, name: str = "eval",
                      also_max_dets: Sequence[int] = ()) -> dict:
    """Runs inference over `dataset` and COCOeval per group of category ids
    (default: one group 'all'). Returns {group: stats} (and {'segm': {group: stats}} with
    the mask branch on); with `also_max_dets` (e.g. REFERENCE_MAX_DETS) also
    {'maxDets_100_300_1000': {group: stats}}."""
    results = infer_dataset(cfg, model, variables, dataset, consts, name)
    coco_gt = dataset.coco()
    img_ids = [r.image_id for r in dataset.records]
    groups = groups or {"all": list(dataset.cat_ids)}
    metrics = {g: coco_eval(coco_gt, results, img_ids, ids) for g, ids in groups.items()}
    if also_max_dets:
        metrics[max_dets_key(also_max_dets)] = {
            g: coco_eval(coco_gt, results, img_ids, ids, max_dets=also_max_dets)
            for g, ids in groups.items()}
    if model.cfg.mask_on:
        metrics["segm"] = {g: coco_eval(coco_gt, results, img_ids, ids, iou_type="segm")
                           for g, ids in groups.items()}
    metrics["num_images"] = len(img_ids)
    metrics["num_detections"] = len(results)
    write_eval_outputs(workdir, name, results, metrics)
    return metrics


def infer_dataset(cfg, model, variables, dataset, consts=None, name: str = "eval"
                  ) -> list[dict]:
    """COCO results (with RLE masks for a Mask R-CNN) of `dataset` from all processes."""
    mesh = sharding.make_mesh(cfg.mesh)
    variables = place_on_mesh(variables, mesh)
    var_sh = jax.tree_util.tree_map(lambda x: x.sharding, variables)
    infer = make_infer_fn(model, var_sh, mesh, consts,
                          mask_canvas(dataset) if model.cfg.mask_on else None)
    pipe = make_pipeline(dataset, cfg, False, cfg.eval.batch_size)
    try:
        return run_inference(lambda b: infer(variables, b), pipe, mesh, dataset.cat_ids, name)
    finally:
        pipe.close()


def restore_variables(cfg, workdir: str, model, consts=None, name: str = "detector",
                      stage: str = "train"):
    """Latest checkpoint of the detector trained in `workdir` -> its variables (sharded).
    Read-only: nothing in the workdir is created, cleaned or written. `stage`: the stage
    that writes ckpt_<name> (named in the error when there is none)."""
    mesh = sharding.make_mesh(cfg.mesh)
    init, state_sh, _, _ = init_train_state(model, cfg, mesh, jax.random.key(0), consts or {})
    # abstract target (shapes, dtypes, shardings): nothing is compiled or allocated
    target = jax.tree_util.tree_map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        jax.eval_shape(init, jax.random.key(0)), state_sh)
    ckdir = os.path.join(workdir, f"ckpt_{name}")
    step = None
    if os.path.isdir(ckdir):
        ckpt = Checkpointer(ckdir, read_only=True)
        step = ckpt.latest_step()
        if step is None:
            ckpt.close()
    if step is None:
        raise cli.MissingInput(f"no detector checkpoint in {ckdir}: run the {stage} stage "
                               "first")
    stats = target["batch_stats"]
    counts = stats.get(det.SEESAW_COUNTS)
    if counts is not None:   # sized by the TRAINING vocabulary, not this model's
        shape = ckpt.stored_shape(step, ("batch_stats", det.SEESAW_COUNTS))
        stats[det.SEESAW_COUNTS] = jax.ShapeDtypeStruct(shape, counts.dtype,
                                                        sharding=counts.sharding)
    state = ckpt.restore(step, target)
    ckpt.close()
    stats = {k: v for k, v in state["batch_stats"].items() if k != det.SEESAW_COUNTS}
    return {"params": state["params"], "batch_stats": stats}, step


def run(cfg, workdir: str) -> dict:
    """Stage "eval": evaluates the trained plain detector on config.data (val split)."""
    train_ds = load_dataset(cfg.data, "train")
    dataset = load_dataset(cfg.data, "val", category_names=train_ds.cat_names)
    model = det.FasterRCNN(detector_config(cfg, dataset.num_classes))
    variables, step = restore_variables(cfg, workdir, model)
    log.info(f"[eval] checkpoint step {step}, {len(dataset.records)} images")
    return evaluate_detector(cfg, workdir, model, variables, dataset)
