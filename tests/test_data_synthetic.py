"""Synthetic COCO-format datasets: determinism, tight boxes, pycocotools compatibility."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from ezsd_jax.data import synthetic as S


def _spec(**kw):
    base = dict(categories=S.default_categories(6), image_hw_range=((60, 100), (60, 120)),
                objects_per_image=(1, 3), object_size=(12, 40))
    base.update(kw)
    return S.SyntheticSpec(**base)


def _load(ann):
    with open(ann) as f:
        return json.load(f)


def _pixels(root, split, im):
    return np.asarray(Image.open(os.path.join(root, split, im["file_name"])).convert("RGB"))


def test_deterministic_per_seed(tmp_path):
    spec = _spec(clutter=2)
    a = S.write_coco_dataset(str(tmp_path / "a"), spec, 6, seed=3)
    b = S.write_coco_dataset(str(tmp_path / "b"), spec, 6, seed=3)
    c = S.write_coco_dataset(str(tmp_path / "c"), spec, 6, seed=4)
    ja, jb, jc = _load(a), _load(b), _load(c)
    assert ja["images"] == jb["images"] and ja["annotations"] == jb["annotations"]
    for im in ja["images"]:
        np.testing.assert_array_equal(_pixels(tmp_path / "a", "train", im),
                                      _pixels(tmp_path / "b", "train", im))
    assert ja["annotations"] != jc["annotations"]
    # sizes vary within the range
    hw = {(im["height"], im["width"]) for im in ja["images"]}
    assert len(hw) > 1
    assert all(60 <= h <= 100 and 60 <= w <= 120 for h, w in hw)
    # another split name gives other images for the same seed
    v = _load(S.write_coco_dataset(str(tmp_path / "a"), spec, 6, seed=3, split="val"))
    assert v["annotations"] != ja["annotations"]
    assert os.path.isfile(tmp_path / "a" / "val" / v["images"][0]["file_name"])


@pytest.mark.parametrize("textured", [False, True])
def test_boxes_tight_around_drawn_pixels(tmp_path, textured):
    if textured:
        cats = [S.CategorySpec("a", "star", "red", "stripes"),
                S.CategorySpec("b", "ring", "blue", "dots"),
                S.CategorySpec("c", "cross", "black", "checker"),
                S.CategorySpec("d", "crescent", (250, 220, 0))]
    else:
        cats = S.default_categories(13)  # every shape once
    spec = _spec(categories=cats, backgrounds=("solid",), objects_per_image=(1, 2),
                 object_size=(10, 48))
    ann = S.write_coco_dataset(str(tmp_path), spec, 12, seed=0)
    data = _load(ann)
    by_img = {}
    for a in data["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    n_checked = 0
    for im in data["images"]:
        img = _pixels(tmp_path, "train", im).astype(np.int32)
        colors, counts = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
        bg = colors[np.argmax(counts)]
        fg = np.any(img != bg, axis=-1)  # everything drawn (no clutter here)
        covered = np.zeros_like(fg)
        for a in by_img.get(im["id"], []):
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= im["width"] and y + h <= im["height"]
            inside = fg[y:y + h, x:x + w]
            # drawn pixels touch all four edges of the box: it is tight
            assert inside[0].any() and inside[-1].any()
            assert inside[:, 0].any() and inside[:, -1].any()
            assert 0 < a["area"] <= w * h
            covered[y:y + h, x:x + w] = True
            n_checked += 1
        # nothing is drawn outside the boxes
        assert not (fg & ~covered).any()
    assert n_checked >= 12


def test_loads_in_pycocotools_and_jpeg(tmp_path):
    from pycocotools.coco import COCO
    spec = _spec(jpeg=True, clutter=3)
    ann = S.write_coco_dataset(str(tmp_path), spec, 5, seed=1)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(ann)
    assert len(coco.getImgIds()) == 5
    names = [c["name"] for c in coco.loadCats(coco.getCatIds())]
    assert names == [c.name for c in spec.categories]
    assert len(coco.getAnnIds()) >= 5
    im = coco.loadImgs(coco.getImgIds()[0])[0]
    assert im["file_name"].endswith(".jpg")
    pil = Image.open(tmp_path / "train" / im["file_name"])
    assert pil.size == (im["width"], im["height"])


def test_default_categories_distinct_and_validation():
    cats = S.default_categories(40)
    assert len({c.name for c in cats}) == 40
    assert len({(c.shape, c.color, c.texture) for c in cats}) == 40
    # consecutive categories differ in shape and colour
    assert all(a.shape != b.shape and a.color != b.color for a, b in zip(cats, cats[1:]))
    with pytest.raises(ValueError, match="unknown shape"):
        S.SyntheticSpec([S.CategorySpec("x", "blob", "red")]).validate()
    with pytest.raises(ValueError, match="unknown colour"):
        S.SyntheticSpec([S.CategorySpec("x", "circle", "notacolour")]).validate()
    with pytest.raises(ValueError, match="unique"):
        S.SyntheticSpec([S.CategorySpec("x", "circle", "red")] * 2).validate()


def test_lvis_format_loads_like_lvis(tmp_path):
    """to_lvis_format: images by coco_url under the data root (the project's loader finds
    them), per-category frequency, negatives = the categories an image lacks, LVIS splits
    (base = frequent + common, novel = rare); a missing frequency is an error."""
    from ezsd_jax.data.coco import load_coco
    from ezsd_jax.data.splits import lvis_names
    spec = _spec(categories=S.default_categories(4))
    coco = _load(S.write_coco_dataset(str(tmp_path), spec, 5, seed=2, split="val"))
    names = [c.name for c in spec.categories]
    freq = dict(zip(names, ("f", "c", "r", "f")))
    lvis = S.to_lvis_format(coco, "val", freq)
    assert lvis["annotations"] == coco["annotations"]
    for im, src in zip(lvis["images"], coco["images"]):
        assert "file_name" not in im and im["coco_url"].endswith("/val/" + src["file_name"])
        have = {a["category_id"] for a in coco["annotations"] if a["image_id"] == im["id"]}
        assert set(im["neg_category_ids"]) == {1, 2, 3, 4} - have
        assert not set(im["neg_category_ids"]) & have and im["not_exhaustive_category_ids"] == []
    path = tmp_path / "lvis_val.json"
    path.write_text(json.dumps(lvis))
    ds = load_coco(str(path), str(tmp_path))
    assert len(ds) == 5 and all(os.path.exists(r.path) for r in ds.records)
    base, novel = lvis_names(str(path))
    assert sorted(base) == sorted(n for n in names if freq[n] != "r") and novel == [names[2]]
    with pytest.raises(ValueError, match=r"missing \['" + names[3]):
        S.to_lvis_format(coco, "val", {n: freq[n] for n in names[:3]})
    with pytest.raises(ValueError, match=r"bad \['x'\]"):
        S.to_lvis_format(coco, "val", {**freq, names[0]: "x"})
