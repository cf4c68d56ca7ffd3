"""The one image decoder (ezsd_jax/core/images.py) on files in every mode users have."""
import numpy as np
import pytest
from PIL import Image

from ezsd_jax.data.coco import DataError
from ezsd_jax.core.images import decode_image, image_size


def _photo(h=48, w=80, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_gives_the_upright_image(tmp_path, orientation):
    upright = _photo()
    # the camera stores the pixels un-rotated and says how to turn them upright
    stored = {3: np.rot90(upright, 2), 6: np.rot90(upright, 1), 8: np.rot90(upright, 3)}
    im = Image.fromarray(np.ascontiguousarray(stored[orientation]))
    exif = im.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "rot.png"  # PNG keeps pixels exact; PIL writes the eXIf chunk
    im.save(path, exif=exif)
    out = decode_image(path)
    np.testing.assert_array_equal(out, upright)
    assert image_size(path) == upright.shape[:2]


def test_16bit_png_keeps_its_contrast(tmp_path):
    g = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(g).save(path)
    out = decode_image(path)
    assert out.shape == (32, 64, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out[..., 0], g / 257.0, atol=0.51)
    assert out.min() == 0 and out.max() == 255


def test_rgba_palette_gray_cmyk(tmp_path):
    rgb = _photo()
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1)
    rgba[:10, :10, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png")
    np.testing.assert_array_equal(out[10:, 10:], rgb[10:, 10:])
    assert not out[:10, :10].any()  # transparent -> black
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    assert decode_image(tmp_path / "p.png").shape == rgb.shape
    Image.fromarray(rgb[..., 0]).save(tmp_path / "l.png")
    gray = decode_image(tmp_path / "l.png")
    np.testing.assert_array_equal(gray[..., 2], rgb[..., 0])
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg")
    cmyk = decode_image(tmp_path / "c.jpg")
    assert cmyk.shape == rgb.shape
    assert np.abs(cmyk.astype(int) - rgb.astype(int)).mean() < 40


def test_unreadable_files_name_themselves(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    buf = tmp_path / "ok.jpg"
    Image.fromarray(_photo()).save(buf, quality=90)
    (tmp_path / "trunc.jpg").write_bytes(buf.read_bytes()[:200])
    for name in ("zero.jpg", "text.jpg", "trunc.jpg", "missing.jpg"):
        with pytest.raises(DataError, match=name):
            decode_image(tmp_path / name)
    for name in ("zero.jpg", "text.jpg", "missing.jpg"):
        with pytest.raises(DataError, match=name):
            image_size(tmp_path / name)
    with pytest.raises(DataError, match="empty"):
        decode_image(b"")
