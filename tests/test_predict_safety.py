"""Predict never modifies what it reads and never answers a user's mistake with a silent
wrong result or a traceback: read-only loading, name normalisation, request limits, a
warning for an unfinished training, stale outputs of an earlier run removed (only
predict's own), masks pasted in bounded chunks, one-line errors naming the field.

The detector is a bundle of the demo's tiny model with random weights and a fixed
vocabulary (no training, no CLIP): what is tested is the plumbing, not accuracy."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("red circle", "blue square")


def _make_bundle(out, mask_on=False, step=7, train_steps=400):
    """A predict bundle of the demo's tiny detector, random weights (filled from the
    variables' shapes: no init compile), fixed embeddings of NAMES."""
    import jax
    from configs import demo_ci
    from ezsd_jax.ezsd.stages import head_config
    from ezsd_jax.models import detector as det
    from ezsd_jax.predict import bundle
    from ezsd_jax.predict.detector import Detector
    cfg = demo_ci.get_config()
    cfg.model.mask_on = mask_on
    cfg.train.steps = train_steps
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
    variables = jax.tree_util.tree_map_with_path(fill, dict(shapes))
    emb = rng.normal(size=(len(NAMES), hcfg.embed_dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    d = Detector(cfg, variables, None, step=step, source="generated", base=list(NAMES),
                 novel=[], fixed_embeddings={("single", n): e for n, e in zip(NAMES, emb)},
                 train_steps=train_steps)
    return bundle.export(d, str(out), list(NAMES))


@pytest.fixture(scope="module")
def boxes_bundle(tmp_path_factory):
    return _make_bundle(tmp_path_factory.mktemp("b") / "bundle")


@pytest.fixture(scope="module")
def detector(boxes_bundle):
    from ezsd_jax.predict.detector import Detector
    return Detector.load(boxes_bundle, batch_size=2)


def _image(h=96, w=120, seed=1):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- readers

def test_loading_writes_nothing_and_spares_a_writers_temporary_step(boxes_bundle, tmp_path):
    from ezsd_jax.predict.detector import Detector
    b = tmp_path / "bundle"
    shutil.copytree(boxes_bundle, b)
    tmp = b / "detector" / "9.orbax-checkpoint-tmp-55"
    (tmp / "default").mkdir(parents=True)
    before = sorted(str(p.relative_to(b)) for p in b.rglob("*"))
    det = Detector.load(str(b))
    assert det.step == 7 and tmp.is_dir()
    assert sorted(str(p.relative_to(b)) for p in b.rglob("*")) == before


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="a read-only bind mount needs root and unshare (chmod proves "
                           "nothing as root)")
def test_bundle_loads_from_a_read_only_mount(boxes_bundle, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    code = ("from ezsd_jax.predict.detector import Detector;"
            f"d = Detector.load('{ro}'); print('LOADED', d.step)")
    script = (f"mount --bind {boxes_bundle} {ro} && mount -o remount,bind,ro {ro} || exit 77;"
              f" touch {ro}/probe 2>/dev/null && echo WRITABLE; "
              f"{sys.executable} -c \"{code}\"")
    p = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"),
                       timeout=180)
    if p.returncode == 77:
        pytest.skip("mount namespaces not available here")
    assert "WRITABLE" not in p.stdout and "LOADED 7" in p.stdout, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "WARNING" not in p.stderr, p.stderr[-2000:]


def test_bundle_damage_is_named(boxes_bundle, tmp_path):
    """A manifest without a field, a missing part, an empty checkpoint directory: a
    MissingInput / CheckpointError naming the file and field (one line from the CLI)."""
    from ezsd_jax.core.checkpoint import CheckpointError
    from ezsd_jax.core.cli import MissingInput
    from ezsd_jax.predict.detector import Detector

    def damaged(name, edit):
        d = tmp_path / name
        shutil.copytree(boxes_bundle, d)
        edit(d)
        return str(d)

    def drop(field):
        def edit(d):
            man = json.load(open(d / "manifest.json"))
            del man[field]
            (d / "manifest.json").write_text(json.dumps(man))
        return edit
    for field in ("step", "base", "text"):
        with pytest.raises(MissingInput, match=f"manifest.json: field '{field}' is missing"):
            Detector.load(damaged(f"no_{field}", drop(field)))
    with pytest.raises(MissingInput, match="part detector is missing"):
        Detector.load(damaged("nopart", lambda d: shutil.rmtree(d / "detector")))

    def empty(d):
        shutil.rmtree(d / "detector")
        (d / "detector").mkdir()
    with pytest.raises(CheckpointError, match=r"has no step 7 \(it has no complete step\)"):
        Detector.load(damaged("empty", empty))


def test_workdir_without_a_checkpoint_names_the_stage(tmp_path):
    from configs import demo_ci
    from ezsd_jax.core.cli import MissingInput
    from ezsd_jax.predict.detector import Detector
    cfg = demo_ci.get_config()
    (tmp_path / "config.json").write_text(cfg.to_json_best_effort())
    (tmp_path / "ckpt_ezsd").mkdir()
    with pytest.raises(MissingInput, match="run the ezsd_train stage first"):
        Detector.load(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["ckpt_ezsd", "config.json"]
    assert not os.listdir(tmp_path / "ckpt_ezsd")          # a reader creates nothing


# ----------------------------------------------------------------------------- names

def test_names_normalised_or_refused():
    from ezsd_jax.predict.buckets import canonical_names, normalize_names
    assert normalize_names(["\ufeffcat", " cat ", "red   mug", "cat"]) == ["cat", "red mug"]
    assert canonical_names(["red mug", "cat"]) == ["cat", "red mug"]
    with pytest.raises(ValueError, match="'Cat' and 'cat' differ only in letter case"):
        normalize_names(["Cat", "cat "])
    with pytest.raises(ValueError, match="one string 'cat'"):
        normalize_names("cat")
    with pytest.raises(ValueError, match="empty name"):
        normalize_names(["cat", "  "])


def test_detect_requests_checked(detector):
    """Names as one string, NaN / out-of-range thresholds, caps beyond what the model
    can output: a ValueError naming the argument. A PIL image works like its array."""
    from PIL import Image
    img = _image()
    with pytest.raises(ValueError, match="one string"):
        detector.detect(img, "red circle")
    for bad in (float("nan"), -1, 1.5):
        with pytest.raises(ValueError, match="score_threshold"):
            detector.detect(img, list(NAMES), score_threshold=bad)
    for bad in (0, 1_000_000):
        with pytest.raises(ValueError, match="max_detections"):
            detector.detect(img, list(NAMES), max_detections=bad)
    with pytest.raises(TypeError, match="expected a file path, bytes, a uint8 HxWx3"):
        detector.detect([[1, 2]], list(NAMES))
    ref = detector.detect(img, list(NAMES), score_threshold=0.0)
    assert ref, "random weights give some detections at threshold 0"
    assert detector.detect(Image.fromarray(img), list(NAMES), score_threshold=0.0) == ref
    # a lower cap is the top of the same list; names differing in spacing are one class
    top = detector.detect(img, [" red  circle", "blue square"], score_threshold=0.0,
                          max_detections=3)
    assert top == ref[:3]


def test_unfinished_training_is_said(detector):
    assert "at step 7 of 400" in detector.unfinished()


# ----------------------------------------------------------------------------- masks

def test_masks_pasted_in_chunks_equal_unchunked(tmp_path, monkeypatch):
    from ezsd_jax.predict import detector as dmod
    from pycocotools import mask as mask_utils
    det = dmod.Detector.load(_make_bundle(tmp_path / "m", mask_on=True), batch_size=2)
    img = _image(150, 97, seed=3)
    monkeypatch.setattr(dmod, "PASTE_CHUNK", 1000)
    whole = det.detect(img, list(NAMES), score_threshold=0.0, max_detections=11)
    monkeypatch.setattr(dmod, "PASTE_CHUNK", 4)
    chunked = det.detect(img, list(NAMES), score_threshold=0.0, max_detections=11)
    assert len(whole) == 11 and whole == chunked
    calls = []
    real = dmod._jitted_paste

    def spy(canvas):
        fn = real(canvas)

        def run(probs, *a):
            calls.append(probs.shape[1])
            return fn(probs, *a)
        return run
    monkeypatch.setattr(dmod, "_jitted_paste", spy)
    det.detect(img, list(NAMES), score_threshold=0.0, max_detections=11)
    assert calls == [4, 4, 4]                     # 11 masks, at most 4 at a time
    m = mask_utils.decode(whole[0]["segmentation"])
    assert m.shape == (150, 97)


# ----------------------------------------------------------------------------- outputs

def test_rerun_removes_only_its_own_stale_outputs(tmp_path):
    from ezsd_jax.predict import outputs as po
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    for f in ("overlays/00001_a.png", "overlays/00002_b.png", "overlays/mine.png",
              "notes.txt"):
        (out / f).write_text("x")
    po.end_outputs(str(out), ["detections.json", "overlays/00001_a.png",
                              "overlays/00002_b.png", "../outside.txt"])
    (tmp_path / "outside.txt").write_text("x")
    removed = po.begin_outputs(str(out), ["overlays/00001_a.png"])
    assert removed == ["overlays/00002_b.png"]
    assert sorted(os.listdir(out / "overlays")) == ["00001_a.png", "mine.png"]
    assert (out / "notes.txt").exists() and (tmp_path / "outside.txt").exists()
    listed = json.load(open(out / po.FILES_MANIFEST))["files"]
    assert "overlays/00001_a.png" in listed and "overlays/00002_b.png" not in listed


# ----------------------------------------------------------------------------- CLI

def _popen(args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, "-m", "ezsd_jax.predict", *args], cwd=REPO,
                            env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


@pytest.mark.slow
def test_cli_mistakes_are_one_line(boxes_bundle, tmp_path):
    from PIL import Image
    Image.fromarray(_image()).save(tmp_path / "a.png")
    imgs = f"--images={tmp_path}/a.png"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "case.txt").write_text("\ufeffCat\ncat\n", encoding="utf-8")
    (tmp_path / "afile").write_text("x")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model": {"roi_head": "standard"},
                                                   "data": {}}))
    b, o = f"--workdir={boxes_bundle}", f"--out={tmp_path}/o"
    cases = [
        ([b, imgs, o, f"--names_file={tmp_path}/latin1.txt"], ["latin1.txt", "not UTF-8"]),
        ([b, imgs, o, f"--names_file={tmp_path}/case.txt"],
         ["case.txt", "'Cat' and 'cat' differ only in letter case"]),
        ([b, imgs, o, "--names=a", "--score_threshold=nan"], ["--score_threshold=nan"]),
        ([b, imgs, o, "--names=a", "--max_detections=1000000"],
         ["--max_detections=1000000", "1..100"]),
        ([f"--workdir={plain}", imgs, o, "--names=a"], ["plain detector", "ezsd_train"]),
        ([b, imgs, f"--out={tmp_path}/afile", "--names=a"], ["--out", "is a file"]),
        (["export", b, f"--out={tmp_path}/afile"], ["--out", "is a file"]),
        (["export", b, "--out=/proc/bundle"], ["--out /proc/bundle", "cannot write"]),
    ]
    procs = [_popen([a.replace(o, f"{o}{i}") for a in args])   # concurrent: own --out
             for i, (args, _) in enumerate(cases)]
    for (args, texts), p in zip(cases, procs):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2 and "Traceback" not in err, (args, err[-3000:])
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, err[-3000:])
        assert all(t in lines[0] for t in texts), (args, lines[0])


@pytest.mark.slow
def test_cli_warns_unfinished_and_cleans_its_stale_overlays(boxes_bundle, tmp_path):
    from PIL import Image
    Image.fromarray(_image()).save(tmp_path / "a.png")
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "00002_gone.png").write_text("x")
    (out / "overlays" / "mine.png").write_text("x")
    (out / "predict_files.json").write_text(json.dumps(
        {"files": ["overlays/00002_gone.png"]}))
    p = _popen([f"--workdir={boxes_bundle}", f"--images={tmp_path}/a.png", f"--out={out}",
                "--names=red circle,blue square"])
    stdout, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "warning:" in stdout and "at step 7 of 400" in stdout
    assert sorted(os.listdir(out / "overlays")) == ["00001_a.png", "mine.png"]
