# reidal - every target reuses `setup`, and every target is idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/reidal/v1/*.proto)
GEN    := reidal/v1/.generated

.PHONY: setup proto protoc test demo bench lint clean

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

# CI also compiles the contract to C++ and Java with Debian's protoc (tests/test_contracts.py).
# As root with apt-get (CI) it is installed when missing; elsewhere that test is skipped.
protoc:
	@command -v protoc >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q protobuf-compiler libprotobuf-dev >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q protobuf-compiler libprotobuf-dev >/dev/null; }; }; } || \
	  echo "protoc not found and not installable here: tests/test_contracts.py will be skipped"

test: setup protoc
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/reidal demo

bench: setup
	$(PY) bench/bench_sampling.py
	$(PY) bench/bench_embedding.py

lint: setup
	$(PY) -m ruff check reidal services clients tests bench

clean:
	rm -rf $(VENV) reidal/v1/*_pb2*.py* $(GEN) .pytest_cache
