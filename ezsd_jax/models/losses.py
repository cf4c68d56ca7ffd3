"""Training targets and losses of the two-stage detector (static shapes, masks for padding).

- rpn_losses: anchors matched to GT (IoU 0.7/0.3 + low-quality matches), 256 sampled per
  image at 50% positives, BCE objectness + L1 box deltas, normalized by the sampled count
  (detectron2's convention).
- sample_rois: proposals + GT boxes, matched at IoU 0.5, 512 sampled per image at 25%
  positives; class targets (background = num_classes, the last index) and box targets.
- box_losses: softmax CE over the sampled RoIs + class-agnostic L1 on foreground deltas.
- seesaw_box_losses: the same with mmdet's SeesawLoss (LVIS; Wang et al., CVPR 2021) for
  the classification: logits [K + 2] = K class logits + a 2-way objectness (object,
  background); the class term (`seesaw_ce`, positives only) reweights the negative
  classes of each RoI by the mitigation factor min(1, N_j / N_i)^p (N = cumulative
  sampled RoIs per class, `seesaw_counts`, carried in the train state) and the
  compensation factor max(1, s_j / s_i)^q (s = detached softmax); the objectness term is
  plain CE. Both are divided by the number of sampled RoIs (mmdet's avg_factor).
  `seesaw_scores` turns [K + 2] logits into the test-time log-probabilities [K + 1]
  (classes x P(object), background last), so post-processing stays the same.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ezsd_jax.ops import boxes as box_ops
from ezsd_jax.ops.matching import match_boxes, sample_balanced


def smooth_l1(x, beta: float):
    """Elementwise smooth L1 (Huber / beta); beta <= 0 is plain |x| (detectron2 default)."""
    ax = jnp.abs(x)
    if beta <= 0:
        return ax
    return jnp.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


def rpn_losses(key, objectness: jax.Array, deltas: jax.Array, anchors: jax.Array,
               gt_boxes: jax.Array, gt_mask: jax.Array, image_valid: jax.Array, *,
               batch_per_image: int = 256, positive_fraction: float = 0.5,
               fg_iou: float = 0.7, bg_iou: float = 0.3, beta: float = 0.0,
               low_quality_min_iou: float = 0.3) -> dict:
    """objectness [B,A], deltas [B,A,4] (all levels concatenated, anchors [A,4]).
    low_quality_min_iou: a GT's best anchors become positive (matched to that GT) when
    their IoU is >= this (mmdet's min_pos_iou; < 0: no low-quality matches)."""
    bsz = objectness.shape[0]
    keys = jax.random.split(key, bsz)

    def one(k, obj, dlt, gt, gm):
        iou = box_ops.iou_matrix(anchors, gt)                                 # [A,M]
        matched, labels = match_boxes(iou, gm, fg_iou, bg_iou,
                                      allow_low_quality=low_quality_min_iou >= 0,
                                      low_quality_min_iou=low_quality_min_iou,
                                      reassign_low_quality=True)
        idx, slab, sval = sample_balanced(k, labels, batch_per_image, positive_fraction)
        pos = (slab == 1) & sval
        obj_s = obj[idx]
        cls = optax.sigmoid_binary_cross_entropy(obj_s, pos.astype(jnp.float32))
        target = box_ops.encode(gt[matched[idx]], anchors[idx])
        reg = smooth_l1(dlt[idx] - target, beta).sum(-1)
        return (jnp.sum(cls * sval), jnp.sum(reg * pos), jnp.sum(pos), jnp.sum(sval))

    cls, reg, npos, nval = jax.vmap(one)(keys, objectness, deltas, gt_boxes, gt_mask)
    w = image_valid.astype(jnp.float32)
    norm = jnp.maximum(batch_per_image * jnp.sum(w), 1.0)
    return {"rpn_cls": jnp.sum(cls * w) / norm, "rpn_box": jnp.sum(reg * w) / norm,
            "rpn_num_pos": jnp.sum(npos * w) / jnp.maximum(jnp.sum(w), 1.0)}


def sample_rois(key, proposals: jax.Array, proposal_valid: jax.Array, gt_boxes: jax.Array,
                gt_classes: jax.Array, gt_mask: jax.Array, num_classes: int, *,
                batch_per_image: int = 512, positive_fraction: float = 0.25,
                fg_iou: float = 0.5, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
                low_quality_min_iou: float = 0.5) -> dict:
    """Returns rois [B,R,4], roi_valid [B,R], cls_target [B,R] (bg = num_classes),
    box_target [B,R,4], fg [B,R], matched_gt [B,R] (index into the image's GT list).
    low_quality_min_iou: as rpn_losses' (the candidates include the GT boxes themselves,
    so at 0.5 it only re-matches a GT's best candidates to that GT; < 0: off)."""
    bsz = proposals.shape[0]
    keys = jax.random.split(key, bsz)
    proposals = jax.lax.stop_gradient(proposals)

    def one(k, prop, pv, gt, gc, gm):
        cand = jnp.concatenate([prop, gt], axis=0)
        cv = jnp.concatenate([pv, gm], axis=0)
        iou = box_ops.iou_matrix(cand, gt)
        matched, labels = match_boxes(iou, gm, fg_iou, fg_iou,
                                      allow_low_quality=low_quality_min_iou >= 0,
                                      low_quality_min_iou=low_quality_min_iou,
                                      reassign_low_quality=True, pred_valid=cv)
        labels = jnp.where(cv, labels, -1)
        idx, slab, sval = sample_balanced(k, labels, batch_per_image, positive_fraction, cv)
        rois = cand[idx]
        fg = (slab == 1) & sval
        mg = matched[idx]
        cls_t = jnp.where(fg, gc[mg], num_classes)
        box_t = box_ops.encode(gt[mg], rois, bbox_reg_weights)
        return rois, sval, cls_t, box_t, fg, mg

    rois, rv, cls_t, box_t, fg, mg = jax.vmap(one)(keys, proposals, proposal_valid,
                                                    gt_boxes, gt_classes, gt_mask)
    return {"rois": rois, "roi_valid": rv, "cls_target": cls_t, "box_target": box_t,
            "fg": fg, "matched_gt": mg}


def _roi_terms(pred: jax.Array, deltas: jax.Array, targets: dict, image_valid: jax.Array,
               beta: float) -> tuple[jax.Array, jax.Array, jax.Array, dict]:
    """(w valid RoIs, fg, n = number of valid RoIs, {box_reg, accuracies}) shared by both
    classification losses; pred [B, R] is the predicted class (bg = K)."""
    valid = targets["roi_valid"] & image_valid[:, None]
    w = valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    fg = (targets["fg"] & valid).astype(jnp.float32)
    reg = smooth_l1(deltas - targets["box_target"], beta).sum(-1)
    hit = pred == targets["cls_target"]
    return w, fg, n, {"box_reg": jnp.sum(reg * fg) / n, "roi_acc": jnp.sum(hit * w) / n,
                      "roi_fg_acc": jnp.sum(hit * fg) / jnp.maximum(jnp.sum(fg), 1.0),
                      "roi_num_fg": jnp.sum(fg) / pred.shape[0]}


def box_losses(logits: jax.Array, deltas: jax.Array, targets: dict, image_valid: jax.Array,
               beta: float = 0.0) -> dict:
    """Softmax CE over all sampled RoIs, L1 on foreground deltas; both divided by the
    number of sampled RoIs (detectron2)."""
    w, _, n, out = _roi_terms(jnp.argmax(logits, axis=-1), deltas, targets, image_valid,
                              beta)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets["cls_target"])
    return {"box_cls": jnp.sum(ce * w) / n, **out}

def seesaw_ce(logits: jax.Array, labels: jax.Array, cum_samples: jax.Array, p: float = 0.8,
              q: float = 2.0, eps: float = 1e-2) -> jax.Array:
    """Per-sample Seesaw CE (mmdet seesaw_loss.seesaw_ce_loss): logits [N, K], labels [N]
    in [0, K), cum_samples [K] -> loss [N]."""
    k = logits.shape[-1]
    onehot = jax.nn.one_hot(labels, k, dtype=jnp.float32)
    w = jnp.ones_like(onehot)
    if p > 0:
        n = jnp.maximum(cum_samples.astype(jnp.float32), 1.0)
        ratio = n[None, :] / n[:, None]                    # [i, j] = N_j / N_i
        mitig = jnp.where(ratio < 1.0, ratio ** p, 1.0)
        w = w * mitig[labels]
    if q > 0:
        sc = jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)
        self_sc = jnp.take_along_axis(sc, labels[:, None], axis=-1)
        ratio = sc / jnp.maximum(self_sc, eps)
        w = w * jnp.where(ratio > 1.0, ratio ** q, 1.0)
    adj = logits + jnp.log(w) * (1.0 - onehot)
    return optax.softmax_cross_entropy_with_integer_labels(adj, labels)


def seesaw_counts(cum_samples: jax.Array, cls_target: jax.Array, valid: jax.Array
                  ) -> jax.Array:
    """cum_samples [K + 1] + this batch's sampled RoIs per class (bg = K, the last)."""
    k1 = cum_samples.shape[0]
    hist = jnp.zeros((k1,), jnp.float32).at[cls_target.reshape(-1)].add(
        valid.reshape(-1).astype(jnp.float32))
    return cum_samples + hist


def seesaw_scores(logits: jax.Array) -> jax.Array:
    """[..., K + 2] (classes, object, background) -> log-probabilities [..., K + 1]:
    log softmax(classes) + log P(object), then log P(background) (mmdet's
    SeesawLoss.get_activation, in log space)."""
    cls = jax.nn.log_softmax(logits[..., :-2], axis=-1)
    obj = jax.nn.log_softmax(logits[..., -2:], axis=-1)
    return jnp.concatenate([cls + obj[..., :1], obj[..., 1:]], axis=-1)


def seesaw_box_losses(logits: jax.Array, deltas: jax.Array, targets: dict,
                      image_valid: jax.Array, cum_samples: jax.Array, p: float = 0.8,
                      q: float = 2.0, eps: float = 1e-2, beta: float = 0.0) -> dict:
    """box_losses with Seesaw classification. logits [B, R, K + 2]; cum_samples [K + 1]
    (already including this batch, as mmdet counts before the loss)."""
    k = logits.shape[-1] - 2
    labels = targets["cls_target"]
    w, fg, n, out = _roi_terms(jnp.argmax(seesaw_scores(logits), axis=-1), deltas, targets,
                               image_valid, beta)
    cls_loss = seesaw_ce(logits[..., :k].reshape(-1, k), jnp.clip(labels.reshape(-1), 0, k - 1),
                         cum_samples[:k], p, q, eps).reshape(labels.shape)
    obj_loss = optax.softmax_cross_entropy_with_integer_labels(
        logits[..., k:], (labels == k).astype(jnp.int32))
    classes = jnp.sum(cls_loss * fg) / n
    return {"box_cls": classes + jnp.sum(obj_loss * w) / n, "box_cls_classes": classes,
            **out}
