"""Anchor/proposal-to-GT matching and fixed-size balanced sampling (RPN and RoI head).

``match_boxes`` is detectron2's ``Matcher`` on an [N anchors, M gt] IoU matrix with
padded GT columns; ``sample_balanced`` is detectron2's ``subsample_labels`` with a static
output size (random priorities + ``lax.top_k``). RPN: (256, 0.5) with IoU 0.7 / 0.3 and
low-quality matches from IoU 0.3; RoI head: (512, 0.25) with IoU 0.5 / 0.5, low-quality
matches from IoU 0.5 (mmdet's MaxIoUAssigner ``min_pos_iou``; docs/protocol.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def match_boxes(iou: jnp.ndarray, gt_valid: jnp.ndarray, fg_threshold: float,
                bg_threshold: float, allow_low_quality: bool = True,
                low_quality_min_iou: float = 0.0, reassign_low_quality: bool = False,
                pred_valid: jnp.ndarray | None = None):
    """Match each of N predictions to its best GT.

    Args:
      iou: [N, M] IoU between predictions (rows) and GT (columns).
      gt_valid: [M] bool; invalid (padded) columns never match.
      fg_threshold / bg_threshold: IoU >= fg -> 1, IoU < bg -> 0, in between -> -1.
      allow_low_quality: each valid GT's highest-IoU predictions (all ties) become
        foreground when that IoU is >= low_quality_min_iou (mmdet's MaxIoUAssigner
        ``match_low_quality`` / ``min_pos_iou`` / ``gt_max_assign_all``). A GT whose best
        IoU is 0 never promotes anything (detectron2 would mark every zero-IoU prediction
        foreground).
      reassign_low_quality: a promoted prediction is matched to the promoting GT (the
        highest-index one when several promote it: mmdet overwrites in GT order); False
        keeps ``matched_gt`` at the row argmax (detectron2).
      pred_valid: optional [N] bool; invalid (padded) rows take no part in a GT's best IoU
        and are never promoted.
    Returns:
      matched_gt [N] int32 (argmax over valid GT, lowest index on ties; 0 when no valid
      GT) and labels [N] int32 in {1, 0, -1}. With no valid GT everything is 0.
    """
    iou = jnp.asarray(iou, jnp.float32)
    if iou.ndim != 2:
        raise ValueError(f"match_boxes: iou must be [N, M], got {iou.shape}")
    n, m = iou.shape
    if m == 0:
        return jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32)
    gt_valid = jnp.asarray(gt_valid, bool)
    q = jnp.where(gt_valid[None, :], iou, -1.0)
    matched_gt = jnp.argmax(q, axis=1).astype(jnp.int32)
    best = jnp.max(q, axis=1)
    labels = jnp.where(best >= fg_threshold, 1, jnp.where(best < bg_threshold, 0, -1))
    if allow_low_quality:
        rows = (jnp.ones((n,), bool) if pred_valid is None
                else jnp.asarray(pred_valid, bool))
        qv = jnp.where(rows[:, None], q, -1.0)
        per_gt = jnp.max(qv, axis=0)                                    # [M]
        promotes = gt_valid & (per_gt > 0) & (per_gt >= low_quality_min_iou)
        hit = (qv == per_gt[None, :]) & promotes[None, :] & rows[:, None]
        promoted = jnp.any(hit, axis=1)
        labels = jnp.where(promoted, 1, labels)
        if reassign_low_quality:
            last = jnp.max(jnp.where(hit, jnp.arange(m, dtype=jnp.int32)[None, :], -1), axis=1)
            matched_gt = jnp.where(promoted, last, matched_gt).astype(jnp.int32)
    labels = jnp.where(jnp.any(gt_valid), labels, 0)
    matched_gt = jnp.where(jnp.any(gt_valid), matched_gt, 0)
    return matched_gt, labels.astype(jnp.int32)


def sample_balanced(key: jax.Array, labels: jnp.ndarray, num_samples: int,
                    positive_fraction: float, valid: jnp.ndarray | None = None):
    """Fixed-size random balanced sampling of labelled predictions.

    Takes min(#fg, int(num_samples * positive_fraction)) foreground (label 1) and fills up
    to ``num_samples`` with background (label 0); label -1 and ``valid == False`` entries
    are never taken. Uniform without replacement, deterministic given ``key``.

    Returns:
      indices [num_samples] int32 (positives first, then negatives, then padding with
      index 0), sampled_labels [num_samples] int32 (1 / 0, padding -1), sampled_valid
      [num_samples] bool.
    """
    labels = jnp.asarray(labels, jnp.int32)
    if labels.ndim != 1:
        raise ValueError(f"sample_balanced: labels must be [N], got {labels.shape}")
    n = labels.shape[0]
    num_samples = int(num_samples)
    max_pos = int(num_samples * positive_fraction)
    if n == 0 or num_samples == 0:
        return (jnp.zeros((num_samples,), jnp.int32), jnp.full((num_samples,), -1, jnp.int32),
                jnp.zeros((num_samples,), bool))
    if valid is None:
        valid = jnp.ones((n,), bool)
    valid = jnp.asarray(valid, bool)
    pos = (labels == 1) & valid
    neg = (labels == 0) & valid
    # 31-bit random priorities; candidates >= 0, others -1 (ties are negligibly rare).
    prio = (jax.random.bits(key, (n,), jnp.uint32) >> 1).astype(jnp.int32)

    def pick(mask, k):
        k = min(k, n)
        if k == 0:
            return jnp.zeros((0,), jnp.int32)
        _, idx = lax.top_k(jnp.where(mask, prio, -1), k)
        return idx.astype(jnp.int32)

    pos_idx = pick(pos, max_pos)
    neg_idx = pick(neg, num_samples)
    num_pos = jnp.minimum(jnp.sum(pos, dtype=jnp.int32), max_pos)
    num_neg = jnp.minimum(jnp.sum(neg, dtype=jnp.int32), num_samples - num_pos)

    slot = jnp.arange(num_samples, dtype=jnp.int32)
    is_pos = slot < num_pos
    is_neg = (~is_pos) & (slot < num_pos + num_neg)
    pos_src = (jnp.take(pos_idx, jnp.clip(slot, 0, pos_idx.shape[0] - 1), mode="clip")
               if pos_idx.shape[0] else jnp.zeros_like(slot))
    neg_src = (jnp.take(neg_idx, jnp.clip(slot - num_pos, 0, neg_idx.shape[0] - 1),
                        mode="clip") if neg_idx.shape[0] else jnp.zeros_like(slot))
    indices = jnp.where(is_pos, pos_src, jnp.where(is_neg, neg_src, 0)).astype(jnp.int32)
    sampled_labels = jnp.where(is_pos, 1, jnp.where(is_neg, 0, -1)).astype(jnp.int32)
    return indices, sampled_labels, is_pos | is_neg
