"""Tests for ezsd_jax.models: ResNet / FrozenBatchNorm / trainable_mask, FPN, RPN, box head.

Tiny variants on small random inputs, compared with plain numpy references.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ezsd_jax.models.box_head import BoxHead, BoxRegressor, LinearClassifier
from ezsd_jax.models.fpn import FPN, upsample_nearest
from ezsd_jax.models.resnet import FrozenBatchNorm, ResNet, trainable_mask
from ezsd_jax.models.rpn import RPNHead
from ezsd_jax.core.tree_paths import path_names as _path_names

TINY = dict(stage_sizes=(1, 1, 1, 1), width=8, bottleneck=False)


def np_conv(x, w_hwio, b=None, stride=1, pad=0):
    """Plain numpy NHWC conv with an HWIO kernel (float64)."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w_hwio, np.float64)
    kh, kw = w.shape[:2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
            out += patch @ w[i, j]
    return out if b is None else out + np.asarray(b, np.float64)


def np_nearest(x, h, w):
    iy = np.floor(np.arange(h) * x.shape[1] / h).astype(int)
    ix = np.floor(np.arange(w) * x.shape[2] / w).astype(int)
    return x[:, iy][:, :, ix]


def rand_vars(module, *args, seed=0):
    """Variables with the module's tree and shapes, filled from numpy (no jax init cost)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)

    def fill(path, leaf):
        name = _path_names(path)[-1]
        if name == "kernel":
            std = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
            v = rng.standard_normal(leaf.shape) * std
        elif name in ("var", "scale"):
            v = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            v = rng.standard_normal(leaf.shape) * 0.1
        return jnp.asarray(v, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _out(n, k=3, s=2, p=1):
    return (n + 2 * p - k) // s + 1


# ---------------------------------------------------------------- ResNet

@pytest.mark.parametrize("bottleneck", [False, True])
@pytest.mark.parametrize("hw", [(64, 96), (50, 71)])
def test_resnet_shapes_and_strides(bottleneck, hw):
    model = ResNet(stage_sizes=(1, 1, 1, 1), width=8, bottleneck=bottleneck)
    x = jax.ShapeDtypeStruct((2, *hw, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    feats = jax.eval_shape(model.apply, variables, x)
    assert sorted(feats) == ["C2", "C3", "C4", "C5"]
    h, w = _out(_out(hw[0], 7, 2, 3)), _out(_out(hw[1], 7, 2, 3))  # stem conv + maxpool
    exp = 4 if bottleneck else 1
    for i, name in enumerate(["C2", "C3", "C4", "C5"]):
        if i > 0:
            h, w = _out(h), _out(w)
        assert feats[name].shape == (2, h, w, 8 * 2 ** i * exp), name
    if hw == (64, 96):  # exact strides 4..32
        assert [feats[k].shape[1:3] for k in sorted(feats)] == [
            (64 // s, 96 // s) for s in (4, 8, 16, 32)]


def test_resnet_forward_runs_and_bf16_dtypes(rng):
    x = jnp.asarray(rng.standard_normal((1, 64, 64, 3)), jnp.float32)
    model = ResNet(**TINY)
    variables = rand_vars(model, x)
    feats = model.apply(variables, x)
    assert all(np.isfinite(np.asarray(v)).all() for v in feats.values())
    assert set(variables) == {"params", "batch_stats"}
    bf = ResNet(**TINY, dtype=jnp.bfloat16)
    vb = jax.eval_shape(bf.init, jax.random.PRNGKey(0), x)
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(vb))
    out = jax.eval_shape(bf.apply, vb, x)
    assert all(v.dtype == jnp.bfloat16 for v in out.values())


def test_resnet_rejects_bad_input():
    with pytest.raises(ValueError, match="B,H,W,3"):
        ResNet(**TINY).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 4)))


def test_frozen_bn_uses_stored_statistics(rng):
    c = 6
    x = rng.standard_normal((2, 5, 7, c)).astype(np.float32)
    stats = dict(scale=rng.standard_normal(c), bias=rng.standard_normal(c),
                 mean=rng.standard_normal(c), var=rng.uniform(0.1, 3.0, c))
    stats = {k: v.astype(np.float32) for k, v in stats.items()}
    variables = {"params": {"scale": stats["scale"], "bias": stats["bias"]},
                 "batch_stats": {"mean": stats["mean"], "var": stats["var"]}}
    bn = FrozenBatchNorm()
    init = bn.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(variables)
    y = np.asarray(bn.apply(variables, x))
    ref = (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * stats["scale"] + stats["bias"]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # affine params never train: exactly zero gradient
    g = jax.grad(lambda p: jnp.sum(bn.apply({"params": p, "batch_stats":
                                             variables["batch_stats"]}, x) ** 2))(
        variables["params"])
    assert all(np.all(np.asarray(v) == 0) for v in jax.tree_util.tree_leaves(g))


def _mask_by_path(mask):
    return {"/".join(_path_names(p)): v
            for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}


@pytest.mark.parametrize("bottleneck", [False, True])
def test_trainable_mask(bottleneck):
    model = ResNet(stage_sizes=(2, 1, 1, 1), width=8, bottleneck=bottleneck)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
    for frozen_stages in (-1, 0, 1, 2):
        flat = _mask_by_path(trainable_mask(params, frozen_stages))
        assert len(flat) == len(jax.tree_util.tree_leaves(params))
        for path, trainable in flat.items():
            parts = path.split("/")
            is_norm = parts[-2] in ("stem_bn", "downsample_bn") or parts[-2].startswith("bn")
            stage = 0 if parts[0].startswith("stem") else int(parts[0][5])
            frozen = is_norm or stage <= frozen_stages
            assert trainable is (not frozen), (frozen_stages, path)
    flat = _mask_by_path(trainable_mask(params))  # default: stem + stage 1 frozen
    assert not flat["stem_conv/kernel"] and not flat["layer1_1/conv1/kernel"]
    assert flat["layer2_0/conv1/kernel"] and not flat["layer2_0/bn1/scale"]
    # nested inside a detector tree, other modules stay trainable
    tree = {"backbone": params, "fpn": {"lateral_2": {"kernel": 0, "bias": 0}},
            "rpn": {"conv": {"kernel": 0}}, "box_head": {"fc_0": {"kernel": 0}}}
    flat = _mask_by_path(trainable_mask(tree, 1))
    assert flat["fpn/lateral_2/kernel"] and flat["rpn/conv/kernel"]
    assert flat["box_head/fc_0/kernel"]
    assert not flat["backbone/stem_conv/kernel"] and flat["backbone/layer3_0/conv2/kernel"]


def test_frozen_stages_cuts_backward(rng):
    x = jnp.asarray(rng.standard_normal((1, 32, 32, 3)), jnp.float32)
    model = ResNet(**TINY, frozen_stages=1)
    variables = rand_vars(model, x)

    def loss(p):
        f = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x)
        return sum(jnp.sum(v ** 2) for v in f.values())

    g = jax.jit(jax.grad(loss))(variables["params"])
    assert np.all(np.asarray(g["stem_conv"]["kernel"]) == 0)
    assert np.all(np.asarray(g["layer1_0"]["conv1"]["kernel"]) == 0)
    assert np.any(np.asarray(g["layer2_0"]["conv1"]["kernel"]) != 0)


# ---------------------------------------------------------------- FPN

@pytest.mark.parametrize("n_in,n_out", [(3, 6), (4, 7), (1, 1), (5, 5), (3, 7), (2, 5)])
def test_upsample_nearest_matches_torch_rule(rng, n_in, n_out):
    x = rng.standard_normal((2, n_in, n_in + 1, 3)).astype(np.float32)
    w_out = 2 * (n_in + 1) - 1
    y = np.asarray(upsample_nearest(jnp.asarray(x), n_out, w_out))
    np.testing.assert_array_equal(y, np_nearest(x, n_out, w_out))


def test_fpn_matches_numpy_on_odd_sizes(rng):
    sizes = {"C2": (13, 25, 8), "C3": (7, 13, 16), "C4": (4, 7, 32), "C5": (2, 4, 64)}
    feats = {k: jnp.asarray(rng.standard_normal((2, *s)), jnp.float32)
             for k, s in sizes.items()}
    fpn = FPN(out_channels=16)
    p = rand_vars(fpn, feats)["params"]
    outs = fpn.apply({"params": p}, feats)
    assert len(outs) == 5
    prev, ref = None, {}
    for lvl in (5, 4, 3, 2):
        lat = np_conv(feats[f"C{lvl}"], p[f"lateral_{lvl}"]["kernel"],
                      p[f"lateral_{lvl}"]["bias"])
        if prev is not None:
            lat = lat + np_nearest(prev, lat.shape[1], lat.shape[2])
        prev = lat
        ref[lvl] = np_conv(lat, p[f"output_{lvl}"]["kernel"], p[f"output_{lvl}"]["bias"],
                           pad=1)
    ref[6] = ref[5][:, ::2, ::2]
    for lvl, out in zip((2, 3, 4, 5, 6), outs):
        np.testing.assert_allclose(np.asarray(out), ref[lvl], rtol=1e-4, atol=1e-4)
    assert outs[4].shape == (2, 1, 2, 16)  # P6 = ceil(P5 / 2)


def test_fpn_on_resnet_strides(rng):
    x = jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32)
    backbone, fpn = ResNet(**TINY), FPN(out_channels=32, dtype=jnp.bfloat16)
    vb = jax.eval_shape(backbone.init, jax.random.PRNGKey(0), x)
    feats = jax.eval_shape(backbone.apply, vb, x)
    vf = jax.eval_shape(fpn.init, jax.random.PRNGKey(0), feats)
    outs = jax.eval_shape(fpn.apply, vf, feats)
    assert [o.shape for o in outs] == [(1, -(-64 // s), -(-96 // s), 32)
                                      for s in (4, 8, 16, 32, 64)]  # P6 = ceil(P5 / 2)
    assert all(o.dtype == jnp.bfloat16 for o in outs)


def test_fpn_init_scale():
    feats = {f"C{l}": jax.ShapeDtypeStruct((1, 4, 4, 256), jnp.float32) for l in (2, 3, 4, 5)}
    p = FPN().init(jax.random.PRNGKey(0), jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape), feats))["params"]
    k = np.asarray(p["output_3"]["kernel"])  # U(+-sqrt(3 / fan_in)), fan_in = 9 * 256
    bound = np.sqrt(3.0 / (9 * 256))
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
    assert np.all(np.asarray(p["output_3"]["bias"]) == 0)


# ---------------------------------------------------------------- RPN

def test_rpn_head_shapes_and_flatten_order(rng):
    shapes = [(8, 12), (4, 6), (3, 3), (1, 2)]
    feats = [jnp.asarray(rng.standard_normal((2, h, w, 16)), jnp.float32) for h, w in shapes]
    head = RPNHead(num_anchors=3)
    variables = head.init(jax.random.PRNGKey(0), feats)
    p = variables["params"]
    assert p["conv"]["kernel"].shape == (3, 3, 16, 16)
    assert p["objectness"]["kernel"].shape == (1, 1, 16, 3)
    assert p["deltas"]["kernel"].shape == (1, 1, 16, 12)
    assert abs(float(np.std(p["conv"]["kernel"])) - 0.01) < 0.002
    assert all(np.all(np.asarray(v["bias"]) == 0) for v in p.values())
    p = jax.tree_util.tree_map(lambda v: v * 10 + 0.05, p)
    obj, deltas = head.apply({"params": p}, feats)
    for f, (h, w), o, d in zip(feats, shapes, obj, deltas):
        assert o.shape == (2, h * w * 3) and d.shape == (2, h * w * 3, 4)
        assert o.dtype == jnp.float32 and d.dtype == jnp.float32
        t = np.maximum(np_conv(f, p["conv"]["kernel"], p["conv"]["bias"], pad=1), 0)
        ro = np_conv(t, p["objectness"]["kernel"], p["objectness"]["bias"])  # [B,h,w,A]
        rd = np_conv(t, p["deltas"]["kernel"], p["deltas"]["bias"])  # [B,h,w,4A]
        y, x, a = h - 1, w // 2, 2  # index (y * W + x) * A + a
        i = (y * w + x) * 3 + a
        np.testing.assert_allclose(np.asarray(o)[:, i], ro[:, y, x, a], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(d)[:, i], rd[:, y, x, 4 * a:4 * a + 4],
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(o), ro.reshape(2, -1), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(d), rd.reshape(2, -1, 4), rtol=1e-4, atol=1e-4)


def test_rpn_head_channels_field():
    feats = [jnp.zeros((1, 4, 4, 8)), jnp.zeros((1, 2, 2, 8))]
    p = jax.eval_shape(RPNHead(num_anchors=1, channels=5).init, jax.random.PRNGKey(0),
                       feats)["params"]
    assert p["conv"]["kernel"].shape == (3, 3, 8, 5)
    assert p["deltas"]["kernel"].shape == (1, 1, 5, 4)


# ---------------------------------------------------------------- box head

def test_box_head_fc_matches_numpy(rng):
    x = jnp.asarray(rng.standard_normal((2, 5, 7, 7, 8)), jnp.float32)
    head = BoxHead(num_convs=0, num_fcs=2, fc_dim=32)
    p = head.init(jax.random.PRNGKey(0), x)["params"]
    assert p["fc_0"]["kernel"].shape == (7 * 7 * 8, 32)
    p = jax.tree_util.tree_map(lambda v: v + 0.01, p)
    y = np.asarray(head.apply({"params": p}, x))
    h = np.asarray(x, np.float64).reshape(2, 5, -1)
    for i in range(2):
        h = np.maximum(h @ np.asarray(p[f"fc_{i}"]["kernel"]) + np.asarray(p[f"fc_{i}"]["bias"]), 0)
    assert y.shape == (2, 5, 32)
    np.testing.assert_allclose(y, h, rtol=1e-4, atol=1e-4)


def test_box_head_convs_and_branches(rng):
    x = jnp.asarray(rng.standard_normal((2, 3, 7, 7, 16)), jnp.float32)
    shared = BoxHead(num_convs=4, conv_dim=16, num_fcs=0)
    vs = shared.init(jax.random.PRNGKey(0), x)
    assert sorted(vs["params"]) == ["conv_0", "conv_1", "conv_2", "conv_3"]
    s = shared.apply(vs, x)
    assert s.shape == (2, 3, 7, 7, 16)
    # conv_0 against numpy
    p0 = vs["params"]["conv_0"]
    ref0 = np.maximum(np_conv(np.asarray(x).reshape(6, 7, 7, 16), p0["kernel"], p0["bias"],
                              pad=1), 0)
    one = BoxHead(num_convs=1, conv_dim=16, num_fcs=0)
    y0 = one.apply({"params": {"conv_0": p0}}, x)
    np.testing.assert_allclose(np.asarray(y0).reshape(6, 7, 7, 16), ref0, rtol=1e-4, atol=1e-4)
    branch = BoxHead(num_convs=0, num_fcs=2, fc_dim=24)
    vb = branch.init(jax.random.PRNGKey(1), s)
    assert branch.apply(vb, s).shape == (2, 3, 24)
    flat = s.reshape(2, 3, -1)  # already flattened input also accepted
    np.testing.assert_allclose(np.asarray(branch.apply(vb, flat)),
                               np.asarray(branch.apply(vb, s)), rtol=1e-6)
    full = BoxHead(num_convs=4, conv_dim=16, num_fcs=2, fc_dim=24, dtype=jnp.bfloat16)
    out = jax.eval_shape(full.apply, jax.eval_shape(full.init, jax.random.PRNGKey(0), x), x)
    assert out.shape == (2, 3, 24) and out.dtype == jnp.bfloat16
    gn = BoxHead(num_convs=2, conv_dim=32, num_fcs=1, fc_dim=8, norm="gn")
    vg = gn.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 7, 7, 16)))
    assert "conv_0_gn" in vg["params"] and "bias" not in vg["params"]["conv_0"]
    with pytest.raises(ValueError, match="num_convs"):
        BoxHead(num_convs=1).init(jax.random.PRNGKey(0), flat)


def test_linear_classifier(rng):
    x = jnp.asarray(rng.standard_normal((2, 6, 1024)), jnp.float32)
    clf = LinearClassifier(num_classes=80)
    p = clf.init(jax.random.PRNGKey(0), x)["params"]
    k = np.asarray(p["cls_score"]["kernel"])
    assert k.shape == (1024, 81) and abs(k.std() - 0.01) < 0.001
    assert np.all(np.asarray(p["cls_score"]["bias"]) == 0)
    logits = clf.apply({"params": p}, x)
    assert logits.shape == (2, 6, 81) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np.asarray(x) @ k, rtol=1e-4, atol=1e-5)
    out = jax.eval_shape(LinearClassifier(3, dtype=jnp.bfloat16).init_with_output,
                         jax.random.PRNGKey(0), x.astype(jnp.bfloat16))[0]
    assert out.shape == (2, 6, 4) and out.dtype == jnp.float32


def test_box_regressor_with_and_without_extra(rng):
    x = jnp.asarray(rng.standard_normal((2, 6, 64)), jnp.float32)
    extra = jnp.asarray(rng.standard_normal((2, 6, 32)), jnp.float32)
    reg = BoxRegressor()
    p = reg.init(jax.random.PRNGKey(0), x)["params"]
    assert p["bbox_pred"]["kernel"].shape == (64, 4)
    assert reg.apply({"params": p}, x).shape == (2, 6, 4)
    pe = reg.init(jax.random.PRNGKey(0), x, extra)["params"]
    k = np.asarray(pe["bbox_pred"]["kernel"])
    assert k.shape == (96, 4)
    big = jnp.zeros((1, 1, 4096), jnp.float32)
    kb = np.asarray(reg.init(jax.random.PRNGKey(1), big)["params"]["bbox_pred"]["kernel"])
    assert abs(kb.std() - 0.001) < 0.0002
    pe = jax.tree_util.tree_map(lambda v: v + 0.5, pe)
    y = reg.apply({"params": pe}, x, extra)
    ref = np.concatenate([np.asarray(x), np.asarray(extra)], -1) @ np.asarray(
        pe["bbox_pred"]["kernel"]) + np.asarray(pe["bbox_pred"]["bias"])
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="extra"):
        reg.apply({"params": pe}, x, extra[:, :3])
