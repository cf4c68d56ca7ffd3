"""Classification datasets for ISAL: scikit-learn digits (offline) and CIFAR-10 (tfds files).

Place in the pipeline: select.py / the AL loop load a `ClassificationData` by name and
split, then cut it into fixed-size, masked host batches for the task adapter and the
influence engine. Sample ids are stable integers (the index in the original collection
for digits, the index within the tfds split for CIFAR-10); every id list a user passes
is checked against them.

* digits: sklearn.datasets.load_digits (1797 images, ships with scikit-learn), float32
  images [N, 8, 8, 1] in [0, 1]. Splits 'train' (1437) / 'test' (360) come from a fixed
  seed-0 permutation; 'all' is everything.
* tfds:<name>: any image-classification set ALREADY PREPARED by tfds as array_record files
  under data_dir (`load_tfds`: configurable image/label keys, mean/std, image size); never
  downloads. cifar10 is this with the CIFAR mean/std (see `CIFAR10_HOWTO`).
* folder: an image folder, <data_dir>/<split>/<class>/<image> (`load_image_folder`).
* idx: MNIST-format idx files (raw or .gz) under data_dir (`load_idx`): Fashion-MNIST,
  MNIST, EMNIST, KMNIST or a user's own.
* a user's own: `ClassificationData.from_arrays(images, labels, ids)`, made loadable by
  name with `register_dataset(name, loader)`.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Callable, Iterator, Sequence

import numpy as np

CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)

CIFAR10_HOWTO = (
    "CIFAR-10 must be prepared beforehand as tfds array_record files (this project never "
    "downloads). On a machine with network and TensorFlow installed run\n"
    "    pip install tensorflow tensorflow-datasets\n"
    "    tfds build cifar10 --data_dir=DIR --file_format=array_record\n"
    "then copy DIR here and pass it as pool.data_dir (or set TFDS_DATA_DIR). Expected "
    "layout: DIR/cifar10/<version>/dataset_info.json + cifar10-<split>.array_record-*.")
CIFAR10_HOWTO_SHORT = ("on a machine with network and TensorFlow; isal_jax.data.CIFAR10_HOWTO "
                       "has the steps")


@dataclasses.dataclass
class ClassificationData:
    """A split of a labeled image collection with random access by id."""
    name: str
    split: str
    ids: np.ndarray                       # int64, sorted, unique
    num_classes: int
    image_shape: tuple[int, ...]
    _fetch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # positions -> (img, lbl)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_arrays(cls, images, labels, ids=None, *, name: str = "arrays", split: str = "all",
                    num_classes: int | None = None) -> "ClassificationData":
        """A user's in-memory data set: images [N, H, W, C] (already normalized as the
        model expects), integer labels [N] in [0, num_classes), optional unique int ids
        (default 0..N-1)."""
        images = np.asarray(images, np.float32)
        labels = np.asarray(labels)
        if images.ndim != 4 or labels.shape != (len(images),):
            raise ValueError(f"from_arrays: images must be [N, H, W, C] and labels [N], got "
                             f"{images.shape} and {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
            raise ValueError("from_arrays: labels must be non-negative integers")
        ids = np.arange(len(images), dtype=np.int64) if ids is None else np.asarray(ids)
        if ids.shape != labels.shape or not np.issubdtype(ids.dtype, np.integer) or \
                len(np.unique(ids)) != len(ids):
            raise ValueError("from_arrays: ids must be unique integers, one per image")
        k = int(num_classes) if num_classes is not None else int(labels.max(initial=-1)) + 1
        if len(labels) and labels.max() >= k:
            raise ValueError(f"from_arrays: label {int(labels.max())} >= num_classes={k}")
        order = np.argsort(ids, kind="stable")
        images, labels, ids = images[order], labels[order].astype(np.int32), \
            ids[order].astype(np.int64)
        return cls(name, split, ids, k, tuple(images.shape[1:]),
                   lambda pos: (images[pos], labels[pos]))

    def positions(self, ids: Sequence[int], what: str = "ids") -> np.ndarray:
        """Ids -> row positions; unknown ids are an error naming a few of them."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if len(self.ids) == 0:
            pos, bad = np.zeros(len(ids), np.int64), np.ones(len(ids), bool)
        else:
            pos = np.clip(np.searchsorted(self.ids, ids), 0, len(self.ids) - 1)
            bad = self.ids[pos] != ids
        if np.any(bad):
            raise ValueError(f"{what}: {int(np.sum(bad))} id(s) are not in {self.name}/"
                             f"{self.split} (e.g. {ids[bad][:5].tolist()}; valid ids are "
                             f"{self.ids[:3].tolist()}..{self.ids[-1:].tolist()})")
        return pos

    def check(self, ids: Sequence[int], what: str = "ids") -> np.ndarray:
        """The ids as int64, after checking that every one is in this split."""
        self.positions(ids, what)
        return np.asarray(ids, np.int64).reshape(-1)

    def get(self, ids: Sequence[int], what: str = "ids") -> dict:
        pos = self.positions(ids, what)
        images, labels = self._fetch(pos)
        return {"image": images.astype(np.float32), "label": labels.astype(np.int32),
                "id": np.asarray(ids, np.int64)}

    def batches(self, ids: Sequence[int], batch_size: int, what: str = "ids") -> Iterator[dict]:
        """Fixed-size host batches {'image', 'label', 'id', 'mask'} in the order of `ids`; the
        last one is padded (repeating its first row) with mask False."""
        ids = np.asarray(ids, np.int64)
        self.positions(ids, what)  # validate all up front
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            b = self.get(chunk, what)
            yield pad_batch(b, batch_size)


def pad_batch(batch: dict, batch_size: int) -> dict:
    """Pads every array to `batch_size` rows (copies of row 0) and adds 'mask'."""
    n = len(batch["id"])
    if n > batch_size:
        raise ValueError(f"pad_batch: {n} rows > batch size {batch_size}")
    out = {}
    for k, x in batch.items():
        if n < batch_size:
            x = np.concatenate([x, np.repeat(x[:1], batch_size - n, axis=0)], axis=0)
        out[k] = x
    mask = np.zeros((batch_size,), bool)
    mask[:n] = True
    out["mask"] = mask
    return out


# ----------------------------------------------------------------------------- digits

DIGITS_TRAIN = 1437


def load_digits(split: str = "train") -> ClassificationData:
    from sklearn.datasets import load_digits as _load
    d = _load()
    images = (d.images.astype(np.float32) / 16.0)[..., None]
    labels = d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(labels))
    if split == "train":
        ids = np.sort(perm[:DIGITS_TRAIN])
    elif split == "test":
        ids = np.sort(perm[DIGITS_TRAIN:])
    elif split == "all":
        ids = np.arange(len(labels))
    else:
        raise ValueError(f"digits: unknown split {split!r} (train | test | all)")
    ids = ids.astype(np.int64)

    def fetch(pos):
        return images[ids[pos]], labels[ids[pos]]
    return ClassificationData("digits", split, ids, 10, (8, 8, 1), fetch)


# ----------------------------------------------------------------------------- tfds

def _tfds_dir(data_dir: str | None) -> str:
    if data_dir:
        return os.path.expanduser(data_dir)
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def _version_key(path: str):
    v = os.path.basename(os.path.dirname(path))
    return tuple(int(x) if x.isdigit() else -1 for x in v.split("."))


def to_model_input(images: np.ndarray, image_size: Sequence[int], mean, std) -> np.ndarray:
    """uint8 (or [0, 255]) images [B, H, W, C] -> float32 [B, h, w, C]: scaled to [0, 1],
    resized to image_size (bilinear; () keeps the size), (x - mean) / std per channel."""
    x = np.asarray(images, np.float32) / 255.0
    if len(image_size) and tuple(x.shape[1:3]) != tuple(int(s) for s in image_size):
        import jax
        x = np.asarray(jax.image.resize(x, (x.shape[0], int(image_size[0]),
                                            int(image_size[1]), x.shape[3]), "bilinear"))
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _check_norm(what: str, channels: int, mean, std) -> None:
    for field, v in (("mean", mean), ("std", std)):
        if len(v) not in (1, channels):
            raise ValueError(f"{what}: loader.{field} has {len(v)} values for {channels}-channel "
                             "images (give 1 or one per channel)")
    if min(std) <= 0:
        raise ValueError(f"{what}: loader.std must be > 0, got {tuple(std)}")


def load_tfds(name: str, split: str, data_dir: str | None = None, *, image_key: str = "image",
              label_key: str = "label", mean=(0.5,), std=(0.5,), image_size=(),
              howto: str = "") -> ClassificationData:
    """Any image-classification data set ALREADY PREPARED by tfds as array_record files
    (`tfds build NAME --data_dir=DIR --file_format=array_record`), read through
    tfds.builder_from_directory (the builder class is not needed; never downloads):
    DIR/NAME/<version>/dataset_info.json, the newest version. `split`: any tfds split
    ('train', 'test', 'train[:80%]', ...). `image_key` / `label_key`: the features holding
    the image (uint8 [H, W, C]) and its ClassLabel. Images -> to_model_input(image_size,
    mean, std); image_size () keeps the stored size (which must then be fixed). Ids: the
    index within the split. Every mistake is a one-line error naming the data set."""
    root = _tfds_dir(data_dir)
    what = f"tfds:{name}"
    infos = sorted(glob.glob(os.path.join(root, name, "*", "dataset_info.json")),
                   key=_version_key)
    if not infos:
        raise FileNotFoundError(
            f"{what}: no prepared dataset under data_dir {root!r} (looked for "
            f"{os.path.join(root, name, '*', 'dataset_info.json')}; prepare it with `tfds "
            f"build {name} --data_dir=DIR --file_format=array_record`){howto}")
    import tensorflow_datasets as tfds
    builder = tfds.builder_from_directory(os.path.dirname(infos[-1]))
    info = builder.info
    base = [p.split("[")[0] for p in split.split("+")]
    missing = [b for b in base if b not in info.splits]
    if missing:
        raise FileNotFoundError(f"{what}: split {split!r} is not prepared under "
                                f"{os.path.dirname(infos[-1])!r} (has {sorted(info.splits)})"
                                f"{howto}")
    feats = info.features
    for key, field in ((image_key, "image_key"), (label_key, "label_key")):
        if key not in feats:
            raise ValueError(f"{what}: loader.{field}={key!r} is not a feature (features: "
                             f"{sorted(feats.keys())})")
    num_classes = getattr(feats[label_key], "num_classes", None)
    if not num_classes:
        raise ValueError(f"{what}: feature {label_key!r} is not a ClassLabel (no number of "
                         "classes)")
    shape = tuple(feats[image_key].shape)
    if len(shape) != 3:
        raise ValueError(f"{what}: feature {image_key!r} has shape {shape}, not [H, W, C]")
    if not len(image_size) and None in shape[:2]:
        raise ValueError(f"{what}: images have variable size {shape}; set loader.image_size")
    if shape[2] is None:
        raise ValueError(f"{what}: feature {image_key!r} has no fixed channel count")
    _check_norm(what, shape[2], mean, std)
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:  # tfds raises several types (e.g. tfrecord files: no random access)
        raise FileNotFoundError(f"{what}: cannot open split {split!r} under {root!r} "
                                f"({type(e).__name__}: {e}; random access needs "
                                f"--file_format=array_record){howto}") from e
    out_hw = tuple(int(v) for v in image_size) if len(image_size) else shape[:2]

    def fetch(pos):
        pos = [int(p) for p in pos]
        recs = source.__getitems__(pos) if hasattr(source, "__getitems__") else \
            [source[p] for p in pos]
        img = to_model_input(np.stack([np.asarray(r[image_key]) for r in recs]), out_hw,
                             mean, std)
        return img, np.asarray([int(r[label_key]) for r in recs], np.int32)
    return ClassificationData(what, split, np.arange(len(source), dtype=np.int64),
                              int(num_classes), (*out_hw, int(shape[2])), fetch)


def load_cifar10(split: str = "train", data_dir: str | None = None) -> ClassificationData:
    """CIFAR-10 from prepared tfds files, normalized with the CIFAR mean/std."""
    d = load_tfds("cifar10", split, data_dir, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                  howto=f" ({CIFAR10_HOWTO_SHORT})")
    d.name = "cifar10"
    return d


# ----------------------------------------------------------------------------- image folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_image_folder(split: str, data_dir: str | None = None, *,
                      image_size: Sequence[int] = (32, 32), mean=(0.5,),
                      std=(0.5,)) -> ClassificationData:
    """<data_dir>/<split>/<class name>/<image file>: one sub-folder per class (classes in
    sorted name order = label 0, 1, ...), images decoded by ezsd_jax.core.images
    (EXIF-upright RGB) -> to_model_input(image_size (() -> 32x32), mean, std). Ids: the
    index in the sorted file list of the split."""
    from ezsd_jax.core.images import decode_image
    if not data_dir:
        raise ValueError("folder: set data_dir to the folder that holds <split>/<class>/")
    root = os.path.join(os.path.expanduser(data_dir), split)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"folder: {root!r} does not exist (expected "
                                "<data_dir>/<split>/<class>/<images>)")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files, labels = [], []
    for k, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(root, c))):
            if f.lower().endswith(IMAGE_SUFFIXES):
                files.append(os.path.join(root, c, f))
                labels.append(k)
    if not files:
        raise FileNotFoundError(f"folder: no images under {root!r}/<class>/")
    _check_norm(f"folder:{data_dir}", 3, mean, std)
    labels = np.asarray(labels, np.int32)
    hw = tuple(int(v) for v in image_size) if len(image_size) else (32, 32)

    def fetch(pos):
        return (np.concatenate([to_model_input(decode_image(files[int(p)])[None], hw, mean, std)
                                for p in pos]), labels[np.asarray(pos, np.int64)])
    return ClassificationData(f"folder:{data_dir}", split, np.arange(len(files), dtype=np.int64),
                              len(classes), (*hw, 3), fetch)


# ----------------------------------------------------------------------------- idx (MNIST format)

IDX_SPLIT_ALIASES = {"test": ("test", "t10k"), "t10k": ("t10k", "test")}


def read_idx(path: str, ndim: int) -> np.ndarray:
    """One idx file (raw or gzip): magic 0x0000 08 <ndim> (unsigned bytes), ndim big-endian
    uint32 sizes, then the data. Any other magic, a wrong ndim or a size that does not match
    the file is a ValueError naming the file."""
    import gzip
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"idx file {path!r}: cannot read ({e})") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise ValueError(f"idx file {path!r}: bad magic {raw[:4].hex() or '(empty)'} (expected "
                         f"000008{ndim:02x}: unsigned bytes, {ndim} dimension(s))")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise ValueError(f"idx file {path!r}: truncated header")
    shape = tuple(int(v) for v in np.frombuffer(raw[4:head], ">u4"))
    if len(raw) - head != int(np.prod(shape)):
        raise ValueError(f"idx file {path!r}: header says {shape} = {int(np.prod(shape))} "
                         f"bytes of data, file has {len(raw) - head}")
    return np.frombuffer(raw[head:], np.uint8).reshape(shape)


def _idx_file(root: str, split: str, kind: str) -> str:
    names = IDX_SPLIT_ALIASES.get(split, (split,))
    for name in names:
        hits = sorted(glob.glob(os.path.join(root, f"*{name}-{kind}")) +
                      glob.glob(os.path.join(root, f"*{name}-{kind}.gz")))
        if len(hits) > 1:
            raise ValueError(f"idx: several files match split {split!r} in {root!r}: "
                             f"{[os.path.basename(h) for h in hits]}")
        if hits:
            return hits[0]
    raise FileNotFoundError(f"idx: no '<prefix>{names[0]}-{kind}[.gz]' in data_dir {root!r} "
                            "(MNIST-format files: train-images-idx3-ubyte.gz, ...)")


def load_idx(split: str, data_dir: str | None = None, *, mean=(0.5,), std=(0.5,),
             image_size: Sequence[int] = ()) -> ClassificationData:
    """MNIST-format data under data_dir: '<prefix><split>-images-idx3-ubyte[.gz]' (uint8
    [N, H, W]) and '<prefix><split>-labels-idx1-ubyte[.gz]' (uint8 [N]); split 'test' also
    finds 't10k'. Serves MNIST, Fashion-MNIST (Debian: dataset-fashion-mnist,
    /usr/share/datasets/fashion-mnist), KMNIST, EMNIST (prefix 'emnist-<set>-') and a
    user's idx files. Images -> to_model_input(image_size, mean, std), [N, H, W, 1]; classes
    = 0..max label of the split; ids = the index in the file."""
    if not data_dir:
        raise ValueError("idx: set data_dir to the folder that holds the idx files")
    root = os.path.expanduser(data_dir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"idx: data_dir {root!r} does not exist")
    images = read_idx(_idx_file(root, split, "images-idx3-ubyte"), 3)
    labels_path = _idx_file(root, split, "labels-idx1-ubyte")
    labels = read_idx(labels_path, 1).astype(np.int32)
    if len(labels) != len(images):
        raise ValueError(f"idx file {labels_path!r}: {len(labels)} labels for {len(images)} "
                         "images")
    if not len(labels):
        raise ValueError(f"idx file {labels_path!r}: no samples")
    _check_norm(f"idx:{data_dir}", 1, mean, std)
    hw = tuple(int(v) for v in image_size) if len(image_size) else tuple(images.shape[1:3])

    def fetch(pos):
        return (to_model_input(images[np.asarray(pos, np.int64)][..., None], hw, mean, std),
                labels[np.asarray(pos, np.int64)])
    return ClassificationData(f"idx:{data_dir}", split, np.arange(len(labels), dtype=np.int64),
                              int(labels.max()) + 1, (*hw, 1), fetch)


# ----------------------------------------------------------------------------- registry

DATASETS: dict[str, Callable[..., ClassificationData]] = {
    "digits": lambda split, data_dir=None: load_digits(split),
    "cifar10": load_cifar10,
}


def register_dataset(name: str, loader: Callable[..., ClassificationData]) -> None:
    """Makes `loader(split, data_dir=None) -> ClassificationData` loadable by name (e.g.
    config.data.dataset / config.pool.dataset) in this process; for data in memory use
    `ClassificationData.from_arrays` inside the loader."""
    if not callable(loader):
        raise TypeError("register_dataset: loader must be callable")
    DATASETS[str(name)] = loader


LOADER_OPTIONS = ("image_key", "label_key", "mean", "std", "image_size")


def loader_options(node) -> dict:
    """config.data / config.pool -> the keyword options of its `loader` sub-config (those
    of LOADER_OPTIONS that are set; {} when there is none)."""
    loader = node.get("loader") if hasattr(node, "get") else None
    if not loader:
        return {}
    return {k: (tuple(loader[k]) if isinstance(loader[k], (list, tuple)) else loader[k])
            for k in LOADER_OPTIONS if k in loader}


def load_dataset(name: str, split: str, data_dir: str | None = None,
                 options: dict | None = None) -> ClassificationData:
    """name: 'tfds:<tfds name>' (load_tfds, any prepared image-classification set),
    'folder' (load_image_folder), 'idx' (load_idx, MNIST-format files), or one of
    DATASETS. `options` (loader_options): image key/label key, mean/std, image size; used
    by tfds:<name> (all), folder and idx (mean, std, image_size); the named sets (digits,
    cifar10, registered ones) have their own."""
    options = dict(options or {})
    if name.startswith("tfds:") and len(name) > 5:
        return load_tfds(name[5:], split, data_dir, **options)
    if name in ("folder", "idx"):
        load = load_image_folder if name == "folder" else load_idx
        return load(split, data_dir, **{k: v for k, v in options.items()
                                         if k in ("mean", "std", "image_size")})
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}, "
                         "tfds:<name> (or isal_jax.data.register_dataset)")
    return DATASETS[name](split, data_dir=data_dir)
