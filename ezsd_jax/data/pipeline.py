"""Host input pipeline: records -> fixed-shape numpy batches for this process.

Each process reads its own disjoint part of the dataset and yields per-process batches (feed
them to `ezsd_jax.core.sharding.host_to_global`); decoding runs in a prefetching thread pool.
Train stream and resume, eval slices, unreadable files: docs/code-notes.md.
"""
from __future__ import annotations

import collections
import logging
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
from ezsd_jax.data.coco import CocoDataset, DataError, ImageRecord
from ezsd_jax.core.config_check import ON_ERROR
from ezsd_jax.core.images import decode_image
from ezsd_jax.data.sampling import repeat_index
from ezsd_jax.data.segmentation import annotation_mask, box_crops
from ezsd_jax.data.transforms import example_info, prepare_example
from ezsd_jax.core.sharding import process_slice

log = logging.getLogger(__name__)

BATCH_KEYS = ("image", "boxes", "classes", "box_mask", "image_id", "scale", "orig_hw",
              "image_hw", "flipped", "valid", "gt_masks")

ExtraFn = Callable[[ImageRecord, dict], dict]


def batch_spec(batch_size: int, image_size: tuple[int, int], max_boxes: int,
               mask_size: int = 0, extra_spec: dict | None = None
               ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of a batch of `batch_size` images: the layout every batch of a
    DetectionPipeline has (BATCH_KEYS; 'gt_masks' when mask_size > 0) plus `extra_spec`
    (extra_fn's per-image {key: (shape, dtype)}). Deviceless compilation (ezsd_jax.aot)
    builds its abstract batches from it."""
    B, M = int(batch_size), int(max_boxes)
    H, W = image_size
    spec = {"image": ((B, H, W, 3), np.uint8), "boxes": ((B, M, 4), np.float32),
            "classes": ((B, M), np.int32), "box_mask": ((B, M), bool),
            "image_id": ((B,), np.int32), "scale": ((B,), np.float32),
            "orig_hw": ((B, 2), np.int32), "image_hw": ((B, 2), np.int32),
            "flipped": ((B,), bool), "valid": ((B,), bool)}
    if mask_size:
        spec["gt_masks"] = ((B, M, int(mask_size), int(mask_size)), np.uint8)
    for k, (shape, dtype) in (extra_spec or {}).items():
        spec[k] = ((B,) + tuple(shape), dtype)
    return spec


class _BatchJob:
    """One batch being filled by worker threads (each slot writes its own rows)."""

    def __init__(self, arrays: dict, futures: list[Future]):
        self.arrays = arrays
        self.futures = futures

    def result(self) -> dict:
        for f in self.futures:
            f.result()  # re-raises a worker's exception here, in the consumer's thread
        return self.arrays

    def cancel(self) -> None:
        for f in self.futures:
            f.cancel()


class DetectionPipeline:
    """Per-process batches of resized, flipped, padded images and padded boxes.

    Batch (numpy): image uint8 [B,H,W,3]; boxes float32 [B,M,4] (xyxy pixels of the
    padded input); classes int32 [B,M]; box_mask bool [B,M]; image_id int32 [B] (-1 for
    padding); scale float32 [B] (resized / original); orig_hw int32 [B,2]; image_hw int32
    [B,2] (the resized image's h, w: the valid region before the zero padding); flipped
    bool [B]; valid bool [B]; with mask_size S > 0 (Mask R-CNN; the dataset loaded
    with_masks) gt_masks uint8 [B,M,S,S]: each box's instance mask cropped to the box and
    resized to S x S (data/segmentation.box_crops; flipped with the image, unchanged by the
    resize, which moves only the box); plus the arrays of `extra_fn(record, info)`
    (fixed shapes, zeros for padding entries). An image with more than M boxes keeps a random subset (train)
    or its M largest (eval); counted in `num_truncated`.
    """

    def __init__(self, dataset: CocoDataset, batch_size: int, image_size: tuple[int, int],
                 max_boxes: int, train: bool, short_side: int, max_side: int,
                 flip_prob: float = 0.5, seed: int = 0, num_threads: int = 4,
                 prefetch: int = 2, process_index: int | None = None,
                 process_count: int | None = None, extra_fn: ExtraFn | None = None,
                 on_error: str = "raise", repeat_factors: np.ndarray | None = None,
                 short_side_range: tuple[int, int] | None = None, mask_size: int = 0):
        if process_index is None or process_count is None:
            import jax
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if batch_size < 1 or max_boxes < 1 or num_threads < 1 or prefetch < 0:
            raise ValueError(f"need batch_size>=1, max_boxes>=1, num_threads>=1, "
                             f"prefetch>=0; got {batch_size}, {max_boxes}, {num_threads}, "
                             f"{prefetch}")
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size must be (H, W) > 0, got {image_size}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if repeat_factors is not None and len(repeat_factors) != len(dataset.records):
            raise ValueError(f"repeat_factors has {len(repeat_factors)} entries for "
                             f"{len(dataset.records)} records")
        if short_side_range:
            lo, hi = (int(v) for v in short_side_range)
            if not 0 < lo <= hi:
                raise ValueError(f"short_side_range must be (lo, hi) with 0 < lo <= hi, got "
                                 f"{short_side_range}")
        self.dataset = dataset
        self.records = dataset.records
        self._epoch_index = (None if repeat_factors is None or not train
                             else repeat_index(repeat_factors))
        self.short_side_range = (tuple(int(v) for v in short_side_range)
                                 if short_side_range and train else None)
        self.batch_size = int(batch_size)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.max_boxes = int(max_boxes)
        self.train = bool(train)
        self.short_side, self.max_side = int(short_side), int(max_side)
        self.flip_prob = float(flip_prob) if train else 0.0
        self.seed = int(seed)
        self.num_threads, self.prefetch = int(num_threads), int(prefetch)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.extra_fn = extra_fn
        self.on_error = on_error
        self.mask_size = int(mask_size)
        if self.mask_size and any(r.segmentations is None for r in self.records):
            raise ValueError("mask_size > 0 needs a dataset loaded with with_masks=True")
        self._unreadable = 0
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._truncated = 0
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._iterators: weakref.WeakSet = weakref.WeakSet()
        self._extra_spec = self._probe_extra() if extra_fn is not None else {}

    # ---- sizes -------------------------------------------------------------------
    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.process_count

    @property
    def epoch_length(self) -> int:
        """Train items per epoch: the records, or their repeated list (repeat_factors)."""
        return len(self.records) if self._epoch_index is None else len(self._epoch_index)

    @property
    def epoch_index(self) -> np.ndarray:
        """Record indices of one train epoch (each record once, or repeated), in record
        order (each epoch permutes them)."""
        if self._epoch_index is None:
            return np.arange(len(self.records))
        return self._epoch_index

    @property
    def steps_per_epoch(self) -> int:
        """Train steps per pass over the data (at least 1; the stream wraps epochs)."""
        return max(1, self.epoch_length // self.global_batch_size)

    @property
    def num_eval_batches(self) -> int:
        """Eval batches per process: the same on every process (the largest slice)."""
        per_process = -(-len(self.records) // self.process_count)
        return -(-per_process // self.batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch if self.train else self.num_eval_batches

    @property
    def num_truncated(self) -> int:
        return self._truncated

    @property
    def num_unreadable(self) -> int:
        """Entries turned into padding because their file failed (on_error='skip')."""
        return self._unreadable

    # ---- iteration ---------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        return self.train_iterator() if self.train else self.iter_epoch(0)

    def iter_epoch(self, epoch: int = 0) -> Iterator[dict]:
        """Eval: every image of this process's slice once (epoch ignored), padded to
        `num_eval_batches`. Train: `steps_per_epoch` steps of the train stream starting
        at this epoch's first item (the remainder is dropped; a dataset smaller than the
        global batch wraps into the next permutation)."""
        if self.train:
            if not self.records:
                raise DataError(f"{self.dataset.ann_file}: no images to train on")
            n, G, B = self.epoch_length, self.global_batch_size, self.batch_size
            start = epoch * n + self.process_index * B

            def plans():
                for s in range(self.steps_per_epoch):
                    base = start + s * G
                    yield [self._stream_item(base + j) for j in range(B)]
            return self._run(plans())
        sl = process_slice(len(self.records), self.process_index, self.process_count)
        idx = list(range(sl.start, sl.stop))
        total = self.num_eval_batches * self.batch_size
        idx += [-1] * (total - len(idx))
        plans = ([(i, 0) for i in idx[b:b + self.batch_size]]
                 for b in range(0, total, self.batch_size))
        return self._run(plans)

    def train_iterator(self, start_step: int = 0) -> Iterator[dict]:
        """Infinite train batches from `start_step`; deterministic given the seed."""
        if not self.train:
            raise ValueError("train_iterator needs a pipeline built with train=True")
        if not self.records:
            raise DataError(f"{self.dataset.ann_file}: no images to train on")
        G, B = self.global_batch_size, self.batch_size

        def plans():
            step = start_step
            while True:
                base = step * G + self.process_index * B
                yield [self._stream_item(base + j) for j in range(B)]
                step += 1
        return self._run(plans())

    def close(self) -> None:
        """Stops open iterators and the worker threads."""
        self._closed = True
        for it in list(self._iterators):
            it.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> "DetectionPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals ---------------------------------------------------------------
    def _stream_item(self, k: int) -> tuple[int, int]:
        """Train stream position k -> (record index, k as the item's random key)."""
        n = self.epoch_length
        epoch, pos = divmod(k, n)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng((self.seed, epoch)).permutation(n)
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        if self._epoch_index is not None:
            return int(self._epoch_index[perm[pos]]), k
        return int(perm[pos]), k

    def _run(self, plans) -> Iterator[dict]:
        if self._closed:
            raise RuntimeError("DetectionPipeline is closed")
        it = self._generate(iter(plans))
        self._iterators.add(it)
        return it

    def _generate(self, plans) -> Iterator[dict]:
        pending: collections.deque[_BatchJob] = collections.deque()
        try:
            for plan in plans:
                pending.append(self._submit(plan))
                if len(pending) > self.prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for job in pending:
                job.cancel()

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            if self._closed:
                raise RuntimeError("DetectionPipeline is closed")
            self._executor = ThreadPoolExecutor(self.num_threads,
                                                thread_name_prefix="ezsd-data")
        return self._executor

    def _empty_batch(self) -> dict:
        spec = batch_spec(self.batch_size, self.image_size, self.max_boxes, self.mask_size,
                          self._extra_spec)
        arrays = {k: np.zeros(shape, dtype) for k, (shape, dtype) in spec.items()}
        arrays["image_id"].fill(-1)
        return arrays

    def _submit(self, plan: list[tuple[int, int]]) -> _BatchJob:
        arrays = self._empty_batch()
        pool = self._pool()
        futures = [pool.submit(self._fill, arrays, slot, rec, key)
                   for slot, (rec, key) in enumerate(plan) if rec >= 0]
        return _BatchJob(arrays, futures)

    def _fill(self, arrays: dict, slot: int, rec_idx: int, key: int) -> None:
        rec = self.records[rec_idx]
        try:
            self._fill_record(arrays, slot, rec, key)
        except DataError:
            raise
        except Exception as e:
            raise RuntimeError(f"data pipeline failed on {rec.path} (image id="
                               f"{rec.image_id}): {type(e).__name__}: {e}") from e

    def _fill_record(self, arrays: dict, slot: int, rec: ImageRecord, key: int) -> None:
        rng = np.random.default_rng((self.seed, key)) if self.train else None
        flip = bool(rng.random() < self.flip_prob) if self.train else False
        short = self.short_side
        if self.short_side_range is not None:
            short = int(rng.integers(self.short_side_range[0], self.short_side_range[1] + 1))
        try:
            image = decode_image(rec.path if rec.read is None else rec.read())
            if image.shape[:2] != (rec.height, rec.width):
                raise DataError(f"{rec.path} (image id={rec.image_id}) decodes to "
                                f"{image.shape[0]}x{image.shape[1]} (HxW, upright) but the "
                                f"annotation says height={rec.height} width={rec.width}")
        except DataError as e:
            if self.on_error == "raise":
                raise
            self._note_unreadable(e)
            return  # the slot stays padding (valid=False)
        ex = prepare_example(rec, image, self.image_size, short, self.max_side,
                             flip, out=arrays["image"][slot])
        boxes, classes, info = ex["boxes"], ex["classes"], ex["info"]
        n = len(boxes)
        keep = np.arange(n)
        if n > self.max_boxes:
            if self.train:
                keep = np.sort(rng.choice(n, self.max_boxes, replace=False))
            else:
                area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
                keep = np.sort(np.argsort(-area, kind="stable")[:self.max_boxes])
            boxes, classes = boxes[keep], classes[keep]
            self._note_truncated(rec, n)
        m = len(boxes)
        if self.mask_size:
            arrays["gt_masks"][slot, :m] = self._box_crops(rec, keep, flip)
        arrays["boxes"][slot, :m] = boxes
        arrays["classes"][slot, :m] = classes
        arrays["box_mask"][slot, :m] = True
        arrays["image_id"][slot] = rec.image_id
        arrays["scale"][slot] = info["scale"]
        arrays["orig_hw"][slot] = info["orig_hw"]
        arrays["image_hw"][slot] = info["resized_hw"]
        arrays["flipped"][slot] = flip
        if self.extra_fn is not None:
            extra = self.extra_fn(rec, info)
            self._check_extra(extra, rec)
            for k in self._extra_spec:
                arrays[k][slot] = extra[k]
        arrays["valid"][slot] = True

    def _box_crops(self, rec: ImageRecord, keep: np.ndarray, flip: bool) -> np.ndarray:
        """uint8 [len(keep), S, S] crops of the kept annotations' masks at their boxes
        (original pixels), mirrored when the image is."""
        where = self.dataset.ann_file
        full = np.stack([annotation_mask(
            {"segmentation": rec.segmentations[k]}, rec.height, rec.width,
            f"{where}: annotation id={rec.ann_ids[k]} (image id={rec.image_id})")
            for k in keep]) if len(keep) else np.zeros((0, rec.height, rec.width), np.uint8)
        crops = box_crops(full, rec.boxes[keep], self.mask_size)
        return crops[:, :, ::-1] if flip else crops

    def _note_unreadable(self, err: DataError) -> None:
        with self._lock:
            self._unreadable += 1
        log.warning("skipped (on_error='skip'): %s", err)

    def _note_truncated(self, rec: ImageRecord, n: int) -> None:
        with self._lock:
            self._truncated += 1
            first = self._truncated == 1
        if first:
            log.warning("%s (image id=%d) has %d boxes > max_boxes=%d: keeping %s (warned "
                        "once; see DetectionPipeline.num_truncated)", rec.path, rec.image_id,
                        n, self.max_boxes, "a random subset" if self.train else "the largest")

    def _probe_extra(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shapes/dtypes of extra_fn's arrays, from the first record (no decoding)."""
        if not self.records:
            return {}
        rec = self.records[0]
        extra = self.extra_fn(rec, example_info(rec, self.image_size, self.short_side,
                                                self.max_side, False))
        if not isinstance(extra, dict):
            raise ValueError(f"extra_fn must return a dict of numpy arrays, got "
                             f"{type(extra).__name__}")
        clash = sorted(set(extra) & set(BATCH_KEYS))
        if clash:
            raise ValueError(f"extra_fn keys {clash} clash with the batch's own keys")
        return {k: (np.shape(v), np.asarray(v).dtype) for k, v in extra.items()}

    def _check_extra(self, extra: dict, rec: ImageRecord) -> None:
        if not isinstance(extra, dict) or set(extra) != set(self._extra_spec):
            got = sorted(extra) if isinstance(extra, dict) else type(extra).__name__
            raise ValueError(f"extra_fn returned {got}, expected keys "
                             f"{sorted(self._extra_spec)}")
        for k, (shape, dtype) in self._extra_spec.items():
            v = np.asarray(extra[k])
            if v.shape != shape or v.dtype != dtype:
                raise ValueError(f"extra_fn['{k}'] is {v.dtype}{list(v.shape)}, expected "
                                 f"{np.dtype(dtype)}{list(shape)} (fixed shapes)")
