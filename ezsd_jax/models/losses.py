"""Training targets and losses of the two-stage detector (static shapes, masks for padding).

- rpn_losses: anchors matched to GT (IoU 0.7/0.3 + low-quality matches), 256 sampled per
  image at 50% positives, BCE objectness + L1 box deltas, normalized by the sampled count
  (detectron2's convention).
- sample_rois: proposals + GT boxes, matched at IoU 0.5, 512 sampled per image at 25%
  positives; class targets (background = num_classes, the last index) and box targets.
- box_losses: softmax CE over the sampled RoIs + class-agnostic L1 on foreground deltas.
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
               fg_iou: float = 0.7, bg_iou: float = 0.3, beta: float = 0.0) -> dict:
    """objectness [B,A], deltas [B,A,4] (all levels concatenated, anchors [A,4])."""
    bsz = objectness.shape[0]
    keys = jax.random.split(key, bsz)

    def one(k, obj, dlt, gt, gm):
        iou = box_ops.iou_matrix(anchors, gt)                                 # [A,M]
        matched, labels = match_boxes(iou, gm, fg_iou, bg_iou, allow_low_quality=True)
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
                fg_iou: float = 0.5, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0)) -> dict:
    """Returns rois [B,R,4], roi_valid [B,R], cls_target [B,R] (bg = num_classes),
    box_target [B,R,4], fg [B,R], matched_gt [B,R] (index into the image's GT list)."""
    bsz = proposals.shape[0]
    keys = jax.random.split(key, bsz)
    proposals = jax.lax.stop_gradient(proposals)

    def one(k, prop, pv, gt, gc, gm):
        cand = jnp.concatenate([prop, gt], axis=0)
        cv = jnp.concatenate([pv, gm], axis=0)
        iou = box_ops.iou_matrix(cand, gt)
        matched, labels = match_boxes(iou, gm, fg_iou, fg_iou, allow_low_quality=False)
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


def box_losses(logits: jax.Array, deltas: jax.Array, targets: dict, image_valid: jax.Array,
               beta: float = 0.0) -> dict:
    """Softmax CE over all sampled RoIs, L1 on foreground deltas; both divided by the
    number of sampled RoIs (detectron2)."""
    valid = targets["roi_valid"] & image_valid[:, None]
    w = valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets["cls_target"])
    fg = (targets["fg"] & valid).astype(jnp.float32)
    reg = smooth_l1(deltas - targets["box_target"], beta).sum(-1)
    pred = jnp.argmax(logits, axis=-1)
    acc = jnp.sum((pred == targets["cls_target"]) * w) / n
    fg_acc = jnp.sum((pred == targets["cls_target"]) * fg) / jnp.maximum(jnp.sum(fg), 1.0)
    return {"box_cls": jnp.sum(ce * w) / n, "box_reg": jnp.sum(reg * fg) / n,
            "roi_acc": acc, "roi_fg_acc": fg_acc, "roi_num_fg": jnp.sum(fg) / logits.shape[0]}
