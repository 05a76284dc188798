# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DEMO_RAW := data/synthetic
DEMO_CACHE := data/demo.h5

.PHONY: install demo test test-slow bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m preprocess synth --out $(DEMO_RAW) --normal 12 --abnormal 12 --size 256
	$(BIN)/python -m preprocess build --raw $(DEMO_RAW) --out $(DEMO_CACHE) --shape 64 64 32
	$(BIN)/python -m preprocess info $(DEMO_CACHE)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not veryslow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "veryslow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_preprocess.py

clean:
	rm -rf $(VENV) .pytest_cache data/synthetic data/demo.h5 runs/demo
