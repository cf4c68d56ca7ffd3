"""Full-size CPU smoke benchmark (not CI): one real step of every jitted hot step of a
config at its real shapes (1344x1344 Mask R-CNN, ViT-B/32 proposals, the LVIS vocabulary,
ResNet-18 on CIFAR-10, Faster R-CNN on VOC/COCO), with random weights and random inputs
of the right kind, on the CPU. It catches what the tiny test configs hide: shapes that only
break at full size, host memory, NaNs of a real-size forward. docs/aot.md.

The steps are the deviceless AOT check's StepSpecs (ezsd_jax.aot.registry.step_specs: the
project's own jitted functions), built on a one-device CPU mesh at `--batch_per_chip`
(default 1) instead of the config's batch, then given concrete arrays.

  python benchmarks/smoke_full_size.py --all [--configs=coco,lvis,...] [--steps=REGEX]
      # one process per step (its own peak RSS), JSON per step under benchmarks/smoke/,
      # existing files skipped (a killed run resumes); then the Markdown table
  python benchmarks/smoke_full_size.py --config=configs/coco.py --steps='^eval/' --out=F
  python benchmarks/smoke_full_size.py --render          # the table from benchmarks/smoke/
"""
from __future__ import annotations

import glob
import json
import os
import re
import resource
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from ezsd_jax.core import cli  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "smoke")
# the reference configs, their steps and class counts: the AOT table's
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from aot_table import CONFIGS, NUM_CLASSES, steps_of  # noqa: E402

FLAGS = flags.FLAGS


# ------------------------------------------------------------------ random inputs by kind

_BOX_KEYS = ("boxes", "gt_boxes", "distill_boxes")
_HW_KEYS = ("image_hw", "orig_hw")
_LABEL_KEYS = ("classes", "labels", "label")
_ONES_KEYS = ("scale", "var", "variance", "weight", "distill_weight")


def _name(path) -> str:
    """The last dict key / attribute name of a tree path ('' for positional leaves)."""
    for k in reversed(path):
        if isinstance(k, jax.tree_util.DictKey):
            return str(k.key)
        if isinstance(k, jax.tree_util.GetAttrKey):
            return k.name
    return ""


def _image_dims(args) -> tuple[int, int, int]:
    """(B, H, W) of the first 4-D 'image(s)' input: boxes and sizes are drawn inside it,
    box-to-image indices below B."""
    for path, a in jax.tree_util.tree_leaves_with_path(args):
        if _name(path) in ("image", "images") and len(getattr(a, "shape", ())) == 4:
            return int(a.shape[0]), int(a.shape[1]), int(a.shape[2])
    return 1, 224, 224


def _leaf(path, a, rng, dims, num_classes: int):
    """A concrete array for the abstract leaf `a`: weights ~ N(0, 1/fan_in), norm scales
    and variances 1, optimizer state 0; batch fields by name (boxes inside the image,
    labels in range, half the box slots valid, unit-norm embeddings)."""
    shape = tuple(a.shape)
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):    # typed PRNG keys
        return jax.random.split(jax.random.key(0), shape) if shape else jax.random.key(0)
    dt = np.dtype(a.dtype)
    name, where = _name(path), jax.tree_util.keystr(path)
    B, H, W = dims
    n = int(np.prod(shape)) if shape else 1
    if dt == np.bool_:
        if name in ("flipped",):
            return np.zeros(shape, bool)
        if len(shape) <= 1:
            return np.ones(shape, bool)
        return np.broadcast_to(np.arange(shape[-1]) < max(1, shape[-1] // 2), shape).copy()
    if dt == np.uint8:
        hi = 2 if "mask" in name else 256
        return rng.integers(0, hi, shape, dtype=np.uint8)
    if np.issubdtype(dt, np.integer):
        if name in _HW_KEYS:
            return np.broadcast_to(np.asarray([H, W], dt), shape).copy()
        if name in _LABEL_KEYS:
            return rng.integers(0, num_classes, shape).astype(dt)
        if name in ("image_id", "image_seed"):
            return np.arange(n, dtype=dt).reshape(shape)
        if name == "box_image":
            return rng.integers(0, B, shape).astype(dt)
        return np.zeros(shape, dt)
    # floating point
    if "opt_state" in where:
        return np.zeros(shape, dt)
    if name in _BOX_KEYS and shape and shape[-1] == 4:
        xy = rng.uniform(0, 0.7, shape[:-1] + (2,)) * np.asarray([W, H])
        wh = rng.uniform(0.05, 0.3, shape[:-1] + (2,)) * np.asarray([W, H])
        return np.concatenate([xy, xy + wh], -1).astype(dt)
    if name in _ONES_KEYS and len(shape) <= 2:      # norm scales / variances, batch weights
        return np.ones(shape, dt)
    if name in ("class_embeddings", "distill_emb", "text_embeddings"):
        x = rng.standard_normal(shape)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(dt)
    if name in ("image", "images"):
        return rng.standard_normal(shape).astype(dt)
    if len(shape) >= 2:
        fan_in = int(np.prod(shape[:-1]))
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dt)
    return np.zeros(shape, dt)


def _arg_names(fn, n: int) -> list[str]:
    """The names of the function's first n positional parameters (jax.jit keeps the
    signature), so that a positional 'scale' is drawn as a scale."""
    import inspect
    try:
        names = [p.name for p in inspect.signature(fn).parameters.values()]
    except (TypeError, ValueError):
        names = []
    return (names + [f"arg{i}" for i in range(len(names), n)])[:n]


def _classes(args, given: int) -> int:
    """Classes the labels are drawn from: the rows of a 'class_embeddings' input (the EZSD
    head's vocabulary, e.g. the base names when training), else `given`."""
    for path, a in jax.tree_util.tree_leaves_with_path(args):
        if _name(path) == "class_embeddings" and len(getattr(a, "shape", ())) == 2:
            return int(a.shape[0])
    return given


def concrete(fn, args, num_classes: int, seed: int = 0) -> tuple:
    """Concrete arrays for fn's abstract positional `args` (see _leaf)."""
    rng = np.random.default_rng(seed)
    names = _arg_names(fn, len(args))
    named = dict(zip(names, args))
    dims, k = _image_dims(named), _classes(named, num_classes)

    def put(path, a):
        if not isinstance(a, jax.ShapeDtypeStruct):
            return a          # static arguments (functions, settings) stay as they are
        x = _leaf(path, a, rng, dims, k)
        return jax.device_put(x, a.sharding) if getattr(a, "sharding", None) else x
    out = jax.tree_util.tree_map_with_path(put, named)
    return tuple(out[n] for n in names)     # (a dict comes back in sorted key order)


def _nonfinite(tree) -> tuple[int, list[str]]:
    """(floating-point output leaves, the paths of those holding a NaN or an inf)."""
    n, bad = 0, []
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if hasattr(x, "dtype") and _floating(x.dtype):
            n += 1
            v = np.asarray(x, np.float32)
            if not np.all(np.isfinite(v)):
                kind = "nan" if np.isnan(v).any() else "inf"
                bad.append(f"{jax.tree_util.keystr(path)}: {kind}")
    return n, bad


def _floating(dt) -> bool:
    return np.issubdtype(np.dtype(dt), np.floating) or str(dt) == "bfloat16"


def _shapes(args) -> dict:
    """{input name: shape} of the batch-like inputs (not weights / optimizer state)."""
    out = {}
    for path, a in jax.tree_util.tree_leaves_with_path(args):
        where = jax.tree_util.keystr(path)
        if not isinstance(a, jax.ShapeDtypeStruct) or any(
                s in where for s in ("params", "opt_state", "batch_stats", "['step']")):
            continue
        out[_name(path) or where] = list(a.shape)
    return out


# ----------------------------------------------------------------------------- one step

def smoke_step(spec, mesh, b: int, num_classes: int) -> dict:
    prog = spec.build(mesh, b)
    named = dict(zip(_arg_names(prog.fn, len(prog.args)), prog.args))  # 'params' by name too
    n_params = sum(int(np.prod(a.shape)) for p, a in jax.tree_util.tree_leaves_with_path(named)
                   if isinstance(a, jax.ShapeDtypeStruct) and "params" in jax.tree_util.keystr(p))
    inputs = _shapes(named)
    args = concrete(prog.fn, prog.args, num_classes)
    t0 = time.perf_counter()
    lowered = prog.fn.lower(*args)
    cost = lowered.cost_analysis() or {}          # of the unoptimized HLO
    cost = cost[0] if isinstance(cost, list) else cost
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0          # lowering + compile
    # the executable takes the array arguments only (functions / settings are baked in)
    dynamic = [a for a in args if all(isinstance(x, jax.Array)
                                      for x in jax.tree_util.tree_leaves(a))]
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*dynamic))
    run_s = time.perf_counter() - t0
    n_float, bad = _nonfinite(out)
    return {"stage": spec.stage, "step": spec.step, "batch": b, "items": float(prog.items),
            "config_batch_per_chip": spec.batch_per_chip, "parameters": n_params,
            "inputs": inputs, "compile_s": compile_s, "step_s": run_s,
            "flops": float(cost.get("flops", 0.0)),
            "output_float_leaves": n_float, "output_nonfinite_leaves": len(bad),
            "nonfinite": bad,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def smallest_batch(cfg, spec) -> int:
    """1, or the group the distillation loss normalizes over (ezsd.distill.norm_images)."""
    if spec.stage == "ezsd_train" and "ezsd" in cfg:
        return max(1, int(cfg.ezsd.distill.get("norm_images", 0) or 0))
    return 1


def main(argv):
    if FLAGS.render:
        print(render())
        return
    if FLAGS.all:
        run_all(FLAGS.configs, FLAGS.steps, FLAGS.batch_per_chip)
        print(render())
        return
    cfg = cli.get_config()
    from ezsd_jax.aot.registry import step_specs
    from ezsd_jax.core import sharding
    from ezsd_jax.detector_programs import num_classes
    mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    specs = [s for s in step_specs(cfg, mesh, FLAGS.num_classes)
             if not FLAGS.steps or re.search(FLAGS.steps, f"{s.stage}/{s.step}")]
    if not specs:
        raise cli.UsageError(f"--steps={FLAGS.steps!r} matches no step of config.stages="
                             f"{tuple(cfg.stages)}")
    # a classifier's classes (ISAL), else the detector's (an EZSD step's own vocabulary is
    # read from its class_embeddings input, see _classes)
    k = int(cfg.model.get("num_classes", 0) or num_classes(cfg, FLAGS.num_classes))
    entries = []
    for spec in specs:
        b = FLAGS.batch_per_chip or smallest_batch(cfg, spec)
        print(f"[smoke] {spec.stage}/{spec.step} at {b} on {jax.devices()[0].device_kind} ...",
              flush=True)
        e = smoke_step(spec, mesh, b, k)
        e["config"] = FLAGS["config"].config_filename
        print(f"[smoke] {spec.stage}/{spec.step}: compile {e['compile_s']:.1f} s, step "
              f"{e['step_s']:.1f} s, peak RSS {e['peak_rss_bytes'] / 2 ** 30:.2f} GiB, "
              f"non-finite outputs {e['output_nonfinite_leaves']}/{e['output_float_leaves']} "
              f"{e['nonfinite']}",
              flush=True)
        entries.append(e)
    if FLAGS.out:
        from ezsd_jax.core.io_utils import atomic_write_json
        atomic_write_json(FLAGS.out, entries)
    bad = [f"{e['stage']}/{e['step']}" for e in entries if e["output_nonfinite_leaves"]]
    if bad:
        print(f"[smoke] non-finite outputs in {bad}", file=sys.stderr, flush=True)
        sys.exit(1)


# ------------------------------------------------------------------ driver and the table

def run_all(configs, steps_regex: str, b: int) -> None:
    os.makedirs(OUT, exist_ok=True)
    for config in configs:
        for step in steps_of(config):
            if steps_regex and not re.search(steps_regex, step):
                continue
            path = os.path.join(OUT, f"{config}__{step.replace('/', '_')}.json")
            if os.path.exists(path):
                continue
            cmd = [sys.executable, os.path.abspath(__file__), f"--config=configs/{config}.py",
                   f"--steps=^{step}$", f"--batch_per_chip={b}", f"--out={path}"]
            if config in NUM_CLASSES:
                cmd.append(f"--num_classes={NUM_CLASSES[config]}")
            t0 = time.time()
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            tail = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()][-1:]
            print(f"{config} {step}: exit {p.returncode} in {time.time() - t0:.0f}s "
                  f"{tail[0] if tail else ''}", flush=True)
            if p.returncode:
                with open(path + ".failed.txt", "w") as f:
                    f.write(p.stderr[-6000:])


def render() -> str:
    rows = ["| config | stage/step | batch | params (M) | main input | compile s | step s | "
            "GFLOP | peak RSS GiB | non-finite outputs |", "|" + "---|" * 10]
    for path in sorted(glob.glob(os.path.join(OUT, "*.json"))):
        config = os.path.basename(path).split("__")[0]
        for e in json.load(open(path)):
            pm = f"{e['parameters'] / 1e6:.1f}" if e["parameters"] else "-"   # (not counted)
            main_in = next((f"{k} {'x'.join(map(str, v))}" for k, v in e["inputs"].items()
                            if k in ("image", "images")), "-")
            rows.append(f"| {config} | {e['stage']}/{e['step']} | {e['batch']} | "
                        f"{pm} | {main_in} | {e['compile_s']:.0f} | "
                        f"{e['step_s']:.1f} | {e['flops'] / 1e9:.0f} | "
                        f"{e['peak_rss_bytes'] / 2 ** 30:.2f} | "
                        f"{e['output_nonfinite_leaves']}/{e['output_float_leaves']} |")
    return "\n".join(rows)


def define_flags() -> None:
    """The script's flags (defined only when it runs: tests import its functions next to
    ezsd_jax.aot.cli, whose flags share names)."""
    cli.define_flags(workdir_required=False)
    flags.DEFINE_string("steps", "", "only the steps whose 'stage/step' matches this regex")
    flags.DEFINE_integer("batch_per_chip", 0, "images (samples) per step on the one CPU device; "
                         "0: the smallest the step takes (1; the distillation's norm_images for "
                         "ezsd_train)")
    flags.DEFINE_integer("num_classes", None, "classes of a plain detector (as ezsd_jax.aot)")
    flags.DEFINE_string("out", "", "write the entries (JSON list) here")
    flags.DEFINE_bool("all", False, "every step of --configs, one process each")
    flags.DEFINE_list("configs", list(CONFIGS), "configs/<name>.py for --all")
    flags.DEFINE_bool("render", False, "print the Markdown table of benchmarks/smoke/*.json")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
