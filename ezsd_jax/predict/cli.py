"""Open-vocabulary detection on your own images, a thin CLI over detector_api.Detector:

  python -m ezsd_jax.predict --workdir=W --images=PATH_OR_DIR_OR_GLOB \\
      --names="giraffe,red mug" | --names_file=FILE | --vocabulary=base|novel|all|coco \\
      --out=DIR [--prompts=single|ensemble] [--score_threshold=S] [--max_detections=N]
  python -m ezsd_jax.predict export --workdir=W --out=BUNDLE [--names=... (fixed vocab)]
  python -m ezsd_jax.predict serve --workdir=W [--port=8765] (a local page: serve.py)
(installed: `ezsd-predict ...`)

--workdir: a trained workdir (ckpt_ezsd, clip_renorm/adapted_clip) or an exported bundle.
Writes DIR/detections.json (COCO results + file_name, category_name; --coco_gt=FILE: the
image and category ids of that ground truth, docs/predict.md), DIR/overlays/*.png,
DIR/index.html, DIR/summary.json (outputs.py); a re-run into DIR removes the outputs of the
earlier run that it does not rewrite (only files predict wrote). A file that is not a
readable image is skipped with one line naming it and counted in the summary. A detector
whose training has not finished is served with a warning line (step k of n). Reading the
workdir or bundle is read-only. Bad arguments or a missing input: one line, exit status 2.
"""
from __future__ import annotations

import glob
import math
import os
import time

from absl import flags

from ezsd_jax.core import cli
from ezsd_jax.predict import serve    # its --host, --port (standard library only)

flags.DEFINE_string("workdir", None, "Trained workdir or exported bundle.")
flags.DEFINE_string("images", None, "An image file, a directory (its files) or a glob.")
flags.DEFINE_string("names", None, "Comma-separated category names.")
flags.DEFINE_string("names_file", None, "File with one category name per line.")
flags.DEFINE_string("vocabulary", None, "base | novel | all (the run's split) | coco.")
flags.DEFINE_string("out", None, "Output directory (predict) or bundle directory (export).")
flags.DEFINE_enum("prompts", "single", ["single", "ensemble"],
                  "Training prompt only, or a prompt ensemble.")
flags.DEFINE_float("score_threshold", None, "Keep detections above this score "
                   "(default: the model's test_score_threshold).")
flags.DEFINE_integer("max_detections", None, "At most this many per image (default: "
                     "the model's test_max_detections).")
flags.DEFINE_float("overlay_threshold", 0.3, "Draw detections of at least this score.")
flags.DEFINE_integer("overlay_max", 20, "Draw at most this many detections per image.")
flags.DEFINE_boolean("overlays", True, "Write overlay PNGs and index.html.")
flags.DEFINE_integer("batch_size", 8, "Images per forward.")
flags.DEFINE_string("coco_gt", None, "A COCO ground-truth file: detections.json takes "
                    "its image ids (by file name) and category ids (by name), for "
                    "pycocotools' loadRes / COCOeval. Default: image id = file index + 1, "
                    "category id = name index + 1.")
FLAGS = flags.FLAGS


def list_images(spec: str) -> list[str]:
    """A file, a directory (its regular, non-hidden files, sorted) or a glob (sorted)."""
    if os.path.isdir(spec):
        files = [os.path.join(spec, f) for f in sorted(os.listdir(spec))
                 if not f.startswith(".") and os.path.isfile(os.path.join(spec, f))]
    elif os.path.isfile(spec):
        files = [spec]
    else:
        files = sorted(f for f in glob.glob(spec) if os.path.isfile(f))
    if not files:
        raise cli.UsageError(f"--images={spec}: no files (not a file, a directory with "
                             "files or a matching glob)")
    return files


def check_name_flags(required: bool = True) -> None:
    """Exactly one of --names / --names_file / --vocabulary (at most one if optional)."""
    given = [f for f in ("names", "names_file", "vocabulary") if FLAGS[f].value]
    if len(given) > 1 or (required and not given):
        raise cli.UsageError("give exactly one of --names, --names_file, --vocabulary "
                             f"(got {', '.join('--' + g for g in given) or 'none'})")


def parse_names(detector=None) -> tuple[list[str], str]:
    """(names, where from) of the one of --names / --names_file / --vocabulary given
    (--vocabulary needs the loaded detector; the others are read before loading it)."""
    check_name_flags()
    if FLAGS.vocabulary:
        try:
            return detector.vocabulary(FLAGS.vocabulary), "split"
        except ValueError as e:
            raise cli.UsageError(f"--vocabulary: {e}") from None
    from ezsd_jax.predict.buckets import normalize_names
    if FLAGS.names_file:
        src = f"--names_file={FLAGS.names_file}"
        try:
            with open(FLAGS.names_file, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise cli.UsageError(f"{src}: {e.strerror}") from None
        try:
            text = raw.decode("utf-8-sig")          # a BOM is not part of the first name
        except UnicodeDecodeError as e:
            raise cli.UsageError(f"{src}: not UTF-8 text (byte {raw[e.start]:#04x} at "
                                 f"offset {e.start}); save it as UTF-8") from None
        names = [ln for ln in text.splitlines() if ln.strip()]
    else:
        names = [n for n in FLAGS.names.split(",") if n.strip()]
        src = "--names"
    if not names:
        raise cli.UsageError(f"{src}: no names")
    try:
        return normalize_names(names), "user"
    except ValueError as e:
        raise cli.UsageError(f"{src}: {e}") from None


def check_workdir(path: str | None) -> None:
    if not path:
        raise cli.UsageError("--workdir is required (a trained workdir or a bundle)")
    if not os.path.isdir(path):
        raise cli.UsageError(f"--workdir={path}: not a directory (a trained workdir or a "
                             "bundle)")


def _load(path: str):
    check_workdir(path)                 # before importing JAX (seconds)
    from ezsd_jax.predict.detector import Detector
    try:
        return Detector.load(path, batch_size=FLAGS.batch_size)
    except (cli.MissingInput, ValueError) as e:
        raise cli.UsageError(f"--workdir={path}: {e}") from None


def prepare_out(path: str) -> str:
    """--out as a writable directory (created), locked against a second predict into it;
    UsageError naming --out otherwise."""
    path = cli.prepare_workdir(path, lock=False, name="--out")
    from ezsd_jax.core.workdir_lock import WorkdirInUse, acquire
    try:
        acquire(path)
    except WorkdirInUse as e:
        raise cli.UsageError(f"--out: {e}".replace("--workdir", "--out")) from None
    return path


def check_out_for_export(path: str) -> None:
    """export's --out: a new or empty directory whose parent is writable."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise cli.UsageError(f"--out {path} is a file: give a new directory for the bundle")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise cli.UsageError(f"--out {path}: its parent directory does not exist")
    try:
        cli.check_writable(parent, "--out's parent")
    except cli.UsageError as e:
        raise cli.UsageError(f"--out {path}: cannot write the bundle there ({e})") from None


def check_limits() -> None:
    """--score_threshold / --max_detections before loading anything."""
    thr = FLAGS.score_threshold
    if thr is not None and not (math.isfinite(thr) and 0.0 <= thr <= 1.0):
        raise cli.UsageError(f"--score_threshold={thr}: need a number in [0, 1] (scores "
                             "are probabilities)")
    if FLAGS.max_detections is not None and FLAGS.max_detections < 1:
        raise cli.UsageError(f"--max_detections must be >= 1, got {FLAGS.max_detections}")


def warn_unfinished(det) -> None:
    msg = det.unfinished()
    if msg:
        print(f"[predict] warning: {msg}", flush=True)


def export_main() -> None:
    from ezsd_jax.predict import bundle
    if not FLAGS.out:
        raise cli.UsageError("export: --out=BUNDLE_DIR is required")
    check_name_flags(required=False)
    check_out_for_export(FLAGS.out)
    det = _load(FLAGS.workdir)
    warn_unfinished(det)
    names = None
    if FLAGS.names or FLAGS.names_file or FLAGS.vocabulary:
        names, _ = parse_names(det)
    out = bundle.export(det, FLAGS.out, names, FLAGS.prompts)
    print(f"[predict export] wrote {out} (step {det.step}, "
          f"{'fixed vocabulary of ' + str(len(names)) + ' names' if names else 'CLIP text tower'})",
          flush=True)


def predict_main() -> None:
    if not FLAGS.images or not FLAGS.out:
        raise cli.UsageError("--images and --out are required")
    if FLAGS.batch_size < 1:
        raise cli.UsageError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    check_limits()
    check_name_flags()
    files = list_images(FLAGS.images)
    check_workdir(FLAGS.workdir)
    out = prepare_out(FLAGS.out)
    user_names = None if FLAGS.vocabulary else parse_names()
    from ezsd_jax.predict import outputs as po      # imports JAX: after the checks
    from ezsd_jax.data.coco import DataError
    from ezsd_jax.core.images import decode_image
    from ezsd_jax.core.metrics import Progress
    det = _load(FLAGS.workdir)
    warn_unfinished(det)
    try:
        det.check_limits(FLAGS.score_threshold, FLAGS.max_detections)
    except ValueError as e:
        raise cli.UsageError(f"--{e}") from None
    names, origin = user_names or parse_names(det)
    name_ids = {n: i + 1 for i, n in enumerate(names)}
    image_ids = list(range(1, len(files) + 1))
    if FLAGS.coco_gt:
        try:
            image_ids, name_ids = po.coco_gt_ids(FLAGS.coco_gt, files, names)
        except (OSError, ValueError) as e:
            raise cli.UsageError(f"--coco_gt={FLAGS.coco_gt}: "
                                 f"{getattr(e, 'strerror', None) or e}") from None
    id_to_name = {i: n for n, i in name_ids.items()}
    novel_ids = {name_ids[n] for n in names if n in set(det.novel)}
    skipped: list[dict] = []
    decoded: list[int] = []          # detect_many index -> file index
    arrays: dict = {}

    def images():
        for fi, path in enumerate(files):
            try:
                img = decode_image(path)
            except DataError as e:
                print(f"[predict] skipped: {e}", flush=True)
                skipped.append({"file": path, "error": str(e)})
                continue
            decoded.append(fi)
            arrays[len(decoded) - 1] = img
            yield img

    planned = [f"{po.OVERLAY_DIR}/{po.overlay_name(fi + 1, f)}"
               for fi, f in enumerate(files)] if FLAGS.overlays else []
    removed = po.begin_outputs(out, planned)
    if removed:
        print(f"[predict] removed {len(removed)} files of an earlier run in {out}",
              flush=True)
    written = list(po.FIXED_FILES[:2])
    print(f"[predict] {len(files)} files, {len(names)} names ({origin}), detector step "
          f"{det.step} from {det.source}", flush=True)
    t0 = time.perf_counter()
    results, rows = [], []
    progress = Progress(len(files), unit="img", name="predict")
    try:
        for n_done, (k, dets) in enumerate(det.detect_many(
                images(), names, FLAGS.score_threshold, FLAGS.max_detections,
                FLAGS.prompts, progress=False), 1):
            progress.tick(n_done + len(skipped))
            fi = decoded[k]
            img = arrays.pop(k)
            res = po.coco_results(image_ids[fi], files[fi], dets, name_ids)
            results.extend(res)
            if FLAGS.overlays:
                oname = po.overlay_name(fi + 1, files[fi])
                po.write_overlay(out, oname, img, res, id_to_name, novel_ids,
                                 FLAGS.overlay_threshold, FLAGS.overlay_max)
                written.append(f"{po.OVERLAY_DIR}/{oname}")
                shown = min(sum(r["score"] >= FLAGS.overlay_threshold for r in res),
                            FLAGS.overlay_max)
                rows.append({"index": fi, "file_name": files[fi], "overlay": oname,
                             "detections": len(res), "shown": shown})
    except ValueError as e:            # names the model cannot serve (fixed bundle)
        raise cli.UsageError(str(e)) from None
    except MemoryError as e:           # masks of many detections on huge photos
        raise cli.UsageError(f"{e} (--max_detections, --score_threshold)") from None
    if progress.step < len(files):          # the last files were unreadable
        progress.tick(len(files), force=True)
    seconds = time.perf_counter() - t0
    results.sort(key=lambda r: (r["image_id"], -r["score"]))
    n_ok = len(files) - len(skipped)
    summary = {"files": len(files), "images": n_ok, "skipped": len(skipped),
               "skipped_files": skipped, "detections": len(results), "names": names,
               "novel_names": [n for n in names if n in set(det.novel)],
               "prompts": FLAGS.prompts, "step": det.step, "source": det.source,
               "seconds": round(seconds, 3),
               "images_per_s": round(n_ok / seconds, 3) if seconds > 0 else None,
               "compile_seconds": round(sum(det.compile_seconds.values()), 3),
               "programs": len(det.compile_seconds)}
    po.write_results(out, results, summary)
    if FLAGS.overlays:
        rows.sort(key=lambda r: r["index"])
        po.write_index(out, rows, f"{n_ok} images, names: {', '.join(names)}")
        written.append("index.html")
    po.end_outputs(out, written)
    print(f"[predict] {n_ok} images, {len(results)} detections, {len(skipped)} skipped "
          f"(unreadable); {summary['images_per_s']} images/s incl. "
          f"{summary['programs']} compiles ({summary['compile_seconds']} s); wrote "
          f"{out}/detections.json" + (", overlays/, index.html" if FLAGS.overlays else ""),
          flush=True)


def main(argv):
    args = argv[1:]
    if args == ["export"]:
        return export_main()
    if args == ["serve"]:
        return serve.serve_main(_load(FLAGS.workdir))
    if args:
        raise cli.UsageError(f"unexpected arguments: {' '.join(args)} (the commands are "
                             "'export' and 'serve')")
    return predict_main()


def run():
    """`python -m ezsd_jax.predict` and the `ezsd-predict` console script."""
    return cli.run(main, doc=__doc__)

