"""Command-line plumbing shared by every entry point (ezsd_jax.main, isal_jax.main,
isal_jax.select, ...): the ONE place where user errors become one line and exit status 2.

One config system: an ml_collections `get_config()` file passed as --config, every field
overridable as --config.a.b=value, plus --workdir. `run(main)` reports, as one line
`error: ...` on stderr and exit status 2 (never a traceback): a config file that is
missing, has a syntax error or whose get_config() raises; an unknown field or a value of
the wrong type; a value the validator rejects (ezsd_jax.core.config_check, run by
`get_config()` before any work); an unusable or busy workdir (ezsd_jax.core.workdir_lock);
and, from inside the work, a UsageError, DataError (bad annotations or images),
MissingInput, CheckpointError or FileNotFoundError, plus the entry point's own types.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

import ml_collections
from absl import app, flags
from ml_collections import config_flags


class UsageError(Exception):
    """Bad command line, config or input: `run` prints it as one line, exit status 2."""


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
                     ("ezsd_jax.core.workdir_lock", "WorkdirInUse"))


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


def prepare_workdir(path: str | None, lock: bool = True) -> str:
    """Creates the workdir (and parents) or fails with a clear message; returns its abspath.
    lock: take the workdir's lock now (an entry point whose runs may share a workdir,
    e.g. multi-host, passes False and calls `lock_workdir(workdir, key)` once it knows
    the key)."""
    if not path:
        raise UsageError("--workdir is required")
    if "://" in path:
        raise UsageError(f"workdir {path!r}: URLs are not supported (metrics, proposal "
                         "stores and COCO files are written with POSIX I/O); mount the "
                         "bucket (e.g. gcsfuse, see launch/README.md) and pass its path")
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create workdir {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"workdir {path} is not writable")
    probe = os.path.join(path, f".write_probe_{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"workdir {path} is not writable: {e.strerror}") from None
    if lock:
        lock_workdir(path)
    return path


def save_config(cfg: ml_collections.ConfigDict, workdir: str, name: str = "config.json") -> str:
    """Writes the resolved config next to the outputs (atomically), for reproducibility."""
    from ezsd_jax.core.io_utils import atomic_write_text
    return atomic_write_text(os.path.join(workdir, name), cfg.to_json_best_effort(indent=2))


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
        except Exception as e:  # noqa: BLE001 -- only user errors are turned into one line
            if isinstance(e, user_errors() + tuple(extra_user_errors)):
                raise UsageError(one_line(e)) from None
            raise

    try:
        app.run(main_with_verbosity, flags_parser=_flags_parser)
    except UsageError as e:
        if "ezsd_jax.core.checkpoint" in sys.modules:  # no orbax thread may outlive the error
            sys.modules["ezsd_jax.core.checkpoint"].close_all()
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
