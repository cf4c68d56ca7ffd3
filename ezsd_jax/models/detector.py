"""The two-stage detector: ResNet + FPN + RPN + RoIAlign + a pluggable RoI head.

`FasterRCNN` holds the networks; `forward_train` / `forward_infer` are the pure functions
the train and eval steps jit: targets, sampling and losses (models/losses.py), proposal
generation (models/proposal_generator.py) and post-processing (models/postprocess.py) are
ops on static shapes, so the whole step compiles to one XLA program.

With cfg.mask_on it is Mask R-CNN: RoIAlign (mask_roi_size, FPN levels as for the boxes)
-> MaskHead -> 2x mask_roi_size logits, trained on the sampled positive RoIs (a static
mask_max_positives per image, padding masked) against targets cut from the batch's box
crops (ops/masks.crop_mask_targets), and run at test time on the final detections
(detections['mask_probs']; `paste_detection_masks` pastes them into original pixels).

RoI heads share one interface, so EZSD's head plugs in where the plain one sits:
    head(roi_feats [B,R,S,S,C], reg_classes [B,R] | None, class_embeddings [K,D] | None)
      -> {'logits' [B,R,K+1] (background last), 'deltas' [B,R,4], ...}
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ezsd_jax.models import losses, postprocess, proposal_generator
from ezsd_jax.models.box_head import (BoxHead, BoxRegressor, LinearClassifier, branch_heads,
                                     flatten_rois, parse_box_head_spec)
from ezsd_jax.models.config import DetectorConfig
from ezsd_jax.models.ezsd_head import EZSDRoIHead
from ezsd_jax.models.fpn import FPN
from ezsd_jax.models.mask_head import MaskHead, mask_loss, select_channel
from ezsd_jax.models.resnet import ResNet
from ezsd_jax.models.rpn import RPNHead
from ezsd_jax.ops.masks import crop_mask_targets, paste_masks
from ezsd_jax.ops.roi_align import multilevel_roi_align

# torchvision ImageNet normalization, images in RGB 0..255.
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)


class StandardRoIHead(nn.Module):
    """Faster R-CNN box head: shared convs/FCs -> linear classifier + class-agnostic deltas."""
    cfg: DetectorConfig

    @nn.compact
    def __call__(self, roi_feats, reg_classes=None, class_embeddings=None):
        c = self.cfg
        if c.box_head_spec:   # branched (mmdet ConvFCBBoxHead)
            shared, cls_head, reg_head = branch_heads(
                parse_box_head_spec(c.box_head_spec), c.box_conv_dim, c.box_fc_dim,
                c.jnp_dtype, named=True)
            x = shared(roi_feats)
            xc, xr = flatten_rois(cls_head(x)), flatten_rois(reg_head(x))
        else:
            xc = xr = BoxHead(c.box_num_convs, c.box_conv_dim, c.box_num_fcs, c.box_fc_dim,
                              dtype=c.jnp_dtype, name="box_head")(roi_feats)
        return {"logits": LinearClassifier(c.num_classes, dtype=c.jnp_dtype,
                                           name="classifier")(xc),
                "deltas": BoxRegressor(dtype=c.jnp_dtype, name="regressor")(xr)}


def make_roi_head(cfg: DetectorConfig) -> nn.Module:
    if cfg.roi_head == "standard":
        return StandardRoIHead(cfg, name="roi_head")
    if cfg.roi_head == "ezsd":
        return EZSDRoIHead(cfg, name="roi_head")
    raise ValueError(f"model.roi_head: unknown head {cfg.roi_head!r} (standard | ezsd)")


class FasterRCNN(nn.Module):
    cfg: DetectorConfig

    def setup(self):
        c = self.cfg
        self.backbone = ResNet(c.stage_sizes, c.width, c.bottleneck, dtype=c.jnp_dtype,
                               frozen_stages=c.frozen_stages)
        self.fpn = FPN(c.fpn_channels, dtype=c.jnp_dtype)
        self.rpn = RPNHead(len(c.anchor_ratios), dtype=c.jnp_dtype)
        self.roi_head = make_roi_head(c)
        if c.mask_on:
            self.mask_head = MaskHead(c.mask_num_classes, c.mask_num_convs, c.mask_conv_dim,
                                      dtype=c.jnp_dtype)

    def features(self, images: jax.Array, image_hw: jax.Array | None = None) -> list[jax.Array]:
        """FPN levels of images [B,H,W,3] (uint8 or float pixels). With image_hw [B,2] and
        model.input_padding='mean', the padded canvas outside each image is 0 after
        normalization (mmdet normalizes, then pads with 0: the mean pixel)."""
        return self.fpn(self.backbone(normalize_images(images, image_hw,
                                                       self.cfg.input_padding)))

    def rpn_outputs(self, feats):
        return self.rpn(feats)

    def roi_features(self, feats, rois):
        return multilevel_roi_align(
            feats[:4], rois, strides=self.cfg.strides[:4],
            output_size=self.cfg.roi_output_size,
            sampling_ratio=self.cfg.roi_sampling_ratio, aligned=True)

    def head(self, roi_feats, reg_classes=None, class_embeddings=None):
        return self.roi_head(roi_feats, reg_classes, class_embeddings)

    def mask_logits(self, feats, rois):
        """rois [B,R,4] -> mask logits [B,R,2S,2S,mask_num_classes] (S = mask_roi_size)."""
        c = self.cfg
        x = multilevel_roi_align(feats[:4], rois, strides=c.strides[:4],
                                 output_size=c.mask_roi_size,
                                 sampling_ratio=c.roi_sampling_ratio, aligned=True)
        return self.mask_head(x)

    def __call__(self, images, rois, class_embeddings=None):
        """Runs every sub-network once (used by init)."""
        feats = self.features(images)
        obj, dlt = self.rpn_outputs(feats)
        out = self.head(self.roi_features(feats, rois), None, class_embeddings)
        if self.cfg.mask_on:
            out = dict(out, mask_logits=self.mask_logits(feats, rois))
        return obj, dlt, out


SEESAW_COUNTS = "seesaw_cum_samples"   # batch_stats entry: sampled RoIs per class [K+1]


def init_variables(model: FasterRCNN, key, batch_size: int = 1,
                   class_embeddings=None) -> dict:
    h, w = model.cfg.image_size
    images = jnp.zeros((batch_size, h, w, 3), jnp.float32)
    rois = jnp.tile(jnp.array([[[0.0, 0.0, 32.0, 32.0]]]), (batch_size, 4, 1))
    v = model.init(key, images, rois, class_embeddings)
    if model.cfg.box_cls_loss == "seesaw":   # the loss's running counts, checkpointed
        v = {**v, "batch_stats": {**v.get("batch_stats", {}), SEESAW_COUNTS: jnp.zeros(
            (model.cfg.num_classes + 1,), jnp.float32)}}
    return v


def _concat_levels(obj, dlt):
    return jnp.concatenate(obj, axis=1), jnp.concatenate(dlt, axis=1)


def normalize_images(images: jax.Array, image_hw: jax.Array | None = None,
                     padding: str = "mean") -> jax.Array:
    """(pixels - PIXEL_MEAN) / PIXEL_STD; with image_hw and padding='mean' the canvas
    outside each image is exactly 0 (mmdet: Normalize, then Pad with 0)."""
    x = (images.astype(jnp.float32) - PIXEL_MEAN) / PIXEL_STD
    if image_hw is not None and padding == "mean":
        x = x * padding_mask(image_hw, x.shape[1], x.shape[2])[..., None]
    return x


def padding_mask(image_hw: jax.Array, h: int, w: int) -> jax.Array:
    """[B,H,W] float32: 1 inside each image's valid (top-left) region, 0 on the padding."""
    hw = jnp.asarray(image_hw)
    rows = jnp.arange(h)[None, :, None] < hw[:, 0, None, None]
    cols = jnp.arange(w)[None, None, :] < hw[:, 1, None, None]
    return (rows & cols).astype(jnp.float32)


def valid_hw(batch: dict) -> jax.Array:
    """Valid (unpadded) region of each image in padded-input pixels (pipeline's image_hw)."""
    return batch["image_hw"].astype(jnp.float32)


def forward_train(model: FasterRCNN, variables: dict, batch: dict, key,
                  class_embeddings=None, extra_loss_fn=None) -> tuple[jax.Array, dict]:
    """Total loss and metrics for one batch (dict from the data pipeline, on device).

    extra_loss_fn(module, feats, batch, key) -> dict of named losses (added to the total)
    lets a method add terms that need the features (EZSD distillation). With the seesaw
    loss the metrics carry the updated counts under SEESAW_COUNTS (the train step stores
    them in batch_stats)."""
    c = model.cfg
    stats = dict(variables.get("batch_stats", {}))
    counts = stats.pop(SEESAW_COUNTS, None)
    if c.box_cls_loss == "seesaw" and counts is None:
        raise ValueError(f"model.box_cls_loss='seesaw': the variables lack batch_stats"
                         f"['{SEESAW_COUNTS}'] (make them with detector.init_variables)")
    variables = {**variables, "batch_stats": stats}
    anchors = jnp.asarray(np.concatenate(c.anchors(), axis=0))
    hw = valid_hw(batch)
    k_rpn, k_roi, k_extra = jax.random.split(key, 3)

    def fn(m: FasterRCNN):
        feats = m.features(batch["image"], batch["image_hw"])
        obj, dlt = m.rpn_outputs(feats)
        out = {}
        out.update(losses.rpn_losses(
            k_rpn, *_concat_levels(obj, dlt), anchors, batch["boxes"], batch["box_mask"],
            batch["valid"], batch_per_image=c.rpn_batch_per_image,
            positive_fraction=c.rpn_positive_fraction, fg_iou=c.rpn_fg_iou,
            bg_iou=c.rpn_bg_iou, low_quality_min_iou=c.rpn_low_quality_min_iou))
        props, _, pvalid = proposal_generator.rpn_proposals(
            [jax.lax.stop_gradient(o) for o in obj], [jax.lax.stop_gradient(d) for d in dlt],
            c.anchors(), hw, c.rpn_pre_nms_topk_train, c.rpn_post_nms_topk_train,
            c.rpn_nms_threshold)
        tgt = losses.sample_rois(
            k_roi, props, pvalid, batch["boxes"], batch["classes"], batch["box_mask"],
            c.num_classes, batch_per_image=c.roi_batch_per_image,
            positive_fraction=c.roi_positive_fraction, fg_iou=c.roi_fg_iou,
            bbox_reg_weights=c.bbox_reg_weights, low_quality_min_iou=c.roi_low_quality_min_iou)
        reg_classes = tgt["cls_target"]
        head_out = m.head(m.roi_features(feats, tgt["rois"]), reg_classes, class_embeddings)
        if c.box_cls_loss == "seesaw":
            cum = losses.seesaw_counts(counts, tgt["cls_target"],
                                       tgt["roi_valid"] & batch["valid"][:, None])
            out.update(losses.seesaw_box_losses(
                head_out["seesaw_logits"], head_out["deltas"], tgt, batch["valid"], cum,
                c.seesaw_p, c.seesaw_q))
            out[SEESAW_COUNTS] = jax.lax.stop_gradient(cum)
        else:
            out.update(losses.box_losses(head_out["logits"], head_out["deltas"], tgt,
                                         batch["valid"]))
        if c.mask_on:
            out.update(_mask_losses(m, feats, tgt, batch))
        if extra_loss_fn is not None:
            out.update(extra_loss_fn(m, feats, batch, k_extra))
        return out

    out = nn.apply(fn, model)(variables)
    total = (c.rpn_loss_weight * (out["rpn_cls"] + c.rpn_reg_loss_weight * out["rpn_box"])
             + c.box_loss_weight * (out["box_cls"] + c.box_reg_loss_weight * out["box_reg"]))
    if c.mask_on:
        total = total + c.mask_loss_weight * out["mask"]
    total = total + sum(v for k, v in out.items() if k.startswith("loss_"))
    out["loss"] = total
    return total, out


def _mask_losses(m: FasterRCNN, feats, tgt: dict, batch: dict) -> dict:
    """Mask loss on the first mask_max_positives positives of each image's sampled RoIs
    (the reference uses all of them: 512 x 0.25 = 128 at most, the default)."""
    c = m.cfg
    fg = tgt["fg"] & tgt["roi_valid"] & batch["valid"][:, None]
    p = min(int(c.mask_max_positives), fg.shape[1])
    order = jnp.argsort(~fg, axis=1, stable=True)[:, :p]            # positives first
    take = lambda x: jnp.take_along_axis(x, order, axis=1)
    rois = jnp.take_along_axis(tgt["rois"], order[..., None], axis=1)
    pos, gt_idx, labels = take(fg), take(tgt["matched_gt"]), take(tgt["cls_target"])
    size = 2 * c.mask_roi_size
    targets, weight = jax.vmap(
        lambda cr, bx, v, r, g, ps, hw: crop_mask_targets(
            cr, bx, v, r, g, ps, hw, size=size, sampling_ratio=c.mask_sampling_ratio))(
        batch["gt_masks"], batch["boxes"], batch["box_mask"], jax.lax.stop_gradient(rois),
        gt_idx, pos, valid_hw(batch))
    logits = m.mask_logits(feats, jax.lax.stop_gradient(rois))
    return {"mask": mask_loss(logits, targets, labels, weight),
            "mask_num_pos": weight.sum() / weight.shape[0]}


def mask_classes(logits: jax.Array, class_valid) -> jax.Array:
    """logits [..., K+1] (background last) with the classes where class_valid [K] is False
    set to -inf: after the softmax they have probability exactly 0 and never detect
    (a vocabulary padded to a bucket size, detector_api.py)."""
    keep = jnp.concatenate([jnp.asarray(class_valid, bool), jnp.ones((1,), bool)])
    return jnp.where(keep, logits, -jnp.inf)


def infer_parts(model: FasterRCNN, variables: dict, batch: dict,
                class_embeddings=None, class_valid=None) -> dict:
    """The test-time forward with its intermediates (for callers that need more than
    detections, e.g. ISAL): feats (FPN levels), rpn_objectness / rpn_deltas, proposals
    [B,P,4] + proposal_valid, head (the box head's outputs) and detections (forward_infer).

    class_valid [K] bool (optional): classes masked out of the post-processing
    (`mask_classes`; head['logits'] is returned masked)."""
    c = model.cfg
    hw = valid_hw(batch)

    def fn(m: FasterRCNN):
        feats = m.features(batch["image"], batch["image_hw"])
        obj, dlt = m.rpn_outputs(feats)
        props, _, pvalid = proposal_generator.rpn_proposals(
            obj, dlt, c.anchors(), hw, c.rpn_pre_nms_topk_test, c.rpn_post_nms_topk_test,
            c.rpn_nms_threshold)
        head_out = m.head(m.roi_features(feats, props), None, class_embeddings)
        return {"feats": feats, "rpn_objectness": obj, "rpn_deltas": dlt,
                "proposals": props, "proposal_valid": pvalid, "head": head_out}

    parts = nn.apply(fn, model)(variables)
    if class_valid is not None:
        parts["head"]["logits"] = mask_classes(parts["head"]["logits"], class_valid)
    det = postprocess.detections(
        parts["head"]["logits"], parts["head"]["deltas"], parts["proposals"],
        parts["proposal_valid"], hw, score_threshold=c.test_score_threshold,
        nms_threshold=c.test_nms_threshold, max_detections=c.test_max_detections,
        topk_candidates=c.test_topk_candidates, bbox_reg_weights=c.bbox_reg_weights)
    det["valid"] &= batch["valid"][:, None]
    if c.mask_on:
        logits = nn.apply(lambda m: m.mask_logits(parts["feats"], det["boxes"]),
                          model)(variables)
        det["mask_probs"] = jax.nn.sigmoid(select_channel(logits, det["classes"]))
    parts["detections"] = det
    return parts


def paste_detection_masks(det: dict, batch: dict, canvas_hw: tuple[int, int]) -> jax.Array:
    """detections['mask_probs'] [B,D,m,m] pasted at the boxes mapped to ORIGINAL image
    pixels (divided by batch['scale'], un-flipped) on a static canvas [Hc, Wc] (>= every
    original size; Wc a multiple of 8), thresholded at 0.5 (ops/masks.paste_masks) and
    bit-packed along the width: uint8 [B, D, Hc, Wc // 8] (np.unpackbits(axis=-1) on the
    host, then crop [:h, :w])."""
    hc, wc = (int(v) for v in canvas_hw)
    if wc % 8:
        raise ValueError(f"paste_detection_masks: canvas width {wc} is not a multiple of 8")
    scale = jnp.maximum(batch["scale"].astype(jnp.float32), 1e-6)[:, None, None]
    boxes = det["boxes"].astype(jnp.float32) / scale
    w = batch["orig_hw"][:, 1].astype(jnp.float32)[:, None]
    flipped = batch["flipped"][:, None]
    x1 = jnp.where(flipped, w - boxes[..., 2], boxes[..., 0])
    x2 = jnp.where(flipped, w - boxes[..., 0], boxes[..., 2])
    boxes = jnp.stack([x1, boxes[..., 1], x2, boxes[..., 3]], axis=-1)
    masks = jax.vmap(lambda p, b: paste_masks(p, b, hc, wc))(det["mask_probs"], boxes)
    return jnp.packbits(masks, axis=-1)


def forward_infer(model: FasterRCNN, variables: dict, batch: dict,
                  class_embeddings=None, class_valid=None) -> dict:
    """Detections in padded-input pixels: boxes [B,D,4], scores, classes, valid."""
    return infer_parts(model, variables, batch, class_embeddings, class_valid)["detections"]
