"""The EZSD stages through `python -m ezsd_jax.main`, the way configs/coco.py runs them
with a real CLIP directory (config.clip.model): here a tiny random CLIP saved with
save_pretrained and the demo's synthetic COCO-format world, stages
demo_data -> renorm -> proposals -> ezsd_train -> ezsd_eval in one command; then the
same command again (every stage finds its outputs and skips), and the proposals stage
alone in the LVIS mode (random sample, no base-class filter) into another directory."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJ = 32        # the tiny CLIP's projection dim = the detector's embedding dim


def _main(wd, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "ezsd_jax.main", "--config=configs/demo_ci.py",
           f"--workdir={wd}", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr        # stage headers on stdout, stage notices logged to stderr


def _flat(params):
    import jax
    from ezsd_jax.tree_paths import path_str
    return {path_str(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.slow
def test_stages_from_main_with_a_clip_directory(tmp_path):
    from configs import demo
    from ezsd_jax.clip.store import ProposalStore
    from ezsd_jax.clip.text import load_text_embeddings
    from ezsd_jax.clip.loading import load_clip
    from ezsd_jax.clip.toy import make_tiny_clip
    names = list(demo.BASE + demo.NOVEL)
    clip_dir = str(tmp_path / "tiny_clip")
    make_tiny_clip(clip_dir, names + ["a", "photo", "of"], seed=0, image_size=32, patch=8,
                   projection_dim=PROJ)
    wd = str(tmp_path / "wd")
    small = [f"--config.clip.model={clip_dir}", f"--config.model.ezsd.embed_dim={PROJ}",
             "--config.synth.train_images=20", "--config.synth.val_images=8",
             "--config.clip.renorm_steps=4", "--config.clip.proposal_images_per_chunk=8",
             "--config.train.steps=6", "--config.train.warmup_steps=2",
             "--config.train.ckpt_every=6", "--config.train.log_every=2"]
    stages = "--stages=demo_data,renorm,proposals,ezsd_train,ezsd_eval"
    out = _main(wd, stages, *small)
    for s in ("renorm", "proposals", "ezsd_train", "ezsd_eval"):
        assert f"=== stage {s} done" in out

    # renorm: an adapted CLIP that loads like the original, differing only in LayerNorms,
    # text embeddings of ALL names, crop accuracy before / after
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

    # proposals: one record per training image, none whose CLIP argmax is a base name
    store = ProposalStore(os.path.join(wd, "proposals"))
    train = json.load(open(os.path.join(wd, "synthetic", "annotations",
                                           "instances_train.json")))
    assert sorted(store.image_ids()) == sorted(im["id"] for im in train["images"])
    is_base = np.array([n in demo.BASE for n in names])
    cats = np.concatenate([store.get(i)["category"] for i in store.image_ids()])
    assert len(cats) > 0 and not is_base[cats].any()

    summary = json.load(open(os.path.join(wd, "eval", "ezsd_summary.json")))
    assert summary["step"] == 6 and set(summary) >= {"all", "novel", "base"}

    # the same command again: every stage finds its outputs
    again = _main(wd, stages, *small)
    assert "[renorm]" in again and "exists, skipping" in again
    assert "chunks of shard 0/1 exist, skipping" in again
    assert json.load(open(os.path.join(wd, "eval", "ezsd_summary.json"))) == summary

    # LVIS mode: base-argmax proposals kept, `keep` of them sampled per image
    lvis_dir = os.path.join(wd, "proposals_lvis")
    _main(wd, "--stages=proposals", *small, f"--config.ezsd.proposals_dir={lvis_dir}",
          "--config.clip.proposals.selection=random",
          "--config.clip.proposals.drop_base=False", "--config.clip.proposals.keep=5")
    lvis = ProposalStore(lvis_dir)
    recs = [lvis.get(i) for i in lvis.image_ids()]
    assert max(len(r["boxes"]) for r in recs) == 5
    assert is_base[np.concatenate([r["category"] for r in recs])].any()
