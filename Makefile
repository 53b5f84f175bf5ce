# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup setup-gpu demo demo-atlas demo-planted test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# CUDA machines: the same environment with the official faiss-gpu wheel instead of faiss-cpu
setup-gpu: | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	-$(BIN)/python -m pip uninstall -q -y faiss-cpu
	$(BIN)/python -m pip install -q -r requirements-gpu.txt
	$(BIN)/python -m pip install -q --no-deps -e .

demo: $(STAMP)
	$(BIN)/python app.py

demo-atlas: $(STAMP)
	$(BIN)/python -m precompute demo

demo-planted: $(STAMP)
	$(BIN)/python -m precompute demo-planted

test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/captioner.py --threads 2
	$(BIN)/python benchmarks/probe.py --threads 2
	$(BIN)/python benchmarks/app.py
	$(BIN)/python benchmarks/app.py --synthetic 8192
	$(BIN)/python benchmarks/family_layout.py
	$(BIN)/python benchmarks/families.py --before HEAD
	$(BIN)/python benchmarks/atlas_open.py
	$(BIN)/python benchmarks/similar.py --threads 2

clean:
	rm -rf $(VENV) demo_atlas demo_atlas-work demo_planted .pytest_cache .ruff_cache
