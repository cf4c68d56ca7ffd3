"""Command-line plumbing shared by every entry point (ezsd_jax.main, isal_jax.select, ...).

One config system: an ml_collections `get_config()` file passed as --config, every field
overridable as --config.a.b=value, plus --workdir. This module turns the ways that can go
wrong (unknown field, bad value, missing file, unwritable workdir) into one clear line and
exit status 2 instead of a traceback from deep inside absl.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

import ml_collections
from absl import app, flags
from ml_collections import config_flags


class UsageError(SystemExit):
    """Bad command line or config: printed as one line, exit status 2."""

    def __init__(self, msg: str):
        print(f"error: {msg}", file=sys.stderr, flush=True)
        super().__init__(2)


class MissingInput(FileNotFoundError):
    """A stage's input is missing (what an earlier stage writes or the user provides);
    the message says what to run or set. The entry points report it as a UsageError."""


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
        raise UsageError(str(e)) from None
    except (AttributeError, KeyError) as e:
        raise UsageError(_explain_override_error(argv, e)) from None


def _explain_override_error(argv: list[str], err: Exception) -> str:
    """Names the --config.<field> override that does not exist and the fields that do."""
    cfg_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv
                 if a.startswith("--config.")]
    generic = (f"unknown config field in {' '.join('--config.' + o for o in overrides)}: "
               f"{err}. Read the config file for valid fields.")
    try:
        import importlib.util
        spec = importlib.util.spec_from_file_location("_cli_cfg", cfg_file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cfg = mod.get_config()
    except Exception:  # noqa: BLE001 -- fall back to the parser's own message
        return generic
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
    """The parsed --config, or a clear error when it could not be loaded."""
    cfg = flags.FLAGS.config
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise UsageError(f"could not load config file {flags.FLAGS['config'].config_filename!r}"
                         " (missing file or an error inside get_config())")
    return cfg


def prepare_workdir(path: str | None) -> str:
    """Creates the workdir (and parents) or fails with a clear message; returns its abspath."""
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
    return path


def save_config(cfg: ml_collections.ConfigDict, workdir: str, name: str = "config.json") -> str:
    """Writes the resolved config next to the outputs (atomically), for reproducibility."""
    from ezsd_jax.io_utils import atomic_write_text
    return atomic_write_text(os.path.join(workdir, name), cfg.to_json_best_effort(indent=2))


def run(main: Callable[[list[str]], None]) -> None:
    """app.run with clear config errors. Library logging (orbax is chatty) defaults to
    WARNING; progress lines are printed. Pass --verbosity=0 for INFO logs."""
    from absl import logging as absl_logging

    def main_with_verbosity(argv):
        if not flags.FLAGS["verbosity"].present:
            absl_logging.set_verbosity(absl_logging.WARNING)
        return main(argv)

    app.run(main_with_verbosity, flags_parser=_flags_parser)
