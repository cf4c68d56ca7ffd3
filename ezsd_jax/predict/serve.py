"""`python -m ezsd_jax.predict serve --workdir=RUN_OR_BUNDLE`: a local web page for
open-vocabulary detection on your own photo (upload or drop it, type names or pick
base/novel/all, move the score threshold, download the JSON, revisit earlier queries).

A standard-library HTTP server with one self-contained HTML page (serve_page.html: no
external script, font or request): it runs offline. Each query is `Detector.detect` at one fixed score
threshold (--score_threshold, default 0: every detection the model keeps), so every query
of an input/vocabulary bucket reuses that bucket's compiled program; the page's slider
filters in the browser. Protocol and page: docs/predict.md.
"""
from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from absl import flags

flags.DEFINE_string("host", "127.0.0.1", "serve: address to listen on (127.0.0.1: this "
                    "machine only).")
flags.DEFINE_integer("port", 8765, "serve: port (0: any free port; the URL is printed).")
FLAGS = flags.FLAGS

MAX_UPLOAD = 32 << 20                  # bytes of one request body
PAGE_FILE = "serve_page.html"          # one self-contained page: inline script and style


class Service:
    """The page's backend: one Detector, one query at a time (the Detector and its
    compiled programs are shared)."""

    def __init__(self, detector, score_threshold: float = 0.0, prompts: str = "single",
                 max_detections: int | None = None, initial_threshold: float = 0.3):
        self.det = detector
        self.score_threshold = float(score_threshold)
        self.prompts, self.max_detections = prompts, max_detections
        self.initial_threshold = float(initial_threshold)
        self.lock = threading.Lock()
        self.queries = 0

    def info(self) -> dict:
        d = self.det
        return {"step": d.step, "source": d.source, "base": d.base, "novel": d.novel,
                "score_threshold": self.score_threshold,
                "initial_threshold": self.initial_threshold, "prompts": self.prompts,
                "programs": len(d.compile_seconds), "queries": self.queries}

    def names(self, req: dict) -> list[str]:
        vocab = str(req.get("vocabulary") or "").strip()
        if vocab:
            return self.det.vocabulary(vocab)            # ValueError names the choices
        names = [n.strip() for n in str(req.get("names") or "").split(",") if n.strip()]
        if not names:
            raise ValueError("no names: type comma-separated names or pick a vocabulary")
        return list(dict.fromkeys(names))

    def detect(self, req: dict) -> dict:
        """{'image': base64 file bytes, 'names': 'a, b' | 'vocabulary': base|novel|all,
        'file_name'} -> detections (COCO results of image_id 1) and the image size."""
        from ezsd_jax.core.images import decode_image
        from ezsd_jax.predict import outputs
        try:
            data = base64.b64decode(str(req.get("image") or ""), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("image: not base64 data") from None
        if not data:
            raise ValueError("no image: upload or drop a photo")
        names = self.names(req)
        file_name = str(req.get("file_name") or "upload")
        img = decode_image(data)                 # DataError: not a readable image
        with self.lock:
            t0 = time.perf_counter()
            programs = len(self.det.compile_seconds)
            dets = self.det.detect(img, names, self.score_threshold, self.max_detections,
                                   self.prompts)
            seconds = time.perf_counter() - t0
            self.queries += 1
            compiled = len(self.det.compile_seconds) - programs
        name_ids = {n: i + 1 for i, n in enumerate(names)}
        results = outputs.coco_results(1, file_name, dets, name_ids)
        for r in results:                        # runs for the page's mask drawing
            if "segmentation" in r:
                r["mask_runs"] = _uncompressed_runs(r["segmentation"])
        novel = set(self.det.novel)
        return {"file_name": file_name, "width": int(img.shape[1]),
                "height": int(img.shape[0]), "names": names,
                "categories": [{"id": i, "name": n, "novel": n in novel}
                               for n, i in name_ids.items()],
                "detections": results, "seconds": round(seconds, 4),
                "compiled": compiled, "programs": len(self.det.compile_seconds),
                "score_threshold": self.score_threshold}


def _uncompressed_runs(rle: dict) -> list[int]:
    """COCO compressed RLE -> its run lengths (column-major, starting with background)."""
    import numpy as np
    from pycocotools import mask as mask_util
    m = np.asarray(mask_util.decode(rle), np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(m)) + 1
    bounds = np.concatenate([[0], change, [m.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if m.size and m[0] else runs


def make_handler(service: Service):
    html_page = page().encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "ezsd-serve"

        def log_message(self, fmt, *args):        # one line per query is printed instead
            pass

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj) -> None:
            self._send(code, json.dumps(obj).encode(), "application/json")

        def do_GET(self):
            if self.path in ("/", "/index.html"):
                self._send(200, html_page, "text/html; charset=utf-8")
            elif self.path == "/api/info":
                self._json(200, service.info())
            else:
                self._json(404, {"error": f"no such page: {self.path}"})

        def do_POST(self):
            if self.path != "/api/detect":
                return self._json(404, {"error": f"no such endpoint: {self.path}"})
            size = int(self.headers.get("Content-Length") or 0)
            if size > MAX_UPLOAD:
                return self._json(413, {"error": f"request of {size} bytes: at most "
                                                  f"{MAX_UPLOAD}"})
            try:
                req = json.loads(self.rfile.read(size) or b"{}")
                out = service.detect(req)
            except json.JSONDecodeError:
                return self._json(400, {"error": "request body is not JSON"})
            except Exception as e:   # noqa: BLE001 -- bad input goes back to the page
                from ezsd_jax.core.errors import DataError
                if isinstance(e, (ValueError, DataError)):
                    return self._json(400, {"error": str(e)})
                raise
            print(f"[serve] {out['file_name']} {out['width']}x{out['height']}, "
                  f"{len(out['names'])} names: {len(out['detections'])} detections in "
                  f"{out['seconds']} s ({out['compiled']} compiled)", flush=True)
            self._json(200, out)
    return Handler


def serve_main(detector) -> None:
    """Serves until interrupted (Ctrl-C); prints the URL first."""
    service = Service(detector,
                      0.0 if FLAGS.score_threshold is None else FLAGS.score_threshold,
                      FLAGS.prompts, FLAGS.max_detections, FLAGS.overlay_threshold)
    try:
        httpd = ThreadingHTTPServer((FLAGS.host, FLAGS.port), make_handler(service))
    except OSError as e:
        from ezsd_jax.core.cli import UsageError
        raise UsageError(f"--host={FLAGS.host} --port={FLAGS.port}: {e.strerror}") from None
    host, port = httpd.server_address[:2]
    print(f"[serve] detector step {detector.step} from {detector.source}; open "
          f"http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


def page() -> str:
    """The page (serve_page.html, installed with the package)."""
    from importlib import resources
    return resources.files("ezsd_jax.predict").joinpath(PAGE_FILE).read_text("utf-8")


__all__ = ["Service", "serve_main", "make_handler", "page"]
