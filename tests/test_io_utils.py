"""Atomic writes: content, permissions that follow the umask, no partial files."""
import json
import os
import stat

import numpy as np
import pytest

from ezsd_jax.core import io_utils


def test_atomic_writes_content_mode_and_failure(tmp_path):
    p = str(tmp_path / "sub" / "a.json")
    io_utils.atomic_write_json(p, {"x": np.float32(1.5)})
    assert json.load(open(p)) == {"x": 1.5}
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~io_utils._UMASK
    z = io_utils.atomic_savez(str(tmp_path / "b.npz"), a=np.arange(3))
    np.testing.assert_array_equal(np.load(z)["a"], np.arange(3))

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        io_utils._atomic(p, boom)
    assert json.load(open(p)) == {"x": 1.5}          # the old file is intact
    assert sorted(os.listdir(tmp_path / "sub")) == ["a.json"]   # no temp file left
