#!/usr/bin/env bash
# `make image`: build deploy/docker/Dockerfile with podman on a machine that can reach the
# package registries but no container registry (the project's CI kind: Debian 12, root).
#
#   1. podman and debootstrap, installed with apt-get when missing (as root); exit 69
#      (EX_UNAVAILABLE) when they are missing and cannot be installed;
#   2. the Python base: Debian 12 (debootstrap --variant=minbase, the mirror apt already
#      uses) with its python3.11 + venv, imported as $BASE_IMAGE (once; kept afterwards);
#      its root file system is kept as a tar in $CACHE_DIR, so a new storage (a fresh
#      podman, another --root) imports it in seconds instead of running debootstrap again;
#   3. meanwhile, a wheelhouse in deploy/docker/wheels/: `pip wheel` of the image's
#      requirements (deploy/docker/requirements.py) pinned to the versions installed in
#      $PYTHON's environment (what the tests run), through this machine's pip: its cache
#      and local wheels (the CPU torch here) make that a copy of what the virtualenv's
#      setup downloaded, not a second download. The deps stage then installs from it
#      without an index. When pip cannot make it (or torch is not the CPU build), the deps
#      stage uses the indexes, as elsewhere;
#   4. podman build --isolation chroot --network host, base passed as PYTHON_IMAGE;
#   5. the image's size.
#
# Elsewhere `docker build -f deploy/docker/Dockerfile .` needs none of this (the Dockerfile's
# default base is the official Python image). Variables: IMAGE (reidal:dev), BASE_IMAGE,
# MIRROR (default: the first Debian mirror in apt's sources), PYTHON (.venv/bin/python),
# CACHE_DIR (${XDG_CACHE_HOME:-~/.cache}/reidal), NICE (nice -n 10). podman's storage is
# its own business: CONTAINERS_STORAGE_CONF picks another (e.g. for a cold build).
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${IMAGE:-reidal:dev}
# What the base holds: Python 3.11 with venv, and libpython3.11.so (the python backend's
# stub links it; the official image has it in /usr/local/lib). The tag follows the list,
# so changing it makes a new base.
BASE_PACKAGES=python3,python3-venv,python-is-python3,libpython3.11,ca-certificates
BASE_TAG=3.11-bookworm-$(echo "$BASE_PACKAGES" | sha256sum | cut -c1-8)
BASE_IMAGE=${BASE_IMAGE:-localhost/reidal-python:$BASE_TAG}
PYTHON=${PYTHON:-.venv/bin/python}
CACHE_DIR=${CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/reidal}
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' deploy/docker/Dockerfile)
NICE=${NICE:-nice -n 10}
wheels=deploy/docker/wheels
started=$SECONDS
say() { printf '[make image %3ds] %s\n' $((SECONDS - started)) "$*"; }

need=()
command -v podman >/dev/null || need+=(podman)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "make image needs ${need[*]} (install them, or run as root with apt-get)" >&2
    exit 69
  fi
  say "installing ${need[*]}"
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; } || {
    echo "make image needs ${need[*]}: apt-get could not install them" >&2; exit 69; }
fi

tmp=$(mktemp -d /var/tmp/reidal-image.XXXXXX)
wheelhouse_pid=""
cleanup() {
  [ -n "$wheelhouse_pid" ] && kill "$wheelhouse_pid" 2>/dev/null
  rm -rf "$tmp"
  rm -f "$wheels"/*.whl "$wheels"/wheelhouse.txt
  true
}
trap cleanup EXIT

# 3. (in the background, beside debootstrap) the wheelhouse; wheelhouse.txt, written
# last, tells the Dockerfile it is complete.
make_wheelhouse() {
  rm -f "$wheels"/*.whl "$wheels"/wheelhouse.txt
  "$PYTHON" deploy/docker/requirements.py > "$tmp/requirements.txt"
  "$PYTHON" -m pip list --format=freeze --exclude-editable > "$tmp/constraints.txt"
  $NICE "$PYTHON" -m pip wheel -q --disable-pip-version-check --wheel-dir "$wheels" \
    -c "$tmp/constraints.txt" -r "$tmp/requirements.txt" "torch==$TORCH_VERSION" || return 1
  # torch must be the CPU build (PyPI's is a multi-GB CUDA one): else the index's.
  ls "$wheels"/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1 || return 1
  (cd "$wheels" && ls ./*.whl) > "$wheels/wheelhouse.txt"
}
if [ -x "$PYTHON" ]; then
  say "wheelhouse: pip wheel of the image's requirements at $PYTHON's versions (background)"
  make_wheelhouse > "$tmp/wheelhouse.log" 2>&1 &
  wheelhouse_pid=$!
fi

if ! podman image exists "$BASE_IMAGE"; then
  tarball=$CACHE_DIR/reidal-python-$BASE_TAG.tar
  if [ ! -s "$tarball" ]; then
    mirror=${MIRROR:-$(grep -rhoE '^(deb|URIs:) +(\[[^]]*\] +)?https?://[^ ]+/debian/?( |$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | grep -oE 'https?://[^ ]+' | head -1 || true)}
    mirror=${mirror:-http://deb.debian.org/debian}
    root=$tmp/root
    say "base: debootstrap bookworm from $mirror ($BASE_PACKAGES)"
    $NICE debootstrap --variant=minbase --include="$BASE_PACKAGES" \
      bookworm "$root" "$mirror" >"$tmp/debootstrap.log" 2>&1 || { tail -20 "$tmp/debootstrap.log" >&2; exit 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/*
    mkdir -p "$CACHE_DIR"
    tar -C "$root" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf "$root"
  else
    say "base: the root file system debootstrap made before ($tarball)"
  fi
  podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tarball" "$BASE_IMAGE" >/dev/null
  say "base: imported as $BASE_IMAGE"
fi

if [ -n "$wheelhouse_pid" ] && wait "$wheelhouse_pid"; then
  say "wheelhouse: $(wc -l < "$wheels/wheelhouse.txt") wheels, $(du -sh "$wheels" | cut -f1) (the deps stage asks no index)"
else
  [ -n "$wheelhouse_pid" ] && tail -5 "$tmp/wheelhouse.log"
  rm -f "$wheels"/*.whl "$wheels"/wheelhouse.txt
  say "wheelhouse: none (the deps stage installs from the indexes)"
fi
wheelhouse_pid=""

# pip here may trust a CA of its own (a proxy's: PIP_CERT or pip's `cert` setting); the
# build's pip gets the same bundle, mounted for the RUN steps only (not in any layer).
volumes=()
cert=$("$PYTHON" -m pip config list 2>/dev/null | sed -n "s/^[^ ]*\.cert='\(.*\)'$/\1/p" | head -1 || true)
if [ -n "$cert" ] && [ -f "$cert" ]; then
  printf '[global]\ncert = /etc/ssl/certs/reidal-build-ca.crt\n' >"$tmp/pip.conf"
  chmod 755 "$tmp"
  chmod 644 "$tmp/pip.conf"
  volumes=(--volume "$cert:/etc/ssl/certs/reidal-build-ca.crt:ro" --volume "$tmp/pip.conf:/etc/pip.conf:ro")
fi

# --format docker: HEALTHCHECK and SHELL are Docker image-format instructions.
build=(podman build --isolation chroot --network host --format docker "${volumes[@]}"
       -f deploy/docker/Dockerfile --build-arg PYTHON_IMAGE="$BASE_IMAGE")
# podman 4.3 (buildah 1.28) orders stages before expanding `FROM runtime-${VARIANT}`, so
# it takes that name for an image to pull: build the stage first, under that name in
# local storage, where the deps stage's FROM finds it; the name is removed afterwards.
previous=$(podman image inspect "$IMAGE" --format '{{.Id}}' 2>/dev/null || true)
say "podman build (storage: $(podman info --format '{{.Store.GraphDriverName}} {{.Store.GraphRoot}}'))"
$NICE "${build[@]}" --target runtime-cpu -t localhost/runtime-cpu:latest .
$NICE "${build[@]}" -t "$IMAGE" .
podman untag localhost/runtime-cpu:latest
# The image this build replaced, unless still tagged.
if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect "$IMAGE" --format '{{.Id}}')" ]; then
  podman rmi "$previous" >/dev/null 2>&1 || true
fi
size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
say "built $IMAGE: $(numfmt --to=iec --suffix=B "$size") ($size bytes)"
