"""The generic classification loaders of isal_jax.data: `tfds:<name>` over a tiny data set
built here with tfds (array_record, no network, no TensorFlow) and `folder` over real PNG
files written with PIL; values checked against numpy on the stored pixels; every mistake
(missing data set, split, feature, bad normalisation, unreadable image) is one line
naming the data set or file."""
import numpy as np
import pytest

from ezsd_jax.core.config_check import ConfigError, validate
from ezsd_jax.core.errors import DataError
from isal_jax.data import load_dataset, loader_options

tfds = pytest.importorskip("tensorflow_datasets")


class IsalTinyImages(tfds.core.GeneratorBasedBuilder):
    """3 classes of random 6x5 RGB uint8 images; splits train (7) / val (4)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "pixels": tfds.features.Tensor(shape=(6, 5, 3), dtype=np.uint8),
            "y": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(7), "val": self._generate_examples(4)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"pixels": _pixels(n, i), "y": i % 3}


def _pixels(n, i):
    """The image of example key i of an n-example split; pixel (0, 0, 0) holds the key (tfds
    stores examples in a hashed order: the loader's ids are positions in that order)."""
    a = np.random.default_rng([n, i]).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    a[0, 0, 0] = i
    return a


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    IsalTinyImages(data_dir=str(d), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return str(d)


def test_tfds_loader_values_and_options(tfds_dir):
    opts = {"image_key": "pixels", "label_key": "y", "mean": (0.1, 0.2, 0.3),
            "std": (0.5, 0.25, 2.0)}
    d = load_dataset("tfds:isal_tiny_images", "val", tfds_dir, opts)
    assert (d.num_classes, d.image_shape, d.ids.tolist()) == (3, (6, 5, 3), [0, 1, 2, 3])
    b = d.get([3, 0, 2, 1])
    keys = np.rint((b["image"][:, 0, 0, 0] * 0.5 + 0.1) * 255).astype(int)
    assert sorted(keys.tolist()) == [0, 1, 2, 3]            # every example once
    want = (np.stack([_pixels(4, k) for k in keys]) / 255.0 - opts["mean"]) / opts["std"]
    np.testing.assert_allclose(b["image"], want, rtol=1e-5, atol=1e-5)
    assert b["label"].tolist() == (keys % 3).tolist()
    np.testing.assert_array_equal(d.get([1])["image"], b["image"][3:])   # random access
    tr = load_dataset("tfds:isal_tiny_images", "train[:3]", tfds_dir,
                      {**opts, "image_size": (4, 8)})
    assert len(tr) == 3 and tr.image_shape == (4, 8, 3)
    assert tr.get([0])["image"].shape == (1, 4, 8, 3)


@pytest.mark.parametrize("name,split,opts,text", [
    ("tfds:nope", "val", {}, "tfds:nope: no prepared dataset under data_dir"),
    ("tfds:isal_tiny_images", "test", {}, "split 'test' is not prepared"),
    ("tfds:isal_tiny_images", "val", {"label_key": "y"}, "loader.image_key='image' is not a"),
    ("tfds:isal_tiny_images", "val", {"image_key": "pixels", "label_key": "pixels"},
     "is not a ClassLabel"),
    ("tfds:isal_tiny_images", "val", {"image_key": "pixels", "label_key": "y",
                                      "mean": (0.1, 0.2)}, "loader.mean has 2 values"),
])
def test_tfds_loader_errors_are_one_line(tfds_dir, name, split, opts, text):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        load_dataset(name, split, tfds_dir, opts)
    assert text in str(e.value) and "\n" not in str(e.value)
    if "no prepared" in text:
        assert tfds_dir in str(e.value)


def test_image_folder_loader(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    pix = {}
    for c in ("cat", "ant"):                    # label order = sorted names: ant 0, cat 1
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(2):
            a = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / "train" / c / f"{i}.png")
            pix[c, i] = a
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")     # ignored
    (tmp_path / "train" / "cat" / "9.png").write_bytes(b"\x89PNG garbage")   # unreadable
    d = load_dataset("folder", "train", str(tmp_path), {"image_size": (5, 7), "mean": (0.5,),
                                                        "std": (0.25,)})
    assert (len(d), d.num_classes, d.image_shape) == (5, 2, (5, 7, 3))
    b = d.get([0, 3])                                       # ant/0.png, cat/1.png
    want = (np.stack([pix["ant", 0], pix["cat", 1]]) / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(b["image"], want, atol=1e-5)
    assert b["label"].tolist() == [0, 1]
    assert d.get([1])["image"].shape == (1, 5, 7, 3)
    assert load_dataset("folder", "train", str(tmp_path)).image_shape == (32, 32, 3)
    with pytest.raises(DataError, match="9.png"):
        d.get([4])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("folder", "val", str(tmp_path))


def test_loader_config_is_validated_and_read():
    from configs import isal_demo
    cfg = isal_demo.get_config()
    validate(cfg)
    assert loader_options(cfg.pool) == {"image_key": "image", "label_key": "label",
                                        "mean": (0.5,), "std": (0.5,), "image_size": ()}
    for field, value, text in (("pool.loader.std", (0.0,), "pool.loader.std"),
                               ("pool.loader.image_size", (32,), "image_size=(32,)"),
                               ("pool.loader.image_key", "", "image_key=''")):
        bad = isal_demo.get_config()
        bad.update_from_flattened_dict({field: value})
        with pytest.raises(ConfigError, match=text.replace("(", r"\(").replace(")", r"\)")):
            validate(bad)
