"""The built-in zero-shot demo: the world (determinism, split hygiene, formats), the
report helpers, and the reduced demo (configs/demo_ci.py) end to end.

The end-to-end test runs every stage of the demo, checks that the distillation really
trained the student's region embeddings towards the teacher's (their cosine, logged by
ezsd_train, rises), then a control: the trained detector evaluated with the novel names'
text embeddings shuffled among themselves must lose its novel AP50 (the novel detections
really come from the right names' embeddings, not from some leak of novel boxes or labels).

The comparison with a base-only detector (distillation off) is a second training run
(~2 min on 2 cores), so it lives in benchmarks/demo_spread.py, which measures it on
every seed (RESULTS.md: distillation adds 0.05-0.13 novel AP50 over that text-only floor,
0.27-0.31). The floor is not ~0 in this world: the toy CLIP's joint space is smooth in
colour, so a base-only detector finds some novel objects through the text embeddings alone
(like ViLD-text on COCO).
"""
import dataclasses
import json
import os
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from ezsd_jax.demo import report, world
from ezsd_jax.ezsd.stages import CKPT_NAME


# ----------------------------------------------------------------------------- world

def test_default_split_shares_no_colour_shape_or_word():
    spec = world.WorldSpec()
    shapes = [c.shape for c in spec.categories]
    colours = [tuple(c.rgb()) for c in spec.categories]
    assert len(set(shapes)) == len(shapes) and len(set(colours)) == len(colours)
    base_words = {w for n in spec.base for w in n.split()}
    assert not base_words & {w for n in spec.novel for w in n.split()}
    with pytest.raises(ValueError, match="unknown categories"):
        world.WorldSpec(novel=("plaid unicorn",))
    with pytest.raises(ValueError, match="twice"):
        world.WorldSpec(base=("red circle",), novel=("red circle",))


def test_scenes_are_deterministic_with_tight_boxes_and_novel_objects():
    spec = world.WorldSpec()
    a, objs = world.render_scene(spec, np.random.default_rng(5), "train")
    b, objs2 = world.render_scene(spec, np.random.default_rng(5), "train")
    np.testing.assert_array_equal(a, b)
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8 and len(objs) == len(objs2)
    for o, o2 in zip(objs, objs2):      # the same objects, their exact pixel masks included
        np.testing.assert_array_equal(o.pop("mask"), o2.pop("mask"))
        assert o == o2
    counts = np.zeros(len(spec.categories))
    for i in range(60):
        _, objs = world.render_scene(spec, np.random.default_rng(i), "train")
        assert 1 <= len(objs) <= spec.objects_per_image[1]
        for o in objs:
            x, y, w, h = o["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128
            assert 0 < o["area"] <= w * h
            counts[o["category"]] += 1
    novel = spec.is_novel
    # novel objects are in the training scenes (unannotated downstream), less often
    assert counts[novel].min() > 0
    assert counts[novel].mean() < counts[~novel].mean()
    np.testing.assert_allclose(spec.weights("val"), 1 / len(spec.categories))


def test_written_world_loads_as_coco_and_captions(tmp_path):
    from ezsd_jax.data.coco import load_coco
    spec = world.WorldSpec(caption_empty_frac=0.25)
    p = world.write_world(str(tmp_path), spec, train_images=6, val_images=3,
                          captions_per_category=2, heldout_per_category=1, seed=1,
                          log=lambda m: None)
    ds = load_coco(p["train_ann"], p["train_images"])
    assert len(ds) == 6 and ds.cat_names == spec.names
    assert sum(len(r.boxes) for r in ds.records) > 6
    base_only = load_coco(p["train_ann"], p["train_images"], category_names=list(spec.base))
    assert all((r.classes < len(spec.base)).all() for r in base_only.records)
    caps = world.load_caption_set(p["captions_train"])
    n_obj = 2 * len(spec.categories)
    assert caps["images"].shape == (n_obj + round(0.25 * n_obj), 32, 32, 3)
    assert caps["names"] == spec.names
    for k, c in zip(caps["labels"], caps["captions"]):
        assert c == (world.EMPTY_CAPTION if k < 0 else f"a photo of a {spec.names[k]}.")
    # re-running writes nothing new (skips existing files)
    mtime = os.stat(p["train_ann"]).st_mtime_ns
    world.write_world(str(tmp_path), spec, train_images=6, val_images=3,
                      captions_per_category=2, heldout_per_category=1, seed=1,
                      log=lambda m: None)
    assert os.stat(p["train_ann"]).st_mtime_ns == mtime


# ----------------------------------------------------------------------------- report

def test_tables_and_drawing():
    s = {"base": {"AP50": 0.8}, "novel": {"AP50": 0.4}, "all": {"AP50": 0.6}}
    acc = {"before": {"acc_base": 0.5, "acc_novel": 0.25, "acc_all": 0.4},
           "after": {"acc_base": 0.9, "acc_novel": 0.75, "acc_all": 0.85}}
    t = report.main_tables(s, acc, {"acc_base": 1.0, "acc_novel": 0.99, "acc_all": 0.995})
    assert "| 0.800     | 0.400      | 0.600" in t and "0.250" in t and "0.990" in t
    t = report.ablation_table({"no_renorm": {"summary": s, "crop_accuracy": None},
                               "full": {"summary": s, "crop_accuracy": acc["after"]}})
    lines = [ln for ln in t.splitlines() if ln.startswith("| ")]
    assert lines[1].startswith("| EZSD (full") and "without re-normalization" in lines[2]
    img = np.zeros((20, 30, 3), np.uint8)
    dets = [{"image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 8], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [5, 5, 3, 3], "score": 0.1}]
    im = report.draw_detections(img, dets, {1: "a", 2: "b"}, {2}, scale=2)
    arr = np.asarray(im)
    assert im.size == (60, 40)
    assert (arr == report.NOVEL_COLOUR).all(-1).any()           # the novel detection
    assert not (arr == report.BASE_COLOUR).all(-1).any()         # below the threshold
    grid = report.detections_grid([im, im, im], columns=2, title="t")
    assert grid.size[0] > 120 and grid.size[1] > 80


# ----------------------------------------------------------------------------- end to end

def _stage_fns():
    from ezsd_jax.stages import STAGES, resolve_stage
    return {name: resolve_stage(name) for name in STAGES}


DISTILL_COS_GAIN = 0.5          # seed 0 (CI): 0.044 -> 0.930


def _metric_column(wd: str, column: str) -> np.ndarray:
    """One column of the ezsd_train metrics CSV (ezsd_jax/metrics.MetricWriter), in step
    order, rows without it skipped."""
    import csv
    path = os.path.join(wd, "metrics", f"{CKPT_NAME}.csv")
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get(column)]
    return np.array([float(r[column]) for r in rows])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, optimized_env):
    """The reduced demo trained once for this module: (cfg, workdir), by the users'
    command `python -m ezsd_jax.main --config=configs/demo_ci.py` in a subprocess with the
    default XLA code generation (its time is executing ~900 training steps; the test
    workers compile at -O0: tests/conftest.py). `cfg` is the config that command used
    (data pointed into the workdir), for the checks that call stages in-process.

    The tests using it share one xdist worker: `--dist loadscope` in the Makefile
    schedules per module."""
    import subprocess
    import sys
    from configs import demo_ci
    from ezsd_jax.data.synthetic_stage import point_data_config
    wd = str(tmp_path_factory.mktemp("demo_ci"))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ezsd_jax.main", "--config=configs/demo_ci.py",
                        f"--workdir={wd}"], cwd=ROOT, env=optimized_env,
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    print(*[ln for ln in p.stdout.splitlines() if " done in " in ln], sep="\n")
    print(f"demo_ci total {time.perf_counter() - t0:.1f} s")
    cfg = demo_ci.get_config()
    point_data_config(cfg, wd)        # as ezsd_jax.main does
    return cfg, wd


@pytest.mark.slow
def test_reduced_demo_end_to_end(demo_run):
    from ezsd_jax.demo import stages as demo_stages
    cfg, wd = demo_run
    fns = _stage_fns()
    full = json.load(open(os.path.join(wd, "eval", "ezsd_summary.json")))
    clean = json.load(open(os.path.join(wd, "clip_pretrain", "clean_accuracy.json")))
    crop = json.load(open(os.path.join(wd, "clip_renorm", "crop_accuracy.json")))
    text = open(os.path.join(wd, "report.md")).read()
    assert "novel AP50" in text and "before re-norm" in text
    assert os.path.getsize(os.path.join(wd, "detections.png")) > 10_000
    # Bounds set on the spread of this config over seeds 0-2 (benchmarks/demo_spread.py,
    # figures in benchmarks/RESULTS.md; CI runs seed 0). The teacher knows every category
    # in its own (clean) domain (0.93-0.97), less so on detection crops, and
    # re-normalization on BASE crops helps base crops (+0.12 to +0.34) and all crops
    # (+0.10 to +0.18). Novel crops are NOT asserted: with this reduced config they moved
    # -0.09 / -0.07 / +0.05 (the full demo's seeds: up on all three).
    assert clean["acc_all"] > 0.9
    assert crop["before"]["acc_all"] < clean["acc_all"]
    assert crop["after"]["acc_base"] > crop["before"]["acc_base"]
    assert crop["after"]["acc_all"] > crop["before"]["acc_all"]

    # the distillation ran and pulled the student's region embeddings towards the
    # teacher's: mean cosine over the logged steps, first vs last
    cos = _metric_column(wd, "distill_cos")
    assert len(cos) >= 4 and np.isfinite(cos).all(), cos
    print(f"distill_cos first {cos[0]:.3f} last {cos[-1]:.3f}")
    assert cos[-1] > cos[0] + DISTILL_COS_GAIN, cos
    assert min(_metric_column(wd, "distill_num")) > 0

    # control (measured over seeds 0-2: full novel AP50 0.33-0.44, shuffled novel text
    # <= 0.003, base 0.88-0.91)
    shuffled = demo_stages.shuffled_novel_text_control(cfg, wd)
    f, s = full["novel"]["AP50"], shuffled["novel"]["AP50"]
    print(f"novel AP50: full {f:.3f}, shuffled novel text {s:.3f}; "
          f"base AP50 {full['base']['AP50']:.3f}")
    assert full["base"]["AP50"] > 0.7
    assert s < 0.05                      # shuffled novel text: novel detections collapse
    assert f > 0.25 and f > 5 * max(s, 0.01)
    # a re-run finds every output and redoes nothing
    for name in ("demo_data", "clip_pretrain", "renorm", "proposals", "ezsd_eval"):
        fns[name](cfg, wd)
    assert json.load(open(os.path.join(wd, "eval", "ezsd_summary.json"))) == full


# ----------------------------------------------------------------------------- predict
# `python -m ezsd_jax.predict` and the Detector API on the demo's trained workdir: the
# val images (AP50 from predict's own JSON == ezsd_eval's) and real photos (scikit-learn's
# sample images) in the variants users have: EXIF-rotated, grayscale, RGBA, 16-bit, CMYK,
# plus a corrupt JPEG and a text file.

def _photo_variants(d):
    """Writes the photo variants into `d`; returns {name: upright decoded HxWx3}."""
    import sklearn
    from PIL import Image
    src = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", "china.jpg")
    up = np.asarray(Image.open(src).convert("RGB"))[::2, ::2]     # 214 x 320, non-square
    os.makedirs(d, exist_ok=True)
    Image.fromarray(up).save(os.path.join(d, "upright.png"))
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(up)))   # 320 x 214 as stored
    exif = Image.Exif()
    exif[0x0112] = 6                                   # viewer rotates 90 degrees clockwise
    stored.save(os.path.join(d, "exif_rotated.png"), exif=exif.tobytes())
    stored.save(os.path.join(d, "exif_rotated.jpg"), exif=exif.tobytes(), quality=95)
    g = Image.fromarray(up).convert("L")
    g.save(os.path.join(d, "gray.png"))
    Image.fromarray((np.asarray(g).astype(np.uint16) * 257)).save(os.path.join(d, "gray16.png"))
    Image.fromarray(up).convert("RGBA").save(os.path.join(d, "rgba.png"))
    Image.fromarray(up).convert("CMYK").save(os.path.join(d, "cmyk.jpg"))
    with open(src, "rb") as f:
        data = f.read()
    with open(os.path.join(d, "corrupt.jpg"), "wb") as f:
        f.write(data[:len(data) // 3])
    with open(os.path.join(d, "notes.txt"), "w") as f:
        f.write("not an image\n")
    return up


@pytest.fixture(scope="module")
def predict_run(demo_run, tmp_path_factory, optimized_env):
    """One CLI run over the val images + the photo variants with the split's names."""
    import subprocess
    import sys
    cfg, wd = demo_run
    d = str(tmp_path_factory.mktemp("predict_in"))
    for f in sorted(os.listdir(cfg.data.val_images)):
        os.symlink(os.path.join(cfg.data.val_images, f), os.path.join(d, f))
    up = _photo_variants(d)
    out = str(tmp_path_factory.mktemp("predict_out"))
    p = subprocess.run([sys.executable, "-m", "ezsd_jax.predict", f"--workdir={wd}",
                        f"--images={d}", "--vocabulary=all", f"--out={out}"],
                       capture_output=True, text=True, env=optimized_env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return {"out": out, "in": d, "stdout": p.stdout, "upright": up, "cfg": cfg, "wd": wd}


@pytest.mark.slow
def test_predict_cli_on_val_and_photos(predict_run):
    from ezsd_jax.data.coco import read_json
    from ezsd_jax.core.images import decode_image
    from ezsd_jax.evaluate import coco_eval
    from ezsd_jax.train import load_dataset
    r, cfg, wd = predict_run, predict_run["cfg"], predict_run["wd"]
    results = json.load(open(os.path.join(r["out"], "detections.json")))
    summary = json.load(open(os.path.join(r["out"], "summary.json")))
    n_val = len(os.listdir(cfg.data.val_images))
    # the corrupt JPEG and the text file: one line each, counted, the rest ran
    assert summary["skipped"] == 2 and summary["images"] == n_val + 7
    assert sorted(os.path.basename(s["file"]) for s in summary["skipped_files"]) == \
        ["corrupt.jpg", "notes.txt"]
    assert r["stdout"].count("[predict] skipped:") == 2
    assert "corrupt.jpg" in r["stdout"] and "notes.txt" in r["stdout"]
    # every box inside its (upright) original image
    by_file = {}
    for d in results:
        by_file.setdefault(os.path.basename(d["file_name"]), []).append(d)
    assert {"upright.png", "exif_rotated.png", "gray16.png", "cmyk.jpg"} <= set(by_file)
    sizes = {}
    for f, dets in by_file.items():
        h, w = sizes[f] = decode_image(os.path.join(r["in"], f)).shape[:2]
        for d in dets:
            x, y, bw, bh = d["bbox"]
            assert 0 <= x and 0 <= y and bw > 0 and bh > 0
            assert x + bw <= w + 1e-3 and y + bh <= h + 1e-3, (f, d, (h, w))
    assert sizes["exif_rotated.jpg"] == sizes["upright.png"] == r["upright"].shape[:2]
    # EXIF: the rotated file's boxes are the upright file's (same decoded pixels)
    key = lambda d: (d["category_name"], d["score"], tuple(d["bbox"]))  # noqa: E731
    assert sorted(map(key, by_file["exif_rotated.png"])) == \
        sorted(map(key, by_file["upright.png"]))
    # overlays for every readable file, indexed
    overlays = os.listdir(os.path.join(r["out"], "overlays"))
    assert len(overlays) == summary["images"]
    index = open(os.path.join(r["out"], "index.html")).read()
    assert all(o in index for o in overlays)
    # AP50 from predict's own JSON == ezsd_eval's (same checkpoint, names, thresholds)
    names = summary["names"]
    ds = load_dataset(cfg.data, "val", category_names=names)
    gt_ids = {n: i for n, i in zip(ds.cat_names, ds.cat_ids)}
    img_ids = {os.path.basename(rec.path): rec.image_id for rec in ds.records}
    coco_res = [dict(d, image_id=img_ids[f], category_id=gt_ids[d["category_name"]])
                for f, dets in by_file.items() if f in img_ids for d in dets]
    novel = [gt_ids[n] for n in summary["novel_names"]]
    assert len(novel) == len(cfg.ezsd.novel_names)
    gt = ds.coco()
    ref = read_json(os.path.join(wd, "eval", "ezsd_eval_metrics.json"))
    mine_all = coco_eval(gt, coco_res, list(img_ids.values()), list(gt_ids.values()))
    mine_novel = coco_eval(gt, coco_res, list(img_ids.values()), novel)
    print(f"predict AP50 all {mine_all['AP50']:.4f} novel {mine_novel['AP50']:.4f}; "
          f"ezsd_eval {ref['all']['AP50']:.4f} / {ref['novel']['AP50']:.4f}")
    assert ref["novel"]["AP50"] > 0.25               # predict finds the novel objects
    assert abs(mine_all["AP50"] - ref["all"]["AP50"]) < 1e-3
    assert abs(mine_novel["AP50"] - ref["novel"]["AP50"]) < 1e-3


@pytest.mark.slow
def test_detector_api_order_extra_names_and_bundle(predict_run, tmp_path):
    import jax
    from ezsd_jax.predict import buckets
    from ezsd_jax import Detector
    from ezsd_jax.core.images import decode_image
    from ezsd_jax.models import detector as det_mod
    cfg, wd = predict_run["cfg"], predict_run["wd"]
    det = Detector.load(wd)
    vdir = cfg.data.val_images
    imgs = [decode_image(os.path.join(vdir, f)) for f in sorted(os.listdir(vdir))[:3]]
    imgs.append(predict_run["upright"])
    names = det.vocabulary("all")
    run = lambda ns: dict(det.detect_many(imgs, ns, progress=False))  # noqa: E731
    a = run(names)
    assert sum(map(len, a.values())) > 0
    assert run(names[::-1]) == a                           # order: exactly the same
    assert run([names[i] for i in np.random.default_rng(0).permutation(len(names))]) == a
    # extra names: the kept names' logits and boxes are unchanged; their probabilities
    # are the old ones times one factor <= 1 per proposal (the bigger softmax)
    extra = ["red mug", "giraffe", "plaid unicorn"]
    x = buckets.prepare(imgs[0], buckets.geometry(128, 128, (128, 128), 128, 128))
    batch = {"image": x[None], "image_hw": np.array([[128, 128]], np.int32),
             "valid": np.array([True])}
    model = det_mod.FasterRCNN(dataclasses.replace(det.dcfg, num_classes=16))
    head = jax.jit(lambda e, v: det_mod.infer_parts(model, det.variables, batch, e, v)["head"])
    outs = []
    for ns in (sorted(names), sorted(names) + extra):          # 9 and 12 names: bucket 16
        outs.append(jax.device_get(head(*buckets.pad_vocabulary(det.embed_names(ns), 16))))
    k = len(names)
    l0, l1 = outs[0]["logits"][0], outs[1]["logits"][0]
    np.testing.assert_allclose(l1[:, :k], l0[:, :k], rtol=1e-5, atol=1e-4)
    logp = lambda z: (z - np.logaddexp.reduce(z.astype(np.float64), -1, keepdims=True)  # noqa
                      )[:, :k]
    dlog = logp(l1) - logp(l0)              # log of p_new / p_old for each kept name
    assert (dlog <= 1e-5).all()
    np.testing.assert_allclose(dlog, dlog[:, :1].repeat(k, 1), atol=1e-4)
    same_cls = np.argmax(l1[:, :16], -1) < k
    np.testing.assert_allclose(outs[1]["deltas"][0][same_cls],
                               outs[0]["deltas"][0][same_cls], rtol=1e-5, atol=1e-5)
    # bundles: the adapted CLIP copied (any names), or a fixed vocabulary's embeddings,
    # which loads without the workdir, detects the same and serves its names only
    from ezsd_jax.predict import bundle
    b = bundle.export(det, str(tmp_path / "bundle"))
    man = json.load(open(os.path.join(b, "manifest.json")))
    assert man["versions"]["jax"] == jax.__version__ and man["text"] == "clip"
    assert man["step"] == det.step and man["novel"] == list(cfg.ezsd.novel_names)
    assert os.path.exists(os.path.join(b, "adapted_clip", "config.json"))
    fb = bundle.export(det, str(tmp_path / "fixed"), names=names)
    fixed = Detector.load(fb)
    assert fixed.clip is None
    assert dict(fixed.detect_many(imgs, names, progress=False)) == a
    with pytest.raises(ValueError, match="fixed vocabulary"):
        fixed.detect(imgs[0], ["giraffe"])
