"""config.data.source='tfds' (data/tfds_source.py), without TensorFlow and without
downloads: a generated COCO-format set written again as a tfds builder (prepared
array_record, images as their PNG bytes, masks as per-object images) gives the same
records, masks and batches as the COCO loader on the JSON, with the zero-shot split by
category name; `tfds.testing.mock_data` serves the lvis builder's real features to the
real reading code; a builder without masks is one line for a Mask R-CNN; evaluation
without the annotation JSON says which field to set; and (slow) a detector trains and
evaluates through `python -m ezsd_jax.main` on the tfds builder."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import common
from ezsd_jax.core.errors import DataError
from ezsd_jax.data import synthetic as S
from ezsd_jax.data.coco import load_coco
from ezsd_jax.data.pipeline import DetectionPipeline
from ezsd_jax.data.segmentation import segmentation_rle
from ezsd_jax.train import load_dataset

tfds = pytest.importorskip("tensorflow_datasets")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "ezsd_tiny_detection"


def _png(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, "PNG")
    return b.getvalue()


def _examples(ann_file: str, image_dir: str, masks_as_png: bool = True) -> list[dict]:
    """The COCO set as tfds detection examples (coco/2017 + lvis features)."""
    from pycocotools import mask as mask_util
    data = json.load(open(ann_file))
    label = {c["id"]: k for k, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    out = []
    for im in data["images"]:
        h, w = im["height"], im["width"]
        anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
        boxes = [[a["bbox"][1] / h, a["bbox"][0] / w, (a["bbox"][1] + a["bbox"][3]) / h,
                  (a["bbox"][0] + a["bbox"][2]) / w] for a in anns]
        masks = [mask_util.decode(segmentation_rle(a["segmentation"], h, w, "t")) * 255
                 for a in anns]
        with open(os.path.join(image_dir, im["file_name"]), "rb") as f:
            img = f.read()
        out.append({"image": img, "image/id": im["id"], "objects": {
            "bbox": np.asarray(boxes, np.float32).reshape(-1, 4),
            "label": [label[a["category_id"]] for a in anns],
            "id": [a["id"] for a in anns], "is_crowd": [bool(a.get("iscrowd", 0)) for a in anns],
            "segmentation": [_png(m) if masks_as_png else m[..., None] for m in masks]}})
    return out


class EzsdTinyDetection(tfds.core.GeneratorBasedBuilder):
    """A tfds builder of the generated set (names and examples set by the fixture)."""
    VERSION = tfds.core.Version("1.0.0")
    NAMES: list = []
    SPLITS: dict = {}

    def _info(self):
        f = tfds.features
        return tfds.core.DatasetInfo(builder=self, features=f.FeaturesDict({
            "image": f.Image(shape=(None, None, 3)), "image/id": np.int64,
            "objects": f.Sequence({"bbox": f.BBoxFeature(), "id": np.int64,
                                   "label": f.ClassLabel(names=self.NAMES),
                                   "is_crowd": np.bool_,
                                   "segmentation": f.Image(shape=(None, None, 1))})}))

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s) for s in self.SPLITS}

    def _generate_examples(self, split):
        for i, ex in enumerate(self.SPLITS[split]):
            yield i, ex


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(data root, {split: COCO annotation path}, names, tfds data_dir)."""
    tmp = tmp_path_factory.mktemp("tfds")
    spec = S.SyntheticSpec(S.default_categories(4), image_hw_range=((48, 64), (48, 64)),
                           objects_per_image=(1, 3), object_size=(16, 36))
    data = str(tmp / "coco")
    ann = {s: S.write_coco_dataset(data, spec, n, seed=0, split=s)
           for s, n in (("train", 8), ("val", 4))}
    names = [c["name"] for c in sorted(json.load(open(ann["train"]))["categories"],
                                       key=lambda c: c["id"])]
    EzsdTinyDetection.NAMES = names
    EzsdTinyDetection.SPLITS = {"train": _examples(ann["train"], os.path.join(data, "train")),
                                "validation": _examples(ann["val"], os.path.join(data, "val"))}
    tfds_dir = str(tmp / "tfds")
    EzsdTinyDetection(data_dir=tfds_dir, file_format="array_record").download_and_prepare()
    return data, ann, names, tfds_dir


def _dcfg(tfds_dir, ann=None, **kw):
    d = common.data_config(**{"source": "tfds", "tfds_name": f"{NAME}:1.0.0",
                              "tfds_data_dir": tfds_dir, "num_threads": 2, **kw})
    if ann:
        d.train_ann, d.val_ann = ann["train"], ann["val"]
    return d


def _same_records(got, ref, masks=True):
    assert [r.image_id for r in got.records] == [r.image_id for r in ref.records]
    assert got.cat_names == ref.cat_names
    for g, r in zip(got.records, ref.records):
        assert (g.height, g.width) == (r.height, r.width)
        np.testing.assert_allclose(g.boxes, r.boxes, atol=2e-3)
        np.testing.assert_array_equal(g.classes, r.classes)
        if masks:
            from pycocotools import mask as mask_util
            for gs, rs in zip(g.segmentations, r.segmentations):
                np.testing.assert_array_equal(
                    mask_util.decode(gs), mask_util.decode(segmentation_rle(
                        rs, r.height, r.width, "ref")))


def test_tfds_records_and_batches_match_the_coco_loader(world):
    data, ann, names, tfds_dir = world
    base = names[:3]                                 # zero-shot: training on base names
    for split, cats in (("train", base), ("val", None)):
        got = load_dataset(_dcfg(tfds_dir, ann), split, category_names=cats, with_masks=True)
        ref = load_coco(ann[split], os.path.join(data, split), category_names=cats,
                        with_masks=True)
        _same_records(got, ref)
        assert got.cat_ids == ref.cat_ids and got.ann_file == ann[split]
    assert got.skipped.get("unselected_category", 0) == 0
    train = load_dataset(_dcfg(tfds_dir, ann), "train", category_names=base)
    assert train.skipped["unselected_category"] > 0
    # without the JSON: category ids are label index + 1
    no_json = load_dataset(_dcfg(tfds_dir), "train", category_names=names[::-1])
    assert no_json.cat_ids == [4, 3, 2, 1] and no_json.ann_file == ""
    with pytest.raises(DataError, match="config.data.val_ann"):
        no_json.coco()
    # the same batches (images decoded by core/images from the stored bytes)
    kw = dict(batch_size=2, image_size=(64, 64), max_boxes=4, train=False, short_side=64,
              max_side=64, num_threads=1, prefetch=0)
    ref = load_coco(ann["val"], os.path.join(data, "val"))
    got = load_dataset(_dcfg(tfds_dir, ann), "val")
    with DetectionPipeline(got, **kw) as pg, DetectionPipeline(ref, **kw) as pr:
        for bg, br in zip(pg, pr):
            np.testing.assert_array_equal(bg["image"], br["image"])
            np.testing.assert_array_equal(bg["image_id"], br["image_id"])
            np.testing.assert_allclose(bg["boxes"], br["boxes"], atol=2e-3)


def test_builder_without_masks_and_missing_builder_are_one_line(world, tmp_path):
    _, ann, names, tfds_dir = world

    class NoMasks:                                   # a coco/2017-like feature set
        dataset_info = type("Info", (), {"features": tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "objects": tfds.features.Sequence({
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(names=names)})})})()

        def __len__(self):
            return 0
    from ezsd_jax.data.tfds_source import load_tfds
    with pytest.raises(DataError, match=r"has no per-object masks .*mask_on=False"):
        load_tfds(_dcfg(tfds_dir), "train", with_masks=True, source=NoMasks())
    assert len(load_tfds(_dcfg(tfds_dir), "train", source=NoMasks())) == 0
    with pytest.raises(DataError, match="config.data.tfds_name='no_such_builder'"):
        load_dataset(_dcfg(tfds_dir, tfds_name="no_such_builder"), "train")


def test_mock_data_lvis_features_through_the_reading_code(world):
    """tfds.testing.mock_data serves examples with the lvis builder's own features (1203
    LVIS names, per-object masks) to tfds.data_source inside load_dataset."""
    data, ann, names, _ = world
    examples = _examples(ann["train"], os.path.join(data, "train"), masks_as_png=False)
    served = []

    def as_data_source(builder, split, decoders=None, **kw):
        served.append((builder.name, split, sorted(decoders)))

        class Source(list):
            dataset_info = builder.info
        return Source(examples)

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        lvis_names = tfds.builder("lvis").info.features["objects"]["label"].names
        # the set's labels 0..3 are these LVIS categories
        picked = [lvis_names[3], lvis_names[1]]
        dcfg = common.data_config(source="tfds", tfds_name="lvis", num_threads=2)
        got = load_dataset(dcfg, "train", category_names=picked, with_masks=True)
    assert served == [("lvis", "train", ["image"])] and len(lvis_names) == 1203
    ref = load_coco(ann["train"], os.path.join(data, "train"),
                    category_names=[names[3], names[1]], with_masks=True)
    assert got.cat_names == picked
    got.cat_names = ref.cat_names
    _same_records(got, ref)


@pytest.mark.slow            # ~30 CPU-s: a detector compiled, trained and evaluated
def test_detector_trains_and_evaluates_from_tfds(world, tmp_path, optimized_env):
    _, ann, _, tfds_dir = world
    wd = tmp_path / "wd"
    flags = {"data.source": "tfds", "data.tfds_name": f"{NAME}:1.0.0",
             "data.tfds_data_dir": tfds_dir, "data.train_ann": ann["train"],
             "data.val_ann": ann["val"], "data.short_side": 64, "data.max_side": 64,
             "data.max_boxes": 4, "train.steps": 3, "train.batch_size": 2,
             "train.ckpt_every": 3, "train.warmup_steps": 1, "train.log_every": 1,
             "eval.batch_size": 2, "model.image_size": "(64, 64)",
             "model.rpn_post_nms_topk_train": 32, "model.roi_batch_per_image": 16,
             "model.rpn_post_nms_topk_test": 16, "model.test_max_detections": 10}
    cmd = [sys.executable, "-m", "ezsd_jax.main", "--config=configs/synthetic_detection.py",
           f"--workdir={wd}", "--stages=train,eval"] + [f"--config.{k}={v}"
                                                        for k, v in flags.items()]
    p = subprocess.run(cmd, cwd=ROOT, env=optimized_env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stderr.strip() == "" or "Traceback" not in p.stderr
    assert "=== stage eval done" in p.stdout
    cfg = json.load(open(wd / "config.json"))
    assert cfg["data"]["source"] == "tfds"
