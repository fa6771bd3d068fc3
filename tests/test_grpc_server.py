"""The generic server framework on real loopback gRPC, with a raw-bytes probe service.

The probe service is registered through the same ServiceBinding path every reidal
service uses, so what is checked here (status mapping, metrics, health, reflection,
graceful stop, SIGTERM) holds for all of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from reidal import errors
from reidal.grpc_server import RunningServer, ServiceBinding, build_server
from reidal.metrics import RpcMetrics, start_metrics_http

SERVICE = "reidal.test.Probe"


def _add_probe(name: str, server: grpc.Server) -> None:
    def echo(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        return req

    def sleep(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        time.sleep(float(req.decode()))
        return b"slept"

    def not_found(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        raise errors.NotFound(f"model {req.decode()!r} does not exist")

    def crash(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        raise RuntimeError("boom")

    def denied(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "no")

    def count(req: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(req.decode())):
            yield str(i).encode()
        if req == b"3":
            raise errors.InvalidArgument("three is too many")

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
        "NotFound": grpc.unary_unary_rpc_method_handler(not_found),
        "Crash": grpc.unary_unary_rpc_method_handler(crash),
        "Denied": grpc.unary_unary_rpc_method_handler(denied),
        "Count": grpc.unary_stream_rpc_method_handler(count),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


def _probe_binding(ready: threading.Event | None = None, name: str = SERVICE) -> ServiceBinding:
    """The probe service; its "servicer" is its name, as add_to_server receives it."""
    return ServiceBinding(name, name, _add_probe,
                          readiness=None if ready is None else ready.is_set)


@pytest.fixture()
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture()
def server(registry: CollectorRegistry) -> Iterator[RunningServer]:
    with build_server([_probe_binding()], metrics=RpcMetrics.create(registry)) as running:
        yield running


def _call(server: RunningServer, method: str, payload: bytes = b"", **kw: object) -> bytes:
    with grpc.insecure_channel(server.address) as ch:
        return ch.unary_unary(f"/{SERVICE}/{method}")(payload, **kw)


def _code(server: RunningServer, method: str, payload: bytes = b"",
          **kw: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        _call(server, method, payload, **kw)
    return info.value.code(), info.value.details()


def _count(registry: CollectorRegistry, method: str, code: str) -> float:
    labels = {"service": SERVICE, "method": method, "code": code}
    return registry.get_sample_value("reidal_rpc_total", labels) or 0.0


def test_status_mapping_and_metrics(server: RunningServer, registry: CollectorRegistry) -> None:
    assert _call(server, "Echo", b"hi") == b"hi"
    assert _code(server, "NotFound", b"m1") == (grpc.StatusCode.NOT_FOUND,
                                                "model 'm1' does not exist")
    code, details = _code(server, "Crash")
    assert code == grpc.StatusCode.INTERNAL and "RuntimeError: boom" in details
    assert _code(server, "Denied") == (grpc.StatusCode.PERMISSION_DENIED, "no")
    with grpc.insecure_channel(server.address) as ch:
        stream = ch.unary_stream(f"/{SERVICE}/Count")
        assert list(stream(b"2")) == [b"0", b"1"]
        got = []
        with pytest.raises(grpc.RpcError) as info:
            for msg in stream(b"3"):
                got.append(msg)
        assert got == [b"0", b"1", b"2"]  # what was sent before the error still arrives
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for method, code in [("Echo", "OK"), ("NotFound", "NOT_FOUND"), ("Crash", "INTERNAL"),
                         ("Denied", "PERMISSION_DENIED"), ("Count", "OK"),
                         ("Count", "INVALID_ARGUMENT")]:
        assert _count(registry, method, code) == 1.0, (method, code)
        labels = {"service": SERVICE, "method": method, "code": code}
        assert registry.get_sample_value("reidal_rpc_seconds_count", labels) == 1.0
    assert registry.get_sample_value("reidal_rpc_in_flight",
                                     {"service": SERVICE, "method": "Echo"}) == 0.0


def test_deadline_is_reported(server: RunningServer, registry: CollectorRegistry) -> None:
    code, _ = _code(server, "Sleep", b"0.5", timeout=0.1)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 3
    while _count(registry, "Sleep", "DEADLINE_EXCEEDED") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _count(registry, "Sleep", "DEADLINE_EXCEEDED") == 1.0


def test_metrics_http_endpoint(server: RunningServer, registry: CollectorRegistry) -> None:
    _call(server, "Echo", b"x")
    http = start_metrics_http(0, addr="127.0.0.1", registry=registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http.port}/metrics", timeout=5) as r:
            text = r.read().decode()
    finally:
        http.close()
    assert f'reidal_rpc_total{{code="OK",method="Echo",service="{SERVICE}"}} 1.0' in text
    assert "reidal_rpc_seconds_bucket{" in text


def test_health_follows_readiness_and_reflection_lists_services(
        registry: CollectorRegistry) -> None:
    ready = threading.Event()
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    other = "reidal.test.Other"  # no probe: always SERVING; "" needs both
    with build_server([_probe_binding(ready), _probe_binding(name=other)],
                      metrics=RpcMetrics.create(registry), health_interval_s=60) as running, \
            grpc.insecure_channel(running.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)

        def status(name: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status

        running.check_health_now()
        assert (status(SERVICE), status(other), status("")) == (not_serving, serving,
                                                                not_serving)
        ready.set()
        running.check_health_now()
        assert (status(SERVICE), status(other), status("")) == (serving, serving, serving)
        assert ch.unary_unary(f"/{other}/Echo")(b"2", timeout=5) == b"2"  # both on one port
        with pytest.raises(grpc.RpcError) as info:
            status("no.such.Service")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answer = next(refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in answer.list_services_response.service}
        assert {SERVICE, other, "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_graceful_stop_lets_calls_in_flight_finish(registry: CollectorRegistry) -> None:
    running = build_server([_probe_binding()], metrics=RpcMetrics.create(registry))
    result: dict[str, object] = {}

    def slow_call() -> None:
        try:
            result["reply"] = _call(running, "Sleep", b"1.0", timeout=10)
        except grpc.RpcError as exc:
            result["error"] = exc.code()

    caller = threading.Thread(target=slow_call)
    caller.start()
    time.sleep(0.3)  # the call is running on the server now
    start = time.monotonic()
    running.stop(grace=5)
    caller.join(timeout=10)
    assert result == {"reply": b"slept"}
    assert time.monotonic() - start < 4.5  # stop returned when the call ended, not at grace
    code, _ = _code(running, "Echo", timeout=2)
    assert code == grpc.StatusCode.UNAVAILABLE


def test_bind_conflict_and_bad_arguments(server: RunningServer) -> None:
    with pytest.raises(RuntimeError, match="cannot bind"):
        build_server([_probe_binding()], address=server.address,
                     metrics=RpcMetrics.create(CollectorRegistry()))
    with pytest.raises(ValueError, match="unique"):
        build_server([_probe_binding(), _probe_binding()])
    with pytest.raises(ValueError, match="at least one"):
        build_server([])


_SIGTERM_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_grpc_server import _probe_binding
    from reidal.grpc_server import build_server, install_signal_handlers
    running = build_server([_probe_binding()])
    install_signal_handlers(running, grace=10)
    print(running.port, flush=True)
    running.wait()
    print("stopped", flush=True)
""")


def test_sigterm_stops_gracefully() -> None:
    script = _SIGTERM_SCRIPT.format(tests=os.path.dirname(__file__))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        result: dict[str, object] = {}

        def slow_call() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                result["reply"] = ch.unary_unary(f"/{SERVICE}/Sleep")(b"1.0", timeout=10)

        caller = threading.Thread(target=slow_call)
        caller.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        caller.join(timeout=10)
        assert result == {"reply": b"slept"}
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read().strip() == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_log_lines_are_structured(caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging

    from reidal.logs import JsonFormatter, log_kv

    logger = logging.getLogger("reidal.test")
    with caplog.at_level(logging.INFO, logger="reidal.test"):
        log_kv(logger, logging.INFO, "rpc", method="Embed", detail='bad "x" here', n=3,
               services=["a", "b"])
    record = caplog.records[-1]
    assert record.getMessage() == 'rpc method=Embed detail="bad \\"x\\" here" n=3 services=a,b'
    assert record.funcName == "test_log_lines_are_structured"  # the caller, not log_kv
    parsed = json.loads(JsonFormatter().format(record))
    assert parsed["event"] == "rpc" and parsed["detail"] == 'bad "x" here' and parsed["n"] == 3
    assert parsed["level"] == "info" and parsed["logger"] == "reidal.test"
