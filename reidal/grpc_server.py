"""One way to run any reidal gRPC service: health, reflection, metrics, logs, clean shutdown.

Every reidal process serves through :func:`build_server`: ``--service embedding`` passes one
:class:`ServiceBinding`, ``--service all`` passes several on one port. What every server
gets, so that no servicer re-implements it:

- ``grpc.health.v1.Health`` with a status per registered service name and the overall
  ``""`` status (SERVING only when every service is). A binding may give a ``readiness``
  probe (e.g. "Triton reports the default model READY"); a background thread polls it every
  ``health_interval_s`` seconds, so Kubernetes readiness probes follow the backend.
- Server reflection (``grpc.reflection.v1alpha``) for every service, so grpcurl works.
- An interceptor that times every RPC into ``reidal_rpc_seconds`` / ``reidal_rpc_total``
  (:mod:`reidal.metrics`), logs one structured line per call, turns reidal's domain errors
  (:mod:`reidal.errors`) into the status codes they name, turns any other
  exception into INTERNAL with its message logged, and refuses calls whose deadline is
  already over. Status messages are cut to ``MAX_STATUS_DETAILS`` bytes and logged values
  to ``MAX_LOG_VALUE`` characters, whatever a handler put in them.
- Every request message checked against the API's limits (:mod:`reidal.request_checks`)
  after authentication and before the servicer: INVALID_ARGUMENT naming the field. Request
  bytes that do not parse get INVALID_ARGUMENT too (after UNAUTHENTICATED when tokens are
  on), not gRPC's INTERNAL with a traceback.
- Optional TLS (mutual with a client CA, :mod:`reidal.tls`) and access tokens checked on
  every call but health and reflection (:mod:`reidal.auth`), installed here for every
  service alike. ``max_message_mb`` bounds messages both ways (RESOURCE_EXHAUSTED beyond).
- Graceful stop: health goes NOT_SERVING first (load balancers stop routing), new calls
  are refused, calls in flight get ``grace`` seconds to finish.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from reidal import errors
from reidal.auth import Authorizer
from reidal.logs import (  # noqa: F401 - also served from here for older imports
    MAX_LOG_VALUE,
    JsonFormatter,
    bounded,
    configure_logging,
    log_kv,
)
from reidal.metrics import RpcMetrics
from reidal.request_checks import (
    UnparsedRequest,
    check_request,
    lenient,
    request_type_name,
)
from reidal.tls import ServerTLS

log = logging.getLogger("reidal.server")
rpc_log = logging.getLogger("reidal.rpc")

#: Longest status message sent (bytes of UTF-8): gRPC carries it in a header, and a header
#: beyond the client's limit turns any status into RESOURCE_EXHAUSTED.
MAX_STATUS_DETAILS = 4096

#: Services whose calls are logged at DEBUG only (probes every few seconds would drown the
#: log); they are still counted in the metrics.
QUIET_SERVICES = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME})


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of a reidal domain error, or None when ``exc`` is not one.

    The code is the one the error names (:mod:`reidal.errors`, where the mapping lives);
    this only turns its name into gRPC's enum.
    """
    name = errors.status_code(exc)
    return None if name is None else grpc.StatusCode[name]


def abort_with(context: grpc.ServicerContext, exc: Exception, prefix: str = "") -> None:
    """Abort the call with the status of domain error ``exc``, its message after ``prefix``
    (which says where in a stream it failed); re-raise anything else (raises either way)."""
    code = status_for(exc)
    if code is None:
        raise exc
    context.abort(code, _status_details(prefix + str(exc)))


@dataclass
class ServiceBinding:
    """One gRPC service to serve.

    name: the full proto service name (``"reidal.v1.EmbeddingService"``), used for health
        and reflection. servicer / add_to_server: the generated ``add_*_to_server`` and the
        object it registers. readiness: optional probe, True when the service can answer
        (called from the health thread; it should return within a few seconds and may
        raise, which counts as not ready). close: optional hook run after the server stopped.
    """

    name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.Server], None]
    readiness: Callable[[], bool] | None = None
    close: Callable[[], None] | None = None


# --------------------------------------------------------------------------- interceptor


def _split_method(full: str) -> tuple[str, str]:
    service, _, method = full.lstrip("/").rpartition("/")
    return service or "unknown", method or full


class _RpcObserver(grpc.ServerInterceptor):
    """Times, counts and logs every call; maps exceptions to status codes."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split_method(handler_call_details.method)
        if handler.unary_unary is not None:
            kind, behavior = "unary_unary", handler.unary_unary
        elif handler.unary_stream is not None:
            kind, behavior = "unary_stream", handler.unary_stream
        elif handler.stream_unary is not None:
            kind, behavior = "stream_unary", handler.stream_unary
        else:
            kind, behavior = "stream_stream", handler.stream_stream
        if getattr(behavior, "experimental_non_blocking", False):
            return handler  # callback-style handlers (health Watch) keep their own machinery
        wrap = self._wrap_stream if kind.endswith("_stream") else self._wrap_unary
        new_behavior = wrap(behavior, service, method)
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(
            new_behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap_unary(self, behavior, service: str, method: str):
        def call(request_or_iterator, context):
            start = self._begin(service, method, context)
            error: BaseException | None = None
            try:
                return behavior(request_or_iterator, context)
            except BaseException as exc:
                error = exc
                self._map_exception(exc, context, service, method)
                raise
            finally:
                self._end(service, method, context, start, error)

        return call

    def _wrap_stream(self, behavior, service: str, method: str):
        def call(request_or_iterator, context) -> Iterator[Any]:
            start = self._begin(service, method, context)
            error: BaseException | None = None
            try:
                yield from behavior(request_or_iterator, context)
            except GeneratorExit:  # the client went away before the stream ended
                error = None
                raise
            except BaseException as exc:
                error = exc
                self._map_exception(exc, context, service, method)
                raise
            finally:
                self._end(service, method, context, start, error)

        return call

    def _begin(self, service: str, method: str, context: grpc.ServicerContext) -> float:
        self._metrics.in_flight.labels(service, method).inc()
        start = time.perf_counter()
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            self._metrics.in_flight.labels(service, method).dec()
            self._end(service, method, context, start, None, count_in_flight=False,
                      code="DEADLINE_EXCEEDED")
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                          "the call's deadline had passed before it started")
        return start

    def _map_exception(self, exc: BaseException, context: grpc.ServicerContext,
                       service: str, method: str) -> None:
        """Abort with the right status unless the handler already chose one (raises)."""
        if isinstance(exc, grpc.RpcError) or not isinstance(exc, Exception):
            return
        if context.code() not in (None, grpc.StatusCode.OK):
            # context.abort() was called: its code stands, its message within bounds (the
            # status is sent after this returns, with the details the context holds then).
            details = context.details() or b""
            if len(details) > MAX_STATUS_DETAILS:
                context.set_details(_status_details(details.decode("utf-8", "replace")))
            return
        code = status_for(exc)
        if code is not None:
            context.abort(code, _status_details(str(exc)))
        log_kv(rpc_log, logging.ERROR, "rpc_exception", service=service, method=method,
               error=type(exc).__name__, detail=str(exc))
        rpc_log.error("unhandled exception in %s/%s", service, method, exc_info=exc)
        context.abort(grpc.StatusCode.INTERNAL,
                      _status_details(f"internal error: {type(exc).__name__}: {exc}"))

    def _end(self, service: str, method: str, context: grpc.ServicerContext, start: float,
             error: BaseException | None, *, count_in_flight: bool = True,
             code: str | None = None) -> None:
        seconds = time.perf_counter() - start
        if count_in_flight:
            self._metrics.in_flight.labels(service, method).dec()
        if code is None:
            status = context.code()
            if status is not None and status != grpc.StatusCode.OK:
                code = status.name
            elif error is not None:
                code = "UNKNOWN"
            elif not context.is_active():
                code = "DEADLINE_EXCEEDED" if context.time_remaining() <= 0 else "CANCELLED"
            else:
                code = "OK"
        self._metrics.observe(service, method, code, seconds)
        level = logging.DEBUG if service in QUIET_SERVICES else logging.INFO
        if code in ("INTERNAL", "UNKNOWN", "DATA_LOSS"):
            level = logging.ERROR
        if not rpc_log.isEnabledFor(level):  # the call's line is not wanted: skip its fields
            return
        fields: dict[str, object] = {"service": service, "method": method, "code": code,
                                     "ms": round(seconds * 1000.0, 2), "peer": context.peer()}
        if code != "OK":
            details = context.details()
            if details:
                fields["detail"] = bounded(details.decode("utf-8", "replace"), 500)
        log_kv(rpc_log, level, "rpc", **fields)


def _status_details(text: str) -> str:
    """A status message of at most MAX_STATUS_DETAILS bytes."""
    data = text.encode("utf-8")
    if len(data) <= MAX_STATUS_DETAILS:
        return text
    cut = data[:MAX_STATUS_DETAILS - 64].decode("utf-8", "ignore")
    return f"{cut}... (cut: {len(data)} bytes)"


class _RequestChecks(grpc.ServerInterceptor):
    """Refuses request messages outside the API's limits, and request bytes that do not
    parse, with INVALID_ARGUMENT (:mod:`reidal.request_checks`).

    Installed inside the token check, so an unauthenticated caller learns nothing about
    its request but UNAUTHENTICATED. The handler's deserializer is made lenient here: a
    deserializer that raises makes gRPC answer INTERNAL and log a traceback before any
    interceptor's code runs. Callback-style handlers (health Watch) are left as they are.
    """

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        kind = (f"{'stream' if handler.request_streaming else 'unary'}_"
                f"{'stream' if handler.response_streaming else 'unary'}")
        behavior = getattr(handler, kind)
        if getattr(behavior, "experimental_non_blocking", False):
            return handler
        type_name = request_type_name(handler.request_deserializer)

        if handler.request_streaming:
            def checked_stream(requests: Iterator[Any], context: grpc.ServicerContext):
                for index, request in enumerate(requests):
                    _check(request, context, f"message {index}: ")
                    yield request

            def call(requests, context):
                return behavior(checked_stream(requests, context), context)
        else:
            def call(request, context):
                _check(request, context)
                return behavior(request, context)

        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(call,
                       request_deserializer=lenient(handler.request_deserializer, type_name),
                       response_serializer=handler.response_serializer)


def _check(request: Any, context: grpc.ServicerContext, where: str = "") -> None:
    """Abort with INVALID_ARGUMENT when ``request`` did not parse or is outside the limits."""
    if isinstance(request, UnparsedRequest):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, where + request.message())
    if hasattr(request, "DESCRIPTOR"):
        try:
            check_request(request)
        except errors.InvalidArgument as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, where + str(exc))


# -------------------------------------------------------------------------------- server


class RunningServer:
    """A started gRPC server and its health state. Use as a context manager or call stop()."""

    def __init__(self, server: grpc.Server, port: int, host: str,
                 bindings: Sequence[ServiceBinding], health_servicer: health.HealthServicer,
                 health_interval_s: float) -> None:
        self.server = server
        self.port = port
        self.address = f"{host}:{port}"
        self.bindings = tuple(bindings)
        self.health = health_servicer
        self._serving: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._interval = health_interval_s
        self._poller = threading.Thread(target=self._poll_health, name="reidal-health",
                                        daemon=True)

    def _start(self) -> None:
        for b in self.bindings:
            self.set_serving(b.name, b.readiness is None)
        self._poller.start()

    def set_serving(self, service: str, serving: bool) -> None:
        """Set one service's health status; the overall ``""`` status follows all of them."""
        with self._lock:
            previous = self._serving.get(service)
            self._serving[service] = serving
            overall = all(self._serving.values())
            enum = health_pb2.HealthCheckResponse
            self.health.set(service, enum.SERVING if serving else enum.NOT_SERVING)
            self.health.set("", enum.SERVING if overall else enum.NOT_SERVING)
        if previous is not serving:  # log changes only; the first status is no alarm
            level = logging.INFO if serving or previous is None else logging.WARNING
            log_kv(log, level, "health", service=service,
                   status="SERVING" if serving else "NOT_SERVING")

    def is_serving(self, service: str = "") -> bool:
        with self._lock:
            if service == "":
                return all(self._serving.values())
            return self._serving.get(service, False)

    def check_health_now(self) -> None:
        """Run every readiness probe once, now, and publish the results."""
        for b in self.bindings:
            if b.readiness is None or self._stopping.is_set():
                continue
            try:
                ready = bool(b.readiness())
            except Exception as exc:  # a failing probe means "not ready", never a crash
                log_kv(log, logging.DEBUG, "readiness_error", service=b.name,
                       error=f"{type(exc).__name__}: {exc}")
                ready = False
            if not self._stopping.is_set():
                self.set_serving(b.name, ready)

    def _poll_health(self) -> None:
        while not self._stopping.is_set():
            self.check_health_now()
            self._stopping.wait(self._interval)

    def stop(self, grace: float | None = 10.0) -> None:
        """Stop gracefully: NOT_SERVING, refuse new calls, let calls in flight finish.

        Calls still running after ``grace`` seconds are cancelled. Idempotent; safe to call
        from a signal-handling thread.
        """
        with self._lock:
            if self._stopping.is_set():
                first = False
            else:
                first = True
                self._stopping.set()
        if not first:
            self._stopped.wait()
            return
        log_kv(log, logging.INFO, "server_stopping", address=self.address, grace_s=grace)
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self._poller.join(timeout=max(self._interval, 1.0) + 5.0)
        for b in self.bindings:
            if b.close is not None:
                try:
                    b.close()
                except Exception:
                    log.exception("closing service %s failed", b.name)
        log_kv(log, logging.INFO, "server_stopped", address=self.address)
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (e.g. by SIGTERM); True when it has."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=1.0)


def build_server(
    bindings: Sequence[ServiceBinding],
    *,
    address: str = "127.0.0.1:0",
    max_workers: int = 16,
    max_message_mb: float = 64,
    max_concurrent_rpcs: int | None = None,
    metrics: RpcMetrics | None = None,
    health_interval_s: float = 3.0,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    tls: ServerTLS | None = None,
    auth: Authorizer | None = None,
) -> RunningServer:
    """Create, bind and start a server for ``bindings`` on ``address`` (``host:0``: any port).

    max_workers: handler threads; each running call (a whole stream for streaming calls)
    holds one. max_concurrent_rpcs: beyond it new calls get RESOURCE_EXHAUSTED instead of
    queueing without bound (None: no limit). max_message_mb: largest request and response
    message. metrics: where RPC metrics go (default: the process-wide Prometheus registry).
    Binding an address already in use raises RuntimeError (SO_REUSEPORT is off, so two
    servers never silently share a port). tls: serve TLS (mutual when it has a client CA)
    instead of plaintext. auth: check access tokens on every call but health and reflection
    (:mod:`reidal.auth`); it runs inside the logging interceptor, so refusals are logged and
    counted like any other status, and outside the request checks, so it answers first.
    """
    if not bindings:
        raise ValueError("build_server needs at least one ServiceBinding")
    names = [b.name for b in bindings]
    if len(set(names)) != len(names):
        raise ValueError(f"service names must be unique, got {names}")
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    if health_interval_s <= 0:
        raise ValueError(f"health_interval_s must be > 0, got {health_interval_s}")
    limit = int(max_message_mb * 1024 * 1024)
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reidal-rpc"),
        interceptors=[_RpcObserver(metrics or RpcMetrics.create()),
                      *([auth] if auth is not None else []), _RequestChecks(), *interceptors],
        options=options,
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    for b in bindings:
        b.add_to_server(b.servicer, server)
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=2,
                                                            thread_name_prefix="reidal-health"),
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = (server.add_secure_port(address, tls.credentials()) if tls is not None
                else server.add_insecure_port(address))
    except RuntimeError as exc:
        raise RuntimeError(f"cannot bind gRPC server to {address}: {exc}") from None
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC server to {address}")
    host = address.rsplit(":", 1)[0]
    running = RunningServer(server, port, host, bindings, health_servicer, health_interval_s)
    server.start()
    running._start()
    log_kv(log, logging.INFO, "server_started", address=running.address, services=names,
           tls="mutual" if tls is not None and tls.mutual else "on" if tls else "off",
           auth="tokens" if auth is not None else "off")
    return running


def install_signal_handlers(running: RunningServer, grace: float = 30.0) -> None:
    """Stop ``running`` gracefully on SIGTERM (Kubernetes) and SIGINT (Ctrl-C).

    Call from the main thread, then block in ``running.wait()``. The stop runs in its own
    thread so the handler returns at once and in-flight calls keep their threads.
    """

    def handler(signum: int, _frame: object) -> None:
        log_kv(log, logging.INFO, "signal", signal=signal.Signals(signum).name, grace_s=grace)
        threading.Thread(target=running.stop, args=(grace,), name="reidal-stop",
                         daemon=False).start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def deadline_left(context: grpc.ServicerContext) -> float | None:
    """Seconds until the caller's deadline, or None when the call has no deadline."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e8:  # grpc reports "no deadline" as a huge number
        return None
    return max(float(remaining), 0.0)
