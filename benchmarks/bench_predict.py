"""Benchmark: predict throughput through the Detector API (decode-free: random uint8
photos as arrays), compile time separately: resize like eval -> input bucket -> jitted
forward (backbone, RPN, EZSD head over a padded, masked vocabulary, NMS) -> boxes in
original pixels.

  python benchmarks/bench_predict.py --workdir=/tmp/predict_demo --size=128x128 --names=9
        # the trained demo model (CPU)
  python benchmarks/bench_predict.py --model=r50 --size=1333x800 --names=80 --batch=8 \\
        --dtype=bfloat16   # R50-FPN EZSD at COCO size, random init (GPU)
  python benchmarks/bench_predict.py --smoke --json=/tmp/p.json

--size=WxH of the photos; --names: vocabulary size (random unit text embeddings unless
--workdir, where the demo's CLIP embeds the run's names, repeated). Contract flags
(benchmarks/contract.py): --smoke, --json, --profile (traces one batch of detect_many),
--check_args; the result carries env, device memory and the smoke flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import contract  # noqa: E402

SMOKE = {"model": "tiny", "size": "96x64", "names": 5, "batch": 2, "images": 4}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="", help="trained workdir/bundle (else random init)")
    p.add_argument("--model", choices=("tiny", "r50"), default="tiny")
    p.add_argument("--size", default="128x128", help="photo WxH")
    p.add_argument("--names", type=int, default=9, help="vocabulary size")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--images", type=int, default=64, help="timed images after warm-up")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    contract.add_args(p)
    return contract.parse(p, argv, SMOKE)


def random_detector(args):
    """A Detector of the chosen architecture, random init, random unit embeddings."""
    import jax
    from configs import coco, demo
    from ezsd_jax.predict.detector import Detector
    from ezsd_jax.predict.trained_run import to_device
    from ezsd_jax.ezsd.stages import head_config
    from ezsd_jax.models import detector as det
    cfg = (demo if args.model == "tiny" else coco).get_config()
    if args.model == "tiny":
        w, h = (int(v) for v in args.size.split("x"))
        side = -(-max(w, h) // 64) * 64
        cfg.model.image_size = (side, side)
        cfg.data.short_side, cfg.data.max_side = min(w, h), max(w, h)
    cfg.model.dtype = args.dtype
    dcfg, hcfg = head_config(cfg, 1)
    key = jax.random.key(0)
    variables = jax.jit(lambda k: det.init_variables(
        det.FasterRCNN(dataclasses.replace(dcfg, image_size=(64, 64))), k, 1,
        np.zeros((1, hcfg.embed_dim), np.float32)))(key)
    rng = np.random.default_rng(0)
    names = [f"name {i}" for i in range(args.names)]
    emb = rng.normal(size=(args.names, hcfg.embed_dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    fixed = {("single", n): e for n, e in zip(names, emb)}
    d = Detector(cfg, to_device(jax.device_get(variables)), None, step=0, source="random",
                 base=names, novel=[], batch_size=args.batch, fixed_embeddings=fixed)
    return d, names


def main(argv=None):
    args = parse(argv)
    import jax
    if args.workdir:
        from ezsd_jax.predict.detector import Detector
        det = Detector.load(args.workdir, batch_size=args.batch)
        base = det.vocabulary("all")
        names = [base[i % len(base)] + ("" if i < len(base) else f" {i}")
                 for i in range(args.names)]
        model = "demo workdir " + args.workdir
    else:
        det, names = random_detector(args)
        model = args.model + " random init"
    w, h = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(1)
    photos = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(args.batch)]

    t0 = time.perf_counter()
    list(det.detect_many(photos, names, progress=False))        # compile + first batch
    first_s = time.perf_counter() - t0
    compile_s = sum(det.compile_seconds.values())
    n = max(args.images // args.batch, 1) * args.batch
    t0 = time.perf_counter()
    got = list(det.detect_many([photos[i % len(photos)] for i in range(n)], names,
                               progress=False))
    dt = time.perf_counter() - t0
    assert len(got) == n
    result = {"bench": "predict", "model": model, "photo_wh": [w, h],
              "input_bucket_hw": [list(k[0]) for k in det.compile_seconds][:1],
              "names": len(names), "vocab_bucket": next(iter(det.compile_seconds))[1],
              "batch": args.batch, "dtype": args.dtype, "images": n,
              "compile_s": round(compile_s, 2), "first_batch_s": round(first_s, 2),
              "images_per_s": round(n / dt, 2), "ms_per_image": round(dt / n * 1e3, 2),
              "programs": len(det.compile_seconds),
              "sizes": {"photo_wh": [w, h], "names": len(names), "batch": args.batch,
                        "images": n, "model": args.model}}
    if args.profile:
        result["profile"] = contract.profile(
            args, lambda: list(det.detect_many(photos, names, progress=False)))
    return contract.finish(args, result)


if __name__ == "__main__":
    main()
