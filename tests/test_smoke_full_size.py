"""benchmarks/smoke_full_size.py's random inputs: boxes inside the image, labels below the
step's own vocabulary (a class_embeddings input), positional arguments drawn by their
parameter names, weights scaled by fan-in, optimizer state zero; and one real step of a
small ISAL config through the AOT check's StepSpec comes out finite."""
from __future__ import annotations

import importlib.util
import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location(
        "_bench_smoke", os.path.join(ROOT, "benchmarks", "smoke_full_size.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


smoke = _load()


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, np.dtype(dtype))


def test_inputs_are_drawn_by_kind():
    from ezsd_jax.data.pipeline import batch_spec

    def step(state, batch, consts, scale):     # the names the generator reads
        return state

    B, H, W, M = 3, 96, 160, 7
    batch = {k: _sds(s, d) for k, (s, d) in batch_spec(B, (H, W), M, mask_size=14).items()}
    state = {"params": {"conv": {"kernel": _sds((3, 3, 16, 32), np.float32)},
                        "norm": {"scale": _sds((32,), np.float32),
                                 "bias": _sds((32,), np.float32)}},
             "opt_state": {"mu": _sds((3, 3, 16, 32), np.float32)},
             "step": _sds((), np.int32)}
    consts = {"class_embeddings": _sds((5, 8), np.float32)}
    st, b, c, scale = smoke.concrete(step, (state, batch, consts, _sds((B,), np.float32)),
                                     num_classes=80)
    boxes = np.asarray(b["boxes"])
    assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
    assert boxes[..., 0::2].min() >= 0 and boxes[..., 0::2].max() <= W
    assert boxes[..., 1::2].max() <= H
    classes = np.asarray(b["classes"])
    assert classes.min() >= 0 and classes.max() < 5 and len(np.unique(classes)) > 1
    assert (np.asarray(b["image_hw"]) == [H, W]).all()
    assert np.asarray(b["valid"]).all() and not np.asarray(b["flipped"]).any()
    assert 0 < np.asarray(b["box_mask"]).sum() < B * M
    assert set(np.unique(np.asarray(b["gt_masks"]))) <= {0, 1}
    assert np.asarray(scale).tolist() == [1.0] * B            # positional, by its name
    k = np.asarray(st["params"]["conv"]["kernel"])
    assert abs(k.std() * np.sqrt(3 * 3 * 16) - 1) < 0.1        # N(0, 1/fan_in)
    assert (np.asarray(st["params"]["norm"]["scale"]) == 1).all()
    assert (np.asarray(st["params"]["norm"]["bias"]) == 0).all()
    assert (np.asarray(st["opt_state"]["mu"]) == 0).all()
    emb = np.asarray(c["class_embeddings"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1, rtol=1e-5)


def test_one_real_step_of_a_small_config_is_finite():
    from ezsd_jax.aot.registry import step_specs
    from ezsd_jax.core import sharding
    spec = importlib.util.spec_from_file_location(
        "smoke_cfg", os.path.join(ROOT, "configs", "isal_digits.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    train = next(s for s in step_specs(cfg, mesh) if s.stage == "train")
    e = smoke.smoke_step(train, mesh, 4, int(cfg.model.num_classes))
    assert e["output_float_leaves"] > 0 and e["output_nonfinite_leaves"] == 0
    assert e["parameters"] > 0 and e["step_s"] > 0 and e["peak_rss_bytes"] > 0
    assert e["inputs"]["image"][0] == 4
