"""The EZSD stages through `python -m ezsd_jax.main`, the way a user runs configs/coco.py
with a real CLIP directory (config.clip.model): here a tiny random CLIP saved with
save_pretrained, a generated COCO-format set whose annotations alternate polygons and
compressed RLE, and the tiny detector at 64x64 with the mask branch on (Mask R-CNN, as
coco.py). One command runs renorm -> proposals -> ezsd_train -> ezsd_eval and reports box
and mask AP for all / novel / base; the same command again finds every output and skips;
the proposals stage alone in the LVIS mode (random sample, no base-class filter) writes
another store; the trained workdir answers the Python predict API with RLE masks."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import common
from ezsd_jax.clip.toy import make_tiny_clip
from ezsd_jax.data import synthetic as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJ = 32


def _flag(key, value):
    if isinstance(value, (tuple, list)):
        value = "(" + ",".join(repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return f"--config.{key}={value}"


def _main(wd, flags):
    """`python -m ezsd_jax.main --config=configs/coco.py` with `flags`; its stdout+stderr."""
    xla = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join(xla + ["--xla_force_host_platform_device_count=1"]),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "ezsd_jax.main", "--config=configs/coco.py",
           f"--workdir={wd}", *flags]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr        # stage headers on stdout, stage notices logged to stderr
    assert p.returncode == 0, out[-4000:]
    return out


def _flat(params):
    import jax
    from ezsd_jax.tree_paths import path_str
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


@pytest.mark.slow
def test_coco_config_runs_mask_rcnn_stages(tmp_path):
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

    tiny = common.tiny_model_config(image_size=(64, 64)).to_dict()
    model = {k: v for k, v in tiny.items() if k not in ("roi_head", "pretrained", "mask_on")}
    model.update(rpn_pre_nms_topk_train=128, rpn_post_nms_topk_train=64,
                 roi_batch_per_image=32, rpn_pre_nms_topk_test=128,
                 rpn_post_nms_topk_test=32, test_max_detections=20, mask_max_positives=8)
    flags = [_flag(f"model.{k}", v) for k, v in model.items()]
    flags += [_flag(k, v) for k, v in {
        "model.ezsd.embed_dim": PROJ, "clip.model": clip_dir,
        "data.train_ann": ann["train"], "data.train_images": os.path.join(data, "train"),
        "data.val_ann": ann["val"], "data.val_images": os.path.join(data, "val"),
        "data.short_side": 64, "data.max_side": 64, "data.max_boxes": 4,
        "data.num_threads": 2,
        "ezsd.split": "names", "ezsd.base_names": tuple(names[:3]),
        "ezsd.novel_names": tuple(names[3:]),
        "ezsd.distill.proposal_slots": 16, "ezsd.distill.num_proposals": 8,
        "ezsd.distill.max_gt": 4, "clip.proposals.keep": 16,
        "clip.renorm_epochs": 1, "clip.proposal_images_per_chunk": 8,
        "train.batch_size": 4, "train.steps": 3, "train.warmup_steps": 1,
        "train.ckpt_every": 3, "train.log_every": 1, "eval.batch_size": 4}.items()]
    wd = str(tmp_path / "wd")
    out = _main(wd, flags)
    for s in ("renorm", "proposals", "ezsd_train", "ezsd_eval"):
        assert f"=== stage {s} done" in out, out[-3000:]
    _check_renorm_and_proposals(wd, clip_dir, names, is_base=np.arange(len(names)) < 3,
                                train_ann=ann["train"])
    summary = json.load(open(os.path.join(wd, "eval", "ezsd_summary.json")))
    assert summary["step"] == 3
    for g in ("all", "novel", "base"):
        assert {"AP", "AP50", "mask_AP", "mask_AP50"} <= set(summary[g]), summary
        assert 0.0 <= summary[g]["mask_AP"] <= 1.0
    metrics = json.load(open(os.path.join(wd, "eval", "ezsd_eval_metrics.json")))
    assert set(metrics["segm"]) == {"all", "novel", "base"}
    dets = json.load(open(os.path.join(wd, "eval", "ezsd_eval_detections.json")))
    assert dets and all(set(d["segmentation"]) == {"size", "counts"} for d in dets)
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
    _main(wd, flags + ["--stages=proposals", f"--config.ezsd.proposals_dir={lvis_dir}",
                       "--config.clip.proposals.selection=random",
                       "--config.clip.proposals.drop_base=False",
                       "--config.clip.proposals.keep=5"])
    lvis = ProposalStore(lvis_dir)
    recs = [lvis.get(i) for i in lvis.image_ids()]
    assert max(len(r["boxes"]) for r in recs) == 5
    assert (np.concatenate([r["category"] for r in recs]) < 3).any()

    # the trained workdir through the Python predict API: detections carry RLE masks at
    # the photo's size, and the overlay tints them
    from ezsd_jax import predict_outputs as po
    from ezsd_jax.data.images import decode_image
    from ezsd_jax.detector_api import Detector
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
