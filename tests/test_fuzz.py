"""Bounded, seeded fuzzing of every RPC of every reidal service over real loopback gRPC.

A real all-in-one server (``serve("all")``) embedding with the real bundled Triton gets,
for each of its RPCs, requests whose fields hold random values (ids that exist and ids that
do not, empty, huge and malformed strings, integer and float edge values, unknown enum
numbers, out-of-range timestamps, random and truncated image bytes) and request bytes that
are random or a valid message with bytes flipped. No call may end INTERNAL or UNKNOWN,
nothing may be logged with a traceback or as an unhandled exception, no log line may hold a
huge value, and every service is SERVING afterwards. The requests are made up front from
SEED, so a failure names what to replay.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from _services_support import SMALL_CLUSTERING, Stubs, ingest_message, pictures
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reidal.serve import serve
from reidal.v1 import (
    collections_pb2,
    constraints_pb2,
    embedding_pb2,
    sampling_pb2,
    training_pb2,
)

SEED = 15
#: Calls per RPC: requests with random field values, and random bytes on the wire.
FIELD_CALLS, BYTES_CALLS = 60, 20
#: How long a call that streams its answer is read (watch streams stay open).
STREAM_READ_S = 0.5
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
#: The collection deleted last (DeleteCollection runs after every other RPC).
LAST = "DeleteCollection"

SERVICES = [svc for mod in (collections_pb2, sampling_pb2, constraints_pb2, embedding_pb2,
                            training_pb2)
            for svc in mod.DESCRIPTOR.services_by_name.values()]

F = FieldDescriptor
_INT_RANGES = {
    F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_SINT32: (-2**31, 2**31 - 1),
    F.TYPE_SFIXED32: (-2**31, 2**31 - 1), F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1), F.TYPE_INT64: (-2**63, 2**63 - 1),
    F.TYPE_SINT64: (-2**63, 2**63 - 1), F.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}
_INTS = [0, 1, 2, 3, 5, 10, 1000, 1001, -1, -5, 2**31 - 1, -2**31, 2**32 - 1, 2**62,
         2**63 - 1, -2**63, 2**64 - 1, 253_402_300_800, -62_135_596_801, 10**9]
_FLOATS = [0.0, 0.5, 1.0, -1.0, 1e-9, 2.0, 1e308, -1e308, float("inf"), float("-inf"),
           float("nan"), 0.0002]


@dataclass
class World:
    """The ids that exist on the server, so random requests reach deep into handlers."""

    strings: list[str]
    images: list[bytes]


@dataclass
class Call:
    method: MethodDescriptor
    payloads: list[bytes]  # serialized requests (one per message of a request stream)
    shown: str  # what the request was, for a failure message


class Fuzzer:
    def __init__(self, rng: np.random.Generator, world: World) -> None:
        self.rng = rng
        self.world = world

    def pick(self, items):
        return items[int(self.rng.integers(len(items)))]

    def string(self) -> str:
        r = self.rng.random()
        if r < 0.45:
            return self.pick(self.world.strings)
        if r < 0.9:
            return self.pick(_STRINGS)
        if r < 0.97:
            n = int(self.rng.integers(1, 40))
            return "".join(chr(int(c)) for c in self.rng.integers(1, 0x2FFF, n))
        return "x" * (1 << 20)

    def bytes_value(self) -> bytes:
        r = self.rng.random()
        if r < 0.4:
            return self.pick(self.world.images)
        if r < 0.6:
            png = self.pick(self.world.images)
            return png[: int(self.rng.integers(1, len(png)))]
        return self.rng.bytes(int(self.rng.integers(0, 200)))

    def scalar(self, field: FieldDescriptor):
        t = field.type
        if t == F.TYPE_STRING:
            return self.string()
        if t == F.TYPE_BYTES:
            return self.bytes_value()
        if t == F.TYPE_BOOL:
            return bool(self.rng.integers(2))
        if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            return self.pick(_FLOATS) if self.rng.random() < 0.7 else float(self.rng.normal())
        if t == F.TYPE_ENUM:
            top = max(v.number for v in field.enum_type.values)
            return int(self.rng.integers(-1, top + 3))
        low, high = _INT_RANGES[t]
        value = self.pick(_INTS) if self.rng.random() < 0.7 else int(self.rng.integers(0, 50))
        return min(max(value, low), high)

    def message(self, desc: Descriptor, depth: int = 0) -> Message:
        msg = message_factory.GetMessageClass(desc)()
        for field in desc.fields:
            if self.rng.random() < 0.45:
                continue
            target = getattr(msg, field.name)
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                value_field = field.message_type.fields_by_name["value"]
                for _ in range(int(self.rng.integers(0, 4))):
                    key = self.scalar(field.message_type.fields_by_name["key"])
                    if value_field.message_type is not None:
                        target[key].CopyFrom(self.message(value_field.message_type, depth + 1))
                    else:
                        target[key] = self.scalar(value_field)
            elif field.is_repeated:
                for _ in range(int(self.rng.integers(0, 4))):
                    if field.message_type is not None:
                        if depth < 3:
                            target.add().CopyFrom(self.message(field.message_type, depth + 1))
                    else:
                        target.append(self.scalar(field))
            elif field.message_type is not None:
                if depth < 3:
                    getattr(msg, field.name).CopyFrom(self.message(field.message_type, depth + 1))
            else:
                setattr(msg, field.name, self.scalar(field))
        return msg

    def wire_bytes(self, method: MethodDescriptor) -> bytes:
        if self.rng.random() < 0.5:
            return self.rng.bytes(int(self.rng.integers(1, 120)))
        data = bytearray(self.message(method.input_type).SerializeToString())
        for _ in range(int(self.rng.integers(1, 4))):
            if data:
                data[int(self.rng.integers(len(data)))] = int(self.rng.integers(256))
        return bytes(data)

    def calls(self, method: MethodDescriptor) -> list[Call]:
        n_messages = (lambda: int(self.rng.integers(1, 4))) if method.client_streaming \
            else (lambda: 1)
        out = []
        for _ in range(FIELD_CALLS):
            msgs = [self.message(method.input_type) for _ in range(n_messages())]
            out.append(Call(method, [m.SerializeToString() for m in msgs],
                            " | ".join(str(m)[:300] for m in msgs)))
        for _ in range(BYTES_CALLS):
            raw = [self.wire_bytes(method) for _ in range(n_messages())]
            out.append(Call(method, raw, repr(raw)[:300]))
        return out


_STRINGS = ["", "abc", "-5", "9" * 25, "0", "1", "2", "03", "\u00b2", "\x00", " ", "*",
            "x" * 300, "\u00e9" * 257, "n" * 5000, "../../etc/passwd", "/etc/hostname",
            "file:///etc/hostname", "http://127.0.0.1:1/x", "2024-05-01", "not-a-date",
            "2024-05-01T06:30:00Z", "head", "full", "uniform", "disagreement", "similarity",
            "memory", "model", "SAME", "answer-1", "reidal_embedder", "m", "date", "viewpoint"]


def send(channel: grpc.Channel, call: Call) -> grpc.StatusCode:
    path = f"/{call.method.containing_service.full_name}/{call.method.name}"
    kind = (f"{'stream' if call.method.client_streaming else 'unary'}_"
            f"{'stream' if call.method.server_streaming else 'unary'}")
    stub = getattr(channel, kind)(path, request_serializer=None, response_deserializer=None)
    request = iter(call.payloads) if call.method.client_streaming else call.payloads[0]
    try:
        if call.method.server_streaming:
            responses = stub(request, timeout=STREAM_READ_S)
            for _ in responses:
                pass
        else:
            stub(request, timeout=30)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.text = io.StringIO()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.text.write(self.format(record) + "\n")


@pytest.fixture(scope="module")
def server(triton, tmp_path_factory) -> Iterator:
    srv = serve("all", data_dir=tmp_path_factory.mktemp("fuzz"), triton_url=triton.grpc_url,
                health_interval_s=60)
    try:
        yield srv
    finally:
        srv.stop(grace=1)


def _world(srv) -> World:
    """A collection "A" of 12 embedded images, a batch, an answer, an operation."""
    stubs = Stubs.connect(srv.address)
    try:
        pics = pictures()[:12]
        stubs.collections.CreateCollection(collections_pb2.CreateCollectionRequest(
            collection_id="A", clustering=SMALL_CLUSTERING), timeout=30)
        stubs.collections.AddImages(iter([ingest_message("A", pics)]), timeout=120)
        batch = stubs.sampling.GetQueryPairs(sampling_pb2.GetQueryPairsRequest(
            collection_id="A", budget=collections_pb2.Budget(count=4)), timeout=60)
        answers = stubs.constraints.SubmitConstraints(constraints_pb2.SubmitConstraintsRequest(
            collection_id="A", answers=[constraints_pb2.AnswerInput(
                pair_id=p.pair_id, label=constraints_pb2.ANSWER_LABEL_SAME)
                for p in batch.pairs[:2]]), timeout=30)
        op = stubs.sampling.StartQueryPairs(sampling_pb2.GetQueryPairsRequest(
            collection_id="A"), timeout=30)
    finally:
        stubs.close()
    strings = ["A", "A", "A", *(p.image_id for p in pics), batch.batch_id,
               *(p.pair_id for p in batch.pairs), *answers.answer_ids, op.operation_id]
    return World(strings, [p.png for p in pictures()[12:16]])


def _health_after(srv, channel: grpc.Channel, attempts: int = 10) -> dict[str, int]:
    """Every service's health status, probed again (a few times while a loaded machine's
    Triton probe times out) until all are SERVING or the attempts are spent."""
    health = health_pb2_grpc.HealthStub(channel)
    names = ["", *(svc.full_name for svc in SERVICES)]
    statuses: dict[str, int] = {}
    for _ in range(attempts):
        srv.running.check_health_now()
        statuses = {name: health.Check(health_pb2.HealthCheckRequest(service=name),
                                       timeout=10).status for name in names}
        if all(s == health_pb2.HealthCheckResponse.SERVING for s in statuses.values()):
            break
    return statuses


def test_fuzz_every_rpc_no_internal_and_still_serving(server):
    world = _world(server)
    fuzzer = Fuzzer(np.random.default_rng(SEED), world)
    methods = sorted((m for svc in SERVICES for m in svc.methods),
                     key=lambda m: (m.name == LAST, m.full_name))
    assert len(methods) >= 30
    calls = [c for m in methods for c in fuzzer.calls(m)]
    deletes = [c for c in calls if c.method.name == LAST]
    others = [c for c in calls if c.method.name != LAST]

    records = Records()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(records)
    root.setLevel(logging.INFO)
    failures: list[str] = []
    codes: dict[str, int] = {}
    try:
        with grpc.insecure_channel(server.address, options=[
                ("grpc.max_receive_message_length", 64 << 20)]) as ch:
            for batch in (others, deletes):
                with futures.ThreadPoolExecutor(6) as pool:
                    for call, code in zip(batch, pool.map(lambda c: send(ch, c), batch),
                                          strict=True):
                        codes[code.name] = codes.get(code.name, 0) + 1
                        if code in FORBIDDEN:
                            failures.append(f"{call.method.full_name} -> {code.name}: "
                                            f"{call.shown}")
            statuses = _health_after(server, ch)
    finally:
        root.removeHandler(records)
        root.setLevel(old_level)

    assert len(calls) >= 2000
    assert not failures, f"{len(failures)} call(s) ended badly (seed {SEED}):\n" + \
        "\n".join(failures[:10])
    serving = health_pb2.HealthCheckResponse.SERVING
    assert all(s == serving for s in statuses.values()), statuses
    unhandled = [r.getMessage()[:300] for r in records.records
                 if r.exc_info or r.name.startswith("grpc") and r.levelno >= logging.ERROR
                 or "rpc_exception" in r.getMessage()]
    assert not unhandled, unhandled[:5]
    longest = max(len(line) for line in records.text.getvalue().splitlines())
    assert longest < 10_000, longest
    assert codes.get("INVALID_ARGUMENT", 0) > 100 and codes.get("OK", 0) > 50, codes


def test_fuzz_requests_are_reproducible():
    """The same seed makes the same requests (a failure can be replayed)."""
    world = World(["A", "i0"], [b"\x89PNG\r\n\x1a\n"])
    method = constraints_pb2.DESCRIPTOR.services_by_name["ConstraintService"] \
        .methods_by_name["SubmitConstraints"]

    def one() -> list[Call]:
        return Fuzzer(np.random.default_rng(SEED), world).calls(method)

    assert [c.payloads for c in one()] == [c.payloads for c in one()]
