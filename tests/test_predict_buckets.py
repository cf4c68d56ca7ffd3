"""predict's static shapes without training (buckets.py, detector.mask_classes): the
vocabulary bucket, its padding and masking (padded names never detect and change nothing
for the real ones), and the input-size bucket (eval's resize, bucket padding)."""
import jax
import numpy as np
import pytest

from ezsd_jax.predict import buckets
from ezsd_jax.data import transforms
from ezsd_jax.models import detector as det
from ezsd_jax.models import postprocess


def test_vocab_bucket_and_padding():
    assert [buckets.vocab_bucket(k) for k in (1, 8, 9, 16, 17, 80, 1203)] == \
        [8, 8, 16, 16, 32, 128, 2048]
    with pytest.raises(ValueError, match="empty"):
        buckets.vocab_bucket(0)
    emb = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    pad, valid = buckets.pad_vocabulary(emb, 8)
    assert pad.shape == (8, 4) and valid.tolist() == [True] * 5 + [False] * 3
    np.testing.assert_array_equal(pad[:5], emb)
    np.testing.assert_array_equal(pad[5:], np.repeat(emb[:1], 3, 0))
    with pytest.raises(ValueError):
        buckets.pad_vocabulary(emb, 4)
    assert buckets.canonical_names([" b", "a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="empty name"):
        buckets.canonical_names(["a", " "])


def _post(logits, deltas, props, pvalid, hw):
    return jax.jit(lambda *a: postprocess.detections(
        *a, score_threshold=0.0, nms_threshold=0.5, max_detections=20,
        topk_candidates=64, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0)))(
            logits, deltas, props, pvalid, hw)


def test_masked_padding_gives_the_unpadded_detections(rng):
    b, r, k, kb = 2, 12, 5, 8
    logits = rng.normal(size=(b, r, k + 1)).astype(np.float32) * 3
    deltas = rng.normal(size=(b, r, 4)).astype(np.float32) * 0.1
    xy = rng.uniform(0, 60, size=(b, r, 2))
    props = np.concatenate([xy, xy + rng.uniform(8, 40, size=(b, r, 2))], -1)
    props = props.astype(np.float32)
    pvalid = np.ones((b, r), bool)
    hw = np.full((b, 2), 100.0, np.float32)
    ref = jax.device_get(_post(logits, deltas, props, pvalid, hw))
    # padded classes: copies of class 0 (what pad_vocabulary does to the embeddings)
    padded = np.concatenate([logits[..., :k], np.repeat(logits[..., :1], kb - k, -1),
                             logits[..., k:]], -1)
    masked = det.mask_classes(padded, np.arange(kb) < k)
    assert np.isneginf(np.asarray(masked)[..., k:kb]).all()
    got = jax.device_get(_post(masked, deltas, props, pvalid, hw))
    assert ((got["classes"] < k) | ~got["valid"]).all()          # padding never detects
    np.testing.assert_array_equal(got["valid"], ref["valid"])
    np.testing.assert_array_equal(got["classes"], ref["classes"])
    np.testing.assert_allclose(got["scores"], ref["scores"], rtol=1e-6)
    np.testing.assert_allclose(got["boxes"], ref["boxes"], rtol=1e-6)
    # without the mask the copies would take probability mass (and detect)
    unmasked = jax.device_get(_post(padded, deltas, props, pvalid, hw))
    assert not np.allclose(unmasked["scores"], ref["scores"])


def test_ezsd_head_semantic_regression_ignores_padding(rng):
    from configs import common
    from ezsd_jax.models.ezsd_head import EZSDRoIHead
    import ml_collections
    m = common.tiny_model_config(roi_head="ezsd")
    m.ezsd = ml_collections.ConfigDict(dict(embed_dim=8))
    emb = rng.normal(size=(3, 8)).astype(np.float32)
    pad, _ = buckets.pad_vocabulary(emb, 8)
    feats = rng.normal(size=(1, 6, 7, 7, 32)).astype(np.float32)
    heads = [EZSDRoIHead(det.DetectorConfig.from_config(m, num_classes=len(e)))
             for e in (emb, pad)]
    v = heads[0].init(jax.random.key(0), feats, None, emb)    # no class-count params
    outs = [jax.device_get(h.apply(v, feats, None, e)) for h, e in zip(heads, (emb, pad))]
    np.testing.assert_allclose(outs[1]["logits"][..., :3], outs[0]["logits"][..., :3],
                               rtol=1e-6)
    np.testing.assert_allclose(outs[1]["deltas"], outs[0]["deltas"], rtol=1e-6)


@pytest.mark.parametrize("h,w", [(128, 128), (427, 640), (640, 427), (3000, 200), (50, 60)])
def test_geometry_matches_eval_and_buckets(h, w):
    info = buckets.geometry(h, w, (128, 128), 128, 128, step=64)
    rec = type("R", (), {"height": h, "width": w, "image_id": 0})
    ref = transforms.example_info(rec, (128, 128), 128, 128, flip=False)
    assert info["scale"] == ref["scale"] and info["resized_hw"] == ref["resized_hw"]
    (ph, pw), (nh, nw) = info["padded_hw"], info["resized_hw"]
    assert ph % 64 == 0 and pw % 64 == 0 and nh <= ph <= 128 and nw <= pw <= 128
    img = np.full((h, w, 3), 7, np.uint8)
    x = buckets.prepare(img, info)
    assert x.shape == (ph, pw, 3) and (x[:nh, :nw] == 7).all() and x[nh:].sum() == 0
    big = buckets.geometry(800, 1200, (1344, 1344), 800, 1333, step=128)
    assert big["resized_hw"] == (800, 1200) and big["padded_hw"] == (896, 1280)


def test_predict_cli_bad_input_is_one_line_exit_2(tmp_path):
    import os
    import subprocess
    import sys
    (tmp_path / "a.png").write_bytes(b"x")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    cases = [([f"--images={tmp_path}/none*.jpg", "--names=a"], "no files"),
             ([f"--images={tmp_path}", "--names=a", "--vocabulary=all"], "exactly one of"),
             ([f"--images={tmp_path}", "--names=a", "--workdir=/nonexistent"],
              "not a directory"),
             (["export"], "--out=BUNDLE_DIR is required")]
    for args, msg in cases:
        out = [] if args == ["export"] else [f"--out={tmp_path}/o"]
        p = subprocess.run([sys.executable, "-m", "ezsd_jax.predict"] + out + args,
                           capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 2, (args, p.stderr)
        err = p.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], (args, err)
