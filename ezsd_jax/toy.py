"""Toy stage: the smallest end-to-end job, exercising the shared infrastructure.

A small MLP learns a fixed random teacher function, data-parallel over the mesh's 'data'
axis with the first layer's kernel split over 'model' (rule-based sharding), through the
project's one training loop (checkpoints, resume, metrics, progress). The foundation tests
run it (configs/toy.py) for the sharded-step and kill/resume checks.
"""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from ezsd_jax.core import sharding, train_loop
from ezsd_jax.core.io_utils import atomic_write_json


class MLP(nn.Module):
    hidden: int = 64
    out: int = 4

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.out)(x)


def batch_at(step: int, cfg: ml_collections.ConfigDict, process_index: int = 0,
             process_count: int = 1) -> dict:
    """Deterministic per (seed, step): the batch a resumed run sees equals the original's."""
    rng = np.random.default_rng([cfg.seed, step])
    x = rng.normal(size=(cfg.batch_size, cfg.in_dim)).astype(np.float32)
    teacher = np.random.default_rng([cfg.seed, 10**9]).normal(
        size=(cfg.in_dim, cfg.out_dim)).astype(np.float32)
    y = np.sin(x @ teacher)
    per = cfg.batch_size // process_count
    sl = slice(process_index * per, (process_index + 1) * per)
    return {"x": x[sl], "y": y[sl]}


def make_rules(cfg) -> list:
    return [(r, P(*spec)) for r, spec in cfg.sharding_rules]


def state_layout(cfg, mesh):
    """-> (model, tx, init(key) -> state, abstract state, state shardings); nothing is
    allocated (the deviceless AOT check compiles the step from the abstract state)."""
    model = MLP(cfg.hidden, cfg.out_dim)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(cfg.lr, weight_decay=1e-4))

    def init(key):
        params = model.init(key, jnp.zeros((1, cfg.in_dim)))["params"]
        return {"params": params, "opt_state": tx.init(params)}

    abstract = jax.eval_shape(init, jax.random.key(cfg.seed))
    return model, tx, init, abstract, sharding.param_shardings(mesh, abstract, make_rules(cfg))


def init_state(cfg, mesh):
    model, tx, init, _, state_sh = state_layout(cfg, mesh)
    state = jax.jit(init, out_shardings=state_sh)(jax.random.key(cfg.seed))
    return model, tx, state, state_sh


def make_step(model, tx, mesh, state_sh):
    def step(state, batch):
        def loss_fn(params):
            pred = model.apply({"params": params}, batch["x"])
            return jnp.mean((pred - batch["y"]) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state}, {"loss": loss}

    return jax.jit(step, in_shardings=(state_sh, sharding.data_sharding(mesh)),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    tcfg = cfg.toy
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch_divisible(tcfg.batch_size, mesh)
    model, tx, state, state_sh = init_state(tcfg, mesh)
    step_fn = make_step(model, tx, mesh, state_sh)
    pi, pc = jax.process_index(), jax.process_count()

    def batches(start):
        s = start
        while True:
            yield batch_at(s, tcfg, pi, pc)
            s += 1

    state, rows = train_loop.fit(
        state=state, step_fn=step_fn, batches=batches, num_steps=tcfg.steps, workdir=workdir,
        name="toy", mesh=mesh, ckpt_every=tcfg.ckpt_every, log_every=tcfg.log_every,
        items_per_step=tcfg.batch_size, unit="sample")
    flat = np.concatenate([np.asarray(x).ravel() for x in
                           jax.tree_util.tree_leaves(sharding.to_host(state["params"]))])
    result = {"final_loss": rows[-1]["loss"] if rows else None,
              "param_checksum": float(np.sum(flat.astype(np.float64))),
              "steps": tcfg.steps}
    atomic_write_json(os.path.join(workdir, "toy_result.json"), result)
    print(json.dumps(result), flush=True)  # the stage's result line
    return result
