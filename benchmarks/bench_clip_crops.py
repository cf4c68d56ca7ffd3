"""Benchmark: CLIP crop preprocessing and candidate scoring throughput (crops/s).

Measures, in one run on the same boxes:
  1. the batched on-device crop path (ezsd_jax.clip.crops.crop_boxes, jitted) against the
     reference's per-box host loop (PIL crop, zero-pad to square, bicubic resize,
     normalize, one box at a time), crops/s each;
  2. the full candidate scoring of the proposal stage (sliding candidates -> crops ->
     CLIP image tower -> softmax entropy score; ezsd_jax.clip.proposals.score_candidates,
     jitted), crops/s, for a chosen CLIP size;
  3. optionally (--full) the whole per-batch proposal function (+ NMS, GT filter, 1.2x
     feature crops and embeddings).

Examples:
  .venv/bin/python benchmarks/bench_clip_crops.py                          # tiny CLIP, CPU
  .venv/bin/python benchmarks/bench_clip_crops.py --random_vitb32 --dtype=bfloat16 \\
      --image_hw=800,1344 --batch=2 --chunk=512 --full                   # GPU/TPU
  .venv/bin/python benchmarks/bench_clip_crops.py --model=openai/clip-vit-base-patch32 \\
      --dtype=bfloat16 --image_hw=800,1344                                # real weights
Timings exclude compilation (lowered and compiled first, reported as compile_s) and
include device sync. Contract flags (benchmarks/contract.py): --smoke, --json, --profile
(traces the full proposal function with --full, else the candidate scoring).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import contract  # noqa: E402
from ezsd_jax.clip import crops as crops_lib  # noqa: E402
from ezsd_jax.clip import proposals  # noqa: E402
from ezsd_jax.clip.loading import CLIP_MEAN, CLIP_STD, load_clip  # noqa: E402
from ezsd_jax.clip.toy import make_tiny_clip, vitb32_config  # noqa: E402

MEAN = np.asarray(CLIP_MEAN, np.float32)
STD = np.asarray(CLIP_STD, np.float32)
SMOKE = {"image_hw": "64,96", "crop_boxes": 8, "pil_boxes": 8, "crop_size": 32, "chunk": 16,
         "repeats": 1}


def pil_crop(img: np.ndarray, box, enlarge: float, out: int) -> np.ndarray:
    """The reference's per-box preprocessing (host, one box)."""
    h, w = img.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    e = (enlarge - 1) / 2
    bw, bh = x2 - x1, y2 - y1
    x0 = min(math.floor(min(max(x1 - e * bw, 0), w)), w - 1)
    y0 = min(math.floor(min(max(y1 - e * bh, 0), h)), h - 1)
    xe = max(math.ceil(min(max(x2 + e * bw, 0), w)), x0 + 1)
    ye = max(math.ceil(min(max(y2 + e * bh, 0), h)), y0 + 1)
    patch = img[y0:ye, x0:xe]
    ch, cw = patch.shape[:2]
    s = max(ch, cw)
    sq = np.zeros((s, s, 3), np.uint8)
    sq[(s - ch) // 2:(s - ch) // 2 + ch, (s - cw) // 2:(s - cw) // 2 + cw] = patch
    r = np.asarray(Image.fromarray(sq).resize((out, out), Image.BICUBIC), np.float32)
    return (r / 255.0 - MEAN) / STD


def timed(jitted, args: tuple, repeats: int):
    """-> (compiled, compile seconds, best seconds of `repeats` calls after a warm-up)."""
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(*args))          # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t)
    return compiled, compile_s, best


def get_model(args):
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    if args.random_vitb32:
        from transformers import FlaxCLIPModel
        model = FlaxCLIPModel(vitb32_config(), dtype=dtype, seed=0)
        return model, model.params, "random ViT-B/32"
    if args.model:
        model, params, *_ = load_clip(args.model, dtype=dtype)
        return model, params, args.model
    d = tempfile.mkdtemp(prefix="bench_tinyclip_")
    make_tiny_clip(d, ["person", "dog"], seed=0, image_size=args.tiny_image_size,
                   patch=args.tiny_image_size // 4)
    model, params, *_ = load_clip(d, dtype=dtype)
    return model, params, f"tiny CLIP (hidden 32, 2 layers, {args.tiny_image_size}px)"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="CLIP dir or hub name (default: tiny toy)")
    ap.add_argument("--random_vitb32", action="store_true",
                    help="random-init ViT-B/32-sized CLIP (no weights needed)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tiny_image_size", type=int, default=32)
    ap.add_argument("--image_hw", default="256,384", help="padded image size H,W")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--crop_boxes", type=int, default=128,
                    help="boxes per image for the crop-only comparison")
    ap.add_argument("--crop_size", type=int, default=224,
                    help="crop output size for the crop-only comparison")
    ap.add_argument("--pil_boxes", type=int, default=128, help="boxes for the PIL loop")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--window", type=int, default=0, help="crop window P (0: 2*size)")
    ap.add_argument("--stride", type=int, default=32)
    ap.add_argument("--num_classes", type=int, default=65)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="also time the full proposal fn")
    ap.add_argument("--skip_scoring", action="store_true")
    contract.add_args(ap)
    args = contract.parse(ap, argv, SMOKE)
    h, w = (int(v) for v in args.image_hw.split(","))
    window = args.window or None
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, h, w, 3), dtype=np.uint8)
    hw = np.tile(np.array([[h, w]], np.int32), (args.batch, 1))
    res = {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
           "image_hw": [h, w], "batch": args.batch,
           "sizes": {"image_hw": [h, w], "batch": args.batch, "crop_boxes": args.crop_boxes,
                     "crop_size": args.crop_size, "chunk": args.chunk, "stride": args.stride,
                     "num_classes": args.num_classes, "dtype": args.dtype}}

    # ---- 1. crops: on-device batched vs per-box PIL loop (boxes: sliding candidates)
    cand, valid = proposals.sliding_candidates((h, w), jnp.array([h, w]), args.stride)
    cand = np.asarray(cand)[np.asarray(valid)]
    pick = rng.choice(len(cand), size=args.crop_boxes, replace=len(cand) < args.crop_boxes)
    boxes = np.stack([cand[rng.permutation(pick)] for _ in range(args.batch)])
    s = args.crop_size
    dev_images, dev_boxes, dev_hw = map(jax.device_put, (images, boxes, hw))
    crop_fn = jax.jit(lambda i, b, v: crops_lib.crop_boxes(i, b, v, out_size=s,
                                                           chunk=args.chunk, window=window))
    _, c_dev, t_dev = timed(crop_fn, (dev_images, dev_boxes, dev_hw), args.repeats)
    n_dev = args.batch * args.crop_boxes
    n_pil = min(args.pil_boxes, n_dev)
    flat = boxes.reshape(-1, 4)
    t0 = time.perf_counter()
    for k in range(n_pil):
        pil_crop(images[k // args.crop_boxes], flat[k], 1.0, s)
    t_pil = time.perf_counter() - t0
    res["crop"] = {"size": s, "window": window or 2 * s, "boxes": n_dev, "compile_s": c_dev,
                   "device_crops_per_s": n_dev / t_dev, "pil_loop_crops_per_s": n_pil / t_pil,
                   "speedup": (n_dev / t_dev) / (n_pil / t_pil),
                   "resample_gmacs_per_crop": crops_lib.crop_flops(s, window) / 1e9}
    print(f"[crops {s}px] device batched: {n_dev / t_dev:9.1f} crops/s   "
          f"PIL per-box loop: {n_pil / t_pil:9.1f} crops/s   "
          f"speedup x{res['crop']['speedup']:.2f}", flush=True)
    if args.skip_scoring:
        return contract.finish(args, res)

    # ---- 2. candidate scoring: crops + CLIP + entropy, all candidates of the batch
    model, params, name = get_model(args)
    size = int(model.config.vision_config.image_size)
    d = int(model.config.projection_dim)
    txt = rng.normal(size=(args.num_classes, d)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    score_fn = jax.jit(lambda p, i, v: proposals.score_candidates(
        model, p, txt, i, v, stride=args.stride, chunk=args.chunk, window=window)[2])
    k = proposals.sliding_candidates((h, w), jnp.array([h, w]), args.stride)[0].shape[0]
    score_c, c_score, t_score = timed(score_fn, (params, dev_images, dev_hw), args.repeats)
    # the CLIP image tower alone on as many ready-made crops, same chunking
    from ezsd_jax.clip.text import encode_image
    n_all = args.batch * k
    c = min(args.chunk * args.batch, n_all)
    nc = -(-n_all // c)
    ready = jnp.zeros((nc, c, size, size, 3), jnp.float32)
    clip_fn = jax.jit(lambda p, x: jax.lax.map(lambda y: encode_image(model, p, y), x))
    _, c_clip, t_clip = timed(clip_fn, (params, ready), args.repeats)
    res["scoring"] = {"model": name, "dtype": args.dtype, "clip_image_size": size,
                      "candidates_per_image": k, "seconds_per_batch": t_score,
                      "compile_s": c_score, "clip_only_compile_s": c_clip,
                      "crops_per_s": n_all / t_score,
                      "clip_only_crops_per_s": nc * c / t_clip,
                      "crop_overhead_fraction": max(t_score - t_clip * n_all / (nc * c), 0)
                      / t_score}
    print(f"[scoring] {name} {args.dtype} {size}px: {k} candidates/image, "
          f"{t_score:.3f}s/batch = {n_all / t_score:.1f} crops/s "
          f"(CLIP tower alone: {nc * c / t_clip:.1f} crops/s; crops+score overhead "
          f"{100 * res['scoring']['crop_overhead_fraction']:.0f}%)", flush=True)
    if args.full:
        fn = proposals.make_proposal_fn(model, txt, np.arange(args.num_classes) < 48,
                                        stride=args.stride, chunk=args.chunk, window=window)
        g = 8
        gt = np.tile(np.array([[10, 10, 60, 80]], np.float32), (args.batch, g, 1))
        gv = np.ones((args.batch, g), bool)
        sc = np.ones((args.batch,), np.float32)
        full_args = (params, dev_images, dev_hw, gt, gv, sc)
        full_c, c_full, t_full = timed(fn, full_args, args.repeats)
        m = min(1000, k)
        res["full"] = {"seconds_per_batch": t_full, "compile_s": c_full,
                       "crops_per_image": k + m + g,
                       "crops_per_s": args.batch * (k + m + g) / t_full,
                       "images_per_s": args.batch / t_full,
                       "aot": contract.aot_estimate(full_c, args.batch)}
        print(f"[full proposal fn] {t_full:.3f}s/batch = {args.batch / t_full:.2f} img/s, "
              f"{res['full']['crops_per_s']:.1f} crops/s (incl. NMS + 1.2x feature pass)",
              flush=True)
    res["compile_s"] = sum(x for v in res.values() if isinstance(v, dict)
                           for key, x in v.items() if key.endswith("compile_s"))
    if args.profile:
        res["profile"] = contract.profile(
            args, (lambda: full_c(*full_args)) if args.full
            else (lambda: score_c(params, dev_images, dev_hw)))
    return contract.finish(args, res)


if __name__ == "__main__":
    main()
