"""Compiled memory of the test-time post-processing (models/postprocess.detections) per
image: every (box, class) pair (topk_candidates=0, the reference) vs a cap of K pairs, at
the COCO and LVIS shapes (1000 proposals, 65 / 1203 classes, 300 detections). XLA's
memory analysis of the compiled function (temp + argument + output bytes), so the figure
does not depend on the machine's load; the compile time is printed too.

  python benchmarks/postprocess_memory.py [--backend=cpu] [--batch=1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--proposals", type=int, default=1000)
    ap.add_argument("--cases", default="65:0,65:4096,1203:0,1203:8192")
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    from ezsd_jax.models import postprocess

    b, r = a.batch, a.proposals
    rows = []
    for case in a.cases.split(","):
        c, k = (int(x) for x in case.split(":"))
        fn = jax.jit(lambda lg, dl, pr, pv, hw, k=k: postprocess.detections(
            lg, dl, pr, pv, hw, score_threshold=0.0, nms_threshold=0.5, max_detections=300,
            topk_candidates=k))
        args = (jax.ShapeDtypeStruct((b, r, c + 1), jnp.float32),
                jax.ShapeDtypeStruct((b, r, 4), jnp.float32),
                jax.ShapeDtypeStruct((b, r, 4), jnp.float32),
                jax.ShapeDtypeStruct((b, r), jnp.bool_),
                jax.ShapeDtypeStruct((b, 2), jnp.float32))
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        secs = time.perf_counter() - t0
        m = compiled.memory_analysis()
        row = {"classes": c, "topk_candidates": k, "batch": b, "proposals": r,
               "temp_MB": round(m.temp_size_in_bytes / 2 ** 20, 1),
               "argument_MB": round(m.argument_size_in_bytes / 2 ** 20, 1),
               "compile_s": round(secs, 1), "backend": jax.default_backend()}
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
