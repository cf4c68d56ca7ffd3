"""Checkpoints: the one wrapper around orbax's CheckpointManager used by every stage.

  ckpt = Checkpointer(workdir + "/ckpt", save_every=1000, keep=3)
  state, step = ckpt.restore_or(state)        # latest checkpoint onto state's shardings
  for step ...:
      ckpt.maybe_save(step, state)            # every `save_every` steps
  ckpt.save(final_step, state, force=True); ckpt.close()

Orbax writes each step into a temporary directory and renames it when complete, so a
process killed mid-save leaves the previous checkpoint intact; the half-written one is
never listed as a step (and is cleaned up on the next start).
"""
from __future__ import annotations

import logging
import os
import weakref
from typing import Any

import jax
import orbax.checkpoint as ocp

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


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for restore onto the right devices."""
    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree_util.tree_map(one, tree)


class Checkpointer:
    def __init__(self, directory: str, save_every: int = 1000, keep: int = 3,
                 async_save: bool = False):
        self.directory = os.path.abspath(directory)
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create checkpoint directory {self.directory}: {e}") from e
        if not os.access(self.directory, os.W_OK):
            raise CheckpointError(f"checkpoint directory {self.directory} is not writable")
        self.save_every = max(int(save_every), 1)
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
                    f"being restored: {name} is {stored[name]} there, {shape} here")

    def restore(self, step: int, target: Any) -> Any:
        """Restores `step` with the structure, dtypes and shardings of `target`."""
        self._check_shapes(step, target)
        try:
            return self._mngr.restore(int(step), args=ocp.args.StandardRestore(_abstract(target)))
        except Exception as e:  # orbax raises many types; name the file and the cause
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not match the model/state being "
                f"restored ({type(e).__name__}: {e})") from e

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
