"""The built container image, run for real: its root file system (``podman image mount``)
started under chroot in a private mount namespace, as the image's own user, with the
image's entry point, environment and working directory (read from the image's config, not
the Dockerfile), /proc, /dev and a private /tmp bound in and a fresh directory as its data
volume, on loopback ports. Then the whole loop with the Python client: create, add images
(embedded by the image's bundled Triton), pairs, answers, identities, a short training job
whose version the bundled Triton loads. Every process of the server is checked to run from
the image as its user, so the image's Python, packages and Triton are what served.

`podman run` is not used: its OCI runtime cannot start containers on this project's CI
machines (setrlimit is refused), while mount + chroot needs only root.

The image is $REIDAL_IMAGE; by default reidal:dev, or under `make test` a tag of the
checkout's own (tests/_image_build.py). `make test` builds it: conftest.py starts
`make image` in the background when collection ends and runs these tests last, after
waiting for it (tests/_image_build.py; docs/deployment.md, "Building the image"). A failed
build fails the test. Skipped, with the reason, when not root, when podman / debootstrap
cannot be installed for the build, without unshare / chroot, or (outside `make test`,
which builds it) when the image does not exist.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _image_build import BUILD_KEY, IMAGE
from _services_support import SMALL_CLUSTERING, pictures

from reidal.embedding.triton_server import free_ports

#: How long the image test waits for the session's `make image` (from its start): a cold
#: build took 6 to 10 minutes here beside the suite.
BUILD_TIMEOUT_S = 1800
#: A training job small enough for a test (TrainingConfig fields).
TINY_TRAINING = dict(epochs=1, iters_per_epoch=2, num_identities=4, num_instances=2,
                     min_samples=2, k1=6, k2=2)


def _podman(*args: str, timeout: float = 120) -> str:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"podman {shlex.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class RunningImage:
    root: Path          # the image's mounted root file system
    data: Path          # its /var/lib/reidal
    proc: subprocess.Popen
    address: str
    user: str           # the image's USER (uid:gid)
    log: Path

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@pytest.fixture(scope="module")
def image(request, tmp_path_factory) -> Iterator[RunningImage]:
    if os.geteuid() != 0:
        pytest.skip("running an image's root file system under chroot needs root")
    build = request.config.stash.get(BUILD_KEY, None)
    if build is not None:
        build.wait(BUILD_TIMEOUT_S)  # fails when the build failed
    missing = [t for t in ("podman", "unshare", "chroot", "mount") if not shutil.which(t)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found (make image installs podman as root)")
    try:
        exists = subprocess.run(["podman", "image", "exists", IMAGE], capture_output=True,
                                timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        pytest.skip("podman's image store stayed locked for 2 minutes (a `make image` "
                    "running?)")
    if not exists:
        pytest.skip(f"no image {IMAGE}: `make image` builds it (docs/deployment.md)")
    (config,) = json.loads(_podman("image", "inspect", IMAGE))
    cfg = config["Config"]
    user = cfg.get("User", "")
    assert user and user.split(":")[0] not in ("", "0", "root"), f"image runs as {user!r}"
    root = Path(_podman("image", "mount", IMAGE).strip())
    base = tmp_path_factory.mktemp("image")
    data, tmp, log = base / "data", base / "tmp", base / "server.log"
    data.mkdir()
    tmp.mkdir()
    uid, gid = (int(x) for x in user.split(":"))
    os.chown(data, uid, gid)
    tmp.chmod(0o1777)
    port, metrics, http = free_ports(3)
    # `docker run IMAGE ARGS` appends ARGS to the entry point: loopback, free ports.
    argv = [*cfg["Entrypoint"], *(cfg.get("Cmd") or []), "--host=127.0.0.1", f"--port={port}",
            f"--metrics-port={metrics}", f"--http-port={http}"]
    workdir = cfg.get("WorkingDir") or "/"
    inner = shlex.join(["env", "-i", *cfg.get("Env", []), "sh", "-c",
                        'cd "$0" && exec "$@"', workdir, *argv])
    r = shlex.quote(str(root))
    script = "; ".join([
        "set -e", f"mount --rbind /dev {r}/dev", f"mount -t proc proc {r}/proc",
        f"mount --bind {shlex.quote(str(tmp))} {r}/tmp",
        f"mount --bind {shlex.quote(str(data))} {r}/var/lib/reidal",
        f"exec chroot --userspec={user} {r} {inner}"])
    with log.open("wb") as out:
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                 script], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    running = RunningImage(root, data, proc, f"127.0.0.1:{port}", user, log)
    try:
        from reidal.health_probe import check

        deadline = time.monotonic() + 300
        while not check(running.address, timeout_s=2.0).ok:
            assert proc.poll() is None, f"the image's server exited:\n{running.tail()}"
            assert time.monotonic() < deadline, f"not serving in 300 s:\n{running.tail()}"
            time.sleep(0.5)
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # tini forwards it: reidal stops gracefully
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left (a Triton child)
        except ProcessLookupError:
            pass
        proc.wait(30)
        _podman("image", "unmount", IMAGE)


# The first test waits for the session's image build (BUILD_TIMEOUT_S) in its setup.
@pytest.mark.timeout(BUILD_TIMEOUT_S + 600)
def test_the_image_serves_the_whole_loop(image):
    import psutil

    from reidal_client import ReidalClient
    from reidal_client.types import ClusteringParams

    pics = pictures(6, 4)
    truth = {p.image_id: p.identity for p in pics}
    with ReidalClient(image.address, timeout_s=120) as client:
        client.create_collection("img", clustering=ClusteringParams.from_pb(SMALL_CLUSTERING))
        added = client.add_images("img", [(p.image_id, p.png) for p in pics])
        assert added.added == added.embedded == len(pics)
        assert (added.model.name, added.model.version) == ("reidal_embedder", "1")
        batch = client.get_query_pairs("img", 10)
        assert batch.pairs
        result = client.submit_answers(
            "img", [(p.pair_id, truth[p.image_a] == truth[p.image_b]) for p in batch.pairs],
            annotator_id="image-test")
        assert result.stored_count == len(batch.pairs)
        identities = client.get_identities("img")
        assert identities.applied_answers == len(batch.pairs)
        assert sum(i.size for i in identities.identities) == len(pics)
        job = client.start_training("img", **TINY_TRAINING)
        done = client.wait_job(job.job_id, timeout_s=300)
        assert done.state == "SUCCEEDED" and done.model.version == "2", done
        # the bundled Triton serves the new version from the image's data volume
        assert (image.data / "model_repository" / "reidal_embedder" / "2").is_dir()
        vectors = client.embed([(pics[0].image_id, pics[0].png)], model="reidal_embedder:2")
        assert vectors.model.version == "2" and vectors.vectors.shape[0] == 1

    # Everything that served ran from the image, as the image's user.
    uid = int(image.user.split(":")[0])
    top = psutil.Process(image.proc.pid)  # tini: unshare, chroot, env and sh exec'ed it
    served = [top, *top.children(recursive=True)]
    exes = {Path(p.exe()).name: p for p in served}
    assert {"tini", "tritonserver"} <= set(exes), sorted(exes)
    assert any(n.startswith("python") for n in exes), sorted(exes)
    for p in served:
        assert p.uids().real == uid, (p.pid, p.exe(), p.uids())
        assert p.exe().startswith(str(image.root)), (p.pid, p.exe())
