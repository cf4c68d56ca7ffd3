"""MaskHead vs a numpy forward (3x3 convs, torch-style 2x2 stride-2 deconv, 1x1 logits),
its reference shapes/parameter count, and mask_loss vs a numpy binary cross-entropy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ezsd_jax.models.mask_head import MaskHead, mask_loss


def np_conv3x3(x, k, b):
    n, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, k.shape[-1])) + b
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("nhwc,co->nhwo", xp[:, dy:dy + h, dx:dx + w], k[dy, dx])
    return out


def np_deconv2x2(x, k, b):
    """ConvTranspose(kernel 2, stride 2) as flax stores it: out[2i+a, 2j+b] = x[i, j] @
    k[1-a, 1-b] (torch's ConvTranspose2d uses w[:, :, a, b]: spatially flipped)."""
    n, h, w, _ = x.shape
    out = np.zeros((n, 2 * h, 2 * w, k.shape[-1])) + b
    for a in range(2):
        for c in range(2):
            out[:, a::2, c::2] += np.einsum("nhwc,co->nhwo", x, k[1 - a, 1 - c])
    return out


def test_mask_head_matches_numpy_forward(rng):
    k = 3
    head = MaskHead(num_classes=k, conv_dim=4)
    x = rng.standard_normal((1, 2, 4, 4, 3)).astype(np.float32)
    # random parameters of the init's shapes (eval_shape: no init compile), biases non-zero
    shapes = jax.eval_shape(head.init, jax.random.PRNGKey(0), x)["params"]
    params = jax.tree_util.tree_map(
        lambda a: (rng.standard_normal(a.shape) * 0.5).astype(np.float32), shapes)
    out = np.asarray(jax.jit(head.apply)({"params": params}, x))
    assert out.shape == (1, 2, 8, 8, k) and out.dtype == np.float32
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    y = x.reshape(-1, 4, 4, 3).astype(np.float64)
    for i in range(4):
        y = np.maximum(np_conv3x3(y, p[f"conv_{i}"]["kernel"], p[f"conv_{i}"]["bias"]), 0)
    y = np.maximum(np_deconv2x2(y, p["deconv"]["kernel"], p["deconv"]["bias"]), 0)
    y = np.einsum("nhwc,co->nhwo", y, p["logits"]["kernel"][0, 0]) + p["logits"]["bias"]
    np.testing.assert_allclose(out.reshape(y.shape), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1, 48])
def test_mask_head_reference_size(k):
    """14x14x256 RoI features -> 28x28xK; parameters of mmdetection's FCNMaskHead."""
    head = MaskHead(num_classes=k)
    x = jax.ShapeDtypeStruct((2, 14, 14, 256), jnp.bfloat16)
    shapes = jax.eval_shape(head.init, jax.random.PRNGKey(0), x)
    n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes))
    assert n == 4 * (9 * 256 * 256 + 256) + (4 * 256 * 256 + 256) + (256 * k + k)
    out = jax.eval_shape(MaskHead(num_classes=k, dtype=jnp.bfloat16).apply, shapes, x)
    assert out.shape == (2, 28, 28, k) and out.dtype == jnp.float32


def np_bce(x, t):
    return -(t * np.log(1 / (1 + np.exp(-x))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-x))))


def test_mask_loss_matches_numpy(rng):
    b, r, m, k = 2, 5, 6, 3
    logits = (rng.standard_normal((b, r, m, m, k)) * 3).astype(np.float32)
    targets = (rng.random((b, r, m, m)) < 0.4).astype(np.float32)
    labels = rng.integers(0, k, (b, r))
    weight = np.zeros((b, r), np.float32)
    weight[0, :3] = 1
    weight[1, 1] = 1
    loss_grad = jax.jit(jax.value_and_grad(mask_loss))     # one compile per K
    got, g = loss_grad(logits, targets, labels, weight)
    sel = np.take_along_axis(logits, labels[..., None, None, None], -1)[..., 0]
    per = np_bce(sel, targets).mean(axis=(-2, -1))
    want = (per * weight).sum() / weight.sum()
    assert float(got) == pytest.approx(want, rel=1e-5)
    # class-agnostic: channel 0 whatever the label (novel ones too)
    agn, _ = loss_grad(logits[..., :1], targets, labels + 100, weight)
    want0 = (np_bce(logits[..., 0], targets).mean(axis=(-2, -1)) * weight).sum() / weight.sum()
    assert float(agn) == pytest.approx(want0, rel=1e-5)
    assert float(loss_grad(logits, targets, labels, np.zeros_like(weight))[0]) == 0.0
    assert np.all(np.asarray(g)[weight == 0] == 0) and np.abs(np.asarray(g)).sum() > 0


def test_toy_mask_branch_learns_and_scores_with_cocoeval(rng):
    """targets -> MaskHead -> mask_loss -> paste -> RLE -> COCOeval segm, end to end: the
    RoI 'features' are the GT masks resampled to 14x14 (an ideal backbone), so a few Adam
    steps must lift mask AP well above the untrained head's."""
    import optax
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    from ezsd_jax.data.segmentation import annotation_mask
    from ezsd_jax.ops.masks import mask_targets, paste_masks
    from ezsd_jax.evaluate import coco_eval
    from ezsd_jax.segm_eval import segm_results
    from test_ops_masks import rand_polygon

    h, w, n_img = 40, 48, 6
    images, anns, masks, boxes = [], [], [], []
    for i in range(1, n_img + 1):
        images.append({"id": i, "height": h, "width": w})
        poly = rand_polygon(rng, h, w)
        m = annotation_mask({"segmentation": [poly]}, h, w, "toy")
        rle = mask_utils.encode(np.asfortranarray(m))
        x, y, bw, bh = mask_utils.toBbox(rle)
        anns.append({"id": i, "image_id": i, "category_id": 1, "segmentation": [poly],
                     "area": float(mask_utils.area(rle)), "bbox": [x, y, bw, bh],
                     "iscrowd": 0})
        masks.append(m)
        boxes.append([x, y, x + bw, y + bh])
    masks, boxes = np.stack(masks), np.asarray(boxes, np.float32)
    idx, ones = np.arange(n_img), np.ones(n_img, bool)
    head = MaskHead(num_classes=1, num_convs=1, conv_dim=8)   # the 4-conv head: above
    shapes = jax.eval_shape(head.init, jax.random.PRNGKey(0), jnp.zeros((n_img, 14, 14, 1)))
    params = jax.tree_util.tree_map(
        lambda a: (rng.standard_normal(a.shape) * np.sqrt(2.0 / max(a.shape[-1] * 9, 1))
                   * (a.ndim > 1)).astype(np.float32), shapes)
    tx = optax.adam(1e-2)

    @jax.jit   # one program: targets, 150 Adam steps, pasting before and after
    def run(p):
        feats = mask_targets(masks, ones, boxes, idx, ones, size=14, binarize=False)[0]
        targets, weight = mask_targets(masks, ones, boxes, idx, ones)

        def step(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(lambda q: mask_loss(
                head.apply(q, feats[..., None]), targets, idx * 0, weight))(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss
        (q, _), losses = jax.lax.scan(step, (p, tx.init(p)), None, length=150)
        pasted = [paste_masks(jax.nn.sigmoid(head.apply(v, feats[..., None])[..., 0]), boxes,
                              h, w) for v in (p, q)]
        return losses, pasted

    def mask_ap(pasted):
        pasted = np.asarray(pasted)
        res = [r for i in range(n_img)
               for r in segm_results(i + 1, pasted[i:i + 1], (h, w), [1], [1.0])]
        coco = COCO()
        coco.dataset = {"images": images, "annotations": [dict(a) for a in anns],
                        "categories": [{"id": 1, "name": "shape"}]}
        coco.createIndex()
        return coco_eval(coco, res, list(range(1, n_img + 1)), iou_type="segm")["AP"]

    losses, (untrained, trained) = run(params)
    assert float(losses[-1]) < 0.5 * float(losses[0])
    ap_untrained, ap_trained = mask_ap(untrained), mask_ap(trained)
    assert ap_trained > 0.6 and ap_trained > ap_untrained + 0.3, (ap_untrained, ap_trained)
