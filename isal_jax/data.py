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


DATASETS = {"digits": lambda split, data_dir=None: load_digits(split),
            "cifar10": load_cifar10}


def load_dataset(name: str, split: str, data_dir: str | None = None) -> ClassificationData:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name](split, data_dir=data_dir)
