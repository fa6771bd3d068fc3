# reidal - every target reuses `setup`, and every target is idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/reidal/v1/*.proto)
GEN    := reidal/v1/.generated

.PHONY: setup proto test demo bench lint clean

setup: $(STAMP) $(GEN)

# torch is installed first from the CPU wheel (a bare `torch` would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

proto: $(STAMP)
	rm -f $(GEN)
	$(MAKE) $(GEN)

# Generated protobuf/gRPC code is built from protos/, never edited by hand (git-ignored).
$(GEN): $(STAMP) $(PROTOS)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch $(GEN)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/reidal demo

bench: setup
	$(PY) bench/bench_sampling.py
	$(PY) bench/bench_embedding.py

lint: setup
	$(PY) -m ruff check reidal services tests bench

clean:
	rm -rf $(VENV) reidal/v1/*_pb2*.py* $(GEN) .pytest_cache
