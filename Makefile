# Two commands a user needs: `make demo` and `make test`. Each (re)builds .venv from
# requirements.txt by itself when requirements change.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
WORKDIR ?= workdir/demo
PYTEST_ARGS ?=

.PHONY: demo demo-ablation test test-fast test-browser venv clean bench

$(STAMP): requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip "setuptools>=70.1"
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	$(VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# libtpu for the deviceless AOT check and its tests (tests/test_aot.py); the demo needs none
TPU_STAMP := $(VENV)/.installed-tpu
$(TPU_STAMP): $(STAMP) requirements-tpu.txt
	$(VENV)/bin/python -m pip install -q -r requirements-tpu.txt
	touch $(TPU_STAMP)

# the demo, then open-vocabulary predict on a few of its val images with names given here
DEMO_NAMES ?= orange diamond,purple hexagon,white pentagon,red circle,green square
demo: $(STAMP)
	$(VENV)/bin/python -m ezsd_jax.main --config=configs/demo.py --workdir=$(WORKDIR)
	$(VENV)/bin/python -m ezsd_jax.predict --workdir=$(WORKDIR) \
	    --images='$(WORKDIR)/synthetic/val/00000000000[1-6].png' \
	    --names="$(DEMO_NAMES)" --out=$(WORKDIR)/predict

# the demo plus its ablation table (re-uses what `make demo` wrote in the same workdir)
demo-ablation: $(STAMP)
	$(VENV)/bin/python -m ezsd_jax.main --config=configs/demo.py --workdir=$(WORKDIR) \
	    --config.ablation.enabled=True

# two passes: everything on one CPU device (2 xdist workers), then the sharding tests on 8
# fake devices (tests/conftest.py says why)
test: $(STAMP) $(TPU_STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q -n 2 --dist loadscope --durations=15 -m "not multidevice" $(PYTEST_ARGS)
	HF_HUB_OFFLINE=1 EZSD_TEST_DEVICES=8 $(VENV)/bin/python -m pytest -q -p no:xdist -m multidevice $(PYTEST_ARGS)

# the edit-test loop: every test not marked `slow` (unit and small integration tests);
# CI runs `make test`, which includes the slow ones
test-fast: $(STAMP) $(TPU_STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q -n 2 --dist loadscope -m "not slow and not multidevice" --durations=20 $(PYTEST_ARGS)
	HF_HUB_OFFLINE=1 EZSD_TEST_DEVICES=8 $(VENV)/bin/python -m pytest -q -p no:xdist -m "multidevice and not slow" $(PYTEST_ARGS)

# the predict serve page in a real headless browser: Debian's chromium and chromium-driver
# (apt-get, as root) and selenium; the page's screenshot goes to benchmarks/serve_page.png.
# SERVE_WORKDIR=workdir/demo: the page serves that trained demo run (after `make demo`)
SERVE_WORKDIR ?=
test-browser: $(STAMP)
	test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || \
	    (apt-get update -q && apt-get install -y -q chromium chromium-driver)
	$(VENV)/bin/python -m pip install -q "selenium>=4.30,<5"
	HF_HUB_OFFLINE=1 EZSD_SERVE_SCREENSHOT=benchmarks/serve_page.png \
	    EZSD_SERVE_WORKDIR=$(SERVE_WORKDIR) $(VENV)/bin/python -m pytest -q -p no:xdist \
	    -m browser tests/test_predict_serve.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) workdir .pytest_cache
