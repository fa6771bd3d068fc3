"""Every request field is checked at the gRPC edge (issue 15, findings 4, 8 and 9).

Over real loopback gRPC to a real ``serve``: model versions, page tokens, timestamps and
string lengths get INVALID_ARGUMENT naming the field, never INTERNAL; request bytes that do
not parse get INVALID_ARGUMENT without a traceback (UNAUTHENTICATED first when tokens are
on); error texts and logs never carry a huge value whole; the metrics endpoint listens on
the gRPC host. No Triton: the embedding backend is a closed port (the checks come first).
"""

from __future__ import annotations

import io
import json
import logging
import socket
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from _services_support import ingest_message, pictures

from reidal.auth import create_token
from reidal.cli import build_parser
from reidal.logs import JsonFormatter
from reidal.serve import serve
from reidal.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    common_pb2,
    constraints_pb2,
    constraints_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

C, K, E, T = collections_pb2, constraints_pb2, embedding_pb2, training_pb2
INVALID = grpc.StatusCode.INVALID_ARGUMENT
CLOSED_PORT = "127.0.0.1:1"
MEGABYTE = "x" * (1 << 20)


class Logs:
    """Every record of the process at DEBUG and above, as JSON lines, while in use."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()
        self.handler = logging.StreamHandler(self.buffer)
        self.handler.setFormatter(JsonFormatter())
        self.handler.setLevel(logging.DEBUG)

    def __enter__(self) -> Logs:
        root = logging.getLogger()
        self._level = root.level
        root.setLevel(logging.DEBUG)
        root.addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        root.removeHandler(self.handler)
        root.setLevel(self._level)

    @property
    def text(self) -> str:
        return self.buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator:
    srv = serve("all", data_dir=tmp_path_factory.mktemp("edge"), triton_url=CLOSED_PORT,
                model_name="m", health_interval_s=60)
    with grpc.insecure_channel(srv.address) as ch:
        col = collections_pb2_grpc.CollectionServiceStub(ch)
        col.CreateCollection(C.CreateCollectionRequest(collection_id="c"), timeout=10)
        pics = pictures()[:4]
        col.AddImages(iter([ingest_message("c", pics, defer=True)]), timeout=30)
        ids = [p.image_id for p in pics]
        srv.runtime.store.collections.set_model("c", "m", "1")
        vectors = np.random.default_rng(0).normal(size=(len(ids), 8))
        srv.runtime.store.images.put_vectors("c", "m", "1", ids, vectors / np.linalg.norm(
            vectors, axis=1, keepdims=True))
    try:
        yield srv
    finally:
        srv.stop(grace=0)


@pytest.fixture(scope="module")
def channel(server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def refusal(method, request, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        out = method(request, timeout=10, **kw)
        if not hasattr(out, "DESCRIPTOR"):
            next(iter(out))
    return info.value


def assert_invalid(method, request, *needles: str) -> str:
    err = refusal(method, request)
    assert err.code() == INVALID, (err.code(), err.details()[:300])
    for needle in needles:
        assert needle in err.details(), (needle, err.details())
    return err.details()


# ------------------------------------------------------------------------------ finding 4


@pytest.mark.parametrize("version", ["abc", "-5", "9" * 25, "03", "²", " 1"])
def test_bad_model_versions_are_invalid_argument_everywhere(server, channel, version):
    emb = embedding_pb2_grpc.EmbeddingServiceStub(channel)
    col = collections_pb2_grpc.CollectionServiceStub(channel)
    train = training_pb2_grpc.TrainingServiceStub(channel)
    ref = common_pb2.ModelRef(name="m", version=version)
    png = pictures()[0].png
    assert_invalid(emb.GetModel, E.GetModelRequest(model=ref), "model.version")
    assert_invalid(emb.Embed, E.EmbedRequest(model=ref, images=[
        common_pb2.Image(id="a", data=png)]), "model.version")
    assert_invalid(col.EmbedCollection, C.EmbedCollectionRequest(collection_id="c", model=ref),
                   "model.version")
    assert_invalid(train.PromoteModel, T.PromoteModelRequest(collection_id="c", model=ref),
                   "model.version")
    assert_invalid(col.CreateCollection, C.CreateCollectionRequest(
        collection_id="v-bad", model=ref), "model.version")
    with pytest.raises(LookupError):  # refused, not stored
        server.runtime.store.collections.get("v-bad")


def test_page_tokens_beyond_int64_are_invalid_argument(channel):
    col = collections_pb2_grpc.CollectionServiceStub(channel)
    cons = constraints_pb2_grpc.ConstraintServiceStub(channel)
    for token in ("9" * 25, "9223372036854775808", "²", "-1", "1e3"):
        assert_invalid(col.ListImages, C.ListImagesRequest(collection_id="c", page_token=token),
                       "page_token")
        assert_invalid(cons.ListConstraints, K.ListConstraintsRequest(
            collection_id="c", page_token=token), "page_token")
    assert col.ListImages(C.ListImagesRequest(collection_id="c", page_token=str(2**63 - 1)),
                          timeout=10).images == []


def test_out_of_range_timestamps_are_invalid_argument(server, channel):
    cons = constraints_pb2_grpc.ConstraintServiceStub(channel)
    a, b = (p.image_id for p in pictures()[:2])

    def answer(**times) -> K.SubmitConstraintsRequest:
        return K.SubmitConstraintsRequest(collection_id="c", answers=[K.AnswerInput(
            images=K.ImagePair(image_a=a, image_b=b), label=K.ANSWER_LABEL_SAME, **times)])

    from google.protobuf.timestamp_pb2 import Timestamp
    assert_invalid(cons.SubmitConstraints, answer(started_at=Timestamp(seconds=2**62)),
                   "answers[0].started_at")
    assert_invalid(cons.SubmitConstraints, answer(ended_at=Timestamp(seconds=1, nanos=-1)),
                   "answers[0].ended_at")
    assert_invalid(cons.SubmitConstraints, answer(ended_at=Timestamp(seconds=-2**40)),
                   "ended_at")
    assert server.runtime.store.collections.counts("c")["answers"] == 0  # nothing stored
    ok = cons.SubmitConstraints(answer(started_at=Timestamp(seconds=1_700_000_000),
                                       ended_at=Timestamp(seconds=1_700_000_001, nanos=5)),
                                timeout=10)
    assert ok.stored_count == 1


RAW = b"\xff\xff\xff\xff\x0f"  # a varint longer than 64 bits: no message parses from it


def _raw_call(ch: grpc.Channel, method: str, payload: bytes, streaming: bool, **kw):
    if streaming:
        call = ch.stream_stream(method, request_serializer=None, response_deserializer=None)
        return list(call(iter([payload]), timeout=10, **kw))
    return ch.unary_unary(method, request_serializer=None, response_deserializer=None)(
        payload, timeout=10, **kw)


@pytest.mark.parametrize("method,streaming", [
    ("/reidal.v1.CollectionService/GetCollection", False),
    ("/reidal.v1.ConstraintService/SubmitConstraints", False),
    ("/reidal.v1.CollectionService/AddImages", True),
    ("/reidal.v1.EmbeddingService/EmbedStream", True),
    ("/grpc.health.v1.Health/Check", False),
])
def test_unparseable_bytes_are_invalid_argument_without_traceback(channel, method, streaming):
    with Logs() as logs:
        with pytest.raises(grpc.RpcError) as info:
            _raw_call(channel, method, RAW, streaming)
    assert info.value.code() == INVALID, (info.value.code(), info.value.details())
    assert "does not parse" in info.value.details()
    assert "Traceback" not in logs.text and '"exc"' not in logs.text
    assert "INTERNAL" not in logs.text


def test_unparseable_bytes_with_tokens_are_unauthenticated_first(tmp_path):
    token, entry = create_token("reader", ["c"], "reader")
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [entry.to_json()]}))
    srv = serve(["collections", "constraints"], data_dir=tmp_path / "d", triton_url=CLOSED_PORT,
                model_name="m", health_interval_s=60, auth_tokens=path)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            for method, streaming in (("/reidal.v1.CollectionService/GetCollection", False),
                                      ("/reidal.v1.CollectionService/AddImages", True)):
                with pytest.raises(grpc.RpcError) as info:
                    _raw_call(ch, method, RAW, streaming)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # With a token limited to some collections: the parse error, not a refusal.
            md = (("authorization", f"Bearer {token}"),)
            with pytest.raises(grpc.RpcError) as info:
                _raw_call(ch, "/reidal.v1.CollectionService/GetCollection", RAW, False,
                          metadata=md)
            assert info.value.code() == INVALID
            # A huge collection id is refused by the token check first, its echo cut.
            col = collections_pb2_grpc.CollectionServiceStub(ch)
            err = refusal(col.GetCollection, C.GetCollectionRequest(collection_id=MEGABYTE),
                          metadata=md)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert len(err.details().encode()) <= 4096
    finally:
        srv.stop(grace=0)


# ------------------------------------------------------------------------------ finding 8


def test_a_megabyte_id_is_refused_with_the_id_truncated(channel):
    col = collections_pb2_grpc.CollectionServiceStub(channel)
    cons = constraints_pb2_grpc.ConstraintServiceStub(channel)
    train = training_pb2_grpc.TrainingServiceStub(channel)
    calls = [
        (col.GetCollection, C.GetCollectionRequest(collection_id=MEGABYTE), "collection_id"),
        (col.GetOperation, C.GetOperationRequest(operation_id=MEGABYTE), "operation_id"),
        (col.GetImage, C.GetImageRequest(collection_id="c", image_id=MEGABYTE), "image_id"),
        (train.GetJob, T.GetJobRequest(job_id=MEGABYTE), "job_id"),
        (cons.ExcludeImage, K.ExcludeImageRequest(collection_id="c", image_id="x",
                                                  reason=MEGABYTE), "reason"),
        (col.CreateCollection, C.CreateCollectionRequest(collection_id="s", species=MEGABYTE),
         "species"),
        (col.ListImages, C.ListImagesRequest(collection_id="c", filter=C.ImageFilter(
            image_ids=["ok", MEGABYTE])), "filter.image_ids[1]"),
    ]
    for method, request, field in calls:
        details = assert_invalid(method, request, field, "at most")
        assert len(details) < 1000, details[:200]


def test_huge_answer_fields_are_refused_and_never_stored_or_logged(server, channel):
    cons = constraints_pb2_grpc.ConstraintServiceStub(channel)
    a, b = (p.image_id for p in pictures()[2:4])
    good = K.AnswerInput(images=K.ImagePair(image_a=a, image_b=b), label=K.ANSWER_LABEL_DIFFERENT)
    before = server.runtime.store.collections.counts("c")["answers"]
    with Logs() as logs:
        for field, value in (("annotator_id", MEGABYTE), ("note", "n" * 5000)):
            bad = K.AnswerInput()
            bad.CopyFrom(good)
            setattr(bad, field, value)
            assert_invalid(cons.SubmitConstraints, K.SubmitConstraintsRequest(
                collection_id="c", answers=[good, bad]), f"answers[1].{field}")
        assert_invalid(cons.SubmitConstraints, K.SubmitConstraintsRequest(
            collection_id="c", answers=[good], request_id=MEGABYTE), "request_id")
        assert_invalid(cons.DeleteConstraint, K.DeleteConstraintRequest(
            collection_id="c", answer_id="1", actor=MEGABYTE), "actor")
    assert server.runtime.store.collections.counts("c")["answers"] == before
    assert "x" * 2000 not in logs.text and "n" * 2000 not in logs.text
    assert max(len(line) for line in logs.text.splitlines()) < 5000


def test_status_details_are_bounded_whatever_the_handler_says(server, channel):
    """A handler's own message naming a long (but allowed) value still fits a status."""
    cons = constraints_pb2_grpc.ConstraintServiceStub(channel)
    long_ids = [f"{k}-" + "p" * 250 for k in range(40)]  # 40 unknown pair ids, each allowed
    err = refusal(cons.SubmitConstraints, K.SubmitConstraintsRequest(
        collection_id="c", answers=[K.AnswerInput(pair_id=p, label=K.ANSWER_LABEL_SAME)
                                    for p in long_ids]))
    assert err.code() == grpc.StatusCode.NOT_FOUND, (err.code(), err.details()[:200])
    assert len(err.details().encode()) <= 4200


# ------------------------------------------------------------------------------ finding 9


def _local_ips() -> set[str]:
    """Addresses of this host other than loopback (none on an isolated machine)."""
    out = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            out.add(info[4][0])
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: picks the outgoing address
            out.add(s.getsockname()[0])
        except OSError:
            pass
    return {ip for ip in out if not ip.startswith("127.")}


def test_metrics_listen_on_the_grpc_host_unless_told_otherwise(tmp_path):
    srv = serve(["sampling"], data_dir=tmp_path, metrics_port=0, health_interval_s=60)
    try:
        assert srv.metrics_address == f"127.0.0.1:{srv.metrics_port}"
        for ip in _local_ips():  # not reachable from another interface
            with pytest.raises(OSError), socket.create_connection((ip, srv.metrics_port),
                                                                  timeout=2):
                pass
    finally:
        srv.stop(grace=0)
    srv = serve(["sampling"], data_dir=tmp_path, metrics_port=0, metrics_addr="0.0.0.0",
                health_interval_s=60)
    try:
        assert srv.metrics_address == f"0.0.0.0:{srv.metrics_port}"
    finally:
        srv.stop(grace=0)
    parser = build_parser()
    args = parser.parse_args(["serve", "--host", "127.0.0.1", "--metrics-port", "9090"])
    assert args.metrics_host is None  # None: the gRPC --host
    args = parser.parse_args(["serve", "--metrics-port", "9090", "--metrics-host", "0.0.0.0"])
    assert args.metrics_host == "0.0.0.0"
