"""The deviceless AOT check (ezsd_jax.aot): a small config's steps compile for TPU slices
with libtpu's compile-only devices (one host and a multi-host slice), per-chip memory grows
with the batch, donation is honoured, an impossible batch exits 2 with one line naming
the largest batch that fits; the HLO collective parser and the slice names on their own.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

from ezsd_jax.core.aot import report, topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(
    not topology.libtpu_available(),
    reason="libtpu is not installed (pip install -r requirements-tpu.txt; make test does)")


def _config(name="isal_digits", **overrides):
    spec = importlib.util.spec_from_file_location("aot_cfg", os.path.join(ROOT, "configs",
                                                                          f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    for k, v in overrides.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


def _check(cfg, topo, steps):
    from ezsd_jax.aot.cli import check
    entries, problems = check(cfg, topo, steps=steps, log=lambda *_: None)
    return entries, problems


def test_collectives_parser_counts_kinds_and_bytes():
    hlo = "\n".join([
        "  %all-reduce.2 = (f32[1024,1024]{1,0}, f32[]{:T(128)}) all-reduce(%a, %b), "
        "channel_id=1",
        "  %ag = bf16[8,256]{1,0} all-gather-start(%x), dimensions={0}",
        "  %ags = (bf16[2,256]{1,0}, bf16[8,256]{1,0}) all-gather-start(%y), dimensions={0}",
        "  ROOT %rs = f32[16]{0} reduce-scatter(%z), dimensions={0}",
        "  %d = bf16[8,256]{1,0} all-gather-done(%ags)",
        "  %n = f32[4]{0} add(%p, %q)"])
    got = report.collectives(hlo)
    assert got["all-reduce"] == {"count": 1, "bytes": 1024 * 1024 * 4 + 4}
    assert got["all-gather"] == {"count": 2, "bytes": 2 * 8 * 256 * 2}
    assert got["reduce-scatter"] == {"count": 1, "bytes": 64}
    assert set(got) == {"all-reduce", "all-gather", "reduce-scatter"}


def test_slice_names():
    assert topology.canonical("v5e-8") == "v5e:2x4"
    assert topology.canonical("v4-16") == "v4:2x2x2"
    assert topology.canonical("v5p:2x2x4") == "v5p:2x2x4"
    with pytest.raises(topology.TopologyError, match="expected a slice like"):
        topology.canonical("a100:8")


@needs_libtpu
def test_chip_of_a_real_device_and_its_roofline():
    """The benchmarks' 'AOT est.' column: a device kind maps to its published figures and
    the roofline of a compiled CPU program is FLOPs / peak (compute-bound matmul)."""
    import jax
    import jax.numpy as jnp
    dev = lambda kind: type("D", (), {"device_kind": kind})()  # noqa: E731
    assert topology.chip_of_device(dev("NVIDIA H100 80GB HBM3")) is topology.CHIPS["h100"]
    assert topology.chip_of_device(dev("NVIDIA H200")) is topology.CHIPS["h200"]
    assert topology.chip_of_device(dev("TPU v5 lite")) is topology.CHIPS["v5e"]
    assert topology.chip_of_device(dev("cpu")) is None
    x = jnp.ones((256, 256), jnp.float32)
    compiled = jax.jit(lambda a: a @ a).lower(x).compile()
    r = report.roofline(compiled, items=4, chip=topology.CHIPS["h100"])
    assert r["flops"] == pytest.approx(2 * 256 ** 3, rel=0.01)
    t = max(r["flops"] / 989e12, r["bytes_accessed"] / 3352e9)
    assert r["estimate_items_per_s"] == pytest.approx(4 / t)


def test_small_config_compiles_on_one_host_and_on_a_multi_host_slice():
    cfg = _config()
    one, problems = _check(cfg, "v5e:2x2", "train|select/score")
    assert not problems
    multi, problems = _check(cfg, "v4:2x2x2", "train")
    assert not problems
    assert (one[0]["chips"], one[0]["hosts"]) == (4, 1)
    assert (multi[0]["chips"], multi[0]["hosts"]) == (8, 2)
    for e in one + multi:
        assert e["fits"] and 0 < e["total_bytes"] < e["capacity_bytes"]
        assert e["flops"] > 0 and e["bytes_accessed"] > 0
        assert e["estimate_items_per_s"] > 0
    train = [e for e in one + multi if e["step"] == "train_step"]
    for e in train:   # data parallel: gradients are all-reduced; the state is donated
        assert e["collectives"]["all-reduce"]["bytes"] > 0
        assert e["donation_honoured"] is True and e["alias_bytes"] >= e["donated_bytes"] > 0
    assert one[0]["mesh"] == {"data": 4, "model": 1}
    assert multi[0]["mesh"] == {"data": 8, "model": 1}


@needs_libtpu
def test_per_chip_memory_grows_with_the_batch():
    from ezsd_jax.core.aot import program
    from ezsd_jax.core import sharding
    from isal_jax.aot_steps import step_specs
    cfg = _config()
    sl = topology.get_slice("v5e:2x2")
    mesh = sharding.make_mesh(cfg.mesh, devices=sl.devices)
    spec = step_specs(cfg, mesh)[0]
    small, big = (program.run_step(spec, mesh, sl.chip, b) for b in (8, 512))
    assert big["temp_bytes"] + big["argument_bytes"] > small["temp_bytes"] + small["argument_bytes"]
    assert big["total_bytes"] > small["total_bytes"]
    assert big["flops"] > 10 * small["flops"]


@needs_libtpu
@pytest.mark.slow   # a handful of compiles to find the largest batch
def test_impossible_batch_exits_2_with_one_line(tmp_path):
    # 2**20 channels of 8x8 activations: ~0.5 GiB a sample, so 64 per chip cannot fit
    # (and the search for the largest batch takes a few compiles, not sixteen)
    out = tmp_path / "aot.json"
    p = subprocess.run(
        [sys.executable, "-m", "ezsd_jax.aot", "--config=configs/isal_digits.py",
         "--topology=v5e:2x2", "--steps=train", "--config.model.channels=(1048576,)",
         f"--config.train.batch_size={4 * 64}", f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in p.stderr
    line = errors[0]
    assert "train/train_step does not fit on v5e:2x2" in line
    assert "of 16.00 GiB at 64 per chip (train.batch_size)" in line
    best = int(line.rsplit(":", 1)[1])
    assert 0 < best < 64
    import json
    rep = json.loads(out.read_text())
    assert rep["steps"][0]["max_batch_per_chip"] == best and not rep["steps"][0]["fits"]


def test_shape_specs_match_what_the_pipeline_and_distillation_build():
    """The abstract batches the check compiles with are the real ones' layouts."""
    import types

    import numpy as np

    from ezsd_jax.data.pipeline import BATCH_KEYS, batch_spec
    from ezsd_jax.data import splits
    from ezsd_jax.ezsd import distill

    class NoStore:
        def get(self, image_id):
            raise KeyError(image_id)

    fn = distill.make_extra_fn(NoStore(), embed_dim=16, proposal_slots=5, max_gt=3,
                               on_missing="empty")
    got = fn(types.SimpleNamespace(image_id=1, path="x.jpg"), {})
    spec = distill.distill_spec(embed_dim=16, proposal_slots=5, max_gt=3)
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == spec
    full = batch_spec(4, (64, 96), 7, mask_size=28, extra_spec=spec)
    assert set(full) == set(BATCH_KEYS) | set(spec)
    assert full["image"] == ((4, 64, 96, 3), np.uint8)
    assert full["gt_masks"] == ((4, 7, 28, 28), np.uint8)
    assert full["distill_emb"] == ((4, 8, 16), np.dtype(np.float16))
    assert splits.split_sizes(_config("coco").ezsd) == (48, 65, 80)
    assert splits.split_sizes(_config("lvis").ezsd) == (866, 1203, 1203)


@needs_libtpu
def test_model_axis_lowers_per_chip_memory_with_the_expected_collectives():
    """The toy stage's MLP, Megatron-style over 'model' (first kernel split on its outputs,
    second on its inputs), against model=1 at the same data-parallel width: the state and
    the step's total per chip shrink, the partial sums are all-reduced, and no weight is
    all-gathered whole."""
    big = {"toy.hidden": 1024, "toy.in_dim": 1024}
    one, _ = _check(_config("toy", **big), "v5e:2x2", "toy")
    rules = (("Dense_0/kernel", (None, "model")), ("Dense_1/kernel", ("model", None)))
    two, _ = _check(_config("toy", **big, **{"mesh.model": 2, "toy.sharding_rules": rules}),
                    "v5e:2x4", "toy")
    one, two = one[0], two[0]
    assert one["mesh"] == {"data": 4, "model": 1} and two["mesh"] == {"data": 4, "model": 2}
    assert one["batch_per_chip"] == two["batch_per_chip"]
    assert two["argument_bytes"] < 0.7 * one["argument_bytes"]
    assert two["total_bytes"] < 0.7 * one["total_bytes"]
    assert two["collectives"]["all-reduce"]["count"] > one["collectives"]["all-reduce"]["count"]
    weight = 1024 * 1024 * 4
    assert all(v["bytes"] < weight for k, v in two["collectives"].items() if k == "all-gather")
    assert two["donation_honoured"] is True


@needs_libtpu
@pytest.mark.parametrize("name", ["demo_ci", "isal_det_synthetic"])
def test_every_step_of_the_small_configs_lowers_for_tpu(name):
    """Each stage's step (CLIP renorm and proposals, EZSD train and eval; ISAL detection's
    train step, pseudo labelling, gradient, HVP and scores) traces and lowers for the
    slice at the config's shapes (compiling them all is the real-size benchmark's job)."""
    from ezsd_jax.core.aot import program
    from ezsd_jax.aot.registry import step_specs
    from ezsd_jax.core import sharding
    cfg = _config(name)
    mesh = sharding.make_mesh(cfg.mesh, devices=topology.get_slice("v5e:2x2").devices)
    specs = step_specs(cfg, mesh)
    want = {"demo_ci": {"renorm/train_step", "proposals/propose", "ezsd_train/train_step",
                        "ezsd_eval/infer"},
            "isal_det_synthetic": {"train/train_step", "select/label_pool", "select/ref_grad",
                                   "select/hvp", "select/score"}}[name]
    assert {f"{s.stage}/{s.step}" for s in specs} == want
    for s in specs:
        p = s.build(program.one_chip_mesh(mesh) if s.per_process else mesh, s.batch_per_chip)
        assert "stablehlo" in p.fn.lower(*p.args).as_text()[:100000]
