"""`python -m ezsd_jax.predict serve`: the local detection page on a tiny random Mask R-CNN
bundle (tests/tiny_detector.py; it checks the plumbing, not accuracy). Over HTTP: the
page is self-contained (no external URL), a query returns what `Detector.detect` returns
on the same photo, a second photo of the same size compiles nothing, bad input is a 400
with one message. In a real headless chromium (Debian's package driven by selenium,
skipped where /usr/bin/chromium is absent; `make test-browser` installs both): upload a
generated photo, type its names, and a box is drawn from JSON equal to Detector.detect."""
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from tiny_detector import make_bundle, shape_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["red square", "blue circle", "green ring"]
QUERY = "red square, green ring"
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _png(img) -> bytes:
    b = io.BytesIO()
    Image.fromarray(img).save(b, "PNG")
    return b.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory, optimized_env):
    """(url, model dir, photo path, query names, Detector.detect of the photo at the
    page's threshold) with the server running in a subprocess. EZSD_SERVE_WORKDIR=W
    serves a trained demo workdir instead (its first val image, its 'all' names): for
    a screenshot with real detections (make test-browser SERVE_WORKDIR=workdir/demo)."""
    from ezsd_jax.predict.detector import Detector
    tmp = tmp_path_factory.mktemp("serve")
    model_dir = trained = os.environ.get("EZSD_SERVE_WORKDIR")
    if trained:
        val = os.path.join(model_dir, "synthetic", "val")
        photo = os.path.join(val, sorted(os.listdir(val))[0])
    else:
        model_dir = make_bundle(str(tmp / "bundle"), NAMES, mask_on=True)
        photo = str(tmp / "photo.png")
        with open(photo, "wb") as f:
            f.write(_png(shape_image()))
    proc = subprocess.Popen([sys.executable, "-m", "ezsd_jax.predict", "serve",
                             f"--workdir={model_dir}", "--port=0"], cwd=ROOT,
                            env=optimized_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "http://" in line, line + proc.stderr.read()
        url = line.split("open ")[1].split()[0]
        det = Detector.load(model_dir)
        names = det.vocabulary("all") if trained else QUERY.split(", ")
        ref = det.detect(photo, names, score_threshold=0.0)
        yield url, det, photo, names, ref
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        stderr = proc.stderr.read()
    assert "Traceback" not in stderr and "Metadata file" not in stderr, stderr


def _post(url, body: dict):
    req = urllib.request.Request(url + "api/detect", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _same(dets, ref):
    assert len(dets) == len(ref) > 0
    for d, r in zip(dets, ref):
        assert d["category_name"] == r["name"]
        np.testing.assert_allclose(d["bbox"], r["bbox"], atol=1e-3)
        np.testing.assert_allclose(d["score"], r["score"], atol=1e-5)
        assert d.get("segmentation") == r.get("segmentation")   # RLE of a Mask R-CNN


@pytest.mark.slow            # ~40 CPU-s: a Mask R-CNN bundle compiled in two processes
def test_api_matches_detector_and_reuses_programs(served):
    url, det, photo, names, ref = served
    page = urllib.request.urlopen(url, timeout=30).read().decode()
    assert "<canvas" in page and "http://" not in page and "https://" not in page
    with open(photo, "rb") as f:
        b64 = base64.b64encode(f.read()).decode()
    code, first = _post(url, {"image": b64, "names": ", ".join(names),
                              "file_name": "photo.png"})
    assert code == 200, first
    _same(first["detections"], ref)
    assert [c["name"] for c in first["categories"]] == names
    assert [c["novel"] for c in first["categories"]] == [n in det.novel for n in names]
    # a new photo of the same size, other names, the run's base vocabulary: every query
    # reuses the compiled programs
    hw = (first["height"], first["width"])
    other = base64.b64encode(_png(shape_image(hw, box=(5, 8, 20, 40), colour=(20, 20, 220),
                                              seed=4))).decode()
    code, second = _post(url, {"image": other, "names": ", ".join(names[::-1])})
    assert code == 200 and second["compiled"] == 0, second
    assert second["programs"] == first["programs"]
    # the run's base vocabulary: its vocabulary bucket's program (new only where the
    # bucket differs), then reused for the next photo
    from ezsd_jax.predict.buckets import vocab_bucket
    new_bucket = vocab_bucket(len(det.base)) != vocab_bucket(len(names))
    code, base = _post(url, {"image": other, "vocabulary": "base"})
    assert code == 200 and base["names"] == det.base and base["compiled"] == int(new_bucket)
    code, again = _post(url, {"image": b64, "vocabulary": "base"})
    assert code == 200 and again["compiled"] == 0
    info = json.load(urllib.request.urlopen(url + "api/info", timeout=30))
    assert info["programs"] == first["programs"] + new_bucket and info["queries"] == 4
    # bad input: a 400 with one message, and the server keeps serving
    for body, msg in (({"image": "!!", "names": "a"}, "not base64"),
                      ({"image": b64, "names": " , "}, "no names"),
                      ({"image": b64, "vocabulary": "weird"}, "vocabulary 'weird'"),
                      ({"image": base64.b64encode(b"not an image").decode(), "names": "a"},
                       "cannot decode image")):
        code, out = _post(url, body)
        assert code == 400 and msg in out["error"], (body, out)
    assert _post(url, {"image": b64, "names": names[0]})[0] == 200


@pytest.mark.slow
@pytest.mark.browser
def test_page_in_headless_chromium(served, tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.skip(f"{CHROMIUM} or {DRIVER} absent: `make test-browser` installs "
                    "Debian's chromium and chromium-driver and runs this test")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not "
                                    "installed (pip install .[test])")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    url, _, photo, names, ref = served
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
              "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--window-size=1100,940",
              f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(a)
    os.environ.setdefault("SE_OFFLINE", "true")         # no selenium-manager download
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(DRIVER))
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 120)
        driver.find_element(By.ID, "file").send_keys(photo)
        wait.until(lambda d: "loaded" in d.find_element(By.ID, "status").text)
        driver.find_element(By.ID, "names").send_keys(", ".join(names))
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(("done",
                                                                              "error")))
        assert driver.find_element(By.ID, "err").text == ""
        result = driver.execute_script("return window.lastResult")
        _same(result["detections"], ref)
        # the slider filters in the page: at 0 every detection is drawn
        driver.execute_script("const t = document.getElementById('thr'); t.value = 0; "
                              "t.dispatchEvent(new Event('input'));")
        assert driver.execute_script("return window.drawnBoxes") == len(ref)
        # the best box's top-left corner carries a box colour (green: base, magenta: novel)
        x, y = ref[0]["bbox"][:2]
        px = driver.execute_script(
            "const cv = document.getElementById('cv'); const s = cv.width / arguments[2];"
            "return Array.from(cv.getContext('2d').getImageData("
            "Math.round(arguments[0] * s), Math.round(arguments[1] * s), 1, 1).data);",
            x, y, result["width"])
        assert tuple(px[:3]) in ((0, 255, 0), (255, 0, 255)), px
        hist = driver.find_elements(By.CSS_SELECTOR, "#hist li")
        assert len(hist) == 1 and ", ".join(names) in hist[0].text
        # back to the default threshold for the picture
        driver.execute_script("const t = document.getElementById('thr'); "
                              "t.value = window.serverInfo.initial_threshold; "
                              "t.dispatchEvent(new Event('input'));")
        shot = tmp_path / "serve_page.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("EZSD_SERVE_SCREENSHOT"):
            shutil.copy(shot, os.environ["EZSD_SERVE_SCREENSHOT"])
    finally:
        driver.quit()
