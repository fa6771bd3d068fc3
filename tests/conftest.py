"""Shared fixtures. ``triton`` starts the real Triton server bundled in nvidia-pytriton once per
test session (about 5-10 s), serving the default embedding model at _model_support.TEST_INPUT_SIZE;
no fake Triton anywhere.

Heavy imports (torch, tritonclient) happen inside the fixtures, so test files that use none
of them do not pay for them.

``REIDAL_TEST_ORDER=reverse`` runs each module's tests in reverse order (modules in their
usual order), so a test that only passes after an earlier one created some state (a
collection, a file, a server setting) fails; see the README's "Testing".
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from _image_build import BUILD_KEY, IMAGE, ImageBuild, image_tests_last, wanted
from _model_support import TEST_INPUT_SIZE

#: Environment variable choosing the test order: unset or "" = as written, "reverse" =
#: each module's tests backwards.
ORDER_ENV = "REIDAL_TEST_ORDER"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With $REIDAL_TEST_ORDER=reverse, reverse the tests within each module in place; then
    test_image.py's tests go last (they wait for the image build started beside the suite)."""
    order = os.environ.get(ORDER_ENV, "").strip()
    if order not in ("", "reverse"):
        raise pytest.UsageError(f"{ORDER_ENV} must be 'reverse' or unset, got {order!r}")
    if order == "reverse":
        by_module: dict[str, list[pytest.Item]] = {}
        for item in items:
            by_module.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
        items[:] = [item for group in by_module.values() for item in reversed(group)]
    image_tests_last(items)

if TYPE_CHECKING:
    from PIL import Image

    from reidal.embedding.model import EmbeddingNet
    from reidal.embedding.spec import ModelSpec
    from reidal.embedding.triton_server import TritonServer

def pytest_collection_finish(session: pytest.Session) -> None:
    """Start `make image` now when `make test` asked for it (REIDAL_IMAGE_BUILD=1), so it
    runs beside the suite; test_image.py, run last, waits for it."""
    config = session.config
    if config.option.collectonly or not wanted(session.items):
        return
    build = ImageBuild.start(IMAGE)
    config.stash[BUILD_KEY] = build
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"building {IMAGE} in the background for test_image.py "
                            f"(make image, log: {build.log})")


def pytest_sessionfinish(session: pytest.Session) -> None:
    build = session.config.stash.get(BUILD_KEY, None)
    if build is not None:
        build.stop()


#: max_batch_size of the test model: small, so tests of batch splitting stay cheap.
TEST_MAX_BATCH_SIZE = 8


@dataclass
class TritonFixture:
    """A running Triton serving ``model_name`` version 1 = ``model`` (the torch reference).

    ``server.stop()`` / ``server.start()`` restart it on the same ports; a test that changes
    the repository or the server must put them back as it found them.
    """

    server: TritonServer
    repo: Path
    model_name: str
    spec: ModelSpec
    model: EmbeddingNet
    max_batch_size: int

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    @property
    def http_url(self) -> str:
        return self.server.http_url

    def reference(self, batch: np.ndarray, model: Any = None) -> np.ndarray:
        """Plain-torch embeddings of a preprocessed batch (the served model by default)."""
        import torch

        with torch.inference_mode():
            return (model or self.model)(torch.from_numpy(batch)).numpy()


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonFixture]:
    from reidal.embedding.model import build_default_model
    from reidal.embedding.spec import default_spec
    from reidal.embedding.triton_repo import write_model_repository
    from reidal.embedding.triton_server import TritonServer

    base = tmp_path_factory.mktemp("triton")
    repo = base / "model_repository"
    spec = default_spec(input_size=TEST_INPUT_SIZE)
    model = build_default_model(seed=0, input_size=spec.input_size)
    write_model_repository(
        repo, model_name=spec.name, version=1, model=model, spec=spec,
        max_batch_size=TEST_MAX_BATCH_SIZE,
    )
    server = TritonServer(repo, models=[spec.name], workdir=base / "server")
    server.start()
    try:
        yield TritonFixture(server, repo, spec.name, spec, model, TEST_MAX_BATCH_SIZE)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sample_images() -> list[Image.Image]:
    """24 varied real-photo crops (scikit-learn's two bundled sample photos), seeded."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(1234)
    crops = []
    for name in ("china.jpg", "flower.jpg"):
        photo = load_sample_image(name)
        for _ in range(12):
            h = int(rng.integers(48, 300))
            w = int(rng.integers(48, 300))
            y = int(rng.integers(0, photo.shape[0] - h))
            x = int(rng.integers(0, photo.shape[1] - w))
            crops.append(Image.fromarray(photo[y : y + h, x : x + w]))
    return crops


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A real PostgreSQL server for the session (tests/_postgres_support.py; ~1 s to start),
    or a skip naming what is missing."""
    from _postgres_support import start_postgres

    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def postgres_url(postgres: Any) -> Iterator[str]:
    """The URL of a fresh, empty database of the session's server (dropped afterwards)."""
    with postgres.database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's store lives, once per backend: ``Store.open(store_target)``."""
    if request.param == "sqlite":
        return str(tmp_path / "store")
    return request.getfixturevalue("postgres_url")
