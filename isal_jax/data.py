"""Classification datasets for ISAL: scikit-learn digits (offline) and CIFAR-10 (tfds files).

Place in the pipeline: select.py / the AL loop load a `ClassificationData` by name and
split, then cut it into fixed-size, masked host batches for the task adapter and the
influence engine. Sample ids are stable integers (the index in the original collection
for digits, the index within the tfds split for CIFAR-10); every id list a user passes
is checked against them.

* digits: sklearn.datasets.load_digits (1797 images, ships with scikit-learn), float32
  images [N, 8, 8, 1] in [0, 1]. Splits 'train' (1437) / 'test' (360) come from a fixed
  seed-0 permutation; 'all' is everything.
* cifar10: `tfds.data_source('cifar10', data_dir=...)` over ALREADY-PREPARED array_record
  files; never downloads (see `CIFAR10_HOWTO`). Images normalized with the CIFAR mean/std.
* folder: an image folder, <data_dir>/<split>/<class>/<image> (`load_image_folder`).
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


# ----------------------------------------------------------------------------- cifar10

def _tfds_dir(data_dir: str | None) -> str:
    if data_dir:
        return os.path.expanduser(data_dir)
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def load_cifar10(split: str = "train", data_dir: str | None = None) -> ClassificationData:
    root = _tfds_dir(data_dir)
    infos = glob.glob(os.path.join(root, "cifar10", "*", "dataset_info.json"))
    if not infos:
        raise FileNotFoundError(f"cifar10: no prepared dataset under {root!r} (looked for "
                                f"{root}/cifar10/*/dataset_info.json).\n{CIFAR10_HOWTO}")
    if not glob.glob(os.path.join(os.path.dirname(sorted(infos)[-1]), f"*{split}*")):
        raise FileNotFoundError(f"cifar10: split {split!r} is not prepared under "
                                f"{os.path.dirname(sorted(infos)[-1])}.\n{CIFAR10_HOWTO}")
    import tensorflow_datasets as tfds
    try:
        source = tfds.data_source("cifar10", split=split, data_dir=root, download=False,
                                  try_gcs=False)
    except Exception as e:  # tfds raises several types; keep the cause, add the how-to
        raise FileNotFoundError(f"cifar10: cannot open split {split!r} under {root!r} "
                                f"({type(e).__name__}: {e}).\n{CIFAR10_HOWTO}") from e
    ids = np.arange(len(source), dtype=np.int64)

    def fetch(pos):
        pos = [int(p) for p in pos]
        recs = source.__getitems__(pos) if hasattr(source, "__getitems__") else \
            [source[p] for p in pos]
        img = np.stack([np.asarray(r["image"]) for r in recs]).astype(np.float32) / 255.0
        img = (img - CIFAR10_MEAN) / CIFAR10_STD
        lbl = np.asarray([int(r["label"]) for r in recs], np.int32)
        return img, lbl
    return ClassificationData("cifar10", split, ids, 10, (32, 32, 3), fetch)


# ----------------------------------------------------------------------------- image folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_image_folder(split: str, data_dir: str | None = None, *,
                      image_size: tuple[int, int] = (32, 32), mean=(0.5, 0.5, 0.5),
                      std=(0.5, 0.5, 0.5)) -> ClassificationData:
    """<data_dir>/<split>/<class name>/<image file>: one sub-folder per class (classes in
    sorted name order = label 0, 1, ...), images decoded by ezsd_jax.data.images
    (EXIF-upright RGB), resized to `image_size` (bilinear), scaled to [0, 1] and
    normalized with mean/std. Ids: the index in the sorted file list of the split."""
    from ezsd_jax.data.images import decode_image
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
    labels = np.asarray(labels, np.int32)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    h, w = int(image_size[0]), int(image_size[1])

    def fetch(pos):
        import jax
        out = []
        for p in pos:
            img = decode_image(files[int(p)]).astype(np.float32) / 255.0
            if img.shape[:2] != (h, w):
                img = np.asarray(jax.image.resize(img, (h, w, 3), "bilinear"))
            out.append((img - mean) / std)
        return np.stack(out), labels[np.asarray(pos, np.int64)]
    return ClassificationData(f"folder:{data_dir}", split, np.arange(len(files), dtype=np.int64),
                              len(classes), (h, w, 3), fetch)


# ----------------------------------------------------------------------------- registry

DATASETS: dict[str, Callable[..., ClassificationData]] = {
    "digits": lambda split, data_dir=None: load_digits(split),
    "cifar10": load_cifar10,
    "folder": load_image_folder,
}


def register_dataset(name: str, loader: Callable[..., ClassificationData]) -> None:
    """Makes `loader(split, data_dir=None) -> ClassificationData` loadable by name (e.g.
    config.data.dataset / config.pool.dataset) in this process; for data in memory use
    `ClassificationData.from_arrays` inside the loader."""
    if not callable(loader):
        raise TypeError("register_dataset: loader must be callable")
    DATASETS[str(name)] = loader


def load_dataset(name: str, split: str, data_dir: str | None = None) -> ClassificationData:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)} (or "
                         "isal_jax.data.register_dataset)")
    return DATASETS[name](split, data_dir=data_dir)
