"""`make image` in the background of a test session, for tests/test_image.py.

`make test` sets REIDAL_IMAGE_BUILD=1. When the session then holds a test of
test_image.py and runs as root (running the image needs it), the build
(deploy/docker/build-image.sh, `nice`d) starts as soon as collection ends and runs beside
the rest of the suite; test_image.py's tests run last (conftest.py orders them) and wait
for it. Its output goes to build/image-build.log (the path is printed when it starts).

A build that fails fails the image test, with the log's tail. Only a build that cannot
start says so with exit status 69 (EX_UNAVAILABLE: podman or debootstrap missing and
not installable here), and the test skips with that reason.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: Set (to 1) by `make test`: build the image for the session's image tests.
BUILD_ENV = "REIDAL_IMAGE_BUILD"
LOG = REPO / "build" / "image-build.log"
#: build-image.sh's exit status when podman / debootstrap are missing and not installable.
EX_UNAVAILABLE = 69
IMAGE_TESTS = "test_image.py"


def _image_name() -> str:
    """$REIDAL_IMAGE; else, when `make test` builds it, a tag of this checkout's own
    (several checkouts' `make test` on one machine share podman's storage, and must not
    run or remove each other's image); else `make image`'s reidal:dev."""
    if "REIDAL_IMAGE" in os.environ:
        return os.environ["REIDAL_IMAGE"]
    if os.environ.get(BUILD_ENV) == "1":
        return f"localhost/reidal:test-{hashlib.sha256(str(REPO).encode()).hexdigest()[:8]}"
    return "reidal:dev"


#: The image test_image.py runs, and that the session's build tags.
IMAGE = _image_name()


@dataclass
class ImageBuild:
    """The running (or finished) background `make image` of this session."""

    proc: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, image: str) -> ImageBuild:
        LOG.parent.mkdir(exist_ok=True)
        with LOG.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", str(REPO / "deploy" / "docker" / "build-image.sh")],
                cwd=REPO, env={**os.environ, "IMAGE": image}, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return cls(proc, LOG)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait(self, timeout_s: float) -> None:
        """Wait until the build ends: return when it built the image, skip when it could
        not start (EX_UNAVAILABLE), fail otherwise (a failed build, or none within
        ``timeout_s`` of its start)."""
        remaining = timeout_s - (time.monotonic() - self.started)
        try:
            rc = self.proc.wait(max(remaining, 1.0))
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"make image did not finish in {timeout_s:.0f} s "
                        f"({self.log}):\n{self.tail()}")
        if rc == EX_UNAVAILABLE:
            pytest.skip(f"make image cannot build here: {self.tail(3)}")
        if rc != 0:
            pytest.fail(f"make image failed (exit status {rc}; {self.log}):\n{self.tail()}")

    def stop(self) -> None:
        """End the build if it still runs (the session ended without waiting for it)."""
        if self.proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 60.0), (signal.SIGKILL, None)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


#: The session's background build, in ``config.stash`` when it started one.
BUILD_KEY = pytest.StashKey["ImageBuild"]()


def wanted(items: list[pytest.Item]) -> bool:
    """Whether this session should build the image: `make test` asked for it, the session
    runs an image test, and as root (else the image test skips before using it)."""
    return (os.environ.get(BUILD_ENV) == "1" and os.geteuid() == 0
            and any(item.path.name == IMAGE_TESTS for item in items))


def image_tests_last(items: list[pytest.Item]) -> None:
    """Move test_image.py's tests to the end, in place: they wait for the build that runs
    beside everything else."""
    items.sort(key=lambda item: item.path.name == IMAGE_TESTS)
