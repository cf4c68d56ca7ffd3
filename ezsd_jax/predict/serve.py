"""`python -m ezsd_jax.predict serve --workdir=RUN_OR_BUNDLE`: a local web page for
open-vocabulary detection on your own photo (upload or drop it, type names or pick
base/novel/all, move the score threshold, download the JSON, revisit earlier queries).

A standard-library HTTP server with one self-contained HTML page (no external script,
font or request): it runs offline. Each query is `Detector.detect` at one fixed score
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
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
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


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ezsd_jax: open-vocabulary detection</title>
<style>
body{font-family:sans-serif;background:#1e1e1e;color:#eee;margin:16px}
#drop{border:2px dashed #888;padding:14px;margin-bottom:8px;max-width:600px}
#drop.over{border-color:#4c4}
input[type=text]{width:360px}
label,button,select{margin-right:8px}
#main{display:flex;gap:16px;align-items:flex-start}
canvas{background:#000;max-width:100%}
#hist li{cursor:pointer;margin:2px 0}
#err{color:#f66}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left}
</style></head><body>
<h2>Open-vocabulary detection</h2>
<div id="drop">Drop a photo here or <input type="file" id="file" accept="image/*"></div>
<div>
<label>names <input type="text" id="names" placeholder="red mug, giraffe"></label>
<label>or <select id="vocab"><option value="">(typed names)</option>
<option>base</option><option>novel</option><option>all</option></select></label>
<button id="go">Detect</button>
</div>
<div style="margin:8px 0">
<label>score &ge; <input type="range" id="thr" min="0" max="1" step="0.01" value="0.3">
<span id="thrv">0.30</span></label>
<button id="dl" disabled>Download JSON</button>
<span id="status">load a photo</span> <span id="err"></span>
</div>
<div id="main"><canvas id="cv" width="512" height="384"></canvas>
<div><table id="tbl"></table><h4>History</h4><ol id="hist"></ol></div></div>
<script>
"use strict";
let photo = null;          // {name, b64, img}
let current = null;        // the shown query: {result, img}
const history = [];
window.lastResult = null;
window.drawnBoxes = 0;
const $ = id => document.getElementById(id);

fetch("/api/info").then(r => r.json()).then(info => {
  $("thr").value = info.initial_threshold; showThr();
  window.serverInfo = info;
});

function showThr(){ $("thrv").textContent = Number($("thr").value).toFixed(2); }

function loadFile(f){
  const rd = new FileReader();
  rd.onload = () => {
    const url = rd.result, img = new Image();
    img.onload = () => {
      photo = {name: f.name, b64: url.slice(url.indexOf(",") + 1), img: img};
      current = null; draw(); $("status").textContent = f.name + " loaded";
    };
    img.src = url;
  };
  rd.readAsDataURL(f);
}
$("file").addEventListener("change", e => { if (e.target.files.length) loadFile(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) loadFile(e.dataTransfer.files[0]); });

$("go").addEventListener("click", () => {
  $("err").textContent = "";
  if (!photo) { $("err").textContent = "load a photo first"; return; }
  $("status").textContent = "detecting...";
  const body = {image: photo.b64, file_name: photo.name, names: $("names").value,
                vocabulary: $("vocab").value};
  fetch("/api/detect", {method: "POST", headers: {"Content-Type": "application/json"},
                        body: JSON.stringify(body)})
    .then(r => r.json().then(j => ({ok: r.ok, j: j})))
    .then(({ok, j}) => {
      if (!ok) { $("err").textContent = j.error; $("status").textContent = "error"; return; }
      current = {result: j, img: photo.img};
      window.lastResult = j;
      history.unshift({result: j, img: photo.img, thr: Number($("thr").value)});
      showHistory(); draw();
      $("status").textContent = "done: " + j.detections.length + " detections in " +
        j.seconds + " s (" + j.compiled + " compiled)";
    })
    .catch(e => { $("err").textContent = String(e); $("status").textContent = "error"; });
});

$("thr").addEventListener("input", () => { showThr(); draw(); });

function shown(){
  if (!current) return [];
  const t = Number($("thr").value);
  return current.result.detections.filter(d => d.score >= t);
}

function colour(cid){
  const c = current.result.categories.find(c => c.id === cid);
  return c && c.novel ? [255, 0, 255] : [0, 255, 0];
}

function draw(){
  const cv = $("cv"), ctx = cv.getContext("2d");
  const img = current ? current.img : (photo ? photo.img : null);
  window.drawnBoxes = 0;
  if (!img) return;
  const s = Math.max(1, Math.min(4, 512 / Math.max(img.width, img.height)));
  cv.width = Math.round(img.width * s); cv.height = Math.round(img.height * s);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(img, 0, 0, cv.width, cv.height);
  $("dl").disabled = !current;
  const rows = ["<tr><th>name</th><th>score</th><th>box (x, y, w, h)</th></tr>"];
  if (!current) { $("tbl").innerHTML = ""; return; }
  const dets = shown();
  for (const d of dets) if (d.mask_runs) paintMask(ctx, d, s);
  ctx.lineWidth = 2; ctx.font = "13px sans-serif";
  for (const d of dets) {
    const [r, g, b] = colour(d.category_id), [x, y, w, h] = d.bbox.map(v => v * s);
    ctx.strokeStyle = "rgb(" + r + "," + g + "," + b + ")";
    ctx.strokeRect(x, y, w, h);
    ctx.fillStyle = ctx.strokeStyle;
    ctx.fillText(d.category_name + " " + d.score.toFixed(2), x + 2, Math.max(12, y - 3));
    window.drawnBoxes += 1;
    rows.push("<tr><td>" + esc(d.category_name) + "</td><td>" + d.score.toFixed(3) +
              "</td><td>" + d.bbox.map(v => v.toFixed(1)).join(", ") + "</td></tr>");
  }
  $("tbl").innerHTML = rows.join("");
}

function paintMask(ctx, d, s){
  const res = current.result, w = res.width, h = res.height;
  const off = document.createElement("canvas"); off.width = w; off.height = h;
  const octx = off.getContext("2d"), im = octx.createImageData(w, h);
  const [r, g, b] = colour(d.category_id);
  let pos = 0, on = false;
  for (const n of d.mask_runs) {          // column-major runs, background first
    if (on) for (let k = pos; k < pos + n; k++) {
      const y = k % h, x = Math.floor(k / h), i = 4 * (y * w + x);
      im.data[i] = r; im.data[i + 1] = g; im.data[i + 2] = b; im.data[i + 3] = 90;
    }
    pos += n; on = !on;
  }
  octx.putImageData(im, 0, 0);
  ctx.drawImage(off, 0, 0, w * s, h * s);
}

function esc(t){ const e = document.createElement("span"); e.textContent = t; return e.innerHTML; }

function showHistory(){
  $("hist").innerHTML = "";
  history.forEach((q, i) => {
    const li = document.createElement("li");
    li.textContent = q.result.file_name + ": " + q.result.names.join(", ") + " (" +
      q.result.detections.length + ")";
    li.addEventListener("click", () => { current = {result: q.result, img: q.img}; draw(); });
    $("hist").appendChild(li);
  });
}

$("dl").addEventListener("click", () => {
  const res = current.result, t = Number($("thr").value);
  const out = shown().map(d => { const c = Object.assign({}, d); delete c.mask_runs; return c; });
  const blob = new Blob([JSON.stringify({file_name: res.file_name, score_threshold: t,
    categories: res.categories, detections: out}, null, 1)], {type: "application/json"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = "detections.json"; a.click();
});
</script></body></html>
"""

__all__ = ["Service", "serve_main", "make_handler", "PAGE"]
