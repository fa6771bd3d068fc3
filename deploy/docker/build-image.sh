#!/usr/bin/env bash
# `make image`: build deploy/docker/Dockerfile with podman on a machine that can reach the
# package registries but no container registry (the project's CI kind: Debian 12, root).
#
#   1. podman and debootstrap, installed with apt-get when missing (as root);
#   2. the Python base: Debian 12 (debootstrap --variant=minbase, the mirror apt already
#      uses) with its python3.11 + venv, imported as $BASE_IMAGE (once; kept afterwards);
#   3. the torch wheel `pip install torch==2.13.0` finds on this machine (its find-links),
#      when it is the CPU build, copied into deploy/docker/wheels/ for the build stage;
#   4. podman build --isolation chroot --network host, base passed as PYTHON_IMAGE;
#   5. the image's size.
#
# Elsewhere `docker build -f deploy/docker/Dockerfile .` needs none of this (the Dockerfile's
# default base is the official Python image). Variables: IMAGE (reidal:dev), BASE_IMAGE,
# MIRROR (default: the first Debian mirror in apt's sources), PYTHON (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${IMAGE:-reidal:dev}
# What the base holds: Python 3.11 with venv, and libpython3.11.so (the python backend's
# stub links it; the official image has it in /usr/local/lib). The tag follows the list,
# so changing it makes a new base.
BASE_PACKAGES=python3,python3-venv,python-is-python3,libpython3.11,ca-certificates
BASE_IMAGE=${BASE_IMAGE:-localhost/reidal-python:3.11-bookworm-$(echo "$BASE_PACKAGES" | sha256sum | cut -c1-8)}
PYTHON=${PYTHON:-.venv/bin/python}
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' deploy/docker/Dockerfile)
NICE="nice -n 10"

need=()
command -v podman >/dev/null || need+=(podman)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "make image needs ${need[*]} (install them, or run as root with apt-get)" >&2
    exit 1
  fi
  echo "installing ${need[*]}"
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; }
fi

if ! podman image exists "$BASE_IMAGE"; then
  mirror=${MIRROR:-$(grep -rhoE '^(deb|URIs:) +(\[[^]]*\] +)?https?://[^ ]+/debian/?( |$)' \
      /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | grep -oE 'https?://[^ ]+' | head -1 || true)}
  mirror=${mirror:-http://deb.debian.org/debian}
  root=$(mktemp -d /var/tmp/reidal-base.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  echo "debootstrap bookworm from $mirror ($BASE_PACKAGES)"
  $NICE debootstrap --variant=minbase --include="$BASE_PACKAGES" \
    bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
  rm -f "$root.log"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/*
  tar -C "$root" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
  trap - EXIT
fi

# The local CPU torch wheel, if pip finds one without asking an index (else the build
# stage downloads it from the PyTorch CPU index).
wheels=deploy/docker/wheels
rm -f "$wheels"/torch-*.whl
if "$PYTHON" -m pip download -q --no-deps --no-index -d "$wheels" "torch==$TORCH_VERSION" \
    >/dev/null 2>&1 && ls "$wheels"/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1; then
  echo "torch: $(basename "$wheels"/torch-*.whl) (local wheel)"
else
  rm -f "$wheels"/torch-*.whl
  echo "torch: from the PyTorch CPU index (no local wheel)"
fi

# pip here may trust a CA of its own (a proxy's: PIP_CERT or pip's `cert` setting); the
# build's pip gets the same bundle, mounted for the RUN steps only (not in any layer).
volumes=()
cert=$("$PYTHON" -m pip config list 2>/dev/null | sed -n "s/^[^ ]*\.cert='\(.*\)'$/\1/p" | head -1)
if [ -n "$cert" ] && [ -f "$cert" ]; then
  conf=$(mktemp /var/tmp/reidal-pip.XXXXXX.conf)
  printf '[global]\ncert = /etc/ssl/certs/reidal-build-ca.crt\n' >"$conf"
  chmod 644 "$conf"
  trap 'rm -f "$conf"' EXIT
  volumes=(--volume "$cert:/etc/ssl/certs/reidal-build-ca.crt:ro" --volume "$conf:/etc/pip.conf:ro")
  echo "pip in the build trusts $cert, as pip does here"
fi

# --format docker: HEALTHCHECK and SHELL are Docker image-format instructions.
build=(podman build --isolation chroot --network host --format docker "${volumes[@]}"
       -f deploy/docker/Dockerfile --build-arg PYTHON_IMAGE="$BASE_IMAGE")
# podman 4.3 (buildah 1.28) orders stages before expanding `FROM runtime-${VARIANT}`, so
# it takes that name for an image to pull: build the stage first, under that name in
# local storage, where the final stage's FROM finds it; the name is removed afterwards.
previous=$(podman image inspect "$IMAGE" --format '{{.Id}}' 2>/dev/null || true)
$NICE "${build[@]}" --target runtime-cpu -t localhost/runtime-cpu:latest .
$NICE "${build[@]}" -t "$IMAGE" .
podman untag localhost/runtime-cpu:latest
# The image this build replaced (its virtualenv layer alone is ~1.8 GB), unless still tagged.
if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect "$IMAGE" --format '{{.Id}}')" ]; then
  podman rmi "$previous" >/dev/null 2>&1 || true
fi
rm -f "$wheels"/torch-*.whl
size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
echo "built $IMAGE: $(numfmt --to=iec --suffix=B "$size") ($size bytes)"
