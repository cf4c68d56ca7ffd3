"""Benchmark: the jitted, sharded detector train step (images/s, compile time, peak memory).

Random images and boxes at a fixed padded size, the real step from ezsd_jax.train
(forward, RPN/RoI sampling, losses, backward, SGD), data-parallel over all local devices.

  python benchmarks/bench_train_step.py --model=tiny --size=128 --batch=8      # CPU
  python benchmarks/bench_train_step.py --model=r50 --size=1024 --batch=16 --dtype=bfloat16  # GPU
  python benchmarks/bench_train_step.py --model=r50 --size=832,1344 ...   # 1333x800 canvas
  python benchmarks/bench_train_step.py --model=r50 --size=832,1344 --masks ...  # Mask R-CNN

Prints one JSON line with the figures (benchmarks/contract.py: --smoke, --json, --profile);
copy it into benchmarks/RESULTS.md with the machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import contract  # noqa: E402

SMOKE = {"size": "64", "batch": 1, "boxes": 4, "num_classes": 4, "steps": 2, "warmup": 1}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("tiny", "r50"), default="tiny")
    p.add_argument("--size", default="128",
                   help="padded input size, S (square) or H,W (multiples of 64)")
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--num_classes", type=int, default=80)
    p.add_argument("--boxes", type=int, default=20, help="GT boxes per image")
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--masks", action="store_true",
                   help="Mask R-CNN: the mask branch on (model.mask_on), random box crops")
    contract.add_args(p)
    return contract.parse(p, argv, SMOKE)


def main(argv=None):
    args = parse(argv)
    from configs import common
    from ezsd_jax.core import sharding
    from ezsd_jax.models import detector as det
    from ezsd_jax.train import init_train_state, make_train_step
    import ml_collections

    hw = [int(v) for v in args.size.split(",")]
    size = (hw[0], hw[-1])
    model_cfg = (common.tiny_model_config(image_size=size) if args.model == "tiny"
                 else common.model_config(image_size=size))
    model_cfg.dtype = args.dtype
    model_cfg.mask_on = bool(args.masks)
    cfg = ml_collections.ConfigDict({"model": model_cfg,
                                     "train": common.train_config(batch_size=args.batch,
                                                                  steps=1000),
                                     "mesh": {"data": -1, "model": 1}})
    mesh = sharding.make_mesh(cfg.mesh)
    dcfg = det.DetectorConfig.from_config(cfg.model, num_classes=args.num_classes)
    model = det.FasterRCNN(dcfg)
    init, state_sh, tx, sched = init_train_state(model, cfg, mesh, jax.random.key(0), {})
    state = jax.jit(init, out_shardings=state_sh)(jax.random.key(0))
    step = make_train_step(model, tx, mesh, state_sh, 0, None, sched)

    rng = np.random.default_rng(0)
    b, m = args.batch, args.boxes
    lo = min(size)
    xy = rng.uniform(0, lo * 0.7, (b, m, 2))
    wh = rng.uniform(lo * 0.05, lo * 0.3, (b, m, 2))
    host = {"image": rng.integers(0, 255, (b, *size, 3)).astype(np.uint8),
            "boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
            "classes": rng.integers(0, args.num_classes, (b, m)).astype(np.int32),
            "box_mask": np.ones((b, m), bool), "valid": np.ones(b, bool),
            "image_hw": np.tile(np.array([size], np.int32), (b, 1))}
    if args.masks:   # the pipeline's box crops: random ellipses filling each box
        s = model_cfg.mask_crop_size
        yy, xx = np.mgrid[:s, :s] / (s - 1) * 2 - 1
        rad = rng.uniform(0.5, 1.0, (b, m, 1, 1))
        host["gt_masks"] = ((xx ** 2 + yy ** 2 <= rad ** 2) * 255).astype(np.uint8)
    batch = sharding.host_to_global(host, mesh)
    consts = jax.device_put({}, sharding.replicated(mesh))

    t0 = time.perf_counter()
    compiled = step.lower(state, batch, consts).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch, consts)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, batch, consts)
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - t0) / args.steps

    result = {
        "bench": "train_step", "model": args.model, "masks": bool(args.masks),
        "size": list(size), "batch": args.batch,
        "dtype": args.dtype, "devices": jax.device_count(),
        "host": platform.processor() or platform.machine(),
        "sizes": {"image_hw": list(size), "batch": args.batch, "boxes": m,
                  "num_classes": args.num_classes, "steps": args.steps},
        "compile_s": round(compile_s, 2), "step_ms": round(dt * 1e3, 2),
        "images_per_s": round(args.batch / dt, 2),
        "host_max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "loss": float(metrics["loss"]),
        "aot": contract.aot_estimate(compiled, args.batch / jax.device_count()),
    }
    if args.profile:
        def one_step():
            nonlocal state
            state, out = compiled(state, batch, consts)
            return out
        result["profile"] = contract.profile(args, one_step)
    return contract.finish(args, result)


if __name__ == "__main__":
    main()
