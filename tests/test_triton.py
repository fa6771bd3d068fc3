"""The embedding model served by a real Triton (bundled in nvidia-pytriton) and the client.

Every expected vector comes from the plain torch model, run in this process.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import psutil
import pytest

from reidal.embedding.model import build_default_model
from reidal.embedding.preprocess import preprocess
from reidal.embedding.spec import default_spec
from reidal.embedding.triton_client import (
    ModelNotFound,
    TritonEmbedder,
    TritonUnavailable,
)
from reidal.embedding.triton_repo import write_model_repository
from reidal.embedding.triton_server import TritonServer, TritonStartError

ATOL = 1e-4


@pytest.fixture
def embedder(triton):
    with TritonEmbedder(triton.grpc_url, triton.spec, timeout_s=60) as client:
        yield client


def _batch(images, spec, n):
    return preprocess(images[:n], spec)


def _success_count(triton, name: str, version: str = "") -> int:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        stats = client.get_inference_statistics(name, version, as_json=True)
    finally:
        client.close()
    return sum(int(s["inference_stats"]["success"].get("count", 0)) for s in stats["model_stats"])


def test_embed_matches_plain_torch(triton, embedder, sample_images):
    batch = _batch(sample_images, triton.spec, 6)
    result = embedder.embed(batch)
    want = triton.reference(batch)
    assert result.vectors.dtype == np.float32
    assert result.vectors.shape == (6, 256)
    np.testing.assert_allclose(result.vectors, want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    assert (result.model_name, result.model_version) == (triton.model_name, "1")
    # Different pictures give different vectors (the model is not collapsed).
    sims = result.vectors @ result.vectors.T
    assert sims[np.triu_indices(6, 1)].max() < 0.999


def test_batch_larger_than_max_batch_size_is_split(triton, embedder, sample_images):
    n = 2 * triton.max_batch_size + 3
    batch = _batch(sample_images, triton.spec, n)
    before = _success_count(triton, triton.model_name)
    result = embedder.embed(batch)
    # Triton bumps its statistics just after answering: give them a moment under load.
    deadline = time.monotonic() + 5
    while (requests := _success_count(triton, triton.model_name) - before) < 3:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert requests == 3  # 8 + 8 + 3, in order
    assert result.vectors.shape == (n, 256)
    np.testing.assert_allclose(result.vectors, triton.reference(batch), atol=ATOL, rtol=0)


def test_empty_batch_and_bad_input(triton, embedder, sample_images):
    empty = np.zeros((0, *triton.spec.input_shape), np.float32)
    assert embedder.embed(empty).vectors.shape == (0, 256)
    with pytest.raises(ValueError, match="shape"):
        embedder.embed(np.zeros((2, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="floating"):
        embedder.embed(np.zeros((2, *triton.spec.input_shape), np.uint8))
    bad = _batch(sample_images, triton.spec, 2)
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        embedder.embed(bad)


def test_list_models_info_and_spec_discovery(triton, embedder):
    models = embedder.list_models()
    # the versions served (Triton also lists versions a test loaded and removed again)
    ours = [m for m in models if m.name == triton.model_name and m.ready]
    assert [m.version for m in ours] == ["1"]
    info = ours[0]
    assert info.ready and info.state == "READY"
    assert (info.dim, info.input_size, info.max_batch_size) == (256, triton.spec.input_size, 8)
    assert embedder.model_info() == info
    assert embedder.is_ready() and embedder.is_ready(triton.model_name, "1")
    assert not embedder.is_ready("no_such_model")
    assert embedder.server_ready()
    # The client discovers the whole preprocessing from the model config.
    assert embedder.spec_from_triton() == triton.spec
    # ...and a client built without a spec works from the config alone.
    with TritonEmbedder(triton.grpc_url) as bare:
        assert bare.embed(np.zeros((1, *triton.spec.input_shape), np.float32)).vectors.shape == (1, 256)


def test_unknown_model_or_version_is_model_not_found(triton, embedder):
    batch = np.zeros((1, *triton.spec.input_shape), np.float32)
    with pytest.raises(ModelNotFound, match="no_such_model"):
        embedder.embed(batch, model="no_such_model")
    with pytest.raises(ModelNotFound):
        embedder.embed(batch, version="7")
    with pytest.raises(ModelNotFound):
        embedder.model_info("no_such_model")
    with pytest.raises(ModelNotFound):
        embedder.spec_from_triton("no_such_model")


def test_explicit_model_control_serves_a_new_version(triton, embedder, sample_images):
    batch = _batch(sample_images, triton.spec, 4)
    v1 = embedder.embed(batch, version="1").vectors
    trained = build_default_model(seed=1, input_size=triton.spec.input_size)
    model_dir = write_model_repository(
        triton.repo, model_name=triton.model_name, version=2, model=trained, spec=triton.spec,
        max_batch_size=triton.max_batch_size,
    )
    try:
        assert not embedder.is_ready(triton.model_name, "2")  # explicit mode: not yet loaded
        triton.server.load_model(triton.model_name)
        versions = [m.version for m in embedder.list_models() if m.name == triton.model_name and m.ready]
        assert versions == ["1", "2"]  # the config keeps the newest two loaded
        v2 = embedder.embed(batch, version="2")
        assert v2.model_version == "2"
        np.testing.assert_allclose(v2.vectors, triton.reference(batch, trained), atol=ATOL, rtol=0)
        assert np.abs(v2.vectors - v1).max() > 0.1
        # no version named: the model's default version, not the newest (issue 15)
        assert embedder.embed(batch).model_version == "1"
        again = embedder.embed(batch, version="1")
        np.testing.assert_allclose(again.vectors, v1, atol=ATOL, rtol=0)
    finally:
        shutil.rmtree(model_dir / "2", ignore_errors=True)
        # A restart, not a reload: Triton would keep listing version 2 (UNAVAILABLE) and
        # report the server not ready to every later test of the session.
        triton.server.restart()
    assert embedder.embed(batch).model_version == "1"
    assert not embedder.is_ready(triton.model_name, "2")


def test_server_down_then_back_on_the_same_ports(triton, embedder, sample_images):
    batch = _batch(sample_images, triton.spec, 3)
    before = embedder.embed(batch).vectors
    server = triton.server
    ports = (server.grpc_port, server.http_port, server.metrics_port)
    pids = [server.pid] + [c.pid for c in server._children]
    try:
        server.stop()
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
        with pytest.raises(TritonUnavailable, match=triton.grpc_url):
            embedder.embed(batch)
        assert not embedder.server_ready()
    finally:
        server.start()
    assert (server.grpc_port, server.http_port, server.metrics_port) == ports
    after = embedder.embed(batch)  # the same client object, not rebuilt
    np.testing.assert_allclose(after.vectors, before, atol=ATOL, rtol=0)


def test_unreachable_url_is_unavailable():
    from reidal.embedding.triton_server import free_ports

    with TritonEmbedder(f"127.0.0.1:{free_ports(1)[0]}", timeout_s=5) as client:
        with pytest.raises(TritonUnavailable, match="127.0.0.1"):
            client.embed(np.zeros((1, *default_spec().input_shape), np.float32))
        assert not client.server_ready()


def test_start_failure_reports_the_log(tmp_path):
    (tmp_path / "repo").mkdir()
    server = TritonServer(tmp_path / "repo", models=["missing_model"], workdir=tmp_path / "w",
                          startup_timeout_s=60)
    with pytest.raises(TritonStartError, match="missing_model"):
        server.start()
    assert not server.running
