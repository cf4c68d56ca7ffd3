"""Zero-shot splits (COCO 48/17, LVIS by frequency, explicit names), the split annotation
files, the all/novel/base evaluation groups, and the LVIS evaluation protocol on tiny
generated LVIS-format ground truth."""
import json

import numpy as np
import pytest

from ezsd_jax import evaluate
from ezsd_jax.data.coco import DataError, load_coco, read_json
from ezsd_jax.data import splits
from ezsd_jax.lvis_eval import lvis_evaluate
from helpers import lvis_gt

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


def _perfect(gt, score=0.9):
    return [{"image_id": a["image_id"], "category_id": a["category_id"],
             "bbox": list(a["bbox"]), "score": score} for a in gt["annotations"]]


def test_lvis_eval_perfect_detections(tmp_path, rng):
    gt = lvis_gt(rng)
    path = tmp_path / "lvis_val.json"
    path.write_text(json.dumps(gt))
    m = lvis_evaluate(str(path), _perfect(gt))
    for k in ("AP", "AP50", "AP75", "APr", "APc", "APf", "AR@300"):
        assert m[k] == pytest.approx(1.0), (k, m)
    assert m["num_categories"] == {"r": 2, "c": 2, "f": 2}
    empty = lvis_evaluate(gt, [])
    assert empty["AP"] == 0.0 and empty["APr"] == 0.0


def test_lvis_federated_rules(rng):
    gt = lvis_gt(rng)
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
    gt = lvis_gt(rng)
    bad = json.loads(json.dumps(gt))
    del bad["images"][0]["neg_category_ids"]
    with pytest.raises(DataError, match="neg_category_ids"):
        lvis_evaluate(bad, [])
    with pytest.raises(DataError, match="not in"):
        lvis_evaluate(gt, [{"image_id": 999, "category_id": 1, "bbox": [0, 0, 1, 1],
                            "score": 1.0}])


def test_lvis_names_by_frequency(tmp_path, rng):
    gt = lvis_gt(rng)
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(gt))
    base, novel = splits.lvis_names(str(path))
    assert novel == ["thing_3", "thing_6"]
    assert base == ["thing_1", "thing_2", "thing_4", "thing_5"]
    gt["categories"][0]["frequency"] = "x"
    path.write_text(json.dumps(gt))
    with pytest.raises(DataError, match="frequency"):
        splits.lvis_names(str(path))


# ------------------------------------------------------- LVIS against the lvis package

def _random_lvis_set(seed: int):
    """A random LVIS-format val set + detections exercising every rule of the protocol:
    r/c/f categories, small/medium/large boxes, several GT per category, jittered true
    positives, false positives in present, negative (verified absent), unverified and
    not-exhaustive categories, more detections than max_dets on some images."""
    rng = np.random.default_rng(seed)
    cats = [{"id": c, "name": f"thing_{c}", "frequency": "rcf"[c % 3], "synset": "x",
             "image_count": 1, "instance_count": 1} for c in range(1, 10)]
    images, anns, dets = [], [], []

    def box(h, w, kind):
        s = {"s": (4, 30), "m": (33, 90), "l": (100, 250)}[kind]
        bw, bh = rng.uniform(*s, 2)
        bw, bh = min(bw, w - 1), min(bh, h - 1)
        return [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), float(bw),
                float(bh)]

    for i in range(1, 15):
        h, w = int(rng.integers(300, 640)), int(rng.integers(300, 640))
        ids = [int(c) for c in rng.permutation(np.arange(1, 10))]
        present, neg, rest = ids[:int(rng.integers(1, 4))], ids[4:6], ids[6:]
        not_exh = [c for c in present if rng.random() < 0.3]
        images.append({"id": i, "height": h, "width": w, "neg_category_ids": neg,
                       "not_exhaustive_category_ids": not_exh,
                       "coco_url": f"http://x/val2017/{i:012d}.jpg"})
        for c in present:
            for _ in range(int(rng.integers(1, 4))):
                b = box(h, w, "sml"[int(rng.integers(0, 3))])
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c,
                             "bbox": b, "area": b[2] * b[3] * float(rng.uniform(0.5, 1))})
                if rng.random() < 0.8:        # a jittered detection of this object
                    j = np.asarray(b) + rng.normal(0, 0.08, 4) * [b[2], b[3], b[2], b[3]]
                    j[2:] = np.maximum(j[2:], 1.0)
                    dets.append({"image_id": i, "category_id": c, "bbox": j.tolist(),
                                 "score": float(rng.random())})
        for c in present + neg + rest[:1]:    # false positives
            for _ in range(int(rng.integers(0, 3))):
                dets.append({"image_id": i, "category_id": c,
                             "bbox": box(h, w, "sml"[int(rng.integers(0, 3))]),
                             "score": float(rng.random())})
    return {"images": images, "annotations": anns, "categories": cats}, dets


# Computed once with the lvis package (lvis==0.5.3, np.float = float shimmed; the test
# never imports it): LVISEval(LVIS(gt), LVISResults(lvis, dets), "bbox").run(), results.
LVIS_PACKAGE_RESULTS = {
    0: {
        "AP": 0.24011970244643513, "AP50": 0.4755474356959504, "AP75": 0.20677385198837345,
        "APs": 0.254496699669967, "APm": 0.2659938034619788, "APl": 0.36255156765676566,
        "APr": 0.2560900375751861, "APc": 0.25525583510732025, "APf": 0.209013234656799,
        "AR@300": 0.4411556036556037, "ARs@300": 0.33735119047619044,
        "ARm@300": 0.44166666666666665, "ARl@300": 0.49041666666666667,
    },
    1: {
        "AP": 0.282068117068117, "AP50": 0.4964067469017964, "AP75": 0.31786196934711786,
        "APs": 0.3119189061763319, "APm": 0.3658498349834983, "APl": 0.22280528052805276,
        "APr": 0.17905570776857907, "APc": 0.23584565599417082, "APf": 0.4313029874416012,
        "AR@300": 0.4700982042648709, "ARs@300": 0.46547619047619043,
        "ARm@300": 0.4729166666666667, "ARl@300": 0.34666666666666673,
    },
    2: {
        "AP": 0.24410843068433827, "AP50": 0.4919713796776503, "AP75": 0.16677667766776677,
        "APs": 0.25638063806380634, "APm": 0.24219707685054218, "APl": 0.3824349101576824,
        "APr": 0.3212380166588087, "APc": 0.18706192047776204, "APf": 0.22402535491644401,
        "AR@300": 0.39839506172839506, "ARs@300": 0.35277777777777775,
        "ARm@300": 0.36904761904761907, "ARl@300": 0.4777777777777778,
    },
}


@pytest.mark.parametrize("seed", sorted(LVIS_PACKAGE_RESULTS))
def test_lvis_eval_matches_the_lvis_package(seed):
    gt, dets = _random_lvis_set(seed)
    got = lvis_evaluate(gt, dets, max_dets=300)
    want = LVIS_PACKAGE_RESULTS[seed]
    assert len(want) == 13
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12), (k, got[k], v)
