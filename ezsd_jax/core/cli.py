"""Command-line plumbing shared by every entry point (ezsd_jax.main, isal_jax.main,
isal_jax.select, ...): the ONE place where user errors become one line and exit status 2.

One config system: an ml_collections `get_config()` file passed as --config, every field
overridable as --config.a.b=value, plus --workdir. `run(main)` reports, as one line
`error: ...` on stderr and exit status 2 (never a traceback): a config file that is
missing, has a syntax error or whose get_config() raises; an unknown field or a value of
the wrong type; a value the validator rejects (ezsd_jax.core.config_check, run by
`get_config()` before any work); an unusable or busy workdir (ezsd_jax.core.workdir_lock);
and, from inside the work, a UsageError, DataError (bad annotations or images),
MissingInput, CheckpointError, a training's divergence (train_loop.Diverged), a full or
read-only disk (ENOSPC/EDQUOT/EROFS anywhere in the error's chain) or FileNotFoundError,
plus the entry point's own types. A preempted training (train_loop.Preempted, an
`Interrupted`) prints its one line and exits 128 + the signal.

`save_config` writes config.json after validation and, on a workdir with results,
refuses a change of a field that alters the model or the data (--allow_config_change
allows and logs it).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import sys
from typing import Callable

import ml_collections
from absl import app, flags
from ml_collections import config_flags


class UsageError(Exception):
    """Bad command line, config or input: `run` prints it as one line, exit status 2."""


class Interrupted(Exception):
    """A run stopped on purpose with its work saved (a preempted training): `run` prints
    the message as one line and exits with `exit_code` (128 + the signal)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = int(exit_code)


class MissingInput(FileNotFoundError):
    """A stage's input is missing (what an earlier stage writes or the user provides);
    the message says what to run or set. The entry points report it as a UsageError."""


def one_line(err: BaseException) -> str:
    """The error's message on one line (orbax and others put newlines in theirs)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


# module -> its exception type that means bad input (a bad annotation or image file, a
# checkpoint that does not match, a rejected config value, a busy workdir).
_USER_ERROR_TYPES = (("ezsd_jax.core.errors", "DataError"),
                     ("ezsd_jax.core.checkpoint", "CheckpointError"),
                     ("ezsd_jax.core.config_check", "ConfigError"),
                     ("ezsd_jax.core.workdir_lock", "WorkdirInUse"),
                     ("ezsd_jax.core.train_loop", "Diverged"))

# a full, read-only or over-quota disk: the user's to fix, named as one line
_DISK_ERRNOS = {errno.ENOSPC: "no space left on the device",
                errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system"}


def disk_error(err: BaseException) -> str | None:
    """One line for an error caused (anywhere in its __cause__/__context__ chain: orbax
    wraps) by a full / read-only disk, naming the file; None for any other error."""
    seen = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            where = f" writing {e.filename}" if e.filename else ""
            return (f"{_DISK_ERRNOS[e.errno]}{where}: free space (or use another --workdir/"
                    "--out) and re-run; finished checkpoints are kept")
        e = e.__cause__ or e.__context__
    return None


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, not a bug: reported without a traceback.
    Only modules already imported are consulted (no other module can have raised), so
    reporting an early error does not import orbax or jax."""
    found = [getattr(sys.modules[m], name) for m, name in _USER_ERROR_TYPES
             if m in sys.modules]
    return (UsageError, FileNotFoundError, *found)


def define_flags(workdir_required: bool = True) -> None:
    config_flags.DEFINE_config_file(
        "config", None, "ml_collections config file (get_config()); fields overridable "
        "with --config.<field>=<value>", lock_config=True)
    flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics, outputs).",
                        required=workdir_required)
    flags.DEFINE_boolean("allow_config_change", False, "Resume a workdir whose stored "
                         "config.json differs in fields that change the model or the data "
                         "(refused otherwise); the change is logged to config_changes.jsonl.")


def _flags_parser(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise UsageError(one_line(e)) from None
    except Exception as e:  # noqa: BLE001 -- raised while loading the config file
        raise UsageError(_explain_config_error(argv, e)) from None


def _load_config_file(path: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location("_cli_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _explain_config_error(argv: list[str], err: Exception) -> str:
    """The config file's own error (syntax, get_config() raising), or the --config.<field>
    override that does not exist and the fields that do."""
    cfg_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv
                 if a.startswith("--config.")]
    try:
        cfg = _load_config_file(cfg_file)
    except SyntaxError as e:
        return (f"config file {cfg_file}: syntax error at line {e.lineno}: {e.msg}")
    except Exception as e:  # noqa: BLE001 -- whatever get_config() raised
        return f"config file {cfg_file}: loading it failed: {type(e).__name__}: {one_line(e)}"
    generic = (f"unknown config field in {' '.join('--config.' + o for o in overrides)}: "
               f"{one_line(err)}. Read the config file for valid fields.")
    for name in overrides:
        node, walked = cfg, []
        for part in name.split("."):
            if not hasattr(node, "keys") or part not in node:
                known = sorted(node.keys()) if hasattr(node, "keys") else []
                where = ".".join(walked) or "the top level"
                return (f"unknown config field {name!r} (from --config.{name}=...): {cfg_file} "
                        f"has no {part!r} under {where}; known fields there: {known}")
            node, walked = node[part], walked + [part]
    return generic


def get_config() -> ml_collections.ConfigDict:
    """The parsed --config, validated (config_check) before any work; UsageError naming
    the file or field otherwise."""
    from ezsd_jax.core.config_check import ConfigError, validate
    cfg = flags.FLAGS.config
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise UsageError(f"could not load config file {flags.FLAGS['config'].config_filename!r}"
                         " (missing file or an error inside get_config())")
    try:
        validate(cfg)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    return cfg


def lock_workdir(workdir: str, key: str = "") -> str:
    """Takes the workdir's lock (one run per workdir and key); UsageError naming the
    holder's PID."""
    from ezsd_jax.core.workdir_lock import WorkdirInUse, acquire
    try:
        return acquire(workdir, key)
    except WorkdirInUse as e:
        raise UsageError(str(e)) from None


def prepare_workdir(path: str | None, lock: bool = True, name: str = "workdir") -> str:
    """Creates the workdir (and parents) or fails with a clear message; returns its abspath.
    lock: take the workdir's lock now (an entry point whose runs may share a workdir,
    e.g. multi-host, passes False and calls `lock_workdir(workdir, key)` once it knows
    the key). name: how messages call it (predict's output directory: '--out')."""
    if not path:
        raise UsageError(f"--{name.lstrip('-')} is required")
    if "://" in path:
        raise UsageError(f"{name} {path!r}: URLs are not supported (metrics, proposal "
                         "stores and COCO files are written with POSIX I/O); mount the "
                         "bucket (e.g. gcsfuse, see launch/README.md) and pass its path")
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{name} {path} is a file: give a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {name} {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{name} {path} is not writable")
    check_writable(path, name)
    if lock:
        lock_workdir(path)
    return path


def check_writable(directory: str, name: str) -> None:
    """Writes and removes a probe file in `directory` (os.access is not enough: a
    read-only mount, root on NFS); UsageError '<name> <directory> is not writable'."""
    probe = os.path.join(directory, f".write_probe_{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{name} {directory} is not writable: {e.strerror}") from None


# Fields a resumed run may change: where/how it runs, how often it logs or saves, how
# long it trains (extending `steps` is a legitimate resume), evaluation settings, fault
# injection. Any other field changes the model or the data: refused on a workdir with
# results unless --allow_config_change.
BENIGN_BLOCKS = frozenset({"mesh", "distributed", "debug", "stages", "eval", "report"})
BENIGN_LEAVES = frozenset({"steps", "log_every", "ckpt_every", "keep", "keep_checkpoints",
                           "num_threads", "prefetch", "eval_batch_size", "proposal_shard",
                           "proposal_batch_size", "proposal_images_per_chunk", "force",
                           "plot", "debug_kill_after"})
CONFIG_NAME = "config.json"


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(guarded, benign) dotted fields whose values differ between two config dicts
    (JSON-normalised: tuples == lists); a field only in one of them counts."""
    a, b = _flat(old), _flat(new)
    guarded, benign = [], []
    for k in sorted(set(a) | set(b)):
        if a.get(k, KeyError) == b.get(k, KeyError):
            continue
        parts = k.split(".")
        (benign if set(parts[:-1]) & BENIGN_BLOCKS or parts[0] in BENIGN_BLOCKS
         or parts[-1] in BENIGN_LEAVES else guarded).append(k)
    return guarded, benign


def _has_results(workdir: str) -> bool:
    """Whether the workdir holds anything a run wrote besides its config and lock files
    (empty directories do not count: a run that failed at once leaves nothing to keep)."""
    skip = (CONFIG_NAME, "config_changes.jsonl")
    for root, dirs, files in os.walk(workdir):
        if root == workdir:
            files = [f for f in files if f not in skip and not f.startswith((".lock",
                                                                            ".write_probe"))]
        if files:
            return True
    return False


def save_config(cfg: ml_collections.ConfigDict, workdir: str, name: str = CONFIG_NAME,
                allow_change: bool | None = None) -> str:
    """Writes the resolved config next to the outputs (atomically), for reproducibility
    and for predict, which reads the model from it. Call it after validation.

    On a workdir with results (a resume), the stored config is compared field by field:
    a change that alters the model or the data (not in BENIGN_BLOCKS / BENIGN_LEAVES) is
    a UsageError listing the fields, unless allow_change (default: --allow_config_change),
    which logs it to config_changes.jsonl; benign changes are printed and written."""
    from ezsd_jax.core.io_utils import atomic_write_text
    path = os.path.join(workdir, name)
    text = cfg.to_json_best_effort(indent=2)
    if os.path.exists(path) and _has_results(workdir):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"{path}: cannot read the stored config of this workdir ({e}); "
                             "restore it or use another --workdir") from None
        guarded, benign = config_changes(old, json.loads(text))
        if allow_change is None:
            allow_change = bool(getattr(flags.FLAGS, "allow_config_change", False)) \
                if "allow_config_change" in flags.FLAGS else False
        if guarded and not allow_change:
            shown = ", ".join(guarded[:8]) + (f" (+{len(guarded) - 8} more)"
                                              if len(guarded) > 8 else "")
            raise UsageError(f"{path}: this workdir was run with another config; changed "
                             f"fields that alter the model or the data: {shown}. Use another "
                             "--workdir, restore those values, or pass --allow_config_change")
        if guarded or benign:
            flat_old, flat_new = _flat(old), _flat(json.loads(text))
            change = {k: [flat_old.get(k), flat_new.get(k)] for k in guarded + benign}
            msg = (f"config: {'ALLOWED (--allow_config_change) ' if guarded else ''}changes "
                   f"from the stored {name}: " +
                   "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in change.items()))
            # an allowed model/data change is a warning; a benign one (e.g. more steps) a note
            (logging.warning if guarded else logging.info)("%s", msg)
            print(msg, flush=True)
            if guarded:
                import time
                with open(os.path.join(workdir, "config_changes.jsonl"), "a") as f:
                    f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                        "fields": change}, default=str) + "\n")
    return atomic_write_text(path, text)


def run(main: Callable[[list[str]], None],
        extra_user_errors: tuple[type[BaseException], ...] = (),
        doc: str | None = None) -> None:
    """app.run, with every user error (`user_errors()` + `extra_user_errors`) reported as
    one line `error: ...` and exit status 2. Library logging (orbax is chatty) defaults to
    WARNING, minus the notices of core/quiet_logs.py; progress lines are printed. Pass
    --verbosity=0 for INFO logs. doc: the usage that --help prints (absl prints the
    __main__ module's docstring: a console script's is its wrapper's)."""
    from absl import logging as absl_logging
    from ezsd_jax.core import quiet_logs
    quiet_logs.setup()
    if doc:
        sys.modules["__main__"].__doc__ = doc

    def main_with_verbosity(argv):
        if not flags.FLAGS["verbosity"].present:
            absl_logging.set_verbosity(absl_logging.WARNING)
        try:
            return main(argv)
        except Interrupted:
            raise
        except Exception as e:  # noqa: BLE001 -- only user errors are turned into one line
            if isinstance(e, user_errors() + tuple(extra_user_errors)):
                raise UsageError(one_line(e)) from None
            disk = disk_error(e)
            if disk is not None:
                raise UsageError(disk) from None
            raise

    try:
        app.run(main_with_verbosity, flags_parser=_flags_parser)
    except Interrupted as e:
        _close_checkpoints()
        print(one_line(e), file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except UsageError as e:
        _close_checkpoints()
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)


def _close_checkpoints() -> None:
    """No orbax thread may outlive the one-line message (nor print after it)."""
    if "ezsd_jax.core.checkpoint" in sys.modules:
        try:
            sys.modules["ezsd_jax.core.checkpoint"].close_all()
        except Exception as e:  # noqa: BLE001 -- already reporting an error
            logging.debug("closing checkpoints: %s", e)
