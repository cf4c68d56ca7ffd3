"""Host transforms and the per-process input pipeline: shapes, box geometry, eval coverage
over processes, deterministic resumable training order, errors from worker threads."""
import numpy as np
import pytest
from PIL import Image

from ezsd_jax.data import transforms as T
from ezsd_jax.data.coco import DataError, load_coco
from helpers import PIPE_HW as HW, small_pipeline as _pipe, synthetic_dataset as _dataset


# ---- transforms --------------------------------------------------------------------
def test_resize_scale_rules():
    assert T.resize_scale(480, 640, 800, 1333) == pytest.approx(800 / 480)
    assert T.resize_scale(640, 480, 800, 1333) == pytest.approx(800 / 480)
    assert T.resize_scale(300, 1000, 800, 1333) == pytest.approx(1333 / 1000)  # long side cap
    assert T.resize_scale(1000, 300, 800, 1333) == pytest.approx(1.333)
    with pytest.raises(ValueError):
        T.resize_scale(0, 10, 8, 8)


def _ref_boxes(boxes, scale, flip, width):
    out = []
    for x1, y1, x2, y2 in boxes.astype(np.float64):
        x1, y1, x2, y2 = x1 * scale, y1 * scale, x2 * scale, y2 * scale
        if flip:
            x1, x2 = width - x2, width - x1
        out.append([x1, y1, x2, y2])
    return np.asarray(out).reshape(-1, 4)


@pytest.mark.parametrize("n", [0, 1, 17])
def test_transform_boxes_against_reference(rng, n):
    for _ in range(5):
        xy = rng.uniform(0, 300, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(0.5, 100, (n, 2))], 1).astype(np.float32)
        scale, width = float(rng.uniform(0.3, 3.0)), float(rng.uniform(100, 900))
        for flip in (False, True):
            got = T.transform_boxes(boxes, scale, flip, width)
            assert got.dtype == np.float32 and got.shape == (n, 4)
            np.testing.assert_allclose(got, _ref_boxes(boxes, scale, flip, width),
                                       rtol=1e-5, atol=1e-3)
            info = {"scale": scale, "flipped": flip, "resized_hw": (500, width)}
            np.testing.assert_allclose(T.boxes_to_original(got, info), boxes,
                                       rtol=1e-5, atol=1e-3)


def test_pad_and_flip_image(rng):
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    p = T.pad_image(img, 8, 9)
    np.testing.assert_array_equal(p[:5, :7], img)
    assert p.shape == (8, 9, 3) and not p[5:].any() and not p[:, 7:].any()
    out = np.full((8, 9, 3), 77, np.uint8)
    T.pad_image(img, 8, 9, out=out)
    np.testing.assert_array_equal(out, p)
    np.testing.assert_array_equal(T.hflip_image(img), img[:, ::-1])
    with pytest.raises(ValueError, match="does not fit"):
        T.pad_image(img, 4, 9)


def test_prepare_example_fits_padded_input(tmp_path):
    ds = _dataset(tmp_path, n=4)
    for r in ds.records:
        img = np.asarray(Image.open(r.path).convert("RGB"))
        for flip in (False, True):
            ex = T.prepare_example(r, img, (50, 60), 64, 1000, flip)
            nh, nw = ex["info"]["resized_hw"]
            assert ex["image"].shape == (50, 60, 3) and nh <= 50 and nw <= 60
            assert max(abs(nh - r.height * ex["info"]["scale"]),
                       abs(nw - r.width * ex["info"]["scale"])) <= 0.5 + 1e-6
            # reference: PIL resize then numpy flip, then pad
            ref = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
            ref = ref[:, ::-1] if flip else ref
            np.testing.assert_array_equal(ex["image"][:nh, :nw], ref)
            assert not ex["image"][nh:].any() and not ex["image"][:, nw:].any()
            np.testing.assert_allclose(
                ex["boxes"], _ref_boxes(r.boxes, ex["info"]["scale"], flip, nw), atol=1e-3)
        wrong = img[:-1]
        with pytest.raises(DataError, match="differs from the annotation"):
            T.prepare_example(r, wrong, (50, 60), 64, 1000, False)


# ---- pipeline ----------------------------------------------------------------------
def test_batch_shapes_dtypes_masks(tmp_path):
    ds = _dataset(tmp_path, n=5, objects=(2, 6))
    with _pipe(ds, train=True, batch_size=2, max_boxes=3) as p:
        batch = next(p.train_iterator())
    B, M = 2, 3
    spec = {"image": (np.uint8, (B,) + HW + (3,)), "boxes": (np.float32, (B, M, 4)),
            "classes": (np.int32, (B, M)), "box_mask": (np.bool_, (B, M)),
            "image_id": (np.int32, (B,)), "scale": (np.float32, (B,)),
            "orig_hw": (np.int32, (B, 2)), "image_hw": (np.int32, (B, 2)),
            "flipped": (np.bool_, (B,)),
            "valid": (np.bool_, (B,))}
    assert set(batch) == set(spec)
    for k, (dt, shape) in spec.items():
        assert batch[k].dtype == dt and batch[k].shape == shape, k
    recs = {r.image_id: r for r in ds.records}
    assert batch["valid"].all()
    for i in range(B):
        r = recs[int(batch["image_id"][i])]
        assert batch["box_mask"][i].sum() == min(len(r.boxes), M)
        assert tuple(batch["orig_hw"][i]) == (r.height, r.width)
        m = batch["box_mask"][i]
        assert not batch["boxes"][i][~m].any() and not batch["classes"][i][~m].any()
        nh, nw = T.resized_hw(r.height, r.width, float(batch["scale"][i]))
        assert tuple(batch["image_hw"][i]) == (nh, nw)
        b = batch["boxes"][i][m]
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (b[:, [0, 2]] <= nw + 1e-4).all() and (b[:, [1, 3]] <= nh + 1e-4).all()
        assert not batch["image"][i, nh:].any() and not batch["image"][i, :, nw:].any()
    # every image of this batch with more than M boxes was truncated (and counted); the
    # prefetching pipeline may have prepared more images than the batch holds
    cut = sum(len(recs[int(i)].boxes) > M for i in batch["image_id"])
    assert cut > 0 and p.num_truncated >= cut


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_boxes_follow_image_content(tmp_path, flip_prob):
    """One object per image on a plain background: the object's pixels in the batch
    image lie exactly where the batch box says (so resize/flip/pad agree)."""
    ds = _dataset(tmp_path, n=6, objects=(1, 1), backgrounds=("solid",))
    with _pipe(ds, train=True, flip_prob=flip_prob, batch_size=6) as p:
        batch = next(p.train_iterator())
    recs = {r.image_id: r for r in ds.records}
    assert (batch["flipped"] == bool(flip_prob)).all()
    for i in range(6):
        r = recs[int(batch["image_id"][i])]
        s = float(batch["scale"][i])
        nh, nw = T.resized_hw(r.height, r.width, s)
        exp = _ref_boxes(r.boxes, s, bool(flip_prob), nw)
        np.testing.assert_allclose(batch["boxes"][i][batch["box_mask"][i]], exp, atol=1e-3)
        img = batch["image"][i, :nh, :nw].astype(int)
        colors, counts = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
        bg = colors[np.argmax(counts)]
        fg = np.abs(img - bg).max(-1) > 60
        ys, xs = np.nonzero(fg)
        x1, y1, x2, y2 = exp[0]
        # bilinear resizing blurs edges by about a pixel
        assert abs(xs.min() - x1) <= 1.5 and abs(xs.max() + 1 - x2) <= 1.5
        assert abs(ys.min() - y1) <= 1.5 and abs(ys.max() + 1 - y2) <= 1.5


def test_eval_covers_each_image_once_over_two_processes(tmp_path):
    ds = _dataset(tmp_path, n=7)
    seen, n_batches = [], []
    for pi in range(2):
        with _pipe(ds, batch_size=2, process_index=pi, process_count=2) as p:
            batches = list(p)
            assert len(batches) == len(p) == 2
        n_batches.append(len(batches))
        for b in batches:
            assert b["image"].shape[0] == 2
            seen += b["image_id"][b["valid"]].tolist()
            inv = ~b["valid"]
            assert (b["image_id"][inv] == -1).all() and not b["box_mask"][inv].any()
            assert not b["image_hw"][inv].any() and not b["scale"][inv].any()
            assert not b["image"][inv].any() and not b["flipped"].any()
    assert n_batches[0] == n_batches[1]
    assert sorted(seen) == sorted(r.image_id for r in ds.records)


def test_eval_keeps_largest_boxes(tmp_path):
    ds = _dataset(tmp_path, n=4, objects=(4, 6))
    with _pipe(ds, batch_size=4, max_boxes=2, image_size=(120, 120), short_side=110,
               max_side=110) as p:
        (batch,) = list(p)
    assert p.num_truncated == sum(len(r.boxes) > 2 for r in ds.records) > 0
    recs = {r.image_id: r for r in ds.records}
    for i in range(4):
        r = recs[int(batch["image_id"][i])]
        area = (r.boxes[:, 2] - r.boxes[:, 0]) * (r.boxes[:, 3] - r.boxes[:, 1])
        top = np.sort(area)[::-1][:2]
        b = batch["boxes"][i] / batch["scale"][i]
        got = np.sort((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[::-1]
        np.testing.assert_allclose(got, top, rtol=1e-4)


def test_train_iterator_resume_equals_uninterrupted(tmp_path):
    ds = _dataset(tmp_path, n=5, objects=(2, 6))
    kw = dict(train=True, batch_size=2, max_boxes=3, seed=11)
    with _pipe(ds, **kw) as p:
        it = p.train_iterator()
        full = [next(it) for _ in range(7)]  # 14 items: wraps into later epochs
    with _pipe(ds, num_threads=1, prefetch=0, **kw) as p:
        it = p.train_iterator(start_step=4)
        resumed = [next(it) for _ in range(3)]
    for a, b in zip(full[4:], resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # every image once per epoch; flips vary; another seed gives another order
    ids = np.concatenate([b["image_id"] for b in full])
    assert sorted(ids[:5]) == sorted(r.image_id for r in ds.records)
    flips = np.concatenate([b["flipped"] for b in full])
    assert flips.any() and not flips.all()
    with _pipe(ds, **dict(kw, seed=12)) as p:
        it = p.train_iterator()
        other = np.concatenate([next(it)["image_id"] for _ in range(7)])
    assert not np.array_equal(ids, other)


def test_train_processes_read_disjoint_items(tmp_path):
    ds = _dataset(tmp_path, n=8, objects=(1, 2))
    ids = []
    for pi in range(2):
        with _pipe(ds, train=True, batch_size=2, process_index=pi, process_count=2) as p:
            it = p.train_iterator()
            ids.append(np.concatenate([next(it)["image_id"] for _ in range(2)]))
    both = np.concatenate(ids)  # 2 steps x global batch 4 = one epoch of 8
    assert sorted(both) == sorted(r.image_id for r in ds.records)
    with _pipe(ds, train=True, batch_size=2, process_index=0, process_count=2) as p:
        assert len(p) == p.steps_per_epoch == 2
        assert sorted(np.concatenate([b["image_id"] for b in p.iter_epoch(0)])) == \
            sorted(ids[0])


def test_extra_fn_merged_with_padding(tmp_path):
    ds = _dataset(tmp_path, n=3)
    K = 5

    def extra(record, info):
        b = np.zeros((K, 4), np.float32)
        n = min(K, len(record.boxes))
        b[:n] = T.boxes_to_input(record.boxes[:n], info)
        return {"prop_boxes": b, "prop_valid": np.arange(K) < n}

    with _pipe(ds, batch_size=2, max_boxes=K, train=True, flip_prob=1.0,
               extra_fn=extra) as p:
        batch = next(p.train_iterator())
    assert batch["prop_boxes"].shape == (2, K, 4) and batch["prop_valid"].dtype == np.bool_
    # proposals follow the image exactly like the GT boxes
    m = batch["box_mask"]
    np.testing.assert_allclose(batch["prop_boxes"][m], batch["boxes"][m], atol=1e-4)
    with _pipe(ds, batch_size=2, max_boxes=K, extra_fn=extra) as p:
        last = list(p)[-1]
    assert not last["valid"][1] and not last["prop_valid"][1].any()
    with pytest.raises(ValueError, match="clash"):
        _pipe(ds, extra_fn=lambda r, i: {"boxes": np.zeros(3)})


def test_corrupt_image_error_names_file(tmp_path):
    ds = _dataset(tmp_path, n=5)
    bad = ds.records[3].path
    with open(bad, "wb") as f:
        f.write(b"\x89PNG not really an image" * 10)
    p = _pipe(ds, batch_size=2)
    with pytest.raises(DataError, match="cannot decode image") as e:
        list(p)
    assert bad in str(e.value)
    p.close()
    with pytest.raises(RuntimeError, match="closed"):
        iter(p.iter_epoch(0))


def test_exif_rotated_jpeg_box_on_the_upright_pixels(tmp_path):
    """A non-square phone JPEG stored sideways with EXIF orientation 6: the annotation (in
    the upright frame, as COCO tools assume) passes the load-time size check, and through
    the real pipeline its box covers the object's pixels."""
    import json
    H, W = 48, 80
    x1, y1, x2, y2 = 50, 8, 74, 30
    upright = np.full((H, W, 3), 20, np.uint8)
    upright[y1:y2, x1:x2] = (230, 30, 30)
    im = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))  # stored 80x48 (HxW)
    exif = im.getexif()
    exif[0x0112] = 6
    (tmp_path / "img").mkdir()
    im.save(tmp_path / "img" / "phone.jpg", quality=95, exif=exif)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "phone.jpg", "height": H, "width": W}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": 528}],
        "categories": [{"id": 1, "name": "thing"}]}))
    ds = load_coco(str(ann), str(tmp_path / "img"))
    with _pipe(ds, batch_size=1, image_size=(48, 80), short_side=48, max_side=80) as p:
        batch = next(iter(p))
    assert batch["valid"][0] and float(batch["scale"][0]) == 1.0
    bx1, by1, bx2, by2 = np.rint(batch["boxes"][0, 0]).astype(int)
    assert (bx1, by1, bx2, by2) == (x1, y1, x2, y2)
    img = batch["image"][0].astype(int)
    inside = img[by1 + 2:by2 - 2, bx1 + 2:bx2 - 2]
    assert (inside[..., 0] > 180).all() and (inside[..., 1] < 80).all()
    outside = img.copy()
    outside[by1 - 2:by2 + 2, bx1 - 2:bx2 + 2] = 0
    assert (outside[..., 0] < 80).all()


def test_image_damaged_after_loading_raises_or_becomes_padding(tmp_path):
    """Damage the header check cannot see (or a file changed after loading): on_error='raise'
    names the file; 'skip' turns the entry into padding, the same on every read."""
    ds = _dataset(tmp_path, n=5)
    bad = ds.records[1]
    Image.fromarray(np.zeros((bad.height + 3, bad.width, 3), np.uint8)).save(bad.path)
    with _pipe(ds, batch_size=2) as p, pytest.raises(DataError, match="annotation says"):
        list(p)
    with open(ds.records[3].path, "wb") as f:
        f.write(b"\x89PNG not really an image" * 10)
    with _pipe(ds, batch_size=2, on_error="skip") as p:
        batches = list(p)
        assert p.num_unreadable == 2
    ids = np.concatenate([b["image_id"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert ids.tolist() == [ds.records[0].image_id, -1, ds.records[2].image_id, -1,
                            ds.records[4].image_id, -1]
    assert valid.tolist() == [True, False, True, False, True, False]
    assert not batches[0]["image"][1].any() and not batches[0]["box_mask"][1].any()
    with _pipe(ds, batch_size=2, on_error="skip", train=True) as p:
        a = [next(it) for it in [p.train_iterator(start_step=0)] for _ in range(4)][2:]
        b = [next(it) for it in [p.train_iterator(start_step=2)] for _ in range(2)]
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
