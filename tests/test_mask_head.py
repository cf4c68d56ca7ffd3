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
