"""Classification task for the active-learning loop (CIFAR-10 protocol; digits for CPU).

Place in the pipeline: config -> THIS (an isal_jax.loop.ActiveLearningTask) ->
isal_jax.loop.run_experiment. Per cycle:

  train     from scratch on the labeled ids through ezsd_jax.core.train_loop.fit (checkpoints in
            <cycle dir>/ckpt_train, metrics in <cycle dir>/metrics/train.csv, resumable):
            SGD + momentum, L2 weight decay on every parameter (PyTorch-style, added to
            the gradient), lr x gamma at `decay_fractions` of the run, BatchNorm in train
            mode, random flip / pad-and-crop augmentation drawn per (seed, step), data
            parallel over the mesh's 'data' axis. Steps = ceil(epochs * n / batch_size)
            (at least min_steps), or train.steps when > 0. The sample order is a stream
            of seeded per-epoch permutations, so step k's batch is a function of
            (seed, k): a resumed run sees the same batches as an uninterrupted one.
  evaluate  accuracy and mean cross-entropy on the eval split (BN in inference mode).
  select    isal_jax.select.run_strategy: the same code as the standalone selection step
            (baselines from softmax / penultimate features; ISAL = reference gradient,
            LiSSA s_test, JVP pool scores in resumable shards under <cycle dir>/isal_scores).
            With reference.source='heldout' (our addition), ISAL scores the pool with a
            second model, trained the same way on the labeled ids minus a seeded held-out
            part (selection_io.heldout_split, drawn per cycle seed) into <cycle
            dir>/selection_model; v sums that part's gradients. Held out rather than
            cross-fitted: one extra training per cycle instead of K; the evaluated model
            keeps every label, so the strategies stay paired (cycle 0 is the same model)
            and the held-out labels are not lost to the model the user keeps. The ids go
            to <cycle dir>/lissa.json ('heldout_ids').

CIFAR-10 needs prepared tfds files (isal_jax.data.CIFAR10_HOWTO); digits is offline.
"""
from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ezsd_jax.core import sharding, train_loop
from ezsd_jax.core.optim import sgd, warmup_step_schedule


def _no_ids(batches):
    for b in batches:
        yield {k: v for k, v in b.items() if k != "id"}


def augment(images: np.ndarray, rng: np.random.Generator, mode: str, pad: int) -> np.ndarray:
    """Random horizontal flip (mode 'flip_crop') and random pad-`pad` crop ('flip_crop',
    'crop'); zero padding in the normalized space (= the mean colour). NHWC numpy."""
    if mode == "none":
        return images
    if mode not in ("flip_crop", "crop", "flip"):
        raise ValueError(f"config.train.augment={mode!r} is not one of flip_crop, crop, flip, "
                         "none")
    x = images
    b, h, w = x.shape[:3]
    if mode in ("flip_crop", "flip"):
        flip = rng.random(b) < 0.5
        x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
    if mode in ("flip_crop", "crop") and pad > 0:
        xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        oy = rng.integers(0, 2 * pad + 1, b)
        ox = rng.integers(0, 2 * pad + 1, b)
        x = np.stack([xp[i, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(b)])
    return x


def make_train_step(model, t, mesh, decays: list[int]):
    """-> (jitted train step (state, batch) -> (state, metrics), optimizer) of config.train
    `t` with lr decays at `decays`: SGD, BN in train mode, state replicated and donated,
    batch {'image', 'label'} split on 'data'."""
    schedule = warmup_step_schedule(float(t.lr), int(t.warmup_steps), decays,
                                    gamma=float(t.gamma), warmup_factor=0.1)
    tx = sgd(schedule, momentum=float(t.momentum), weight_decay=float(t.weight_decay))

    def step(state, batch):
        def loss_fn(params):
            variables = {"params": params}
            if state["batch_stats"]:
                variables["batch_stats"] = state["batch_stats"]
                logits, upd = model.apply(variables, batch["image"], train=True,
                                          mutable=["batch_stats"])
            else:
                logits, upd = model.apply(variables, batch["image"], train=True), {}
            ce = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), batch["label"]).mean()
            return ce, (logits, upd)
        (loss, (logits, upd)), g = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"])
        updates, opt = tx.update(g, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        count = optax.tree_utils.tree_get(opt, "count")
        new = {"params": params, "batch_stats": upd.get("batch_stats",
                                                          state["batch_stats"]),
               "opt_state": opt}
        return new, {"loss": loss, "train_accuracy": acc, "lr": schedule(count - 1)}

    rep = sharding.replicated(mesh)
    fn = jax.jit(step, in_shardings=(rep, sharding.data_sharding(mesh)),
                 out_shardings=(rep, rep), donate_argnums=(0,))
    return fn, tx


class ClassificationALTask:
    """ActiveLearningTask for image classification. `cfg`: the whole experiment config
    (configs/isal_cifar10.py): data, model, train, influence, reference, mesh."""

    primary_metric = "accuracy"

    def __init__(self, cfg: ml_collections.ConfigDict):
        from isal_jax import select as sel
        from isal_jax import selection_io as sio
        from isal_jax.data import load_dataset, loader_options
        from isal_jax.strategies import STRATEGIES
        from isal_jax.tasks import ClassificationTask

        self.cfg = cfg
        self.known_strategies = tuple(STRATEGIES)
        sel.validate_influence(cfg)
        d = cfg.data
        try:
            opts = loader_options(d)
            self.data = load_dataset(d.dataset, d.pool_split, d.data_dir or None, opts)
            self.eval_data = load_dataset(d.dataset, d.eval_split, d.data_dir or None, opts)
        except (ValueError, FileNotFoundError) as e:
            raise sio.SelectError(f"config.data: {e}") from e
        if self.data.num_classes != cfg.model.num_classes:
            raise sio.SelectError(f"config.model.num_classes={cfg.model.num_classes} but "
                                  f"{self.data.name} has {self.data.num_classes} classes")
        if d.pool_ids_file:
            ids = sio.read_id_list(d.pool_ids_file, "config.data.pool_ids_file")
            try:
                self.data.positions(ids, what=f"config.data.pool_ids_file {d.pool_ids_file!r}")
            except ValueError as e:
                raise sio.SelectError(str(e)) from e
            self._pool = np.sort(ids)
        else:
            self._pool = np.asarray(self.data.ids, np.int64)
        self.model = sel.model_from_config(cfg)
        self.task = ClassificationTask(self.model, pseudo_label=cfg.influence.pseudo_label,
                                       topk=cfg.influence.topk)
        self.mesh = sharding.make_mesh(cfg.mesh)
        t = cfg.train
        try:
            sharding.check_batch_divisible(int(t.batch_size), self.mesh)
        except ValueError as e:
            raise sio.SelectError(f"config.train.batch_size: {e}") from e
        augment(np.zeros((1, *self.data.image_shape), np.float32),
                np.random.default_rng(0), t.augment, int(t.crop_pad))   # validates the mode
        self._steps_cache: dict = {}
        self._eval_fn = None

    # ----------------------------------------------------------------- protocol
    def pool_ids(self) -> np.ndarray:
        return self._pool

    def num_steps(self, n: int) -> tuple[int, list[int]]:
        """(total steps, lr decay steps) for a labeled set of n samples."""
        t = self.cfg.train
        if int(t.steps) > 0:
            total = int(t.steps)
        else:
            total = max(int(math.ceil(float(t.epochs) * n / int(t.batch_size))),
                        int(t.min_steps))
        return total, [int(round(f * total)) for f in t.decay_fractions]

    def _init_state(self, seed: int, tx):
        state = self.task.init(jax.random.PRNGKey(seed), self.data.image_shape)
        state["opt_state"] = tx.init(state["params"])
        return jax.device_put(state, sharding.replicated(self.mesh))

    def _step_fn(self, total: int, decays: list[int]):
        key = (total, tuple(decays))
        if key in self._steps_cache:
            return self._steps_cache[key]
        fn, tx = make_train_step(self.model, self.cfg.train, self.mesh, decays)
        self._steps_cache[key] = (fn, tx)
        return fn, tx

    def _batches(self, images: np.ndarray, labels: np.ndarray, seed: int):
        t = self.cfg.train
        bs, n = int(t.batch_size), len(images)
        perms: dict[int, np.ndarray] = {}

        def perm(e):
            if e not in perms:
                if len(perms) > 4:
                    perms.clear()
                perms[e] = np.random.default_rng([seed, e]).permutation(n)
            return perms[e]

        def gen(start):
            k = start
            while True:
                p = np.arange(k * bs, (k + 1) * bs)
                idx = np.array([perm(int(q // n))[int(q % n)] for q in p])
                rng = np.random.default_rng([seed, k, 7])
                x = augment(images[idx], rng, t.augment, int(t.crop_pad))
                yield {"image": x.astype(np.float32), "label": labels[idx]}
                k += 1
        return gen

    def train(self, labeled_ids: np.ndarray, seed: int, workdir: str) -> Any:
        t = self.cfg.train
        b = self.data.get(np.asarray(labeled_ids, np.int64), what="labeled ids")
        total, decays = self.num_steps(len(labeled_ids))
        step_fn, tx = self._step_fn(total, decays)
        state, _ = train_loop.fit(
            state=self._init_state(seed, tx), step_fn=step_fn,
            batches=self._batches(b["image"], b["label"], seed), num_steps=total,
            workdir=workdir, name="train", mesh=self.mesh, ckpt_every=int(t.ckpt_every),
            keep=int(t.keep_checkpoints), log_every=int(t.log_every),
            items_per_step=int(t.batch_size), unit="img")
        host = sharding.to_host({"params": state["params"], "batch_stats": state["batch_stats"]})
        host["checkpoint"] = (os.path.join(os.path.abspath(workdir), "ckpt_train"), total)
        return host

    def evaluate(self, state: Any, workdir: str) -> dict[str, float]:
        if self._eval_fn is None:
            model = self.model

            @jax.jit
            def f(params, batch_stats, batch):
                variables = {"params": params, **({"batch_stats": batch_stats}
                                                  if batch_stats else {})}
                logits = model.apply(variables, batch["image"], train=False).astype(
                    jnp.float32)
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
                m = batch["mask"].astype(jnp.float32)
                correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
                return jnp.sum(correct * m), jnp.sum(ce * m)
            self._eval_fn = f
        bs = int(self.cfg.train.eval_batch_size)
        correct = loss = 0.0
        for batch in _no_ids(self.eval_data.batches(self.eval_data.ids, bs)):
            c, ls = self._eval_fn(state["params"], state["batch_stats"], batch)
            correct += float(c)
            loss += float(ls)
        n = len(self.eval_data)
        return {"accuracy": correct / n, "loss": loss / n}

    def select(self, strategy: str, state: Any, labeled_ids: np.ndarray,
               unlabeled_ids: np.ndarray, budget: int, seed: int,
               workdir: str) -> tuple[np.ndarray, np.ndarray]:
        from isal_jax import select as sel
        from isal_jax import selection_io as sio
        c = self.cfg
        scfg = ml_collections.ConfigDict({
            "strategy": strategy, "budget": int(budget), "seed": int(seed),
            "allow_degenerate": bool(c.get("allow_degenerate", False)),
            "pool": {"dataset": c.data.dataset, "data_dir": c.data.data_dir,
                     "loader": c.data.get("loader", {})},
            "model": c.model.to_dict(), "influence": c.influence.to_dict(),
            "reference": c.reference.to_dict(), "mesh": c.mesh.to_dict()})
        labeled_ids = np.asarray(labeled_ids, np.int64)
        held = None
        if strategy == "isal" and sio.reference_source(c.reference)[0] == "heldout":
            # The selection model: trained like the cycle's model (same seed and recipe) on
            # the labeled ids minus a seeded held-out part, whose gradient is v. The
            # evaluated model (`state`) keeps every label.
            labeled_ids, held = sio.heldout_split(labeled_ids, seed, c.reference)
            state = self.train(labeled_ids, seed, os.path.join(workdir, "selection_model"))
        selection, info, _ = sel.run_strategy(
            scfg, workdir, self.task, {"params": state["params"],
                                       "batch_stats": state["batch_stats"]},
            self.data, labeled_ids, np.asarray(unlabeled_ids, np.int64),
            checkpoint=state["checkpoint"], reference_ids=held)
        if info:
            from ezsd_jax.core.io_utils import atomic_write_json
            if held is not None:
                info = {**info, "reference": "heldout", "heldout_ids": [int(i) for i in held],
                        "num_selection_model_train": int(len(labeled_ids))}
            atomic_write_json(os.path.join(workdir, "lissa.json"),
                              {k: v for k, v in info.items() if k != "norm_trace"})
        return selection.ids, selection.scores


def build_task(cfg: ml_collections.ConfigDict, workdir: str) -> ClassificationALTask:
    return ClassificationALTask(cfg)
