"""EZSD RoI head: cosine classifier over call-time text embeddings with a learned
background and temperature, semantic regression on the class's text embedding, the
embed() branch for distillation, and the ablation switches (numpy references on random
inputs). The full detector with this head (train over base names, evaluate over all) runs
in tests/test_ezsd_train.py."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from ezsd_jax.models import detector as det
from ezsd_jax.models.ezsd_head import EZSDHeadConfig, EZSDRoIHead

D, K = 32, 5


def _cfg(k=K, **ezsd):
    m = common.tiny_model_config(image_size=(128, 128), roi_head="ezsd", box_num_convs=2)
    m.ezsd = dict(embed_dim=D, **ezsd)
    return det.DetectorConfig.from_config(m, num_classes=k)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _setup(rng, k=K, b=2, r=7, **ezsd):
    cfg = _cfg(k, **ezsd)
    head = EZSDRoIHead(cfg)
    feats = jnp.asarray(rng.normal(size=(b, r, 7, 7, cfg.fpn_channels)), jnp.float32)
    emb = _unit(rng.normal(size=(k, D))).astype(np.float32)
    variables = head.init(jax.random.key(0), feats, None, jnp.asarray(emb))
    return head, variables, feats, emb


def test_config_plumbing_and_validation():
    cfg = _cfg(semantic_regression=False)
    assert isinstance(cfg.ezsd, tuple) and isinstance(hash(cfg), int)  # hashable pairs
    h = EZSDHeadConfig.from_detector(cfg)
    assert h.embed_dim == D and not h.semantic_regression and h.learned_background
    assert EZSDHeadConfig.from_detector(det.DetectorConfig.from_config(ml_collections.ConfigDict(), num_classes=3)) == EZSDHeadConfig()
    with pytest.raises(ValueError, match="unknown options"):
        EZSDHeadConfig.from_detector(_cfg(bogus=1))


@pytest.mark.parametrize("k,r", [(K, 7), (2, 3)])
def test_logits_are_temperature_times_cosine_plus_learned_background(rng, k, r):
    head, variables, feats, emb = _setup(rng, k=k, r=r)
    p = variables["params"]
    np.testing.assert_allclose(np.exp(float(p["log_temperature"])), 100.0, rtol=1e-6)
    out = head.apply(variables, feats, None, jnp.asarray(emb))
    assert out["logits"].shape == (2, r, k + 1)
    assert out["deltas"].shape == (2, r, 4)
    assert out["embedding"].shape == (2, r, D)
    emb_r = np.asarray(head.apply(variables, feats, method=EZSDRoIHead.embed))
    np.testing.assert_allclose(emb_r, np.asarray(out["embedding"]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb_r, axis=-1), 1.0, rtol=1e-5)
    # random (non-normalized) embeddings: the head normalizes them
    raw = rng.normal(size=(k, D)).astype(np.float32) * rng.uniform(0.5, 3, (k, 1))
    out = head.apply(variables, feats, None, jnp.asarray(raw, jnp.float32))
    temp = np.exp(float(p["log_temperature"]))
    want_cls = temp * emb_r @ _unit(raw).T
    want_bg = temp * emb_r @ np.asarray(p["background"]["kernel"])[:, 0]
    logits = np.asarray(out["logits"])
    np.testing.assert_allclose(logits[..., :k], want_cls, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits[..., k], want_bg, rtol=1e-4, atol=1e-5)
    assert np.abs(want_bg).max() > 0


def test_temperature_and_background_are_learned(rng):
    head, variables, feats, emb = _setup(rng)

    def loss(p):
        out = head.apply({"params": p}, feats, None, jnp.asarray(emb))
        return jax.nn.log_softmax(out["logits"])[..., -1].mean()
    g = jax.grad(loss)(variables["params"])
    assert abs(float(g["log_temperature"])) > 0
    assert np.abs(np.asarray(g["background"]["kernel"])).sum() > 0


def _reg_feat(head, variables, feats):
    return np.asarray(head.apply(variables, feats,
                                 method=lambda m, x: m.regression_features(m.shared(x))))


def test_semantic_regression_uses_the_assigned_class_embedding(rng):
    head, variables, feats, emb = _setup(rng, r=9)
    reg = jnp.asarray([[0, 1, 2, 3, 4, K, K, 2, 0], [4, 4, K, 1, 0, 3, 2, K, 1]], jnp.int32)
    base = np.asarray(head.apply(variables, feats, reg, jnp.asarray(emb))["deltas"])
    # numpy reference: Linear over [reg feature, t_class] (zeros for background)
    w = variables["params"]["regressor"]["bbox_pred"]
    kern, bias = np.asarray(w["kernel"]), np.asarray(w["bias"])
    assert kern.shape == (128 + D, 4)
    feat = _reg_feat(head, variables, feats)
    cls = np.asarray(reg)
    extra = np.where((cls < K)[..., None], emb[np.clip(cls, 0, K - 1)], 0.0)
    want = np.concatenate([feat, extra], -1) @ kern + bias
    np.testing.assert_allclose(base, want, rtol=1e-4, atol=1e-6)
    # changing class c's embedding changes exactly the RoIs assigned to c
    for c in (2, 4):
        emb2 = emb.copy()
        emb2[c] = _unit(rng.normal(size=D))
        new = np.asarray(head.apply(variables, feats, reg, jnp.asarray(emb2))["deltas"])
        changed = np.abs(new - base).max(-1) > 1e-7
        np.testing.assert_array_equal(changed, cls == c)
    # background RoIs see zeros: independent of every embedding
    other = _unit(rng.normal(size=(K, D))).astype(np.float32)
    new = np.asarray(head.apply(variables, feats, reg, jnp.asarray(other))["deltas"])
    np.testing.assert_allclose(new[cls == K], base[cls == K], rtol=0, atol=0)
    np.testing.assert_allclose(base[cls == K], (feat @ kern[:128] + bias)[cls == K],
                               rtol=1e-4, atol=1e-6)


def test_semantic_regression_at_test_uses_the_predicted_class(rng):
    head, variables, feats, emb = _setup(rng)
    out = head.apply(variables, feats, None, jnp.asarray(emb))
    pred = jnp.argmax(out["logits"][..., :K], axis=-1)
    want = head.apply(variables, feats, pred, jnp.asarray(emb))["deltas"]
    np.testing.assert_allclose(np.asarray(out["deltas"]), np.asarray(want), rtol=0, atol=0)


def test_switches(rng):
    head, variables, feats, emb = _setup(rng, semantic_regression=False,
                                         learned_background=False, learn_temperature=False,
                                         temperature_init=20.0)
    p = variables["params"]
    assert "background" not in p
    assert p["regressor"]["bbox_pred"]["kernel"].shape == (128, 4)
    reg = jnp.asarray(rng.integers(0, K + 1, (2, 7)), jnp.int32)
    a = head.apply(variables, feats, reg, jnp.asarray(emb))
    b = head.apply(variables, feats, None, jnp.asarray(emb[::-1].copy()))
    np.testing.assert_allclose(np.asarray(a["deltas"]), np.asarray(b["deltas"]), atol=0)
    np.testing.assert_allclose(np.asarray(a["logits"][..., -1]), 0.0)
    r = np.asarray(a["embedding"])
    np.testing.assert_allclose(np.asarray(a["logits"][..., :K]), 20.0 * r @ emb.T,
                               rtol=1e-4, atol=1e-4)
    g = jax.grad(lambda p: head.apply({"params": p}, feats, None,
                                      jnp.asarray(emb))["logits"].sum())(p)
    assert float(g["log_temperature"]) == 0.0


def test_bad_class_embeddings_are_clear_errors(rng):
    head, variables, feats, emb = _setup(rng)
    with pytest.raises(ValueError, match="needs class_embeddings"):
        head.apply(variables, feats, None, None)
    with pytest.raises(ValueError, match="embed_dim"):
        head.apply(variables, feats, None, jnp.zeros((K, D + 1)))
    with pytest.raises(ValueError, match="num_classes"):
        head.apply(variables, feats, None, jnp.asarray(emb[:3]))
