"""Branched box heads (mmdet ConvFCBBoxHead counts, model.box_head_spec): the reference's
'301212' EZSD head and the standard head, shapes and parameter counts against a count
written out by hand from the layer list; the legacy layout is unchanged."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from ezsd_jax.models import detector as det
from ezsd_jax.models.box_head import parse_box_head_spec
from ezsd_jax.models.ezsd_head import EZSDRoIHead

C, CONV, FC, D, K, S = 8, 8, 16, 12, 3, 7


def _conv(cin, cout):
    return 9 * cin * cout + cout


def _fc(cin, cout):
    return cin * cout + cout


def _branch(convs, fcs, cin, flat_in):
    """Parameters and output width of one branch (convs -> flatten -> fcs), mmdet rules."""
    n, dim = 0, cin
    for _ in range(convs):
        n, dim = n + _conv(dim, CONV), CONV
    if fcs:
        dim = dim if flat_in else dim * S * S
        for _ in range(fcs):
            n, dim = n + _fc(dim, FC), FC
    return n, dim


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _cfg(roi_head, spec, **kw):
    m = common.tiny_model_config(image_size=(128, 128), roi_head=roi_head, fpn_channels=C,
                                 box_conv_dim=CONV, box_fc_dim=FC, box_head_spec=spec, **kw)
    m.ezsd = dict(embed_dim=D)
    return det.DetectorConfig.from_config(m, num_classes=K)


def test_parse_box_head_spec():
    assert parse_box_head_spec("301212") == (3, 0, 1, 2, 1, 2)
    assert parse_box_head_spec((4, 0, 0, 2, 0, 2)) == (4, 0, 0, 2, 0, 2)
    for bad in ("30121", "3x1212", "011000", "000000", (1, 2)):
        with pytest.raises(ValueError, match="box_head_spec"):
            parse_box_head_spec(bad)


@pytest.mark.parametrize("spec", ["301212", "020000", "400202", "000101"])
def test_ezsd_head_param_count_and_shapes(rng, spec):
    sc, sf, cc, cf, rc, rf = parse_box_head_spec(spec)
    cfg = _cfg("ezsd", spec)
    head = EZSDRoIHead(cfg)
    feats = jax.ShapeDtypeStruct((2, 5, S, S, C), jnp.float32)
    emb = jax.ShapeDtypeStruct((K, D), jnp.float32)
    v = jax.eval_shape(lambda f, e: head.init(jax.random.key(0), f, None, e), feats, emb)
    out = jax.eval_shape(lambda v, f, e: head.apply(v, f, None, e), v, feats, emb)
    n_sh, dim = _branch(sc, sf, C, False)
    flat = sf > 0
    n_c, dc = _branch(cc, cf, dim, flat)
    n_r, dr = _branch(rc, rf, dim, flat)
    dc = dc if (cf or flat) else dc * S * S
    dr = dr if (rf or flat) else dr * S * S
    want = n_sh + n_c + n_r + _fc(dc, D) + D * 1 + 1 + _fc(dr + D, 4)  # proj, bg, temp, reg
    p = v["params"]
    assert _count(p) == want
    assert _count(p.get("shared", {})) == n_sh and _count(p.get("cls_head", {})) == n_c
    assert _count(p.get("reg_head", {})) == n_r
    assert out["logits"].shape == (2, 5, K + 1) and out["deltas"].shape == (2, 5, 4)


def test_301212_layers():
    cfg = _cfg("ezsd", "301212")
    head = EZSDRoIHead(cfg)
    v = jax.eval_shape(lambda: head.init(jax.random.key(0), jnp.zeros((1, 2, S, S, C)),
                                         None, jnp.zeros((K, D))))["params"]
    assert sorted(v["shared"]) == ["conv_0", "conv_1", "conv_2"]
    for b in ("cls_head", "reg_head"):
        assert sorted(v[b]) == ["conv_0", "fc_0", "fc_1"]
        assert v[b]["fc_0"]["kernel"].shape == (S * S * CONV, FC)


def test_legacy_layout_unchanged_and_standard_head_branches():
    """'' keeps the old parameter tree (shared convs, FCs per branch); the standard head
    with a spec has separate branches feeding classifier and regressor."""
    legacy = EZSDRoIHead(_cfg("ezsd", "", box_num_convs=2))
    v = jax.eval_shape(lambda: legacy.init(jax.random.key(0), jnp.zeros((1, 2, S, S, C)),
                                           None, jnp.zeros((K, D))))["params"]
    assert sorted(v["shared"]) == ["conv_0", "conv_1"] and sorted(v["cls_head"]) == \
        ["fc_0", "fc_1"]
    std = det.StandardRoIHead(_cfg("standard", "301212"))
    feats = jax.ShapeDtypeStruct((2, 4, S, S, C), jnp.float32)
    vs = jax.eval_shape(lambda f: std.init(jax.random.key(0), f), feats)
    out = jax.eval_shape(std.apply, vs, feats)
    assert out["logits"].shape == (2, 4, K + 1) and out["deltas"].shape == (2, 4, 4)
    _, dc = _branch(1, 2, CONV, False)
    assert vs["params"]["classifier"]["cls_score"]["kernel"].shape == (dc, K + 1)
    assert "box_head" not in vs["params"] and "reg_head" in vs["params"]
