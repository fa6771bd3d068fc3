"""EmbeddingService end to end: real gRPC on loopback, the real bundled Triton (``triton``).

Vectors are checked against plain torch on the served model (``triton.reference``) fed by
Pillow's own decoder and the shared preprocess function, not against reidal's decoding.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from prometheus_client import REGISTRY, CollectorRegistry

from reidal.embedding.embedder import ImageEmbedder, ImageItem
from reidal.embedding.images import ImageLimits
from reidal.embedding.preprocess import preprocess
from reidal.errors import Cancelled, DeadlineExceeded
from reidal.grpc_server import RunningServer, build_server
from reidal.metrics import RpcMetrics
from reidal.services.embedding import SERVICE_NAME, EmbeddingServicer
from reidal.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc


def _synthetic(seed: int, h: int, w: int) -> np.ndarray:
    """A smooth random colour field plus noise: distinct per seed, any size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * (rng.random() * xx + rng.random() * yy) + rng.random() * 6)
                     for _ in range(3)], axis=-1)
    img = 127 + 100 * base + rng.normal(0, 10, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt != "PNG" else {}))
    return buf.getvalue()


def _png_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def rpc_registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture(scope="module")
def service(triton, rpc_registry, tmp_path_factory
            ) -> Iterator[tuple[RunningServer, EmbeddingServicer]]:
    # batch_size 5 with the fixture's max_batch_size 8: requests span several batches;
    # URIs may name the tests' temporary files.
    servicer = EmbeddingServicer(ImageEmbedder(
        triton.grpc_url, triton.model_name, batch_size=5,
        limits=ImageLimits(allowed_roots=(str(tmp_path_factory.getbasetemp()),))))
    running = build_server([servicer.binding()], metrics=RpcMetrics.create(rpc_registry),
                           health_interval_s=60)
    try:
        yield running, servicer
    finally:
        running.stop(grace=1)


@pytest.fixture(scope="module")
def channel(service) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(service[0].address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel) -> embedding_pb2_grpc.EmbeddingServiceStub:
    return embedding_pb2_grpc.EmbeddingServiceStub(channel)


@pytest.fixture(scope="module")
def encoded() -> list[tuple[str, bytes]]:
    """Nine images of varied sizes in all three formats, with unsorted ids."""
    shapes = [(60, 80), (128, 128), (200, 90), (33, 47), (150, 150), (96, 64), (70, 140),
              (128, 64), (40, 40)]
    fmts = ["PNG", "JPEG", "WEBP"]
    return [(f"img-{(7 * i) % 9}-{fmts[i % 3].lower()}", _encode(_synthetic(i, h, w),
                                                                fmts[i % 3]))
            for i, (h, w) in enumerate(shapes)]


def _request(items: list[tuple[str, bytes]], model: str = "") -> embedding_pb2.EmbedRequest:
    return embedding_pb2.EmbedRequest(
        model=common_pb2.ModelRef(name=model),
        images=[common_pb2.Image(id=i, data=d) for i, d in items])


def _vectors(resp: embedding_pb2.EmbedResponse) -> np.ndarray:
    return np.array([list(e.vector) for e in resp.embeddings], dtype=np.float32)


def _reference(triton, items: list[tuple[str, bytes]]) -> np.ndarray:
    pictures = [Image.open(io.BytesIO(d)).convert("RGB") for _, d in items]
    return triton.reference(preprocess(pictures, triton.spec))


def _error(call, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kw)
        if not isinstance(result, embedding_pb2.EmbedResponse | embedding_pb2.ModelInfo):
            list(result)
    return info.value


def test_embed_matches_torch_and_keeps_ids_in_order(triton, stub, encoded, tmp_path: Path):
    path = tmp_path / "from-disk.png"
    path.write_bytes(encoded[0][1])
    request = _request(encoded)
    request.images.append(common_pb2.Image(id="by-path", uri=str(path)))
    resp = stub.Embed(request, timeout=60)
    assert [e.id for e in resp.embeddings] == [i for i, _ in encoded] + ["by-path"]
    assert resp.model_name == triton.model_name and resp.model_version == "1"
    got = _vectors(resp)
    ref = _reference(triton, encoded)
    assert resp.dim == ref.shape[1] == got.shape[1]
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got[:-1], ref, atol=1e-4)
    np.testing.assert_allclose(got[-1], got[0], rtol=0, atol=1e-6)  # same file: bytes, path
    # Distinct images give distinct vectors (the check above is not trivially true).
    assert np.abs(ref @ ref.T - np.eye(len(ref))).max() < 0.9999


def test_same_image_gives_identical_vectors(stub, encoded):
    _, data = encoded[3]
    one = stub.Embed(_request([("a", data), ("b", data)]), timeout=60)
    two = stub.Embed(_request([("c", data)]), timeout=60)
    va, vb = _vectors(one)
    np.testing.assert_array_equal(va, vb)  # same batch: bit for bit
    # Another batch size may pick other CPU kernels: equal up to float32 rounding.
    np.testing.assert_allclose(va, _vectors(two)[0], rtol=0, atol=1e-6)


def test_embed_stream_answers_each_request_in_order(stub, encoded):
    groups = [encoded[0:4], encoded[4:5], encoded[5:9]]
    responses = list(stub.EmbedStream(iter(_request(g) for g in groups), timeout=60))
    assert [[e.id for e in r.embeddings] for r in responses] == [[i for i, _ in g]
                                                                  for g in groups]
    unary = _vectors(stub.Embed(_request(encoded), timeout=60))
    np.testing.assert_allclose(np.concatenate([_vectors(r) for r in responses]), unary,
                               atol=1e-6)


def test_list_and_get_model(triton, stub):
    listed = stub.ListModels(embedding_pb2.ListModelsRequest(), timeout=30)
    assert listed.default_model == triton.model_name
    mine = [m for m in listed.models if m.name == triton.model_name]
    assert len(mine) == 1
    m = mine[0]
    dim = triton.reference(np.zeros((1, 3, *triton.spec.input_size), np.float32)).shape[1]
    assert (m.version, m.state, m.ready, m.is_default) == ("1", "READY", True, True)
    assert (m.dim, m.input_height, m.input_width) == (dim, *triton.spec.input_size)
    assert m.max_batch_size == triton.max_batch_size
    got = stub.GetModel(embedding_pb2.GetModelRequest(), timeout=30)  # default model
    assert (got.name, got.version, got.ready, got.dim) == (triton.model_name, "1", True, dim)
    err = _error(stub.GetModel, embedding_pb2.GetModelRequest(
        model=common_pb2.ModelRef(name="no_such_model")), timeout=30)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "no_such_model" in err.details()
    err = _error(stub.GetModel, embedding_pb2.GetModelRequest(
        model=common_pb2.ModelRef(name=triton.model_name, version="99")), timeout=30)
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_bad_requests_fail_whole_and_name_the_items(stub, encoded):
    good = encoded[:6]
    bad = [*good[:2], ("broken", b"not an image at all"), *good[2:],
           ("bomb", _png_bomb(50_000, 1_000))]
    err = _error(stub.Embed, _request(bad), timeout=60)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'broken'" in err.details() and "'bomb'" in err.details()
    assert "2 of 8 image(s) rejected, nothing was embedded" in err.details()

    cases = [
        ([("a", good[0][1]), ("", good[1][1])], "position 1 has an empty id"),
        ([("a", good[0][1]), ("b", good[1][1]), ("a", good[2][1])], "'a' appears more"),
        ([], "no images"),
    ]
    for items, message in cases:
        err = _error(stub.Embed, _request(items), timeout=30)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in err.details()
    no_source = embedding_pb2.EmbedRequest(images=[common_pb2.Image(id="empty")])
    err = _error(stub.Embed, no_source, timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'empty'" in err.details()
    err = _error(stub.Embed, embedding_pb2.EmbedRequest(
        images=[common_pb2.Image(id="gone", uri="/no/such/file.jpg")]), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'gone'" in err.details()

    err = _error(stub.Embed, _request(good[:1], model="no_such_model"), timeout=30)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "no_such_model" in err.details()

    # In a stream, the bad request ends the stream; answers before it arrive.
    requests = [_request(good[:2]), _request([("x", b"junk")]), _request(good[2:3])]
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for resp in stub.EmbedStream(iter(requests), timeout=60):
            got.append(resp)
    assert len(got) == 1 and [e.id for e in got[0].embeddings] == [i for i, _ in good[:2]]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("request 1: ") and "'x'" in info.value.details()


def test_deadline_and_cancellation_are_honoured(service, stub, rpc_registry, encoded):
    embedder = service[1].embedder
    items = [ImageItem(i, data=d) for i, d in encoded]
    with pytest.raises(DeadlineExceeded, match="after 0 of 9 images"):
        embedder.embed(items, deadline=time.monotonic() - 0.01)
    with pytest.raises(Cancelled, match="after 0 of 9 images"):
        embedder.embed(items, is_active=lambda: False)
    # Over gRPC: 200 images (40 Triton batches) cannot finish in 50 ms; the server notices.
    many = [(f"m{k}", encoded[k % len(encoded)][1]) for k in range(200)]
    err = _error(stub.Embed, _request(many), timeout=0.05)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    labels = {"service": SERVICE_NAME, "method": "Embed", "code": "DEADLINE_EXCEEDED"}
    stop = time.monotonic() + 10
    while not rpc_registry.get_sample_value("reidal_rpc_total", labels):
        assert time.monotonic() < stop, "the server never recorded the deadline"
        time.sleep(0.05)


def test_health_reflection_and_metrics(service, channel, stub, rpc_registry, encoded):
    running, _ = service
    running.check_health_now()
    health = health_pb2_grpc.HealthStub(channel)
    for name in (SERVICE_NAME, ""):
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING, name

    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(refl.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
    ]), timeout=10))
    assert SERVICE_NAME in {s.name for s in answers[0].list_services_response.service}
    assert answers[1].file_descriptor_response.file_descriptor_proto  # grpcurl describe works

    labels = {"service": SERVICE_NAME, "method": "Embed", "code": "OK"}
    before = rpc_registry.get_sample_value("reidal_rpc_total", labels) or 0.0
    images_before = REGISTRY.get_sample_value("reidal_embedding_images_total",
                                              {"model": "reidal_embedder"}) or 0.0
    stub.Embed(_request(encoded[:3]), timeout=60)
    assert rpc_registry.get_sample_value("reidal_rpc_total", labels) == before + 1
    assert rpc_registry.get_sample_value("reidal_rpc_seconds_count", labels) == before + 1
    assert REGISTRY.get_sample_value("reidal_embedding_images_total",
                                     {"model": "reidal_embedder"}) == images_before + 3


def test_triton_down_is_unavailable_then_recovers(triton, service, stub, encoded):
    running, _ = service
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(running.address))
    request = _request(encoded[:2])
    expected = _vectors(stub.Embed(request, timeout=60))
    triton.server.stop()
    try:
        err = _error(stub.Embed, request, timeout=30)
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert f"Triton at {triton.grpc_url} is unreachable" in err.details()
        err = _error(stub.ListModels, embedding_pb2.ListModelsRequest(), timeout=30)
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        running.check_health_now()
        status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        triton.server.start()
    # Same gRPC server, same servicer: it reconnects by itself.
    np.testing.assert_array_equal(_vectors(stub.Embed(request, timeout=60)), expected)
    running.check_health_now()
    status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
