"""Tests for ezsd_jax.models.pretrained: torchvision ResNet state dict <-> flax variables.

The torchvision-format state dicts are built here in numpy, independently of the module's
own key table, following torchvision's ResNet structure (no torch needed).
"""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ezsd_jax.models.resnet import ResNet
from ezsd_jax.models.pretrained import (flax_to_torchvision, load_state_dict,
                                        load_torchvision_resnet, save_state_dict,
                                        torchvision_to_flax)

R50 = dict(stage_sizes=(3, 4, 6, 3), bottleneck=True)
TINY_BASIC = dict(stage_sizes=(1, 1, 1, 1), bottleneck=False)
TINY_BOTTLE = dict(stage_sizes=(2, 1, 1, 1), bottleneck=True)


def torchvision_state_dict(rng, stage_sizes, bottleneck, width=64, extras=True):
    """Random state dict shaped like torchvision.models.resnet.ResNet(...).state_dict()."""
    sd = {}

    def conv(name, o, i, k):
        sd[f"{name}.weight"] = (rng.standard_normal((o, i, k, k), dtype=np.float32)
                                / np.float32(np.sqrt(i * k * k)))

    def bn(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.bias"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
        sd[f"{name}.running_mean"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        if extras:
            sd[f"{name}.num_batches_tracked"] = np.array(0, np.int64)

    expansion = 4 if bottleneck else 1
    conv("conv1", width, 3, 7)
    bn("bn1", width)
    inplanes = width
    for li, n in enumerate(stage_sizes):
        planes = width * 2 ** li
        for b in range(n):
            stride = 1 if li == 0 or b > 0 else 2
            pre = f"layer{li + 1}.{b}"
            if bottleneck:
                conv(f"{pre}.conv1", planes, inplanes, 1)
                bn(f"{pre}.bn1", planes)
                conv(f"{pre}.conv2", planes, planes, 3)
                bn(f"{pre}.bn2", planes)
                conv(f"{pre}.conv3", planes * 4, planes, 1)
                bn(f"{pre}.bn3", planes * 4)
            else:
                conv(f"{pre}.conv1", planes, inplanes, 3)
                bn(f"{pre}.bn1", planes)
                conv(f"{pre}.conv2", planes, planes, 3)
                bn(f"{pre}.bn2", planes)
            if stride != 1 or inplanes != planes * expansion:
                conv(f"{pre}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{pre}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    if extras:
        sd["fc.weight"] = rng.standard_normal((1000, inplanes), dtype=np.float32)
        sd["fc.bias"] = np.zeros(1000, np.float32)
    return sd


# ---------------------------------------------------------------- numpy reference forward

def np_conv(x, w_oihw, stride, pad):
    w = np.asarray(w_oihw, np.float64)
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (xp.shape[1] - k) // stride + 1
    wo = (xp.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[0]))
    for i in range(k):
        for j in range(k):
            out += xp[:, i:i + stride * (ho - 1) + 1:stride,
                      j:j + stride * (wo - 1) + 1:stride] @ w[:, :, i, j].T
    return out


def np_bn(x, sd, name):
    return ((x - sd[f"{name}.running_mean"]) / np.sqrt(sd[f"{name}.running_var"] + 1e-5)
            * sd[f"{name}.weight"] + sd[f"{name}.bias"])


def np_maxpool(x):
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    ho, wo = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
    return np.max([xp[:, i:i + 2 * (ho - 1) + 1:2, j:j + 2 * (wo - 1) + 1:2]
                   for i in range(3) for j in range(3)], axis=0)


def np_stem(x, sd):
    return np.maximum(np_bn(np_conv(x, sd["conv1.weight"], 2, 3), sd, "bn1"), 0)


def np_resnet(x, sd, stage_sizes, bottleneck):
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    x = np_maxpool(np_stem(np.asarray(x, np.float64), sd))
    feats = {}
    for li, n in enumerate(stage_sizes):
        for b in range(n):
            stride = 1 if li == 0 or b > 0 else 2
            pre = f"layer{li + 1}.{b}"
            if bottleneck:
                y = relu(np_bn(np_conv(x, sd[f"{pre}.conv1.weight"], 1, 0), sd, f"{pre}.bn1"))
                y = relu(np_bn(np_conv(y, sd[f"{pre}.conv2.weight"], stride, 1), sd,
                               f"{pre}.bn2"))
                y = np_bn(np_conv(y, sd[f"{pre}.conv3.weight"], 1, 0), sd, f"{pre}.bn3")
            else:
                y = relu(np_bn(np_conv(x, sd[f"{pre}.conv1.weight"], stride, 1), sd,
                               f"{pre}.bn1"))
                y = np_bn(np_conv(y, sd[f"{pre}.conv2.weight"], 1, 1), sd, f"{pre}.bn2")
            if f"{pre}.downsample.0.weight" in sd:
                x = np_bn(np_conv(x, sd[f"{pre}.downsample.0.weight"], stride, 0), sd,
                          f"{pre}.downsample.1")
            x = relu(y + x)
        feats[f"C{li + 2}"] = x
    return feats


# ---------------------------------------------------------------- tests

def _shape_tree(tree):
    return jax.tree_util.tree_map(lambda v: tuple(np.shape(v)), tree)


@pytest.mark.parametrize("cfg,width", [(TINY_BASIC, 8), (TINY_BOTTLE, 8), (R50, 64)])
def test_round_trip_and_tree_matches_resnet(rng, cfg, width):
    sd = torchvision_state_dict(rng, width=width, **cfg)
    variables = torchvision_to_flax(sd, **cfg)
    model = ResNet(width=width, **cfg)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                              jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    assert _shape_tree(variables) == _shape_tree(abstract)  # same tree, same shapes
    back = flax_to_torchvision(variables, **cfg)
    kept = {k: v for k, v in sd.items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert list(back) == list(kept)  # same keys, torchvision order
    for k in kept:
        assert back[k].dtype == np.float32
        np.testing.assert_array_equal(back[k], kept[k], err_msg=k)
    if cfg is R50:
        assert len(sd) == 320  # torchvision resnet50().state_dict() has 320 entries
        n_params = sum(np.size(v) for v in jax.tree_util.tree_leaves(variables["params"]))
        assert n_params == 25_557_032 - 2048 * 1000 - 1000  # torchvision count minus fc
    # conv layout: OIHW -> HWIO
    np.testing.assert_array_equal(variables["params"]["stem_conv"]["kernel"],
                                  sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["batch_stats"]["layer1_0"]["bn1"]["var"],
                                  sd["layer1.0.bn1.running_var"])


@pytest.mark.parametrize("cfg", [TINY_BASIC, TINY_BOTTLE])
def test_converted_forward_matches_numpy(rng, cfg):
    sd = torchvision_state_dict(rng, width=8, **cfg)
    variables = torchvision_to_flax(sd, **cfg)
    model = ResNet(width=8, **cfg)
    x = rng.standard_normal((2, 40, 51, 3)).astype(np.float32)  # stem out: even, odd
    feats, state = jax.jit(lambda v, x: model.apply(
        v, x, capture_intermediates=lambda mdl, _: mdl.name == "stem_bn",
        mutable=["intermediates"]))(variables, x)
    stem = np.maximum(np.asarray(state["intermediates"]["stem_bn"]["__call__"][0]), 0)
    np.testing.assert_allclose(stem, np_stem(x.astype(np.float64), sd), rtol=1e-4, atol=1e-4)
    ref = np_resnet(x, sd, **cfg)
    for k in ("C2", "C3", "C4", "C5"):
        assert feats[k].shape == ref[k].shape, k
        np.testing.assert_allclose(np.asarray(feats[k]), ref[k], rtol=1e-3, atol=1e-3,
                                   err_msg=k)


@pytest.mark.parametrize("ext", [".safetensors", ".npz"])
def test_file_round_trip(rng, tmp_path, ext):
    sd = torchvision_state_dict(rng, width=8, **TINY_BOTTLE)
    path = tmp_path / f"resnet{ext}"
    save_state_dict(sd, path)
    loaded = load_state_dict(path)
    assert sorted(loaded) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(loaded[k], sd[k])
    variables = load_torchvision_resnet(path, **TINY_BOTTLE)
    back = flax_to_torchvision(variables, **TINY_BOTTLE)
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k])
    # and export: flax -> file -> flax
    out = tmp_path / f"export{ext}"
    save_state_dict(back, out)
    again = load_torchvision_resnet(out, **TINY_BOTTLE)
    assert _shape_tree(again) == _shape_tree(variables)


def test_missing_key_is_a_clear_error(rng):
    sd = torchvision_state_dict(rng, width=8, **TINY_BASIC)
    del sd["layer2.0.bn1.running_var"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): layer2\.0\.bn1\.running_var"):
        torchvision_to_flax(sd, **TINY_BASIC)


def test_unexpected_and_shape_errors(rng):
    sd = torchvision_state_dict(rng, width=8, **TINY_BASIC)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): layer1\.0\.conv3\.weight"):
        torchvision_to_flax({**sd, "layer1.0.conv3.weight": np.zeros(1)}, **TINY_BASIC)
    torchvision_to_flax({**sd, "layer1.0.conv3.weight": np.zeros(1)}, strict=False,
                        **TINY_BASIC)
    bad = {**sd, "layer3.0.conv2.weight": np.zeros((32, 32, 1, 1), np.float32)}
    with pytest.raises(ValueError, match=r"layer3\.0\.conv2\.weight: expected \(32, 32, 3, 3\)"):
        torchvision_to_flax(bad, **TINY_BASIC)
    # wrong architecture: a basic-block dict read as bottleneck
    with pytest.raises(ValueError, match="missing keys.*conv3"):
        torchvision_to_flax(sd, stage_sizes=(1, 1, 1, 1), bottleneck=True)
    with pytest.raises(ValueError, match="conv1.weight"):
        torchvision_to_flax({}, **TINY_BASIC)
    with pytest.raises(ValueError, match="missing"):
        variables = torchvision_to_flax(sd, **TINY_BASIC)
        del variables["params"]["layer4_0"]["conv2"]
        flax_to_torchvision(variables, **TINY_BASIC)


def test_prefix(rng):
    sd = torchvision_state_dict(rng, width=8, **TINY_BASIC)
    wrapped = {f"backbone.{k}": v for k, v in sd.items()}
    wrapped["neck.lateral.weight"] = np.zeros(3, np.float32)
    variables = torchvision_to_flax(wrapped, prefix="backbone.", **TINY_BASIC)
    np.testing.assert_array_equal(variables["params"]["layer4_0"]["conv2"]["kernel"],
                                  sd["layer4.0.conv2.weight"].transpose(2, 3, 1, 0))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported"):
        load_state_dict(tmp_path / "w.bin")
    (tmp_path / "w.pth").write_bytes(b"x")
    if importlib.util.find_spec("torch") is None:
        with pytest.raises(ImportError, match="safetensors"):
            load_state_dict(tmp_path / "w.pth")
