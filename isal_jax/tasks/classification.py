"""Classification task adapter: per-sample losses, pseudo labels, predictions, tiny training.

Place in the pipeline: wraps a linen classifier (isal_jax/models.py) into what the
influence engine and the strategies need:

  task = ClassificationTask(model)
  loss_fn = task.loss_fn(model_state)          # (params, batch) -> [B], BN inference mode
  pseudo = task.pseudo_label_fn(model_state)   # (params, batch) -> batch with targets
  fused = task.self_labeled_loss_fn(model_state)  # pseudo label + loss in ONE forward
  probs, feats = task.predict(params, model_state, batches)   # baselines

Batches are dicts {'image' [B,H,W,C], 'label' [B] int, 'mask' [B] bool, ...}; with
pseudo_label='expected' the targets are 'soft_label' [B, C] (softmax renormalized over the
top-k classes): the loss is then sum_c w_c * CE(c), which is linear in w, so its gradient
is the expected gradient sum_c w_c grad CE(c).
model_state is {'batch_stats': ...} ({} for models without BatchNorm); checkpoints hold
{'params': ..., 'batch_stats': ...}.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from isal_jax.scoring import TrainedModel


@dataclasses.dataclass(frozen=True, eq=False)
class ClassificationTask:
    model: nn.Module
    pseudo_label: str = "argmax"      # 'argmax' | 'expected'
    topk: int = 3                     # classes in the expected gradient

    def __post_init__(self):
        if self.pseudo_label not in ("argmax", "expected"):
            raise ValueError(f"pseudo_label must be 'argmax' or 'expected', got "
                             f"{self.pseudo_label!r}")
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")

    # ------------------------------------------------------------------ model
    def init(self, key, input_shape) -> dict:
        """{'params': ..., 'batch_stats': ...} for a [1, *input_shape] input."""
        variables = self.model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
        return {"params": variables["params"],
                "batch_stats": variables.get("batch_stats", {})}

    @staticmethod
    def model_state(state: dict) -> dict:
        bs = state.get("batch_stats", {})
        return {"batch_stats": bs} if bs else {}

    def logits(self, params, model_state, images, return_features: bool = False):
        return self.model.apply({"params": params, **model_state}, images, train=False,
                                return_features=return_features)

    # ------------------------------------------------------------------ losses
    @staticmethod
    def _ce(logits, batch):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        if "soft_label" in batch:
            return -jnp.sum(batch["soft_label"] * logp, axis=-1)
        return -jnp.take_along_axis(logp, batch["label"][:, None].astype(jnp.int32), -1)[:, 0]

    def loss(self, params, model_state, batch) -> jax.Array:
        """Per-sample cross-entropy [B] (BN in inference mode)."""
        return self._ce(self.logits(params, model_state, batch["image"]), batch)

    def _loss_with_state(self, model_state, params, batch) -> jax.Array:
        return self.loss(params, model_state, batch)

    def loss_fn(self, model_state):
        """(params, batch) -> [B]: a jax.tree_util.Partial over the model state (a pytree,
        so the influence engine compiles it once per shape, across calls and AL cycles)."""
        return jax.tree_util.Partial(self._loss_with_state, model_state)

    def targets_from_logits(self, logits, batch) -> dict:
        batch = dict(batch)
        logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
        if self.pseudo_label == "argmax":
            batch["label"] = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            p = jax.nn.softmax(logits, axis=-1)
            k = min(self.topk, p.shape[-1])
            kth = jax.lax.top_k(p, k)[0][:, -1:]
            w = jnp.where(p >= kth, p, 0.0)
            batch["soft_label"] = w / jnp.sum(w, axis=-1, keepdims=True)
        return batch

    def _pseudo_label_with_state(self, model_state, params, batch) -> dict:
        return self.targets_from_logits(self.logits(params, model_state, batch["image"]), batch)

    def pseudo_label_fn(self, model_state):
        """(params, batch) -> batch with pseudo targets from the current model (a Partial,
        like loss_fn)."""
        return jax.tree_util.Partial(self._pseudo_label_with_state, model_state)

    def self_labeled_loss_fn(self, model_state, with_class: bool = False):
        """Fused pseudo-label loss: one forward gives the logits, the targets are taken from
        them under stop_gradient, so d loss = d CE at fixed targets (argmax is piecewise
        constant; the soft weights are stopped). Same scores as pseudo_label_fn + loss_fn.
        A Partial over the model state, like loss_fn. with_class: returns (losses, argmax
        class) -- the pseudo class for diversity='class_balanced' from the same pass."""
        fn = self._self_labeled_class_with_state if with_class else self._self_labeled_with_state
        return jax.tree_util.Partial(fn, model_state)

    def _self_labeled_with_state(self, model_state, params, batch) -> jax.Array:
        return self._self_labeled_class_with_state(model_state, params, batch)[0]

    def _self_labeled_class_with_state(self, model_state, params, batch):
        logits = self.logits(params, model_state, batch["image"])
        cls = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1).astype(jnp.int32))
        return self._ce(logits, self.targets_from_logits(logits, batch)), cls

    # ------------------------------------------------------------------ predictions
    def predict(self, params, model_state,
                batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Softmax probabilities [N, C] and penultimate features [N, D] of the valid rows."""
        @jax.jit
        def f(params, images):
            logits, feats = self.logits(params, model_state, images, return_features=True)
            return jax.nn.softmax(logits, axis=-1), feats
        probs, feats = [], []
        for b in batches:
            p, q = f(params, b["image"])
            m = np.asarray(b["mask"], bool)
            probs.append(np.asarray(p)[m])
            feats.append(np.asarray(q)[m])
        return np.concatenate(probs), np.concatenate(feats)


# ----------------------------------------------------------------------------- ISAL scoring

@dataclasses.dataclass(eq=False)
class ClassificationInfluence(TrainedModel):
    """The classifier's side of the one ISAL scoring path (isal_jax.scoring.InfluenceTask)
    over a ClassificationTask, its state and the pool's ClassificationData. fused: pseudo
    label + loss in one forward pass; need_groups: also predict the pool's argmax classes
    (diversity='class_balanced')."""
    fused: bool = True
    need_groups: bool = False
    mesh: object = None

    def labeled_batches(self, data, ids, batch_size: int, what: str) -> Iterator[dict]:
        for b in data.batches(ids, batch_size, what):
            yield {k: v for k, v in b.items() if k != "id"}

    def score_pool(self, subset, s_test, ids, batch_size: int):
        from isal_jax import influence as infl
        ms = self.model_state
        batches = self.labeled_batches(self.data, ids, batch_size, "pool")
        groups = np.zeros(len(ids), np.int64)
        if self.fused:      # scores and (need_groups) the pseudo class in ONE pool pass
            loss = self.task.self_labeled_loss_fn(ms, with_class=self.need_groups)
            score_fn = infl.make_score_fn(loss, subset, mesh=self.mesh,
                                          has_aux=self.need_groups)
            out = infl.pool_scores(loss, self.params, subset, s_test, batches,
                                   mesh=self.mesh, score_fn=score_fn)
            sc, groups = out if self.need_groups else (out, groups)
            return sc, np.ones(len(ids), bool), np.asarray(groups, np.int64)
        loss, plabel = self.task.loss_fn(ms), self.task.pseudo_label_fn(ms)
        sc = infl.pool_scores(loss, self.params, subset, s_test, batches, plabel,
                              mesh=self.mesh)
        if self.need_groups:
            probs, _ = self.task.predict(self.params, ms,
                                         self.data.batches(ids, batch_size, "pool"))
            groups = np.argmax(probs, 1).astype(np.int64)
        return sc, np.ones(len(ids), bool), groups


# ----------------------------------------------------------------------------- training

def train_tiny_classifier(task: ClassificationTask, images: np.ndarray, labels: np.ndarray, *,
                          steps: int = 200, batch_size: int = 64, lr: float = 3e-3,
                          seed: int = 0) -> dict:
    """A few Adam steps of cross-entropy (BN in train mode) -> {'params', 'batch_stats'}.
    For demos and tests only (the AL loop has the real training)."""
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    if len(images) == 0:
        raise ValueError("train_tiny_classifier: no training samples")
    state = task.init(jax.random.PRNGKey(seed), images.shape[1:])
    tx = optax.adam(lr)
    opt = tx.init(state["params"])
    has_bs = bool(state["batch_stats"])

    @jax.jit
    def step(params, bstats, opt, x, y):
        def loss(p):
            variables = {"params": p, **({"batch_stats": bstats} if has_bs else {})}
            if has_bs:
                logits, upd = task.model.apply(variables, x, train=True, mutable=["batch_stats"])
            else:
                logits, upd = task.model.apply(variables, x, train=True), {}
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce, upd
        (l, upd), g = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), upd.get("batch_stats", bstats), opt, l

    rng = np.random.default_rng(seed)
    params, bstats = state["params"], state["batch_stats"]
    bs = min(batch_size, len(images))
    for _ in range(steps):
        idx = rng.choice(len(images), bs, replace=False)
        params, bstats, opt, _ = step(params, bstats, opt, images[idx], labels[idx])
    return {"params": params, "batch_stats": bstats}


def save_classifier_checkpoint(directory: str, state: dict, step: int = 0) -> None:
    """Writes {'params', 'batch_stats'} with ezsd_jax.core.checkpoint.Checkpointer (orbax)."""
    from ezsd_jax.core.checkpoint import Checkpointer
    ckpt = Checkpointer(directory, keep=1)
    ckpt.save(step, {"params": state["params"], "batch_stats": state.get("batch_stats", {})},
              force=True)
    ckpt.close()
