"""COCO-format loading: category remapping/ordering, crowd, subsets, bad input, splits."""
import json
import os

import numpy as np
import pytest

from ezsd_jax.data import synthetic as S
from ezsd_jax.data.coco import DataError, load_coco, write_split

CAT_IDS = [7, 3, 12, 5]  # non-contiguous, unsorted in the file


@pytest.fixture
def ds_files(tmp_path):
    """Synthetic dataset (8 images) whose category ids are made non-contiguous."""
    spec = S.SyntheticSpec(S.default_categories(4), image_hw_range=((60, 90), (60, 90)),
                           objects_per_image=(2, 4), object_size=(10, 30))
    ann = S.write_coco_dataset(str(tmp_path), spec, 8, seed=0)
    data = json.load(open(ann))
    for c in data["categories"]:
        c["id"] = CAT_IDS[c["id"] - 1]
    for a in data["annotations"]:
        a["category_id"] = CAT_IDS[a["category_id"] - 1]
    json.dump(data, open(ann, "w"))
    return ann, str(tmp_path / "train"), data


def _write(ann, data):
    with open(ann, "w") as f:
        json.dump(data, f)


def _expected(data, cat_order):
    """image_id -> (boxes xyxy, classes) computed straight from the JSON."""
    out = {im["id"]: ([], []) for im in data["images"]}
    for a in data["annotations"]:
        if a.get("iscrowd") or a["category_id"] not in cat_order:
            continue
        x, y, w, h = a["bbox"]
        out[a["image_id"]][0].append([x, y, x + w, y + h])
        out[a["image_id"]][1].append(cat_order.index(a["category_id"]))
    return out


def _check(ds, data, cat_order):
    exp = _expected(data, cat_order)
    assert [r.image_id for r in ds.records] == [im["id"] for im in data["images"]]
    for r in ds.records:
        b, c = exp[r.image_id]
        assert r.boxes.dtype == np.float32 and r.classes.dtype == np.int32
        np.testing.assert_allclose(r.boxes, np.asarray(b, np.float32).reshape(-1, 4))
        np.testing.assert_array_equal(r.classes, c)
        assert os.path.isfile(r.path)


def test_all_categories_sorted_by_id(ds_files):
    ann, img_dir, data = ds_files
    ds = load_coco(ann, img_dir)
    assert ds.cat_ids == sorted(CAT_IDS)
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert ds.cat_names == [names[i] for i in sorted(CAT_IDS)]
    assert ds.num_classes == 4 and ds.skipped == {} and ds.clipped == 0
    _check(ds, data, sorted(CAT_IDS))
    assert sorted(ds.coco().getImgIds()) == sorted(r.image_id for r in ds.records)


def test_category_subset_in_given_order(ds_files):
    ann, img_dir, data = ds_files
    names = {c["id"]: c["name"] for c in data["categories"]}
    order = [12, 7]  # the "base" split, in this order
    ds = load_coco(ann, img_dir, category_names=[names[i] for i in order])
    assert ds.cat_ids == order and ds.cat_names == [names[i] for i in order]
    _check(ds, data, order)
    n_other = sum(a["category_id"] not in order for a in data["annotations"])
    assert n_other > 0 and ds.skipped["unselected_category"] == n_other
    # images whose boxes all went stay as background unless keep_empty=False
    empty = [r for r in ds.records if len(r.boxes) == 0]
    ds2 = load_coco(ann, img_dir, category_names=[names[i] for i in order], keep_empty=False)
    assert len(ds2.records) == len(ds.records) - len(empty)
    assert all(len(r.boxes) for r in ds2.records)
    with pytest.raises(DataError, match="not in the file"):
        load_coco(ann, img_dir, category_names=["no such thing"])


def test_crowd_ignored_and_partial_box_clipped(ds_files):
    ann, img_dir, data = ds_files
    data["annotations"][0]["iscrowd"] = 1
    a1 = data["annotations"][1]
    im = next(i for i in data["images"] if i["id"] == a1["image_id"])
    a1["bbox"] = [im["width"] - 5, -3.0, 20, 10]  # overlaps the image's top-right corner
    _write(ann, data)
    ds = load_coco(ann, img_dir)
    assert ds.skipped == {"crowd": 1} and ds.clipped == 1
    rec = next(r for r in ds.records if r.image_id == a1["image_id"])
    assert [im["width"] - 5, 0, im["width"], 7] in rec.boxes.tolist()
    crowd_img = data["annotations"][0]["image_id"]
    n_crowd_img = sum(a["image_id"] == crowd_img for a in data["annotations"])
    assert len(next(r for r in ds.records if r.image_id == crowd_img).boxes) == n_crowd_img - 1


def _ann_of(data, k=2):
    return data["annotations"][k]


BAD_CASES = {
    # name: (mutate(data, img_dir) -> text naming the record, skip reason)
    "missing_file": (lambda d, p: (os.remove(os.path.join(p, d["images"][2]["file_name"])),
                                   f"image id={d['images'][2]['id']}")[1], "missing_file"),
    "box_outside": (lambda d, p: (_ann_of(d).update(bbox=[500, 500, 10, 10]),
                                  f"annotation id={_ann_of(d)['id']}")[1], "box_outside_image"),
    "zero_area": (lambda d, p: (_ann_of(d).update(bbox=[3, 4, 0, 5]),
                                f"annotation id={_ann_of(d)['id']}")[1], "degenerate_box"),
    "negative_box": (lambda d, p: (_ann_of(d).update(bbox=[3, 4, 6, -2]),
                                   f"annotation id={_ann_of(d)['id']}")[1], "degenerate_box"),
    "unknown_category": (lambda d, p: (_ann_of(d).update(category_id=999),
                                       f"annotation id={_ann_of(d)['id']}")[1],
                         "unknown_category"),
    "ann_missing_bbox": (lambda d, p: (_ann_of(d).pop("bbox"),
                                       f"annotation id={_ann_of(d)['id']}")[1],
                         "ann_missing_keys"),
    "image_missing_height": (lambda d, p: (d["images"][2].pop("height"),
                                           f"image id={d['images'][2]['id']}")[1],
                             "image_missing_keys"),
    # image files the header check catches before any training
    "zero_byte_file": (lambda d, p: _damage(d, p, lambda b: b""), "unreadable_image"),
    "not_an_image": (lambda d, p: _damage(d, p, lambda b: b"<html>not found</html>"),
                     "unreadable_image"),
    "truncated_file": (lambda d, p: _damage(d, p, lambda b: b[: len(b) // 2]),
                       "unreadable_image"),
    "size_mismatch": (lambda d, p: (d["images"][2].update(height=d["images"][2]["height"] + 1),
                                    f"image id={d['images'][2]['id']}")[1],
                      "image_size_mismatch"),
}
# cases that drop the image itself (not via one of its annotations)
IMAGE_CASES = {"missing_file", "image_missing_height", "zero_byte_file", "not_an_image",
               "truncated_file", "size_mismatch"}


def _damage(d, p, fn):
    path = os.path.join(p, d["images"][2]["file_name"])
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(fn(data))
    return f"image id={d['images'][2]['id']}"


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_raises_or_is_counted(ds_files, case):
    ann, img_dir, data = ds_files
    mutate, reason = BAD_CASES[case]
    n_images = len(data["images"])
    record = mutate(data, img_dir)
    _write(ann, data)
    with pytest.raises(DataError) as e:
        load_coco(ann, img_dir)
    msg = str(e.value)
    assert ann in msg and record in msg, msg
    ds = load_coco(ann, img_dir, on_error="skip")
    assert ds.skipped[reason] == 1
    assert ds.skipped.get("images_dropped") == (None if case in IMAGE_CASES else 1)
    assert len(ds.records) == n_images - 1
    # the dropped image is the one the bad record belongs to
    bad_img = data["images"][2]["id"] if case in IMAGE_CASES else _ann_of(data)["image_id"]
    assert bad_img not in {r.image_id for r in ds.records}


@pytest.mark.parametrize("what", ["images", "annotations", "categories"])
def test_duplicate_ids_never_pass(ds_files, what):
    """A duplicate id changes what evaluation reads: an error even with on_error='skip'."""
    ann, img_dir, data = ds_files
    data[what][3]["id"] = data[what][1]["id"]
    _write(ann, data)
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match=f"duplicate {what[:-1].replace('ie', 'y')} id "
                                            f"{data[what][1]['id']}"):
            load_coco(ann, img_dir, on_error=on_error)


def test_annotation_of_unknown_image(ds_files):
    ann, img_dir, data = ds_files
    a = _ann_of(data)
    a["image_id"] = 424242
    _write(ann, data)
    with pytest.raises(DataError, match=f"annotation id={a['id']} .*not in 'images'"):
        load_coco(ann, img_dir)
    ds = load_coco(ann, img_dir, on_error="skip")
    assert ds.skipped["unknown_image"] == 1 and len(ds.records) == len(data["images"])


def test_missing_file_not_checked(ds_files):
    ann, img_dir, data = ds_files
    os.remove(os.path.join(img_dir, data["images"][0]["file_name"]))
    assert len(load_coco(ann, img_dir, check_files=False).records) == len(data["images"])


def test_malformed_json_and_missing_top_level_key(ds_files, tmp_path):
    ann, img_dir, data = ds_files
    text = open(ann).read()
    bad = str(tmp_path / "broken.json")
    with open(bad, "w") as f:
        f.write(text[: len(text) // 2])
    for on_error in ("raise", "skip"):  # a broken file cannot be skipped
        with pytest.raises(DataError, match=r"broken\.json: malformed JSON at line 1 column"):
            load_coco(bad, img_dir, on_error=on_error)
    del data["images"]
    _write(ann, data)
    with pytest.raises(DataError, match="missing top-level key 'images'"):
        load_coco(ann, img_dir, on_error="skip")
    with pytest.raises(DataError, match="not found"):
        load_coco(str(tmp_path / "nope.json"), img_dir)


def test_write_split_round_trip(ds_files, tmp_path):
    ann, img_dir, data = ds_files
    names = {c["id"]: c["name"] for c in data["categories"]}
    keep = [names[5], names[12]]
    dst = str(tmp_path / "out" / "base.json")
    assert write_split(ann, dst, keep) == dst
    assert [f for f in os.listdir(tmp_path / "out")] == ["base.json"]  # no temp files left
    out = json.load(open(dst))
    assert sorted(c["id"] for c in out["categories"]) == [5, 12]
    assert len(out["images"]) == len(data["images"])
    assert all(a["category_id"] in (5, 12) for a in out["annotations"])
    # loading the split file == loading the original restricted to the same names
    a = load_coco(dst, img_dir, category_names=keep)
    b = load_coco(ann, img_dir, category_names=keep)
    assert a.cat_ids == b.cat_ids == [5, 12]
    for ra, rb in zip(a.records, b.records, strict=True):
        assert ra.image_id == rb.image_id
        np.testing.assert_array_equal(ra.boxes, rb.boxes)
        np.testing.assert_array_equal(ra.classes, rb.classes)
    assert len(a.coco().getCatIds()) == 2
    # drop_images_without keeps only images with a remaining annotation
    dst2 = str(tmp_path / "out" / "base_nonempty.json")
    write_split(ann, dst2, [names[5]], drop_images_without=True)
    out2 = json.load(open(dst2))
    with_ann = {x["image_id"] for x in data["annotations"] if x["category_id"] == 5}
    assert {im["id"] for im in out2["images"]} == with_ann
    with pytest.raises(DataError, match="not in the file"):
        write_split(ann, dst2, ["unknown"])
