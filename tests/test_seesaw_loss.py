"""Seesaw loss (LVIS detector, model.box_cls_loss='seesaw') against a numpy transcription
of mmdet's seesaw_ce_loss / SeesawLoss.forward on random logits and labels; the test-time
scores (get_activation) and the running class counts; the EZSD head's K + 2 outputs."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from ezsd_jax.models import detector as det
from ezsd_jax.models import losses
from ezsd_jax.models.ezsd_head import EZSDRoIHead


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _ce(x, y):
    return -np.log(_softmax(x)[np.arange(len(y)), y])


def np_seesaw_ce(cls_score, labels, cum_samples, p, q, eps):
    """mmdet mmdet/models/losses/seesaw_loss.py seesaw_ce_loss, reduction='none'."""
    n, k = cls_score.shape
    onehot = np.eye(k)[labels]
    w = np.ones_like(onehot)
    if p > 0:
        cs = np.maximum(cum_samples, 1)
        ratio = cs[None, :] / cs[:, None]
        index = (ratio < 1.0).astype(float)
        w = w * (ratio ** p * index + (1 - index))[labels]
    if q > 0:
        scores = _softmax(cls_score)
        self_scores = scores[np.arange(n), labels]
        sm = scores / np.maximum(self_scores[:, None], eps)
        index = (sm > 1.0).astype(float)
        w = w * (sm ** q * index + (1 - index))
    return _ce(cls_score + np.log(w) * (1 - onehot), labels)


def np_seesaw_forward(cls_score, labels, cum_samples, num_classes, p, q, eps, avg):
    """SeesawLoss.forward (cum_samples already updated), reduction 'mean' + avg_factor."""
    pos = labels < num_classes
    cls = np_seesaw_ce(cls_score[pos, :-2], labels[pos], cum_samples[:num_classes], p, q,
                       eps).sum() / avg
    obj = _ce(cls_score[:, -2:], (labels == num_classes).astype(int)).sum() / avg
    return cls, obj


@pytest.mark.parametrize("p,q", [(0.8, 2.0), (0.0, 2.0), (0.8, 0.0)])
def test_seesaw_ce_matches_numpy(rng, p, q):
    k, n = 7, 40
    logits = rng.normal(size=(n, k)) * 3
    labels = rng.integers(0, k, n)
    cum = rng.integers(0, 50, k).astype(np.float64)
    cum[2] = 0                                   # a class never seen: clamp to 1
    fn = jax.jit(losses.seesaw_ce, static_argnums=(3, 4, 5))
    got = np.asarray(fn(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                        jnp.asarray(cum, jnp.float32), p, q, 1e-2))
    np.testing.assert_allclose(got, np_seesaw_ce(logits, labels, cum, p, q, 1e-2),
                               rtol=1e-4, atol=1e-5)
    plain = _ce(logits, labels)
    assert not np.allclose(got, plain)
    if p == 0:   # compensation alone only raises negative logits
        assert (got >= plain - 1e-4).all()
    if q == 0:   # mitigation alone only lowers them
        assert (got <= plain + 1e-4).all()


def test_seesaw_box_losses_counts_and_scores_match_mmdet(rng):
    b, r, k = 2, 30, 6
    logits = rng.normal(size=(b, r, k + 2)) * 2
    labels = np.where(rng.random((b, r)) < 0.4, rng.integers(0, k, (b, r)), k)
    roi_valid = rng.random((b, r)) < 0.9
    image_valid = np.array([True, False])
    valid = roi_valid & image_valid[:, None]
    prior = rng.integers(0, 30, k + 1).astype(np.float32)
    cum = jax.jit(losses.seesaw_counts)(jnp.asarray(prior), jnp.asarray(labels),
                                        jnp.asarray(valid))
    want_cum = prior + np.bincount(labels[valid], minlength=k + 1)
    np.testing.assert_allclose(np.asarray(cum), want_cum)
    deltas = rng.normal(size=(b, r, 4)).astype(np.float32)
    tgt = {"roi_valid": jnp.asarray(roi_valid), "cls_target": jnp.asarray(labels),
           "fg": jnp.asarray(labels < k), "box_target": jnp.asarray(np.zeros((b, r, 4)),
                                                                      jnp.float32)}
    out = jax.jit(losses.seesaw_box_losses)(jnp.asarray(logits, jnp.float32),
                                            jnp.asarray(deltas), tgt,
                                            jnp.asarray(image_valid), cum)
    lv, yv = logits[valid], labels[valid]
    cls, obj = np_seesaw_forward(lv, yv, want_cum, k, 0.8, 2.0, 1e-2, max(len(yv), 1))
    np.testing.assert_allclose(float(out["box_cls_classes"]), cls, rtol=1e-4)
    np.testing.assert_allclose(float(out["box_cls"]), cls + obj, rtol=1e-4)
    want_reg = np.abs(deltas[valid & (labels < k)]).sum() / len(yv)
    np.testing.assert_allclose(float(out["box_reg"]), want_reg, rtol=1e-4)
    # get_activation: softmax(classes) * P(object), P(background)
    sc = np.exp(np.asarray(jax.jit(losses.seesaw_scores)(jnp.asarray(logits, jnp.float32))))
    obj_p = _softmax(logits[..., -2:])
    want = np.concatenate([_softmax(logits[..., :k]) * obj_p[..., :1], obj_p[..., 1:]], -1)
    np.testing.assert_allclose(sc, want, rtol=1e-4, atol=1e-6)


def test_ezsd_head_seesaw_outputs(rng):
    d, k = 8, 4
    m = common.tiny_model_config(image_size=(64, 64), roi_head="ezsd", fpn_channels=8,
                                 box_conv_dim=8, box_fc_dim=16, box_cls_loss="seesaw")
    m.ezsd = dict(embed_dim=d)
    cfg = det.DetectorConfig.from_config(m, num_classes=k)
    head = EZSDRoIHead(cfg)
    feats = jnp.asarray(rng.normal(size=(1, 3, 7, 7, 8)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(k, d)), jnp.float32)
    v = jax.jit(lambda f, e: head.init(jax.random.key(0), f, None, e))(feats, emb)
    out = jax.jit(lambda v, f, e: head.apply(v, f, None, e))(v, feats, emb)
    assert v["params"]["background"]["kernel"].shape == (d, 2)
    assert out["seesaw_logits"].shape == (1, 3, k + 2) and out["logits"].shape == (1, 3, k + 1)
    np.testing.assert_allclose(np.asarray(out["logits"]),
                               np.asarray(losses.seesaw_scores(out["seesaw_logits"])),
                               rtol=1e-5, atol=1e-5)   # float32 of logits up to ~100
    # objectness logits are not temperature-scaled: bg = r . W (reference)
    r = np.asarray(out["embedding"])
    np.testing.assert_allclose(np.asarray(out["seesaw_logits"])[..., k:],
                               r @ np.asarray(v["params"]["background"]["kernel"]), atol=1e-5)
    full = det.FasterRCNN(cfg)
    shapes = jax.eval_shape(lambda: det.init_variables(full, jax.random.key(0), 1, emb))
    assert shapes["batch_stats"][det.SEESAW_COUNTS].shape == (k + 1,)
    with pytest.raises(ValueError, match="roi_head='ezsd'"):
        det.DetectorConfig.from_config(ml_collections.ConfigDict(), num_classes=3, box_cls_loss="seesaw")


def test_checkpoint_stored_shape_of_the_counts(tmp_path):
    """The counts are sized by the TRAINING vocabulary: evaluation over more names reads
    their stored shape (evaluate.restore_variables) instead of its own model's."""
    from ezsd_jax.core.checkpoint import CheckpointError, Checkpointer
    ck = Checkpointer(str(tmp_path / "ck"))
    ck.save(3, {"batch_stats": {det.SEESAW_COUNTS: jnp.zeros((7,))}, "step": jnp.ones(())},
            force=True)
    ck.wait()
    assert ck.stored_shape(3, ("batch_stats", det.SEESAW_COUNTS)) == (7,)
    with pytest.raises(CheckpointError, match="has no batch_stats/nothing"):
        ck.stored_shape(3, ("batch_stats", "nothing"))
    ck.close()
