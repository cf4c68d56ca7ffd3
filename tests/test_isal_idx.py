"""The MNIST-format (idx) loader, dataset='idx': raw and gzip files written here, values
against numpy, the 't10k' name of the test split, a prefix (EMNIST style), and bad files
(magic, size, label count) as one line naming the file -- through the select CLI, exit
status 2. Reads Fashion-MNIST from Debian's dataset-fashion-mnist when it is installed."""
import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from isal_jax.data import load_dataset, read_idx

ROOT = Path(__file__).resolve().parents[1]
FASHION = "/usr/share/datasets/fashion-mnist"


def _write(path: Path, arr: np.ndarray, magic_type: int = 0x08) -> None:
    head = bytes([0, 0, magic_type, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    data = head + np.ascontiguousarray(arr, np.uint8).tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def _set(root: Path, split: str, n: int, seed: int, gz: bool, prefix: str = ""):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 5, 4), np.uint8)
    labels = rng.integers(0, 3, n).astype(np.uint8)
    labels[0] = 2                                    # 3 classes in every split
    ext = ".gz" if gz else ""
    _write(root / f"{prefix}{split}-images-idx3-ubyte{ext}", images)
    _write(root / f"{prefix}{split}-labels-idx1-ubyte{ext}", labels)
    return images, labels


def test_idx_values_splits_and_prefix(tmp_path):
    img, lab = _set(tmp_path, "train", 7, 0, gz=False)
    timg, tlab = _set(tmp_path, "t10k", 4, 1, gz=True)
    d = load_dataset("idx", "train", str(tmp_path), {"mean": (0.25,), "std": (0.5,)})
    assert (len(d), d.num_classes, d.image_shape) == (7, 3, (5, 4, 1))
    b = d.get([6, 2])
    np.testing.assert_allclose(b["image"][..., 0], (img[[6, 2]] / 255.0 - 0.25) / 0.5,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(b["label"], lab[[6, 2]])
    t = load_dataset("idx", "test", str(tmp_path))            # finds t10k-*.gz
    np.testing.assert_array_equal(t.get([3])["label"], tlab[[3]])
    np.testing.assert_allclose(t.get([0])["image"][0, ..., 0], (timg[0] / 255.0 - 0.5) / 0.5,
                               rtol=1e-5, atol=1e-6)
    r = load_dataset("idx", "train", str(tmp_path), {"image_size": (10, 8)})
    assert r.get([0])["image"].shape == (1, 10, 8, 1)
    emnist = tmp_path / "emnist"
    emnist.mkdir()
    _set(emnist, "train", 3, 2, gz=True, prefix="emnist-balanced-")
    assert len(load_dataset("idx", "train", str(emnist))) == 3


@pytest.mark.parametrize("mutate,text", [
    (lambda p: p.write_bytes(b"\0\0\x09\x03" + p.read_bytes()[4:]), "bad magic 00000903"),
    (lambda p: p.write_bytes(p.read_bytes()[:-3]), "header says (7, 5, 4) = 140 bytes"),
    (lambda p: p.write_bytes(b""), "bad magic (empty)"),
])
def test_idx_bad_files(tmp_path, mutate, text):
    _set(tmp_path, "train", 7, 0, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    mutate(path)
    with pytest.raises(ValueError) as e:
        load_dataset("idx", "train", str(tmp_path))
    assert text in str(e.value) and str(path) in str(e.value)


def test_idx_label_count_and_missing(tmp_path):
    _set(tmp_path, "train", 7, 0, gz=False)
    _write(tmp_path / "train-labels-idx1-ubyte", np.zeros(6, np.uint8))
    with pytest.raises(ValueError, match="6 labels for 7 images"):
        load_dataset("idx", "train", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="val-images-idx3-ubyte"):
        load_dataset("idx", "val", str(tmp_path))
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("idx", "train", "")
    with pytest.raises(ValueError, match="cannot read"):
        read_idx(str(tmp_path / "nope"), 1)


def test_idx_bad_file_is_one_line_exit_2(tmp_path):
    _set(tmp_path, "train", 7, 0, gz=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01xx"))
    r = subprocess.run(
        [sys.executable, "-m", "isal_jax.select", "--config=configs/isal_demo.py",
         f"--workdir={tmp_path / 'wd'}", "--config.pool.dataset=idx",
         f"--config.pool.data_dir={tmp_path}", "--config.strategy=random"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "train-images-idx3-ubyte.gz" in err[0] and "bad magic" in err[0]
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="dataset-fashion-mnist not installed")
def test_reads_fashion_mnist():
    d = load_dataset("idx", "train", FASHION)
    t = load_dataset("idx", "test", FASHION)
    assert (len(d), len(t), d.num_classes, d.image_shape) == (60000, 10000, 10, (28, 28, 1))
    assert np.bincount(t.get(t.ids)["label"]).tolist() == [1000] * 10
