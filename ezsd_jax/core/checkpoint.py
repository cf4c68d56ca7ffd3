"""Checkpoints: the one wrapper around orbax's CheckpointManager used by every stage.

  ckpt = Checkpointer(workdir + "/ckpt", save_every=1000, keep=3)
  state, step = ckpt.restore_or(state)        # latest checkpoint onto state's shardings
  for step ...:
      ckpt.maybe_save(step, state)            # every `save_every` steps
  ckpt.save(final_step, state, force=True); ckpt.close()

Orbax writes each step into a temporary directory and renames it when complete, so a
process killed mid-save leaves the previous checkpoint intact; the half-written one is
never listed as a step (and is cleaned up on the next start of the writer).

Readers (predict, export, evaluation) open it with `read_only=True`: nothing is created,
cleaned or written, so a reader never deletes the temporary directory of a run still
training in the same workdir, and a read-only directory loads.
"""
from __future__ import annotations

import logging
import os
import weakref
from typing import Any

import jax
import orbax.checkpoint as ocp

from ezsd_jax.core import quiet_logs
from ezsd_jax.core.tree_paths import path_names


class CheckpointError(RuntimeError):
    pass


_open: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


def close_all() -> None:
    """Waits for and closes every Checkpointer still open (the error path of the entry
    points, so that no orbax thread outlives a clean one-line error)."""
    for ck in list(_open):
        try:
            ck.close()
        except Exception as e:  # noqa: BLE001 -- already on an error path: report, go on
            logging.warning("closing checkpoint manager %s failed: %s", ck.directory, e)


def one_line_short(text: str, limit: int = 200) -> str:
    """`text` on one line, cut to `limit` characters (orbax's messages run to kilobytes)."""
    text = " ".join(t.strip() for t in str(text).splitlines() if t.strip())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for restore onto the right devices."""
    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree_util.tree_map(one, tree)


quiet_logs.install_filters()   # orbax's read-only and metadata notices (core/quiet_logs.py)


class Checkpointer:
    def __init__(self, directory: str, save_every: int = 1000, keep: int = 3,
                 async_save: bool = False, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.read_only = bool(read_only)
        self.save_every = max(int(save_every), 1)
        if self.read_only:
            if not os.path.isdir(self.directory):
                raise CheckpointError(f"no checkpoint directory {self.directory}")
            # nothing created, cleaned (a writer's in-flight <step>.orbax-checkpoint-tmp)
            # or deleted; the values orbax would otherwise override with a warning
            options = ocp.CheckpointManagerOptions(
                read_only=True, save_interval_steps=0, max_to_keep=None, create=False,
                cleanup_tmp_directories=False, enable_async_checkpointing=False)
        else:
            try:
                os.makedirs(self.directory, exist_ok=True)
            except OSError as e:
                raise CheckpointError(f"cannot create checkpoint directory "
                                      f"{self.directory}: {e}") from e
            if not os.access(self.directory, os.W_OK):
                raise CheckpointError(f"checkpoint directory {self.directory} is not writable")
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                cleanup_tmp_directories=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options)
        self._closed = False
        _open.add(self)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, force: bool = False) -> bool:
        if self.read_only:
            raise CheckpointError(f"checkpoint directory {self.directory} was opened "
                                  "read-only: not saving")
        saved = self._mngr.save(int(step), args=ocp.args.StandardSave(state), force=force)
        if saved:
            logging.info("checkpoint: saved step %d to %s", step, self.directory)
        return saved

    def maybe_save(self, step: int, state: Any) -> bool:
        if step % self.save_every:
            return False
        return self.save(step, state, force=True)

    def _item_metadata(self, step: int) -> Any:
        """The stored tree of `step` as orbax's metadata (ArrayMetadata leaves: name,
        shape, dtype), read without reading any array."""
        # the manager's single item is orbax's "default" (StandardSave)
        try:
            with ocp.StandardCheckpointer() as reader:
                md = reader.metadata(os.path.join(self.directory, str(int(step)), "default"))
        except Exception as e:  # orbax raises many types; name the file and the cause
            raise CheckpointError(f"checkpoint {self.directory}/{step}: cannot read its "
                                  f"metadata ({type(e).__name__}: {e})") from e
        return md.item_metadata

    def stored_shape(self, step: int, path: tuple[str, ...]) -> tuple[int, ...]:
        """Shape of the array at `path` (dict keys) in the checkpoint of `step`."""
        node = self._item_metadata(step)
        try:
            for k in path:
                node = node[k]
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {self.directory}/{step} has no "
                                  f"{'/'.join(path)}") from e
        return tuple(node.shape)

    def _check_shapes(self, step: int, target: Any) -> None:
        """Raises CheckpointError naming the first array whose stored shape differs from
        the target's (read from the checkpoint's metadata, before orbax starts reading:
        a failed orbax restore names no array and leaves its reads pending). Arrays the
        metadata does not name the same way are left to orbax's own check."""
        stored = {getattr(leaf, "name", None): tuple(getattr(leaf, "shape", ()))
                  for leaf in jax.tree_util.tree_leaves(self._item_metadata(step))}
        for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
            name = ".".join(path_names(path))      # orbax's spelling: params.Dense_0.kernel
            shape = tuple(getattr(leaf, "shape", ()))
            if name in stored and stored[name] != shape:
                raise CheckpointError(
                    f"checkpoint {self.directory}/{step} does not match the model/state "
                    f"being restored: {name} is {stored[name]} there, {shape} here. Fix: "
                    "use the config it was written with (the run's config.json)")

    def _first_key_mismatch(self, step: int, target: Any) -> str | None:
        """'<key> is missing there' / 'only there' for the first array name that the
        stored tree and the target do not share (sorted), or None."""
        try:
            stored = {getattr(leaf, "name", None)
                      for leaf in jax.tree_util.tree_leaves(self._item_metadata(step))}
        except CheckpointError:
            return None
        stored.discard(None)
        wanted = {".".join(path_names(p))
                  for p, _ in jax.tree_util.tree_flatten_with_path(target)[0]}
        diff = sorted(wanted ^ stored)
        if not diff:
            return None
        key = diff[0]
        return f"{key} is {'missing there' if key in wanted else 'only there'}"

    def restore(self, step: int, target: Any) -> Any:
        """Restores `step` with the structure, dtypes and shardings of `target`.
        CheckpointError naming the step, the first mismatching array and the fix."""
        step = int(step)
        steps = self.all_steps()
        if step not in steps:
            raise CheckpointError(f"checkpoint {self.directory} has no step {step} (it has "
                                  f"{steps or 'no complete step'})")
        self._check_shapes(step, target)
        try:
            return self._mngr.restore(step, args=ocp.args.StandardRestore(_abstract(target)))
        except Exception as e:  # orbax raises many types; name the file and the cause
            what = self._first_key_mismatch(step, target)
            cause = one_line_short(f"{type(e).__name__}: {e}")
            raise CheckpointError(
                f"checkpoint {self.directory} step {step} does not match the model/state "
                f"being restored: " + (what + "; " if what else "") + f"({cause}). Fix: "
                f"use the config it was written with (the run's config.json), or move "
                f"{self.directory}/{step} away to fall back to an earlier step") from e

    def restore_or(self, target: Any) -> tuple[Any, int]:
        """(latest checkpoint restored onto target's shardings, its step), or (target, 0)."""
        step = self.latest_step()
        if step is None:
            return target, 0
        logging.info("checkpoint: restoring step %d from %s", step, self.directory)
        return self.restore(step, target), step

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and closes the manager (idempotent)."""
        if self._closed:
            return
        self._closed = True
        _open.discard(self)
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
