"""Helpers shared by the tests: independent references (numpy ports, pycocotools),
small generated data, and running the command-line entry points. Tests import from here,
never from another test file."""
import contextlib
import copy
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ezsd_jax.data import synthetic as S
from ezsd_jax.data.coco import load_coco
from ezsd_jax.data.pipeline import DetectionPipeline

ROOT = Path(__file__).resolve().parents[1]


def load_config(path, flat=None):
    """get_config() of the config file `path`, with dotted overrides `flat` applied."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"cfg_{Path(path).stem}", str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    if flat:
        cfg.update_from_flattened_dict(dict(flat))
    return cfg


def cli_argv(module, config, workdir, flat=None):
    """`python -m module --config=... --workdir=... --config.k=v ...`"""
    args = [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}"]
    return args + [f"--config.{k}={v}" for k, v in (flat or {}).items()]


def run_cli(args, timeout=240, env=None):
    """Run a command from the repository root with this checkout first on the path."""
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


# ---- numpy port of torchvision's ROIAlign forward (CPU kernel)

def np_bilinear(f, y, x):
    h, w = f.shape[:2]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(f.shape[2], np.float64)
    y = max(y, 0.0)
    x = max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_high = y_low = h - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_high = x_low = w - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * f[y_low, x_low] + hy * lx * f[y_low, x_high]
            + ly * hx * f[y_high, x_low] + ly * lx * f[y_high, x_high])


def np_roi_align(f, boxes, scale, out=7, sr=2, aligned=True):
    f = f.astype(np.float64)
    res = np.zeros((len(boxes), out, out, f.shape[2]))
    off = 0.5 if aligned else 0.0
    for r, b in enumerate(boxes.astype(np.float64)):
        x1, y1 = b[0] * scale - off, b[1] * scale - off
        x2, y2 = b[2] * scale - off, b[3] * scale - off
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / out, rw / out
        gh = sr if sr > 0 else math.ceil(rh / out)
        gw = sr if sr > 0 else math.ceil(rw / out)
        count = max(gh * gw, 1)
        for ph in range(out):
            for pw in range(out):
                acc = 0.0
                for iy in range(gh):
                    y = y1 + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        x = x1 + pw * bw + (ix + 0.5) * bw / gw
                        acc = acc + np_bilinear(f, y, x)
                res[r, ph, pw] = acc / count
    return res


# ---- masks: random polygons, uncompressed RLE, numpy mask targets

MASK_H, MASK_W = 48, 64


def rand_polygon(rng, h=MASK_H, w=MASK_W, n=None):
    """Star-shaped polygon (flat x, y list) inside the image."""
    n = n or int(rng.integers(5, 12))
    cx, cy = rng.uniform(0.3 * w, 0.7 * w), rng.uniform(0.3 * h, 0.7 * h)
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = rng.uniform(0.15, 0.45, n) * min(h, w)
    xs = np.clip(cx + rad * np.cos(ang), 0, w - 1)
    ys = np.clip(cy + rad * np.sin(ang), 0, h - 1)
    return np.stack([xs, ys], 1).ravel().tolist()


def uncompressed_rle(mask):
    """Column-major run lengths starting with zeros (COCO's uncompressed RLE)."""
    flat = np.asarray(mask, np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]])) if flat.size else []
    counts = np.diff(np.r_[0, change]).tolist()
    return {"counts": counts[:-1] if counts and sum(counts) > flat.size else counts,
            "size": list(mask.shape)}


def np_mask_targets(gts, rois, gi, sr, size=28):
    """Straightforward numpy crop-and-resize of each matched rasterized mask."""
    clipped = rois.astype(np.float64).copy()
    clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], 0, MASK_W)
    clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], 0, MASK_H)
    return np.stack([np_roi_align(gts[g][:, :, None], clipped[i:i + 1], 1.0, size, sr)[0, ..., 0]
                     for i, g in enumerate(gi)])


# ---- a tiny LVIS-format ground truth

def lvis_gt(rng, n_img=6):
    cats = [{"id": c, "name": f"thing_{c}", "frequency": "rcf"[c % 3], "synset": "x"}
            for c in range(1, 7)]
    images, anns = [], []
    for i in range(1, n_img + 1):
        present = [1 + (i % 6), 1 + ((i + 2) % 6)]
        images.append({"id": i, "height": 200, "width": 300,
                       "coco_url": f"http://x/val2017/{i:012d}.jpg",
                       "neg_category_ids": [1 + ((i + 4) % 6)],
                       "not_exhaustive_category_ids": []})
        for c in present:
            w, h = rng.uniform(10, 120, 2)
            x, y = rng.uniform(0, 300 - w), rng.uniform(0, 200 - h)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c,
                         "bbox": [x, y, w, h], "area": w * h * 0.8})
    return {"images": images, "annotations": anns, "categories": cats}


# ---- a small synthetic COCO set and a pipeline over it

PIPE_HW = (64, 80)


def synthetic_dataset(tmp_path, n=7, objects=(1, 4), seed=0, **kw):
    spec = S.SyntheticSpec(S.default_categories(5), image_hw_range=((50, 110), (50, 110)),
                           objects_per_image=objects, object_size=(10, 36), **kw)
    ann = S.write_coco_dataset(str(tmp_path), spec, n, seed=seed)
    return load_coco(ann, str(tmp_path / "train"))


def small_pipeline(ds, **kw):
    args = dict(batch_size=3, image_size=PIPE_HW, max_boxes=4, train=False, short_side=48,
                max_side=80, num_threads=2, prefetch=2, process_index=0, process_count=1)
    args.update(kw)
    return DetectionPipeline(ds, **args)


# ---- pycocotools' COCOeval as the independent AP reference
def cocoeval_ap(gt_file: str, dets: list, names, iou_type: str = "bbox") -> tuple[float, float]:
    """(AP, AP50) that COCOeval gives `dets` on the categories named `names` of `gt_file`,
    over all its images (0 where there are no detections or no GT, as our summary)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
        ids = [c["id"] for c in gt.loadCats(gt.getCatIds()) if c["name"] in names]
        mine = [copy.deepcopy(d) for d in dets if d["category_id"] in ids]  # loadRes edits
        if not mine:
            return 0.0, 0.0
        ev = COCOeval(gt, gt.loadRes(mine), iou_type)
        ev.params.imgIds, ev.params.catIds = sorted(gt.getImgIds()), ids
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return max(float(ev.stats[0]), 0.0), max(float(ev.stats[1]), 0.0)
