"""Detection task adapter for ISAL: per-image Faster R-CNN losses with (pseudo) ground truth,
pseudo labels, per-image uncertainty / features for the baselines, and influence scores
through the shared engine (isal_jax/influence.py).

Place in the pipeline: detector (ezsd_jax/models/detector.py) -> THIS -> influence engine /
strategies -> isal_jax/detection_al.py (AL loop task, select CLI).

  task = DetectionTask(model)                       # a FasterRCNN (standard RoI head)
  b = task.assign(params, ms, batch)                # labeled batch + its fixed assignment
  b = {**batch, **task.label_pool(params, ms, batch)}   # pool batch: pseudo GT + assignment
  losses = task.loss_fn(ms)(params, b)              # [B], smooth in params
  out = task.infer(params, ms, batch)               # detections, per-detection entropy,
                                                    # pooled features (baselines)
  src = DetectionInfluence(task, state, data, split_loader)   # isal_jax.scoring's view

Batches are the detection pipeline's dicts (image, boxes, classes, box_mask, image_id,
image_hw, valid, ...); the engine's 'mask' [B] marks the rows that count.

Per-image loss = the detector's training loss (ezsd_jax/models/losses.py) with its discrete
part FIXED. The training loss samples anchors and RoIs and builds proposals with top-k and
NMS; those choices could flip on a last-bit difference between two compilations
(near-ties: flat image regions, zero padding), so a gradient and a JVP compiled as
different programs might see different samples. So the discrete part runs once per batch,
under no gradient (`assign`; `label_pool` for the pool), and travels in the batch
(ASSIGN_KEYS); `loss` is then a fixed function of the parameters in every program:
  * RPN: anchors matched to the (pseudo) GT (IoU rpn_fg_iou / rpn_bg_iou, low-quality
    matches); sampling='sampled' draws the training sample (rpn_batch_per_image at
    rpn_positive_fraction) with a PRNG key fixed by (loss_seed, image_id) -- the same
    image gets the same sample in any batch; 'all' keeps every non-ignored anchor.
    BCE on the sampled objectness + L1 on the positives' deltas, divided by the sample
    size (rpn_batch_per_image, or the anchor count for 'all'), as losses.rpn_losses.
  * RoI head: proposals of the current RPN (training top-k + NMS) + the GT boxes, sampled
    by losses.sample_rois ('sampled': roi_batch_per_image at roi_positive_fraction;
    'all': every valid candidate); losses.box_losses per image (CE + L1 over the image's
    own sampled RoIs).
  * Box losses are smooth L1 with a small `reg_beta` (default 0.01; 0 = training's plain
    L1): a pseudo box is decoded from the model's own deltas, so on the RoI it came from
    the residual deltas - target is 0 up to rounding, and L1's gradient there, sign(+-1e-7),
    is arbitrary and differs between compiled programs (measured on a trained tiny
    detector: JVP and explicit scores 15-40% apart). Smooth L1 gives it the gradient ~0;
    outside |residual| < beta the gradient is L1's (in delta units, 0.01 is ~0.03 px on a
    30 px box for the RoI head's weights 10/5).
  * total = rpn_loss_weight * (rpn_cls + rpn_box) + box_loss_weight * (box_cls + box_reg).
    Image i's value depends on image i only (per-image keys, per-image normalization,
    FrozenBatchNorm), and at the assignment's parameters it equals the training loss on
    that sample; its derivatives are those of the training loss (the discrete choices are
    piecewise constant / under stop_gradient there anyway).
Pseudo GT: detections of the current model (post-processed as at test time) with score >=
`score_threshold` become hard boxes of their predicted class, the `max_pseudo_boxes`
highest-scoring ones, padded with a mask. Images with no kept box get NO influence score
(`scored` False); isal_jax.scoring.select_scored ranks them after every scored image.

Default parameter subset (`DEFAULT_SUBSET`): the heads' last layers, rpn/objectness,
rpn/deltas, roi_head/classifier/cls_score, roi_head/regressor/bbox_pred (kernels and
biases) -- the reference's rpn_cls, rpn_reg, fc_cls, fc_reg; `REFERENCE_SUBSET` = their
kernels only, as the reference (which drops every 1-D parameter).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ezsd_jax.models import detector as det
from ezsd_jax.models import losses, proposal_generator
from ezsd_jax.ops import boxes as box_ops
from ezsd_jax.ops.matching import match_boxes, sample_balanced
from isal_jax import influence as infl
from isal_jax import strategies
from isal_jax.scoring import TrainedModel

DEFAULT_SUBSET = (r"regex:^(rpn/(objectness|deltas)|"
                  r"roi_head/(classifier/cls_score|regressor/bbox_pred))/")
# The reference's subset: the same layers' weights WITHOUT their biases (it keeps only
# parameters with ndim > 1; detection/src/test_calc_s_test.py:117 in dragonlzm/ISAL).
REFERENCE_SUBSET = (r"regex:^(rpn/(objectness|deltas)|"
                    r"roi_head/(classifier/cls_score|regressor/bbox_pred))/kernel$")
SAMPLING = ("sampled", "all")
# The fixed assignment a batch carries into the loss (DetectionTask.assign / label_pool).
ASSIGN_KEYS = ("rpn_idx", "rpn_gt", "rpn_pos", "rpn_valid", "rois", "roi_valid",
               "cls_target", "box_target", "fg")


@dataclasses.dataclass(frozen=True, eq=False)
class DetectionTask:
    model: det.FasterRCNN
    score_threshold: float = 0.1      # pseudo GT: detections with score >= this
    max_pseudo_boxes: int = 100       # static pad of the pseudo GT (top by score)
    sampling: str = "sampled"         # 'sampled' (fixed per-image key) | 'all'
    loss_seed: int = 0                # base of the per-image sampling keys
    reg_beta: float = 0.01            # smooth-L1 beta of the box losses (0 = training's L1)
    feature_level: int = 3            # FPN level pooled for core-set (3 = P5)

    def __post_init__(self):
        c = self.model.cfg
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {self.sampling!r}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.reg_beta < 0:
            raise ValueError(f"reg_beta must be >= 0, got {self.reg_beta}")
        if self.max_pseudo_boxes < 1:
            raise ValueError(f"max_pseudo_boxes must be >= 1, got {self.max_pseudo_boxes}")
        if c.roi_head != "standard":
            raise ValueError(f"DetectionTask supports the standard RoI head only, got "
                             f"model.roi_head={c.roi_head!r}")
        if not 0 <= self.feature_level < len(c.strides):
            raise ValueError(f"feature_level {self.feature_level} not in [0, {len(c.strides)})")

    @property
    def cfg(self) -> det.DetectorConfig:
        return self.model.cfg

    @staticmethod
    def model_state(state: Mapping) -> dict:
        return {"batch_stats": state.get("batch_stats", {})}

    # ------------------------------------------------------------------ losses
    def _image_keys(self, image_id: jax.Array) -> jax.Array:
        base = jax.random.key(self.loss_seed)
        ids = jnp.maximum(image_id.astype(jnp.int32), 0)
        return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(base, i), 2))(ids)

    def _anchors(self) -> tuple[list[np.ndarray], jax.Array]:
        levels = self.cfg.anchors()
        return levels, jnp.asarray(np.concatenate(levels, axis=0))

    def _assign_from(self, obj, dlt, batch) -> dict:
        """The discrete part of the training loss, for the batch's (pseudo) GT, from the
        RPN outputs (no gradient): the RPN anchor sample and its matched GT, the proposals
        (training top-k + NMS) and the RoI sample with its targets."""
        c = self.cfg
        anchors_l, anchors = self._anchors()
        obj = [jax.lax.stop_gradient(o) for o in obj]
        dlt = [jax.lax.stop_gradient(d) for d in dlt]
        keys = self._image_keys(batch["image_id"])                       # [B, 2]
        valid = batch["valid"].astype(bool)
        gt, gm = batch["boxes"].astype(jnp.float32), batch["box_mask"].astype(bool)
        gc = batch["classes"].astype(jnp.int32)

        def rpn_one(k, g, mk):
            iou = box_ops.iou_matrix(anchors, g)
            matched, labels = match_boxes(iou, mk, c.rpn_fg_iou, c.rpn_bg_iou,
                                          allow_low_quality=c.rpn_low_quality_min_iou >= 0,
                                          low_quality_min_iou=c.rpn_low_quality_min_iou,
                                          reassign_low_quality=True)   # as losses.rpn_losses
            if self.sampling == "sampled":
                idx, slab, sval = sample_balanced(k, labels, c.rpn_batch_per_image,
                                                  c.rpn_positive_fraction)
            else:
                idx = jnp.arange(labels.shape[0], dtype=jnp.int32)
                slab, sval = labels, labels >= 0
            return idx, matched[idx], (slab == 1) & sval, sval
        rpn_idx, rpn_gt, rpn_pos, rpn_valid = jax.vmap(rpn_one)(keys[:, 0], gt, gm)

        props, _, pvalid = proposal_generator.rpn_proposals(
            obj, dlt, anchors_l, det.valid_hw(batch), c.rpn_pre_nms_topk_train,
            c.rpn_post_nms_topk_train, c.rpn_nms_threshold)
        if self.sampling == "sampled":
            roi_n, roi_frac = c.roi_batch_per_image, c.roi_positive_fraction
        else:
            roi_n, roi_frac = int(props.shape[1] + gt.shape[1]), 1.0

        def roi_one(k, p, pv, g, cl, mk):
            t = losses.sample_rois(k, p[None], pv[None], g[None], cl[None], mk[None],
                                   c.num_classes, batch_per_image=roi_n,
                                   positive_fraction=roi_frac, fg_iou=c.roi_fg_iou,
                                   bbox_reg_weights=c.bbox_reg_weights,
                                   low_quality_min_iou=c.roi_low_quality_min_iou)
            return {k2: t[k2][0] for k2 in ("rois", "roi_valid", "cls_target", "box_target",
                                            "fg")}
        tgt = jax.vmap(roi_one)(keys[:, 1], props, pvalid, gt, gc, gm)
        v = valid[:, None]
        return {"rpn_idx": rpn_idx, "rpn_gt": rpn_gt, "rpn_pos": rpn_pos & v,
                "rpn_valid": rpn_valid & v, **tgt, "roi_valid": tgt["roi_valid"] & v}

    def assign(self, params, model_state, batch) -> dict:
        """batch (with GT boxes/classes/box_mask) -> the same batch plus the fixed
        assignment (ASSIGN_KEYS) at `params`. Jittable; run it once per batch, then take
        any number of losses / gradients / HVPs / JVPs of `loss` on the result."""
        def fn(m: det.FasterRCNN):
            return m.rpn_outputs(m.features(batch["image"], batch["image_hw"]))
        obj, dlt = nn.apply(fn, self.model)({"params": params, **model_state})
        return {**batch, **self._assign_from(obj, dlt, batch)}

    def loss_terms(self, params, model_state, batch) -> dict:
        """Per-image loss terms [B] (rpn_cls, rpn_box, box_cls, box_reg, loss) for a batch
        carrying its fixed assignment (`assign`, `label_pool`). Every discrete choice
        (anchor sample, proposals, RoI sample) comes from the batch, so the loss, its
        gradient, HVPs and JVPs all see the same function of params (smooth for
        reg_beta > 0)."""
        missing = [k for k in ASSIGN_KEYS if k not in batch]
        if missing:
            raise KeyError(f"DetectionTask.loss: the batch has no fixed assignment "
                           f"{missing}; run task.assign (labeled) or task.label_pool (pool) "
                           "on it first")
        c = self.cfg
        _, anchors = self._anchors()
        valid = batch["valid"].astype(bool)
        n_rpn = batch["rpn_idx"].shape[1]     # rpn_batch_per_image, or every anchor ('all')

        def fn(m: det.FasterRCNN):
            feats = m.features(batch["image"], batch["image_hw"])
            obj, dlt = m.rpn_outputs(feats)
            obj_c, dlt_c = jnp.concatenate(obj, axis=1), jnp.concatenate(dlt, axis=1)
            idx = batch["rpn_idx"]
            o = jnp.take_along_axis(obj_c, idx, axis=1)                          # [B,S]
            d = jnp.take_along_axis(dlt_c, idx[..., None], axis=1)               # [B,S,4]
            g = jnp.take_along_axis(batch["boxes"].astype(jnp.float32),
                                    batch["rpn_gt"][..., None], axis=1)
            target = box_ops.encode(g, anchors[idx])
            pos, sval = batch["rpn_pos"], batch["rpn_valid"]
            cls = optax.sigmoid_binary_cross_entropy(o, pos.astype(jnp.float32))
            reg = losses.smooth_l1(d - target, self.reg_beta).sum(-1)   # as losses.rpn_losses
            rpn_cls = jnp.sum(jnp.where(sval, cls, 0.0), axis=1) / n_rpn
            rpn_box = jnp.sum(jnp.where(pos, reg, 0.0), axis=1) / n_rpn
            head = m.head(m.roi_features(feats, batch["rois"]), batch["cls_target"], None)

            def box_one(lg, dl, t, v):
                r = losses.box_losses(lg[None], dl[None],
                                      jax.tree_util.tree_map(lambda x: x[None], t), v[None],
                                      beta=self.reg_beta)
                return r["box_cls"], r["box_reg"]
            box_t = {k: batch[k] for k in ("roi_valid", "cls_target", "box_target", "fg")}
            box_cls, box_reg = jax.vmap(box_one)(head["logits"], head["deltas"], box_t, valid)
            return {"rpn_cls": rpn_cls, "rpn_box": rpn_box, "box_cls": box_cls,
                    "box_reg": box_reg}

        out = nn.apply(fn, self.model)({"params": params, **model_state})
        out["loss"] = (c.rpn_loss_weight * (out["rpn_cls"] + out["rpn_box"])
                       + c.box_loss_weight * (out["box_cls"] + out["box_reg"]))
        return out

    def loss(self, params, model_state, batch) -> jax.Array:
        """Per-image detection loss [B] (0 on padding rows, valid=False)."""
        return self.loss_terms(params, model_state, batch)["loss"]

    def _loss_with_state(self, model_state, params, batch) -> jax.Array:
        return self.loss(params, model_state, batch)

    def loss_fn(self, model_state):
        """The engine's `loss_fn(params, batch)`: a jax.tree_util.Partial over the model
        state, so the engine compiles it once per shape across calls and cycles."""
        return jax.tree_util.Partial(self._loss_with_state, model_state)

    # ------------------------------------------------------------------ inference
    def _infer_parts(self, params, model_state, batch) -> tuple[list, list, dict]:
        c = self.cfg
        hw = det.valid_hw(batch)
        level = self.feature_level
        parts = det.infer_parts(self.model, {"params": params, **model_state}, batch)
        head, props, pvalid = parts["head"], parts["proposals"], parts["proposal_valid"]
        out = parts["detections"]
        out["entropy"] = _detection_entropy(head["logits"], head["deltas"], props, pvalid, hw,
                                            out, c.bbox_reg_weights)
        out["features"] = _masked_mean_pool(parts["feats"][level], hw, c.strides[level])
        return parts["rpn_objectness"], parts["rpn_deltas"], out

    def infer(self, params, model_state, batch) -> dict:
        """Test-time detections plus what selection needs, all [B, ...] (jittable):
        boxes [B,D,4], scores, classes, valid [B,D] (as forward_infer), entropy [B,D]
        (entropy of the softmax over K+1 classes of the proposal each detection came from),
        features [B,C] (masked mean of FPN level `feature_level` over the valid region)."""
        return self._infer_parts(params, model_state, batch)[2]

    def pseudo_targets(self, dets: Mapping, threshold=None) -> dict:
        """Detections -> hard pseudo GT: score >= threshold (default score_threshold; may be
        a traced value), the top max_pseudo_boxes by score, classes = predicted classes."""
        thr = self.score_threshold if threshold is None else threshold
        keep = dets["valid"] & (dets["scores"] >= thr)
        k = min(self.max_pseudo_boxes, dets["scores"].shape[1])
        prio = jnp.where(keep, dets["scores"], -1.0)
        top_s, idx = jax.lax.top_k(prio, k)
        mask = top_s >= 0
        boxes = jnp.take_along_axis(dets["boxes"], idx[..., None], axis=1)
        classes = jnp.take_along_axis(dets["classes"], idx, axis=1)
        return {"pseudo_boxes": jnp.where(mask[..., None], boxes, 0.0),
                "pseudo_classes": jnp.where(mask, classes, 0).astype(jnp.int32),
                "pseudo_mask": mask, "num_pseudo": jnp.sum(mask, axis=1)}

    def label_pool(self, params, model_state, batch, threshold=None) -> dict:
        """One forward pass over pool images: test-time detections -> pseudo GT (replacing
        boxes/classes/box_mask; mask = valid & at least one pseudo box) -> the fixed
        assignment for them. Returns only the new/changed keys (merge them into the host
        batch) plus num_pseudo; jittable, `threshold` may be traced (one program for any)."""
        obj, dlt, out = self._infer_parts(params, model_state, batch)
        pt = self.pseudo_targets(out, threshold)
        b = with_pseudo_targets(batch, pt)
        new = {k: b[k] for k in ("boxes", "classes", "box_mask", "mask")}
        new.update(self._assign_from(obj, dlt, b))
        new["num_pseudo"] = pt["num_pseudo"]
        return new

    def pseudo_label_fn(self, model_state):
        """The engine's `pseudo_label_fn(params, batch)`: the batch with pseudo GT and its
        fixed assignment (jittable)."""
        def fn(params, batch):
            new = self.label_pool(params, model_state, batch)
            new.pop("num_pseudo")
            return {**batch, **new}
        return fn


def with_pseudo_targets(batch: Mapping, out: Mapping) -> dict:
    """Replaces the batch's GT by the pseudo GT `out` (DetectionTask.pseudo_targets) and
    sets mask = valid & num_pseudo > 0 (numpy or jax arrays)."""
    b = dict(batch)
    b["boxes"], b["classes"], b["box_mask"] = (out["pseudo_boxes"], out["pseudo_classes"],
                                               out["pseudo_mask"])
    b["mask"] = b["valid"] & (out["num_pseudo"] > 0)
    return b


def with_mask(batch: Mapping) -> dict:
    """A labeled pipeline batch -> the engine's form (mask = valid)."""
    b = dict(batch)
    b["mask"] = np.asarray(b["valid"], bool)
    return b


def _detection_entropy(logits, deltas, props, pvalid, hw, dets, reg_weights) -> jax.Array:
    """Per detection: entropy of the class distribution (softmax over K+1) of the proposal
    it came from. postprocess.detections does not return that proposal's index, so it is
    recovered as the proposal whose decoded, clipped box and class probability are
    nearest to the detection's (exact ties in practice: the same ops on the same inputs)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)                 # [B,R,K+1]
    ent = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-12)), axis=-1)         # [B,R]
    boxes = box_ops.decode(deltas, props, reg_weights)
    boxes = box_ops.clip_boxes(boxes, hw[:, None, 0], hw[:, None, 1])           # [B,R,4]

    def one(p, e, bx, pv, db, ds, dc):
        pc = jnp.take(p, jnp.clip(dc, 0, p.shape[1] - 1), axis=1).T             # [D,R]
        dist = jnp.sum(jnp.abs(db[:, None, :] - bx[None, :, :]), -1) + jnp.abs(pc - ds[:, None])
        r = jnp.argmin(jnp.where(pv[None, :], dist, jnp.inf), axis=1)
        return e[r]
    out = jax.vmap(one)(probs, ent, boxes, pvalid, dets["boxes"], dets["scores"],
                        dets["classes"])
    return jnp.where(dets["valid"], out, 0.0)


def _masked_mean_pool(fmap, hw, stride: int) -> jax.Array:
    """Mean of fmap [B,h,w,C] over the cells covering each image's valid region."""
    h, w = fmap.shape[1:3]
    vh = jnp.ceil(hw[:, 0] / stride)
    vw = jnp.ceil(hw[:, 1] / stride)
    m = ((jnp.arange(h)[None, :, None] < vh[:, None, None])
         & (jnp.arange(w)[None, None, :] < vw[:, None, None])).astype(jnp.float32)
    s = jnp.einsum("bhwc,bhw->bc", fmap.astype(jnp.float32), m)
    return s / jnp.maximum(jnp.sum(m, axis=(1, 2)), 1.0)[:, None]


# ----------------------------------------------------------------------------- predictions

@dataclasses.dataclass
class PoolPredictions:
    """Per valid image of the pool, in batch order (host numpy)."""
    ids: np.ndarray               # [N] image ids
    max_score: np.ndarray         # [N] best detection score (0 when none)
    mean_entropy: np.ndarray      # [N] see `predict`
    num_pseudo: np.ndarray        # [N] kept (pseudo GT) detections
    features: np.ndarray          # [N, C] pooled features (core-set)

    @property
    def least_confidence(self) -> np.ndarray:
        return 1.0 - self.max_score


def _place(batch, mesh):
    if mesh is None:
        return batch
    from ezsd_jax.core.sharding import host_to_global
    return host_to_global(batch, mesh)


def _replicate(tree, mesh):
    if mesh is None:
        return tree
    from ezsd_jax.core.sharding import replicated
    return jax.device_put(tree, replicated(mesh))


def make_infer_fn(task: DetectionTask, model_state):
    return jax.jit(lambda params, batch: task.infer(params, model_state, batch))


def predict(task: DetectionTask, params, model_state, batches: Iterable[dict], *,
            mesh=None, infer_fn=None) -> PoolPredictions:
    """Runs `infer` over host batches; keeps the valid rows.
    mean_entropy: mean over the kept detections (score >= score_threshold) of their class
    entropy; an image with none takes the mean over all its detections, and one with no
    detection at all the maximum log(K+1) (maximally uncertain, like least confidence 1)."""
    f = infer_fn or make_infer_fn(task, model_state)
    params = _replicate(params, mesh)
    max_ent = float(np.log(task.cfg.num_classes + 1))
    cols = {k: [] for k in ("ids", "max_score", "mean_entropy", "num_pseudo", "features")}
    for batch in batches:
        out = jax.device_get(f(params, _place(_engine_batch(batch), mesh)))
        v = np.asarray(batch["valid"], bool)
        dv = np.asarray(out["valid"], bool)
        sc = np.asarray(out["scores"], np.float64)
        ent = np.asarray(out["entropy"], np.float64)
        kept = dv & (sc >= task.score_threshold)
        use = np.where(kept.any(1, keepdims=True), kept, dv)
        n = use.sum(1)
        ment = np.where(n > 0, (ent * use).sum(1) / np.maximum(n, 1), max_ent)
        cols["ids"].append(np.asarray(batch["image_id"], np.int64)[v])
        cols["max_score"].append(np.where(dv, sc, 0.0).max(1)[v])
        cols["mean_entropy"].append(ment[v])
        cols["num_pseudo"].append(np.minimum(kept.sum(1), task.max_pseudo_boxes)[v])
        cols["features"].append(np.asarray(out["features"], np.float32)[v])
    if not cols["ids"]:
        raise ValueError("predict: no batches")
    return PoolPredictions(**{k: np.concatenate(x) for k, x in cols.items()})


def _engine_batch(batch: Mapping) -> dict:
    """Host batch -> numpy arrays, with mask = valid unless the batch has a mask."""
    b = {k: np.asarray(v) for k, v in batch.items()}
    b.setdefault("mask", np.asarray(b["valid"], bool))
    return b


# ----------------------------------------------------------------------------- influence

def block_scale(scale: float, block_scales: Iterable = ()) -> float | dict:
    """Config -> lissa's `scale`: a scalar, or with `block_scales` ((key, scale), ...) a
    per-block mapping (key: exact path, 'regex:<pattern>' or '*'; unnamed blocks get
    `scale` unless a '*' is given)."""
    pairs = [(str(k), float(v)) for k, v in block_scales]
    if not pairs:
        return float(scale)
    d = dict(pairs)
    d.setdefault("*", float(scale))
    return d


def make_assign_fn(task: DetectionTask, model_state):
    """Jitted (params, batch) -> the fixed-assignment arrays (ASSIGN_KEYS) of the batch."""
    return jax.jit(lambda params, batch: {
        k: v for k, v in task.assign(params, model_state, batch).items() if k in ASSIGN_KEYS})


def make_label_fn(task: DetectionTask, model_state):
    """Jitted (params, batch, threshold) -> DetectionTask.label_pool's arrays. Shareable by
    tasks that differ only in score_threshold (it is an argument, not a constant)."""
    return jax.jit(lambda params, batch, thr: task.label_pool(params, model_state, batch, thr))


def assigned_batches(task: DetectionTask, params, model_state, batches: Iterable[dict], *,
                     assign_fn=None) -> Iterator[dict]:
    """Labeled host batches (true GT) -> host batches with mask = valid and their fixed
    assignment at `params`, ready for the engine's losses."""
    f = assign_fn or make_assign_fn(task, model_state)
    for batch in batches:
        b = with_mask(_engine_batch(batch))
        b.update(jax.device_get(f(params, b)))
        yield b


def isal_pool_scores(task: DetectionTask, params, model_state, subset: infl.ParamSubset,
                     s_test: Mapping, batches: Iterable[dict], *, mesh=None,
                     label_fn=None, score_fn=None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Influence I(z) = -<G_z, s_test> of every valid pool image of `batches` (host
    pipeline batches), through the engine's JVP scores. Per batch, one jitted
    `label_pool` pass gives the pseudo GT and its fixed assignment; images without a kept
    box are not scored. `label_fn` (make_label_fn) / `score_fn` (infl.make_score_fn on
    task.loss_fn) reuse compiled functions.
    Returns (ids [N], scores [N] float64, NaN where unscored, scored [N] bool, groups [N]:
    the class of each image's highest-scoring pseudo box)."""
    f = label_fn or make_label_fn(task, model_state)
    if score_fn is None:
        score_fn = infl.make_score_fn(task.loss_fn(model_state), subset, None, mesh=mesh)
    rep_params = _replicate(params, mesh)
    thr = np.float32(task.score_threshold)
    ids, scored, groups = [], [], []

    def labeled_batches() -> Iterator[dict]:
        for batch in batches:
            b = _engine_batch(batch)
            new = jax.device_get(f(rep_params, _place(b, mesh), thr))
            new.pop("num_pseudo")
            b.update({k: np.asarray(x) for k, x in new.items()})
            v = np.asarray(b["valid"], bool)
            ids.append(np.asarray(b["image_id"], np.int64)[v])
            scored.append(np.asarray(b["mask"], bool)[v])
            groups.append(np.asarray(b["classes"], np.int64)[v, 0])
            yield b

    sc = infl.pool_scores(task.loss_fn(model_state), params, subset, s_test,
                          labeled_batches(), None, mesh=mesh, score_fn=score_fn)
    ids = np.concatenate(ids) if ids else np.zeros((0,), np.int64)
    scored = np.concatenate(scored) if scored else np.zeros((0,), bool)
    full = np.full(len(ids), np.nan)
    if int(scored.sum()) != len(sc):
        raise RuntimeError(f"isal_pool_scores: {len(sc)} scores for {int(scored.sum())} "
                           "scored images")
    full[scored] = sc
    groups = np.concatenate(groups) if groups else np.zeros((0,), np.int64)
    return ids, full, scored, groups


@dataclasses.dataclass(eq=False)
class DetectionInfluence(TrainedModel):
    """The detector's side of the one ISAL scoring path (isal_jax.scoring.InfluenceTask)
    over a DetectionTask, its state and the pool's DetectionData. Labeled batches carry
    their fixed assignment; pool images without a kept pseudo box are not scored."""
    mesh: object = None
    scale: object = None              # per-block LiSSA scales (block_scale), None: scalar

    def __post_init__(self):
        ms = self.model_state
        self._assign_fn = make_assign_fn(self.task, ms)
        self._label_fn = make_label_fn(self.task, ms)

    def labeled_batches(self, data, ids, batch_size: int, what: str) -> Iterator[dict]:
        return assigned_batches(self.task, self.params, self.model_state,
                                data.batches(ids, batch_size, what), assign_fn=self._assign_fn)

    def score_pool(self, subset, s_test, ids, batch_size: int):
        score_fn = infl.make_score_fn(self.loss_fn(), subset, None, mesh=self.mesh)
        got, sc, ok, groups = isal_pool_scores(
            self.task, self.params, self.model_state, subset, s_test,
            self.data.batches(ids, batch_size, "pool"), mesh=self.mesh,
            label_fn=self._label_fn, score_fn=score_fn)
        if not np.array_equal(got, ids):
            raise RuntimeError("isal: the pool scores came back for other ids")
        return sc, ok, groups


# ----------------------------------------------------------------------------- selection

def select_by_uncertainty(ids, values, budget: int) -> strategies.Selection:
    """Largest per-image uncertainty first (least confidence, mean entropy); ties -> id."""
    ids = strategies._check(ids, budget, len(np.asarray(values)), "uncertainty")
    return strategies._top(ids, np.asarray(values, np.float64), int(budget), largest=True)
