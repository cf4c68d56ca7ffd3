"""An exported predict bundle: one directory that `Detector.load` reads on another machine
without the training workdir (`python -m ezsd_jax.predict export --workdir=W --out=B`).

  B/manifest.json         format, versions (ezsd_jax, jax, flax, orbax, transformers,
                          numpy, python), checkpoint step (and the training's planned
                          steps), source workdir, split names, text source ('clip' or
                          'embeddings')
  B/config.json           the run's resolved config (model, data resize, prompt templates)
  B/detector/<step>/      detector params + batch_stats (checkpoint.Checkpointer)
  B/adapted_clip/         the re-normalized CLIP (any names), or, with a fixed vocabulary,
  B/text_embeddings.npz   only the embeddings of those names (clip/text.py format)
Loading is read-only (a bundle on a read-only disk loads); a manifest or part that is
missing or malformed is a MissingInput naming the file and field.
"""
from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import time
from typing import Sequence

import importlib.metadata as md

import jax
import numpy as np

import ezsd_jax
from ezsd_jax.core import cli
from ezsd_jax.core.checkpoint import Checkpointer
from ezsd_jax.clip.text import load_text_embeddings, save_text_embeddings
from ezsd_jax.ezsd.stages import head_config
from ezsd_jax.core.io_utils import atomic_write_json
from ezsd_jax.models import detector as det
from ezsd_jax.predict.buckets import normalize_names
from ezsd_jax.predict.trained_run import (load_text_tower, planned_steps, read_config,
                                          to_device)

FORMAT = "ezsd_jax.predict_bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def is_bundle(path: str) -> bool:
    return os.path.exists(os.path.join(path, MANIFEST))


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("ezsd_jax", "jax", "jaxlib", "flax", "orbax-checkpoint", "transformers",
                "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if out["ezsd_jax"] is None:
        out["ezsd_jax"] = ezsd_jax.__version__
    return out


def export(detector, out: str, names: Sequence[str] | None = None,
           prompts: str = "single") -> str:
    """Writes the bundle of a loaded Detector into `out` (atomically: a temporary
    directory renamed into place). names: a fixed vocabulary (its embeddings replace the
    CLIP); None: the adapted CLIP is copied and any names work."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise cli.UsageError(f"--out {out} is a file: give a new directory for the bundle")
    if os.path.exists(out) and os.listdir(out):
        raise cli.UsageError(f"--out {out} exists and is not empty")
    tmp = f"{out}.tmp.{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        _write(detector, tmp, names, prompts)
        if os.path.exists(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = errno.errorcode.get(e.errno, "") if e.errno else ""
        raise cli.UsageError(f"--out {out}: cannot write the bundle there ("
                             f"{e.strerror or e}{' ' + what if what else ''}"
                             f"{', ' + e.filename if e.filename else ''})") from None
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        disk = cli.disk_error(e)
        if disk is not None:
            raise cli.UsageError(f"--out {out}: {disk}") from None
        raise
    return out


def _write(detector, tmp: str, names, prompts: str) -> None:
    with Checkpointer(os.path.join(tmp, "detector"), keep=1) as ck:
        ck.save(detector.step, detector.variables, force=True)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(),
                "step": detector.step, "source": detector.source,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "base": detector.base, "novel": detector.novel,
                "train_steps": detector.train_steps}
    if names:
        names = normalize_names(names)
        save_text_embeddings(os.path.join(tmp, "text_embeddings.npz"), names,
                             detector.embed_names(names, prompts),
                             detector.templates_for(prompts))
        manifest.update(text="embeddings", names=names, prompts=prompts)
    else:
        src = detector.clip_dir
        if not src:
            raise cli.UsageError(f"{detector.source}: this detector has no CLIP directory "
                                 "to export (a fixed-vocabulary bundle); pass --names")
        shutil.copytree(src, os.path.join(tmp, "adapted_clip"))
        manifest.update(text="clip")
    with open(os.path.join(tmp, "config.json"), "w") as f:
        f.write(detector.cfg.to_json_best_effort(indent=2))
    atomic_write_json(os.path.join(tmp, MANIFEST), manifest)


def read_manifest(path: str) -> dict:
    """The bundle's manifest, checked: MissingInput naming the file and the field."""
    mpath = os.path.join(path, MANIFEST)
    try:
        with open(mpath, encoding="utf-8") as f:
            man = json.load(f)
    except (OSError, ValueError) as e:
        raise cli.MissingInput(f"{mpath}: cannot read it ({e})") from None
    if not isinstance(man, dict):
        raise cli.MissingInput(f"{mpath}: not a JSON object")
    if man.get("format") != FORMAT:
        raise cli.MissingInput(f"{mpath}: field 'format' is {man.get('format')!r}, not "
                               f"{FORMAT!r} (not a predict bundle)")

    def field(name, ok, what):
        if name not in man:
            raise cli.MissingInput(f"{mpath}: field {name!r} is missing ({what})")
        if not ok(man[name]):
            raise cli.MissingInput(f"{mpath}: field {name!r} is {man[name]!r}, need {what}")

    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    names = lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)  # noqa: E731
    field("format_version", lambda v: is_int(v) and 1 <= v <= FORMAT_VERSION,
          f"an integer 1..{FORMAT_VERSION} (a newer ezsd_jax wrote it?)")
    field("step", lambda v: is_int(v) and v >= 0, "the checkpoint step under detector/")
    field("base", names, "a list of names")
    field("novel", names, "a list of names")
    field("text", lambda v: v in ("clip", "embeddings"), "'clip' or 'embeddings'")
    if man["text"] == "embeddings":
        field("names", names, "the fixed vocabulary's names")
    return man


def load(cls, path: str, batch_size: int = 8, bucket_step: int = 64):
    """A Detector (class `cls`) from the bundle at `path` (read-only)."""
    man = read_manifest(path)
    cfg = read_config(os.path.join(path, "config.json"))
    parts = [os.path.join(path, "detector")]
    parts.append(os.path.join(path, "text_embeddings.npz" if man["text"] == "embeddings"
                              else "adapted_clip"))
    for part in parts:
        if not os.path.exists(part):
            raise cli.MissingInput(f"{path}: bundle part {os.path.basename(part)} is "
                                   "missing (re-export the bundle)")
    dcfg, hcfg = head_config(cfg, 1)
    model = det.FasterRCNN(dcfg)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(lambda k: det.init_variables(
        model, k, 1, np.zeros((1, hcfg.embed_dim), np.float32)), jax.random.key(0))
    target = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), dict(shapes))
    step = int(man["step"])
    with Checkpointer(os.path.join(path, "detector"), read_only=True) as ck:
        variables = ck.restore(step, target)
    variables = to_device(jax.device_get(variables))
    fixed, clip, clip_dir = None, None, None
    if man["text"] == "embeddings":
        try:
            names, emb = load_text_embeddings(os.path.join(path, "text_embeddings.npz"))
        except (OSError, ValueError) as e:
            raise cli.MissingInput(f"{path}/text_embeddings.npz: {e}") from None
        fixed = {(man.get("prompts", "single"), n): e for n, e in zip(names, emb)}
    else:
        clip_dir = os.path.join(path, "adapted_clip")
        clip = load_text_tower(clip_dir)
    return cls(cfg, variables, clip, step=step, source=path, base=man["base"],
               novel=man["novel"], batch_size=batch_size, bucket_step=bucket_step,
               fixed_embeddings=fixed, clip_dir=clip_dir,
               train_steps=man.get("train_steps") or planned_steps(cfg, path, ""))


__all__ = ["is_bundle", "export", "load", "read_manifest", "versions", "FORMAT", "FORMAT_VERSION"]
