"""Mesh and sharding infrastructure: sharded train step == single-device step."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import toy as toy_config
from ezsd_jax.core import sharding
from ezsd_jax import toy

pytestmark = pytest.mark.multidevice


def _run_steps(cfg, mesh, n):
    model, tx, state, state_sh = toy.init_state(cfg, mesh)
    step = toy.make_step(model, tx, mesh, state_sh)
    losses = []
    for s in range(n):
        batch = sharding.host_to_global(toy.batch_at(s, cfg), mesh)
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return losses, sharding.to_host(state["params"]), state


def test_eight_fake_devices():
    assert jax.device_count() == 8


def test_mesh_shape_inference():
    assert sharding.mesh_shape(-1, 2, 8) == (4, 2)
    assert sharding.mesh_shape(2, -1, 8) == (2, 4)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.mesh_shape(-1, 3, 8)
    with pytest.raises(ValueError, match="!="):
        sharding.mesh_shape(2, 2, 8)
    mesh = sharding.make_mesh({"data": -1, "model": 2})
    assert dict(mesh.shape) == {"data": 4, "model": 2}


def test_sharded_step_equals_single_device():
    cfg = toy_config.get_config().toy
    mesh2d = sharding.make_mesh((4, 2))
    mesh1 = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    l8, p8, state8 = _run_steps(cfg, mesh2d, 5)
    l1, p1, _ = _run_steps(cfg, mesh1, 5)
    # The rule really split the first kernel over 'model' and the batch over 'data'.
    k = state8["params"]["Dense_0"]["kernel"]
    assert k.sharding.spec == P(None, "model")
    assert len(k.addressable_shards) == 8 and k.addressable_shards[0].data.shape[1] == 32
    np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(p8), jax.tree_util.tree_leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert l8[-1] < l8[0]  # it trains


def test_host_to_global_splits_batch():
    mesh = sharding.make_mesh((8, 1))
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    g = sharding.host_to_global({"x": x}, mesh)["x"]
    assert g.shape == (16, 3)
    assert {s.data.shape for s in g.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(g), x)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.check_batch_divisible(12, mesh)


def test_param_rule_errors():
    mesh = sharding.make_mesh((4, 2))
    tree = {"a": {"kernel": np.zeros((3, 5))}}
    with pytest.raises(ValueError, match="not divisible"):
        sharding.param_shardings(mesh, tree, [("kernel", P(None, "model"))])
    with pytest.raises(ValueError, match="does not fit"):
        sharding.param_shardings(mesh, tree, [("kernel", P(None, None, "model"))])
    sh = sharding.param_shardings(mesh, tree, [("nomatch", P("model"))])
    assert sh["a"]["kernel"].spec == P()


def test_process_slice_covers_all():
    parts = [sharding.process_slice(10, i, 3) for i in range(3)]
    covered = sum((list(range(10))[s] for s in parts), [])
    assert covered == list(range(10))
