"""Zero-shot splits (COCO 48/17, LVIS by frequency, explicit names), the split annotation
files, the all/novel/base evaluation groups, and the LVIS evaluation protocol on tiny
generated LVIS-format ground truth."""
import json

import pytest

from ezsd_jax import evaluate
from ezsd_jax.data.coco import DataError, load_coco, read_json
from ezsd_jax.ezsd import splits
from ezsd_jax.ezsd.lvis_eval import lvis_evaluate

COCO80 = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus",
    7: "train", 8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant",
    13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog",
    19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra",
    25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie",
    33: "suitcase", 34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball",
    38: "kite", 39: "baseball bat", 40: "baseball glove", 41: "skateboard",
    42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass", 47: "cup",
    48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster",
    81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors",
    88: "teddy bear", 89: "hair drier", 90: "toothbrush"}
NAME_TO_ID = {n: i for i, n in COCO80.items()}


def test_coco_48_17_lists():
    base, novel = splits.COCO_BASE_48, splits.COCO_NOVEL_17
    assert len(base) == 48 and len(set(base)) == 48
    assert len(novel) == 17 and len(set(novel)) == 17
    assert not set(base) & set(novel)
    assert set(base) | set(novel) <= set(COCO80.values())  # COCO 2017 JSON spellings
    assert {"tv", "couch", "motorcycle", "airplane"} <= set(base) | set(novel)


def _coco_json(path, images, anns):
    data = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": 100, "width": 120}
                       for i in images],
            "annotations": [{"id": k + 1, "image_id": i, "category_id": NAME_TO_ID[n],
                             "bbox": [5.0 + k, 6.0, 30.0, 20.0], "area": 600.0,
                             "iscrowd": 0} for k, (i, n) in enumerate(anns)],
            "categories": [{"id": i, "name": n, "supercategory": "x"}
                           for i, n in COCO80.items()]}
    path.write_text(json.dumps(data))
    return str(path)


def test_make_coco_zeroshot_files(tmp_path):
    train = _coco_json(tmp_path / "train.json", [1, 2, 3, 4],
                       [(1, "person"), (1, "cat"), (2, "dog"), (2, "airplane"),
                        (3, "tv"), (3, "hair drier"), (3, "couch")])   # 4: no objects
    val = _coco_json(tmp_path / "val.json", [10, 11, 12],
                     [(10, "person"), (10, "bus"), (11, "hair drier"), (12, "cake")])
    out = splits.make_coco_zeroshot_files(train, val, str(tmp_path / "zs"))
    tr, va = read_json(out["train"]), read_json(out["val"])
    assert len(tr["categories"]) == 48 and len(va["categories"]) == 65
    assert {c["name"] for c in tr["categories"]} == set(splits.COCO_BASE_48)
    # every train image stays (2: only novel objects, 4: none) but only base annotations
    assert [im["id"] for im in tr["images"]] == [1, 2, 3, 4]
    assert sorted(COCO80[a["category_id"]] for a in tr["annotations"]) == ["person", "tv"]
    assert [im["id"] for im in va["images"]] == [10, 11, 12]
    assert sorted(COCO80[a["category_id"]] for a in va["annotations"]) == \
        ["bus", "cake", "person"]
    # the base-only train set loads with background-only images kept
    ds = load_coco(out["train"], str(tmp_path), check_files=False)
    assert ds.num_classes == 48 and [len(r.boxes) for r in ds.records] == [1, 0, 1, 0]
    out2 = splits.make_coco_zeroshot_files(train, val, str(tmp_path / "zs2"),
                                           drop_val_images_without=True)
    assert [im["id"] for im in read_json(out2["val"])["images"]] == [10, 12]


def test_names_groups_and_order(tmp_path):
    ann = _coco_json(tmp_path / "a.json", [1], [(1, "person")])

    class E:  # stands in for config.ezsd
        split = "coco48_17"
        base_names, novel_names = (), ()
    base, novel = splits.zeroshot_names(E, ann)
    assert base[:4] == ["person", "bicycle", "car", "motorcycle"]  # category-id order
    ids = [NAME_TO_ID[n] for n in splits.all_names(base, novel, ann)]
    assert ids == sorted(ids) and len(ids) == 65
    g = splits.category_groups(ann, base, novel)
    assert len(g["all"]) == 65 and len(g["novel"]) == 17 and len(g["base"]) == 48
    assert NAME_TO_ID["airplane"] in g["novel"] and NAME_TO_ID["tv"] in g["base"]
    assert NAME_TO_ID["hair drier"] not in g["all"]
    E.split, E.base_names, E.novel_names = "names", ("dog", "cat"), ("person",)
    assert splits.zeroshot_names(E, ann) == (["cat", "dog"], ["person"])
    E.novel_names = ("cat",)
    with pytest.raises(ValueError, match="both base and novel"):
        splits.zeroshot_names(E, ann)
    E.novel_names = ("unicorn",)
    with pytest.raises(DataError, match="unicorn"):
        splits.zeroshot_names(E, ann)
    E.split = "voc"
    with pytest.raises(ValueError, match="unknown split"):
        splits.zeroshot_names(E, ann)


def test_coco_eval_groups_perfect_detections(tmp_path):
    val = _coco_json(tmp_path / "val.json", [10, 11],
                     [(10, "person"), (10, "bus"), (11, "cake"), (11, "tv")])
    out = splits.make_coco_zeroshot_files(val, val, str(tmp_path / "zs"))
    ds = load_coco(out["val"], str(tmp_path), check_files=False)
    gt = read_json(out["val"])
    res = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
            "score": 0.9} for a in gt["annotations"]]
    groups = splits.category_groups(out["val"], splits.COCO_BASE_48, splits.COCO_NOVEL_17)
    for g, ids in groups.items():
        m = evaluate.coco_eval(ds.coco(), res, [10, 11], ids)
        assert m["AP50"] == pytest.approx(1.0) and m["AP"] == pytest.approx(1.0), g
    # a novel-only miss lowers novel and all, not base
    res2 = [r for r in res if r["category_id"] != NAME_TO_ID["bus"]]
    m = {g: evaluate.coco_eval(ds.coco(), res2, [10, 11], ids) for g, ids in groups.items()}
    assert m["base"]["AP50"] == pytest.approx(1.0)
    assert m["novel"]["AP50"] == pytest.approx(0.5) and m["all"]["AP50"] < 1.0


# ----------------------------------------------------------------------------- LVIS

def _lvis_gt(rng, n_img=6):
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


def _perfect(gt, score=0.9):
    return [{"image_id": a["image_id"], "category_id": a["category_id"],
             "bbox": list(a["bbox"]), "score": score} for a in gt["annotations"]]


def test_lvis_eval_perfect_detections(tmp_path, rng):
    gt = _lvis_gt(rng)
    path = tmp_path / "lvis_val.json"
    path.write_text(json.dumps(gt))
    m = lvis_evaluate(str(path), _perfect(gt))
    for k in ("AP", "AP50", "AP75", "APr", "APc", "APf", "AR@300"):
        assert m[k] == pytest.approx(1.0), (k, m)
    assert m["num_categories"] == {"r": 2, "c": 2, "f": 2}
    empty = lvis_evaluate(gt, [])
    assert empty["AP"] == 0.0 and empty["APr"] == 0.0


def test_lvis_federated_rules(rng):
    gt = _lvis_gt(rng)
    perfect = _perfect(gt, 0.5)
    img = gt["images"][0]
    present = {a["category_id"] for a in gt["annotations"] if a["image_id"] == img["id"]}
    unknown = [c for c in range(1, 7)
               if c not in present and c not in img["neg_category_ids"]][0]
    fp = {"image_id": img["id"], "bbox": [1.0, 1.0, 20.0, 20.0], "score": 0.99}
    # a confident false positive of a category with no information in the image: ignored
    m = lvis_evaluate(gt, perfect + [{**fp, "category_id": unknown}])
    assert m["AP"] == pytest.approx(1.0)
    # ... of a verified-absent (negative) category: counts, lowers that category's AP
    neg = img["neg_category_ids"][0]
    m = lvis_evaluate(gt, perfect + [{**fp, "category_id": neg}])
    assert m["AP"] < 1.0
    # ... of a present but not exhaustively annotated category: unmatched -> ignored
    c = sorted(present)[0]
    gt2 = json.loads(json.dumps(gt))
    gt2["images"][0]["not_exhaustive_category_ids"] = [c]
    assert lvis_evaluate(gt2, perfect + [{**fp, "category_id": c}])["AP"] == \
        pytest.approx(1.0)
    assert lvis_evaluate(gt, perfect + [{**fp, "category_id": c}])["AP"] < 1.0
    # the per-image limit keeps the highest scores: 1 per image drops a true positive
    m1 = lvis_evaluate(gt, perfect, max_dets=1)
    assert m1["AR@1"] < 1.0 and lvis_evaluate(gt, perfect, max_dets=2)["AR@2"] == 1.0


def test_lvis_eval_bad_input(rng):
    gt = _lvis_gt(rng)
    bad = json.loads(json.dumps(gt))
    del bad["images"][0]["neg_category_ids"]
    with pytest.raises(DataError, match="neg_category_ids"):
        lvis_evaluate(bad, [])
    with pytest.raises(DataError, match="not in"):
        lvis_evaluate(gt, [{"image_id": 999, "category_id": 1, "bbox": [0, 0, 1, 1],
                            "score": 1.0}])


def test_lvis_names_by_frequency(tmp_path, rng):
    gt = _lvis_gt(rng)
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(gt))
    base, novel = splits.lvis_names(str(path))
    assert novel == ["thing_3", "thing_6"]
    assert base == ["thing_1", "thing_2", "thing_4", "thing_5"]
    gt["categories"][0]["frequency"] = "x"
    path.write_text(json.dumps(gt))
    with pytest.raises(DataError, match="frequency"):
        splits.lvis_names(str(path))
