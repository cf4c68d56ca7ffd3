"""Device mesh, shardings and host->global batch conversion: the one way to place data.

Every jitted step in the project gets its in/out shardings from here (`make_mesh`,
`host_to_global`, `param_shardings`); multi-host runs call `maybe_initialize_distributed`
first. Usage pattern: docs/code-notes.md.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ezsd_jax.core.tree_paths import path_str

DATA_AXIS = "data"
MODEL_AXIS = "model"

_initialized = False


def maybe_initialize_distributed(enabled: bool | None = None, **kwargs) -> bool:
    """Calls `jax.distributed.initialize()` when asked (flag or EZSD_DISTRIBUTED=1).

    kwargs (coordinator_address, num_processes, process_id) are passed through; on TPU
    pods and SLURM/GPU clusters jax discovers them itself. Must run before any other jax
    call touches devices. Returns whether the runtime is (now) distributed.
    """
    global _initialized
    if enabled is None:
        enabled = os.environ.get("EZSD_DISTRIBUTED", "0") == "1"
    if not enabled or _initialized:
        return _initialized
    kwargs = {k: v for k, v in kwargs.items() if v not in (None, "", -1)}
    jax.distributed.initialize(**kwargs)
    _initialized = True
    logging.info("jax.distributed initialized: process %d/%d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True


def mesh_shape(data: int = -1, model: int = 1, num_devices: int | None = None) -> tuple[int, int]:
    """Resolves (data, model) sizes; one of them may be -1 (inferred from device count)."""
    n = jax.device_count() if num_devices is None else num_devices
    if data == -1 and model == -1:
        raise ValueError("mesh: at most one of mesh.data / mesh.model may be -1")
    if data == -1:
        if n % model:
            raise ValueError(f"mesh: {n} devices are not divisible by mesh.model={model}")
        data = n // model
    elif model == -1:
        if n % data:
            raise ValueError(f"mesh: {n} devices are not divisible by mesh.data={data}")
        model = n // data
    if data * model != n:
        raise ValueError(f"mesh: data={data} x model={model} != {n} devices")
    return data, model


def make_mesh(cfg: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ('data', 'model') mesh from a config with fields `data`, `model`.

    `cfg` may be None (all devices on 'data'), a ConfigDict/dict, or a (data, model) tuple.
    """
    if cfg is None:
        data, model = -1, 1
    elif isinstance(cfg, (tuple, list)):
        data, model = cfg
    else:
        get = cfg.get if hasattr(cfg, "get") else (lambda k, d: getattr(cfg, k, d))
        data, model = get("data", -1), get("model", 1)
    if devices is None:
        shape = mesh_shape(data, model)
        return jax.make_mesh(shape, (DATA_AXIS, MODEL_AXIS),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    shape = mesh_shape(data, model, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), (DATA_AXIS, MODEL_AXIS),
                axis_types=(jax.sharding.AxisType.Auto,) * 2)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data', everything else replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def param_shardings(mesh: Mesh, tree: Any, rules: Iterable[tuple[str, P]] = ()) -> Any:
    """Shardings for a parameter/state tree: first regex rule matching the '/'-joined path
    wins, everything else replicated. A rule whose spec does not fit the leaf's rank or
    whose sharded dims do not divide is an error (no silent fallback)."""
    rules = [(re.compile(r), spec) for r, spec in rules]

    def one(path, leaf):
        name = path_str(path)
        for rx, spec in rules:
            if rx.search(name):
                shape = np.shape(leaf)
                if len(spec) > len(shape):
                    raise ValueError(f"sharding rule {rx.pattern!r} -> {spec} does not fit "
                                     f"{name} of shape {shape}")
                for dim, axis in zip(shape, spec):
                    if axis is not None and dim % mesh.shape[axis]:
                        raise ValueError(f"sharding rule {rx.pattern!r}: dim {dim} of {name} "
                                         f"not divisible by mesh axis {axis}={mesh.shape[axis]}")
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, tree)


def process_slice(num_items: int, process_index: int | None = None,
                  process_count: int | None = None) -> slice:
    """The contiguous part of a dataset of `num_items` that this process reads."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    per = -(-num_items // pc)
    return slice(min(pi * per, num_items), min((pi + 1) * per, num_items))


def host_to_global(batch: Any, mesh: Mesh, sharding: NamedSharding | None = None) -> Any:
    """Per-process host batch (numpy tree, leading axis = local batch) -> global jax.Arrays
    split on 'data'. The global batch is process_count x the local one."""
    sharding = data_sharding(mesh) if sharding is None else sharding
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    n = mesh.shape[DATA_AXIS]
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} is not divisible by the mesh's data "
                         f"axis ({n} devices); change the batch size or mesh.data")
    if global_batch % jax.process_count():
        raise ValueError(f"global batch {global_batch} not divisible by "
                         f"{jax.process_count()} processes")


def to_host(tree: Any) -> Any:
    """Fully-replicated or fully-addressable arrays -> numpy (eval/metrics, not hot loop)."""
    if jax.process_count() > 1:
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree_util.tree_map(np.asarray, tree)
