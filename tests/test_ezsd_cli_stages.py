"""The EZSD stages through `python -m ezsd_jax.main`, the way a user runs configs/coco.py
and configs/lvis.py with a real CLIP directory (config.clip.model): here a tiny random
CLIP saved with save_pretrained, a generated set whose annotations alternate polygons and
compressed RLE (COCO format, and the same set in LVIS v1 format), and the tiny detector's
sizes at 64x64 with every other value as the config file sets it (Mask R-CNN, box head
'301212'; LVIS: seesaw loss, repeat-factor sampling, multi-scale training, box-size
weighted renorm). One command runs renorm -> proposals -> ezsd_train -> ezsd_eval and
reports box and mask AP (COCO: all / novel / base; LVIS: AP, APr / APc / APf); for
coco.py the same command again finds every output and skips, the proposals stage alone
in the LVIS mode (random sample, no base-class filter) writes another store, and the
trained workdir answers the Python predict API with RLE masks."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import common
from helpers import cocoeval_ap
from ezsd_jax.clip.toy import make_tiny_clip
from ezsd_jax.data import synthetic as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJ = 32


def _flag(key, value):
    if isinstance(value, (tuple, list)):
        value = "(" + ",".join(repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return f"--config.{key}={value}"


def _main(wd, flags, config="configs/coco.py"):
    """`python -m ezsd_jax.main --config=<config>` with `flags`; its stdout+stderr."""
    xla = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join(xla + ["--xla_force_host_platform_device_count=1"]),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "ezsd_jax.main", f"--config={config}",
           f"--workdir={wd}", *flags]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr        # stage headers on stdout, stage notices logged to stderr
    assert p.returncode == 0, out[-4000:]
    return out


def _flat(params):
    import jax
    from ezsd_jax.core.tree_paths import path_str
    return {path_str(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _check_renorm_and_proposals(wd, clip_dir, names, is_base, train_ann):
    """renorm: an adapted CLIP that loads like the original, differing only in LayerNorms,
    text embeddings of ALL names, crop accuracy before / after; proposals (COCO mode): one
    record per training image, none whose CLIP argmax is a base name."""
    from ezsd_jax.clip.loading import load_clip
    from ezsd_jax.clip.store import ProposalStore
    from ezsd_jax.clip.text import load_text_embeddings
    src = _flat(load_clip(clip_dir)[1])
    adapted = _flat(load_clip(os.path.join(wd, "clip_renorm", "adapted_clip"))[1])
    assert src.keys() == adapted.keys()
    changed = [k for k in src if not np.array_equal(src[k], adapted[k])]
    assert changed and all("norm" in k for k in changed), changed
    got_names, emb = load_text_embeddings(os.path.join(wd, "clip_renorm",
                                                       "text_embeddings.npz"))
    assert sorted(got_names) == sorted(names) and emb.shape == (len(names), PROJ)
    acc = json.load(open(os.path.join(wd, "clip_renorm", "crop_accuracy.json")))
    assert acc["teacher"] == clip_dir
    assert {"acc_base", "acc_novel"} <= set(acc["before"]) and "acc_all" in acc["after"]
    store = ProposalStore(os.path.join(wd, "proposals"))
    train = json.load(open(train_ann))
    assert sorted(store.image_ids()) == sorted(im["id"] for im in train["images"])
    cats = np.concatenate([store.get(i)["category"] for i in store.image_ids()])
    assert len(cats) > 0 and not is_base[cats].any()


def _world(tmp_path):
    """(data root, {split: COCO annotation path}, names, tiny CLIP dir): 4 categories,
    8 train + 4 val images whose masks alternate polygons and RLE."""
    spec = S.SyntheticSpec(S.default_categories(4), image_hw_range=((48, 64), (48, 64)),
                           objects_per_image=(1, 3), object_size=(16, 36))
    data = str(tmp_path / "coco")
    ann = {s: S.write_coco_dataset(data, spec, n, seed=0, split=s)
           for s, n in (("train", 8), ("val", 4))}
    segs = [a["segmentation"] for a in json.load(open(ann["train"]))["annotations"]]
    assert {type(s).__name__ for s in segs} == {"list", "dict"}      # polygons and RLE
    names = [c.name for c in spec.categories]
    clip_dir = str(tmp_path / "tiny_clip")
    make_tiny_clip(clip_dir, [w for n in names for w in n.split()] + ["a", "photo", "of"],
                   seed=0, image_size=32, patch=8, projection_dim=PROJ)
    return data, ann, names, clip_dir


def _tiny_flags(clip_dir):
    """Flags shared by both configs: the tiny detector's sizes (the values where
    common.tiny_model_config differs from common.model_config; every other model value
    stays as the config file sets it), 64 px data, short schedules."""
    tiny, full = common.tiny_model_config(image_size=(64, 64)), common.model_config()
    model = {k: v for k, v in tiny.items() if v != full[k] and k != "test_score_threshold"}
    model.update(rpn_pre_nms_topk_train=128, rpn_post_nms_topk_train=64,
                 roi_batch_per_image=32, rpn_pre_nms_topk_test=128,
                 rpn_post_nms_topk_test=32, test_max_detections=20, mask_max_positives=8)
    flags = [_flag(f"model.{k}", v) for k, v in model.items()]
    return flags + [_flag(k, v) for k, v in {
        "model.ezsd.embed_dim": PROJ, "clip.model": clip_dir,
        "data.short_side": 64, "data.max_side": 64, "data.max_boxes": 4,
        "data.num_threads": 2,
        "ezsd.distill.proposal_slots": 16, "ezsd.distill.num_proposals": 8,
        "ezsd.distill.max_gt": 4, "clip.proposals.keep": 16,
        "clip.renorm_epochs": 1, "clip.proposal_images_per_chunk": 8,
        "train.batch_size": 4, "train.warmup_steps": 1, "train.log_every": 1,
        "eval.batch_size": 4}.items()]


@pytest.mark.slow
def test_coco_config_runs_mask_rcnn_stages(tmp_path):
    data, ann, names, clip_dir = _world(tmp_path)
    flags = _tiny_flags(clip_dir) + [_flag(k, v) for k, v in {
        "data.train_ann": ann["train"], "data.train_images": os.path.join(data, "train"),
        "data.val_ann": ann["val"], "data.val_images": os.path.join(data, "val"),
        "ezsd.split": "names", "ezsd.base_names": tuple(names[:3]),
        "ezsd.novel_names": tuple(names[3:]),
        "train.steps": 3, "train.ckpt_every": 3}.items()]
    wd = str(tmp_path / "wd")
    out = _main(wd, flags)
    for s in ("renorm", "proposals", "ezsd_train", "ezsd_eval"):
        assert f"=== stage {s} done" in out, out[-3000:]
    _check_renorm_and_proposals(wd, clip_dir, names, is_base=np.arange(len(names)) < 3,
                                train_ann=ann["train"])
    summary = json.load(open(os.path.join(wd, "eval", "ezsd_summary.json")))
    assert summary["step"] == 3
    metrics = json.load(open(os.path.join(wd, "eval", "ezsd_eval_metrics.json")))
    assert set(metrics["segm"]) == {"all", "novel", "base"}
    dets = json.load(open(os.path.join(wd, "eval", "ezsd_eval_detections.json")))
    assert dets and all(set(d["segmentation"]) == {"size", "counts"} for d in dets)
    # every group's box and mask AP is pycocotools' COCOeval of the written detections on
    # that group's categories (an independent evaluation of the same file)
    groups = {"all": names, "novel": names[3:], "base": names[:3]}
    for g, group in groups.items():
        for kind, key in (("bbox", "AP"), ("segm", "mask_AP")):
            assert summary[g][key] == pytest.approx(
                cocoeval_ap(ann["val"], dets, group, kind)[0], abs=1e-12), (g, kind)
    val = json.load(open(ann["val"]))
    hw = {im["id"]: [im["height"], im["width"]] for im in val["images"]}
    assert all(d["segmentation"]["size"] == hw[d["image_id"]] for d in dets)

    # the same command again: every stage finds its outputs
    again = _main(wd, flags)
    assert "[renorm]" in again and "exists, skipping" in again
    assert "chunks of shard 0/1 exist, skipping" in again
    assert json.load(open(os.path.join(wd, "eval", "ezsd_summary.json"))) == summary

    # LVIS mode: base-argmax proposals kept, `keep` of them sampled per image
    from ezsd_jax.clip.store import ProposalStore
    lvis_dir = os.path.join(wd, "proposals_lvis")
    _main(wd, flags + ["--stages=proposals", "--allow_config_change",
                       f"--config.ezsd.proposals_dir={lvis_dir}",
                       "--config.clip.proposals.selection=random",
                       "--config.clip.proposals.drop_base=False",
                       "--config.clip.proposals.keep=5"])
    lvis = ProposalStore(lvis_dir)
    recs = [lvis.get(i) for i in lvis.image_ids()]
    assert max(len(r["boxes"]) for r in recs) == 5
    assert (np.concatenate([r["category"] for r in recs]) < 3).any()

    # the trained workdir through the Python predict API: detections carry RLE masks at
    # the photo's size, and the overlay tints them
    from ezsd_jax.predict import outputs as po
    from ezsd_jax.core.images import decode_image
    from ezsd_jax.predict.detector import Detector
    im = val["images"][0]
    path = os.path.join(data, "val", im["file_name"])
    found = Detector.load(wd, batch_size=1).detect(path, names, score_threshold=0.0)
    assert found and all(d["segmentation"]["size"] == [im["height"], im["width"]]
                         for d in found)
    res = po.coco_results(1, path, found, {n: k for k, n in enumerate(names)})
    assert all("segmentation" in r for r in res)
    po.write_overlay(str(tmp_path / "pred"), "x.png", decode_image(path), res,
                     dict(enumerate(names)), set(), 0.0, 5)
    assert os.path.getsize(tmp_path / "pred" / po.OVERLAY_DIR / "x.png") > 0


@pytest.mark.slow
def test_lvis_config_runs_mask_rcnn_stages(tmp_path):
    """configs/lvis.py on the same set in LVIS v1 format (images by coco_url under the
    data root, base = frequent + common, novel = rare): renorm with repeats and box-size
    weights, random proposals without the base filter, the detector with seesaw loss,
    repeat-factor sampling and multi-scale training for train.epochs of the repeated list,
    then LVIS box and mask AP."""
    data, ann, names, clip_dir = _world(tmp_path)
    freq = dict(zip(names, ("f", "f", "c", "r")))
    lvis = {}
    for split in ("train", "val"):
        lvis[split] = os.path.join(data, "annotations", f"lvis_v1_{split}.json")
        with open(lvis[split], "w") as f:
            json.dump(S.to_lvis_format(json.load(open(ann[split])), split, freq), f)
    flags = _tiny_flags(clip_dir) + [_flag(k, v) for k, v in {
        "data.train_ann": lvis["train"], "data.train_images": data,
        "data.val_ann": lvis["val"], "data.val_images": data,
        "data.short_side_range": (48, 64), "data.repeat_threshold": 0.5,
        "clip.renorm_repeat_threshold": 0.5, "train.epochs": 1.0,
        "train.ckpt_every": 100}.items()]
    wd = str(tmp_path / "wd")
    out = _main(wd, flags, config="configs/lvis.py")
    for s in ("renorm", "proposals", "ezsd_train", "ezsd_eval"):
        assert f"=== stage {s} done" in out, out[-3000:]
    assert "repeat-factor sampling t=0.5" in out, out[-3000:]
    from ezsd_jax.clip.store import ProposalStore
    from ezsd_jax.clip.text import load_text_embeddings
    got_names, _ = load_text_embeddings(os.path.join(wd, "clip_renorm", "text_embeddings.npz"))
    assert sorted(got_names) == sorted(names)
    store = ProposalStore(os.path.join(wd, "proposals"))
    assert len(store.image_ids()) == 8
    assert max(len(store.get(i)["boxes"]) for i in store.image_ids()) <= 16
    summary = json.load(open(os.path.join(wd, "eval", "ezsd_summary.json")))
    assert summary["protocol"] == "lvis" and summary["step"] >= 2, summary
    assert summary["APc"] >= -1.0 and summary["APr"] >= -1.0
    for k in ("AP", "AP50", "mask_AP", "mask_AP50"):
        assert 0.0 <= summary["all"][k] <= 1.0, summary
    m = json.load(open(os.path.join(wd, "eval", "ezsd_eval_metrics.json")))
    val = json.load(open(lvis["val"]))
    by_id = {c["id"]: c["frequency"] for c in val["categories"]}
    present = {a["category_id"] for a in val["annotations"]}    # evaluated: those with GT
    want = {g: sum(by_id[c] == g for c in present) for g in ("r", "c", "f")}
    assert m["num_categories"] == want and want["r"] == 1, (m["num_categories"], want)
    assert m["segm"]["num_categories"] == m["num_categories"]
    dets = json.load(open(os.path.join(wd, "eval", "ezsd_eval_detections.json")))
    assert dets and all(set(d["segmentation"]) == {"size", "counts"} for d in dets)
