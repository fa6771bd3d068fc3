"""Prometheus metrics of every reidal server: per-RPC latency and counts, plus service gauges.

Naming follows Prometheus conventions with a ``reidal_`` prefix: durations are histograms in
seconds (``reidal_*_seconds``), events are counters (``reidal_*_total``). Metric objects are
created once per registry (:func:`counter`, :func:`histogram`, :func:`gauge` return the
existing one on a second call), because ``--service all`` puts several services, and tests
put several servers, into one process where a second registration would raise.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

#: Latency buckets (seconds) from 1 ms to 2 min: an RPC here is a health check (sub-ms), an
#: embedding batch (tens of ms to seconds) or a training-job call (up to minutes).
RPC_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
)

_lock = threading.Lock()
_created: dict[tuple[int, str], Any] = {}


def _get_or_create(kind: type, name: str, documentation: str, labelnames: Sequence[str],
                   registry: CollectorRegistry, **kwargs: Any) -> Any:
    key = (id(registry), name)
    with _lock:
        metric = _created.get(key)
        if metric is None:
            metric = kind(name, documentation, labelnames=tuple(labelnames), registry=registry,
                          **kwargs)
            _created[key] = metric
        elif not isinstance(metric, kind) or tuple(metric._labelnames) != tuple(labelnames):
            raise ValueError(f"metric {name!r} already exists with another type or labels")
        return metric


def counter(name: str, documentation: str, labelnames: Sequence[str] = (),
            registry: CollectorRegistry = REGISTRY) -> Counter:
    """A counter named ``name`` (exposed as ``name_total``), created on first use."""
    return _get_or_create(Counter, name, documentation, labelnames, registry)


def histogram(name: str, documentation: str, labelnames: Sequence[str] = (),
              registry: CollectorRegistry = REGISTRY,
              buckets: Sequence[float] = RPC_BUCKETS) -> Histogram:
    """A histogram named ``name`` (use a ``_seconds`` suffix for durations)."""
    return _get_or_create(Histogram, name, documentation, labelnames, registry,
                          buckets=tuple(buckets))


def gauge(name: str, documentation: str, labelnames: Sequence[str] = (),
          registry: CollectorRegistry = REGISTRY) -> Gauge:
    """A gauge (queue sizes, things in flight), created on first use."""
    return _get_or_create(Gauge, name, documentation, labelnames, registry)


@dataclass(frozen=True)
class RpcMetrics:
    """The per-RPC metrics the server interceptor records.

    ``reidal_rpc_seconds{service,method,code}``: latency histogram, from the call's start
    to its status (for a streaming response, until the last message is sent);
    ``reidal_rpc_total{service,method,code}``: finished calls;
    ``reidal_rpc_in_flight{service,method}``: calls running now.
    """

    seconds: Histogram
    total: Counter
    in_flight: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry = REGISTRY) -> RpcMetrics:
        labels = ("service", "method", "code")
        return cls(
            seconds=histogram("reidal_rpc_seconds", "gRPC call latency in seconds, per RPC "
                              "and status code", labels, registry),
            total=counter("reidal_rpc", "gRPC calls finished, per RPC and status code",
                          labels, registry),
            in_flight=gauge("reidal_rpc_in_flight", "gRPC calls running now",
                            ("service", "method"), registry),
        )

    def observe(self, service: str, method: str, code: str, seconds: float) -> None:
        self.seconds.labels(service, method, code).observe(seconds)
        self.total.labels(service, method, code).inc()


class MetricsHTTP:
    """A running ``/metrics`` HTTP endpoint; ``port`` is the bound port (useful with 0)."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host: str = server.server_address[0]
        self.port: int = server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_http(port: int, addr: str = "0.0.0.0",
                       registry: CollectorRegistry = REGISTRY) -> MetricsHTTP:
    """Serve the registry in Prometheus text format at ``http://addr:port/metrics``.

    ``port=0`` picks a free port (read it from the result). The default address listens on
    every interface because a Prometheus scraper runs on another host or pod;
    :func:`reidal.serve.serve` passes the gRPC host unless told otherwise.
    """
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return MetricsHTTP(server, thread)
