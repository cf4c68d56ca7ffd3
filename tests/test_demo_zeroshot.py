"""The built-in zero-shot demo: the world (determinism, split hygiene, formats), the
report helpers, and the reduced demo (configs/demo_ci.py) end to end.

The end-to-end test runs every stage of the demo, then two controls:
  - the trained detector evaluated with the novel names' text embeddings shuffled among
    themselves: novel AP50 must collapse to ~0 (the novel detections really come from
    the right names' embeddings, not from some leak of novel boxes or labels);
  - the same pipeline with distillation off (a base-only detector with the CLIP text
    classifier). In this world it is NOT near 0: the toy CLIP's joint space is smooth in
    colour (cos(orange diamond, yellow star) ~ 0.7 in its text embeddings), so a base-only
    detector already finds some novel objects through the text embeddings alone (like
    ViLD-text on COCO). Measured: ~0.2-0.3 novel AP50. The full run must beat it by a
    clear margin, which a pipeline whose distillation is silently off cannot do.
"""
import json
import os
import time

import numpy as np
import pytest

from ezsd_jax.demo import report, world


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
    assert objs == objs2 and a.shape == (128, 128, 3) and a.dtype == np.uint8
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
    from ezsd_jax.clip import stages as clip_stages
    from ezsd_jax.demo import stages as demo_stages
    from ezsd_jax.ezsd import stages as ezsd_stages
    return {"demo_data": demo_stages.demo_data, "clip_pretrain": clip_stages.clip_pretrain,
            "renorm": clip_stages.renorm, "proposals": clip_stages.proposals,
            "ezsd_train": ezsd_stages.ezsd_train, "ezsd_eval": ezsd_stages.ezsd_eval,
            "ablation": demo_stages.ablation, "demo_report": demo_stages.demo_report}


def _shuffled_text_control(cfg, wd):
    """The trained detector, evaluated with the novel names' text embeddings permuted."""
    from ezsd_jax.clip.text import load_text_embeddings, save_text_embeddings
    from ezsd_jax.ezsd import stages as ezsd_stages
    names, emb = load_text_embeddings(os.path.join(wd, "clip_renorm", "text_embeddings.npz"))
    novel = [names.index(n) for n in cfg.ezsd.novel_names]
    perm = emb.copy()
    perm[novel] = emb[novel[1:] + novel[:1]]          # a derangement of the novel rows
    sub = os.path.join(wd, "control_shuffled_text")
    os.makedirs(sub, exist_ok=True)
    os.symlink(os.path.join(wd, "ckpt_ezsd"), os.path.join(sub, "ckpt_ezsd"))
    path = os.path.join(sub, "text_embeddings.npz")
    save_text_embeddings(path, names, perm)
    c = cfg.copy_and_resolve_references()
    c.ezsd.text_embeddings = path
    return ezsd_stages.ezsd_eval(c, sub)


@pytest.mark.slow
def test_reduced_demo_end_to_end(tmp_path):
    from configs import demo_ci
    from ezsd_jax.demo import stages as demo_stages
    cfg = demo_ci.get_config()
    wd = str(tmp_path)
    fns = _stage_fns()
    times = {}
    for name in cfg.stages:
        t0 = time.perf_counter()
        fns[name](cfg, wd)
        times[name] = round(time.perf_counter() - t0, 1)
    print("stage seconds", times, "total", round(sum(times.values()), 1))
    full = json.load(open(os.path.join(wd, "eval", "ezsd_summary.json")))
    clean = json.load(open(os.path.join(wd, "clip_pretrain", "clean_accuracy.json")))
    crop = json.load(open(os.path.join(wd, "clip_renorm", "crop_accuracy.json")))
    text = open(os.path.join(wd, "report.md")).read()
    assert "novel AP50" in text and "before re-norm" in text
    assert os.path.getsize(os.path.join(wd, "detections.png")) > 10_000
    # the teacher knows every category in its own (clean) domain, less so on detection
    # crops, and re-normalization on BASE crops helps base and novel crops
    assert clean["acc_all"] > 0.9
    assert crop["before"]["acc_all"] < clean["acc_all"]
    assert crop["after"]["acc_base"] > crop["before"]["acc_base"]
    assert crop["after"]["acc_novel"] > crop["before"]["acc_novel"]

    # controls
    nodist = demo_stages.run_variant(cfg, "no_distillation", wd)["summary"]
    shuffled = _shuffled_text_control(cfg, wd)
    f, n, s = (r["novel"]["AP50"] for r in (full, nodist, shuffled))
    print(f"novel AP50: full {f:.3f}, no distillation {n:.3f}, shuffled novel text {s:.3f};"
          f" base AP50 full {full['base']['AP50']:.3f}, no distillation "
          f"{nodist['base']['AP50']:.3f}")
    assert full["base"]["AP50"] > 0.5
    assert s < 0.05                      # shuffled novel text: novel detections collapse
    assert f > 0.25 and f > 5 * max(s, 0.01)
    assert f > n + 0.08                  # distillation adds clearly to the text-only floor
    # a re-run finds every output and redoes nothing
    for name in ("demo_data", "clip_pretrain", "renorm", "proposals", "ezsd_eval"):
        fns[name](cfg, wd)
    assert json.load(open(os.path.join(wd, "eval", "ezsd_summary.json"))) == full
