"""Benchmark: host memory of Mask R-CNN predict on large photos (masks pasted at the
original size), through the Detector API: the demo's tiny Mask R-CNN with random weights
(threshold 0: every image gets test_max_detections masks) on random uint8 photos.

  python benchmarks/bench_mask_paste.py --size=4000x3000 --images=1 --batch=1
  python benchmarks/bench_mask_paste.py --smoke --json=/tmp/m.json

Reports the process's peak resident memory (ru_maxrss, which includes the JAX runtime
and the model, ~1 GB on CPU), the detections and masks returned, and the seconds of
the call (compile included: one call). Contract flags: benchmarks/contract.py.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import contract  # noqa: E402

SMOKE = {"size": "160x120", "images": 1, "batch": 1}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="4000x3000", help="photo WxH")
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    contract.add_args(p)
    return contract.parse(p, argv, SMOKE)


def random_mask_detector(batch: int):
    """The demo's tiny Mask R-CNN, weights filled from the variables' shapes (no init
    compile), three random unit text embeddings."""
    import jax
    from configs import demo
    from ezsd_jax.ezsd.stages import head_config
    from ezsd_jax.models import detector as det
    from ezsd_jax.predict.detector import Detector
    from ezsd_jax.predict.trained_run import to_device
    cfg = demo.get_config()
    cfg.model.mask_on = True
    dcfg, hcfg = head_config(cfg, 1)
    shapes = jax.eval_shape(lambda k: det.init_variables(
        det.FasterRCNN(dcfg), k, 1, np.zeros((1, hcfg.embed_dim), np.float32)),
        jax.random.key(0))
    rng = np.random.default_rng(0)

    def fill(path, s):
        name = str(path[-1])
        if "var" in name or "scale" in name:
            return np.ones(s.shape, s.dtype)
        if "mean" in name or "bias" in name:
            return np.zeros(s.shape, s.dtype)
        return (rng.normal(size=s.shape) * 0.05).astype(s.dtype)
    variables = to_device(jax.tree_util.tree_map_with_path(fill, dict(shapes)))
    names = ["a", "b", "c"]
    emb = rng.normal(size=(3, hcfg.embed_dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return Detector(cfg, variables, None, step=0, source="random", base=names, novel=[],
                    batch_size=batch,
                    fixed_embeddings={("single", n): e for n, e in zip(names, emb)}), names


def main(argv=None):
    args = parse(argv)
    det, names = random_mask_detector(args.batch)
    w, h = (int(v) for v in args.size.split("x"))
    photos = [np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)
              for i in range(args.images)]
    t0 = time.perf_counter()
    out = dict(det.detect_many(photos, names, score_threshold=0.0, progress=False))
    seconds = time.perf_counter() - t0
    dets = sum(map(len, out.values()))
    result = {"bench": "mask_paste", "photo_wh": [w, h], "images": args.images,
              "batch": args.batch, "detections": dets,
              "masks": sum("segmentation" in d for v in out.values() for d in v),
              "seconds_incl_compile": round(seconds, 2),
              "peak_host_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                        / 1024, 1),
              "sizes": {"photo_wh": [w, h], "images": args.images, "batch": args.batch}}
    return contract.finish(args, result)


if __name__ == "__main__":
    main()
