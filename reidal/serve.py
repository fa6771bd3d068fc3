"""Serve any set of reidal services on one port: ``serve(ServeConfig(services=["sampling"]))``,
``serve(["sampling"], data_dir=...)`` or ``serve("all", ...)``.

What to start is one :class:`~reidal.serve_config.ServeConfig` (its fields, defaults,
flags and environment variables are in reidal/serve_config.py).

Every service runs through the same code path, alone or together: one
:class:`~reidal.runtime.Runtime` (store, blobs, embedder, locks, operations) per process,
one :class:`~reidal.grpc_server.ServiceBinding` per service name, one
:func:`~reidal.grpc_server.build_server` call (health per service, reflection, metrics,
interceptor, graceful stop).

Embedding for ingest, in this order of preference:

1. ``embedding_url``: a separate EmbeddingService (``--service embedding`` elsewhere);
2. ``triton_url``: Triton's gRPC endpoint; the EmbeddingServicer runs in this process (and
   is served too when "embedding" is among the services);
3. ``start_triton``: the model repository is written into ``data_dir/model_repository``
   (the default model, once) and the Triton server bundled with nvidia-pytriton is started
   on free ports, with its log in ``data_dir/triton``; it stops with the server. If it
   dies meanwhile, a :class:`~reidal.triton_supervisor.TritonSupervisor` starts it again
   on the same ports (with backoff) and loads again the models loaded since.

Everything durable is in ``data_dir``: ``reidal.sqlite3`` (SQLite, WAL), ``blobs/`` (the
image bytes) and, with ``start_triton``, the model repository. With ``database_url``
(``postgresql://...``) the store is that PostgreSQL database instead of the SQLite file, so
several server processes (replicas) can share it; they must share ``data_dir/blobs`` too.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reidal.auth import Authorizer, TokenFile
from reidal.blobs import BlobStore
from reidal.embedding.decode_budget import MIB, DecodeBudget
from reidal.embedding.embedder import ImageEmbedder
from reidal.embedding.images import ImageLimits
from reidal.embedding.triton_repo import ensure_default_model
from reidal.embedding.triton_server import TritonServer
from reidal.embedding.triton_versions import triton_loader
from reidal.grpc_server import RunningServer, ServiceBinding, build_server
from reidal.logs import configure_logging, log_kv
from reidal.metrics import MetricsHTTP, start_metrics_http
from reidal.notify_pg import PgNotifications
from reidal.runtime import Notifier, OperationRunner, Runtime
from reidal.serve_config import (  # noqa: F401 - SERVICES, resolve_services: re-exported
    PAGE_SERVICES,
    SERVICES,
    STATEFUL,
    ServeConfig,
    resolve_services,
)
from reidal.services.collections import CollectionsServicer
from reidal.services.constraints import ConstraintsServicer
from reidal.services.embedding import EmbeddingServicer
from reidal.services.embedding_client import RemoteEmbedder
from reidal.services.sampling import SamplingServicer
from reidal.services.training import TrainingServicer
from reidal.store import Store
from reidal.tls import ServerTLS, https_context, own_server_channel
from reidal.training_jobs import TrainingJobs
from reidal.triton_supervisor import TritonSupervisor
from reidal.web import start_review_http

log = logging.getLogger("reidal.serve")

@dataclass
class Started:
    """What :func:`serve` started (and :meth:`ReidalServer.stop` stops)."""

    runtime: Runtime | None
    embedder: Any
    triton: Any  # reidal.embedding.triton_server.TritonServer or None
    metrics_http: MetricsHTTP | None
    review_http: Any = None  # reidal.web.ReviewHTTP or None
    triton_supervisor: Any = None  # reidal.triton_supervisor.TritonSupervisor or None


class ReidalServer:
    """A running reidal process: the gRPC server and what it owns.

    ``address`` / ``port``: where it listens. ``triton_url``: the Triton it embeds with
    (None without embedding). ``stop()`` ends streams, stops the server gracefully, then
    operations, the store, the metrics endpoint and a Triton it started. Use as a context
    manager, or :meth:`serve_forever` in a CLI.
    """

    def __init__(self, running: RunningServer, started: Started, services: list[str],
                 data_dir: Path | None, triton_url: str | None, grace_s: float = 30.0) -> None:
        self.running = running
        self.grace_s = grace_s
        self.services = services
        self.data_dir = data_dir
        self.triton_url = triton_url
        self._started = started
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._stopping = False

    @property
    def address(self) -> str:
        return self.running.address

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def runtime(self) -> Runtime | None:
        return self._started.runtime

    @property
    def metrics_port(self) -> int | None:
        m = self._started.metrics_http
        return m.port if m is not None else None

    @property
    def metrics_address(self) -> str | None:
        """``host:port`` the metrics endpoint listens on (None when not served)."""
        m = self._started.metrics_http
        return f"{m.host}:{m.port}" if m is not None else None

    @property
    def http_url(self) -> str | None:
        """Where the pair-review web page is (None when not served)."""
        page = self._started.review_http
        return page.url if page is not None else None

    @property
    def http_port(self) -> int | None:
        page = self._started.review_http
        return page.port if page is not None else None

    def stop(self, grace: float | None = 10.0) -> None:
        """Graceful stop (idempotent, callable from any thread)."""
        with self._lock:
            if self._stopping:
                first = False
            else:
                self._stopping = first = True
        if not first:
            self._stopped.wait()
            return
        s = self._started
        try:
            if s.review_http is not None:
                s.review_http.close()  # no new page requests while the gRPC server drains
            if s.runtime is not None:
                s.runtime.notifier.close()  # watch streams end now instead of at the grace
            self.running.stop(grace)
            if s.runtime is not None:
                s.runtime.close()
                s.runtime.store.close()
            if s.embedder is not None:
                s.embedder.close()
            if s.metrics_http is not None:
                s.metrics_http.close()
            if s.triton is not None:
                s.triton.stop()  # first: it ends a restart the supervisor has in progress
            if s.triton_supervisor is not None:
                s.triton_supervisor.stop()
        finally:
            self._stopped.set()
            log_kv(log, logging.INFO, "reidal_stopped", address=self.address)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stopped; True when it has."""
        return self._stopped.wait(timeout)

    def serve_forever(self, grace: float | None = None) -> None:
        """Stop gracefully on SIGTERM / SIGINT and block until stopped (main thread only);
        calls in flight get ``grace`` seconds (None: the config's ``grace_s``)."""
        grace = self.grace_s if grace is None else grace

        def handler(signum: int, _frame: object) -> None:
            log_kv(log, logging.INFO, "signal", signal=signal.Signals(signum).name, grace_s=grace)
            threading.Thread(target=self.stop, args=(grace,), name="reidal-stop").start()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        while not self.wait(1.0):
            pass

    def __enter__(self) -> ReidalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=1.0)


def _start_triton(data_dir: Path, model_name: str, startup_timeout_s: float) -> Any:

    repo = data_dir / "model_repository"
    if ensure_default_model(repo, model_name):
        log_kv(log, logging.INFO, "wrote_default_model", path=str(repo), model=model_name)
    server = TritonServer(repo, models=[model_name], workdir=data_dir / "triton",
                          startup_timeout_s=startup_timeout_s)
    server.start()
    log_kv(log, logging.INFO, "triton_started", grpc=server.grpc_url, repo=str(repo))
    return server


def build_bindings(names: Sequence[str], runtime: Runtime | None,
                   embedding_servicer: Any = None, training: Any = None) -> list[ServiceBinding]:
    """One binding per service name, all sharing ``runtime`` (``training``: the
    :class:`reidal.training_jobs.TrainingJobs` of the training service)."""

    makers: dict[str, Callable[[], ServiceBinding]] = {
        "collections": lambda: CollectionsServicer(runtime).binding(),
        "sampling": lambda: SamplingServicer(runtime).binding(),
        "constraints": lambda: ConstraintsServicer(runtime).binding(),
        "training": lambda: _training_binding(training),
    }
    out = []
    for name in names:
        if name == "embedding":
            binding = embedding_servicer.binding()
            binding.close = None  # the embedder is shared; ReidalServer.stop closes it
            out.append(binding)
        else:
            out.append(makers[name]())
    return out


def _training_binding(training: Any) -> ServiceBinding:

    return TrainingServicer(training).binding()


def serve(config: ServeConfig | str | Sequence[str] = "all", /, **fields: Any) -> ReidalServer:
    """Start what ``config`` (a :class:`~reidal.serve_config.ServeConfig`) says and return
    the running server. ``serve(services, **fields)`` is short for
    ``serve(ServeConfig(services=services, **fields))``, and ``serve(config, **fields)`` for
    ``serve(config.replace(**fields))``.

    Raises ValueError for a bad combination or an unreadable TLS / tokens file,
    RuntimeError when the address cannot be bound; nothing is left running on failure.
    """
    c = (config.replace(**fields) if isinstance(config, ServeConfig)
         else ServeConfig(services=config, **fields))
    names = resolve_services(c.services)
    if c.log_level is not None:
        configure_logging(c.log_level, json_lines=c.log_json)
    _check_security(c, names)
    limits = ImageLimits(allowed_roots=tuple(str(r) for r in c.image_roots or ()))
    # Read the TLS and token files first: a wrong path fails before anything starts.
    tls = None if c.tls_cert is None else ServerTLS.from_files(c.tls_cert, c.tls_key,
                                                              c.tls_client_ca)
    tokens = None if c.auth_tokens is None else TokenFile(c.auth_tokens)
    page = _PageTLS()
    if c.http_port is not None and tls is not None:
        assert c.tls_cert is not None and c.tls_key is not None
        page.ssl = https_context(c.tls_cert, c.tls_key, tls.client_ca)
        page.credentials, page.options = own_server_channel(tls, c.review_client_cert,
                                                            c.review_client_key)
    root = Path(c.data_dir) if c.data_dir is not None else None
    needs_embedding = _check_state(c, names, root)

    started = Started(None, None, None, None)
    triton_url = c.triton_url
    try:
        embedding_servicer = None
        if needs_embedding:
            embedding_servicer, triton_url = _start_embedder(c, root, limits, started)
        if STATEFUL & set(names):
            assert root is not None
            started.runtime = _start_runtime(c, root, limits, started.embedder)
        training = _training_jobs(c, started, triton_url) if "training" in names else None
        bindings = build_bindings(names, started.runtime, embedding_servicer, training)
        running = build_server(bindings, address=c.address, max_workers=c.max_workers,
                               max_message_mb=c.max_message_mb,
                               max_concurrent_rpcs=c.max_concurrent_rpcs,
                               metrics=c.rpc_metrics, health_interval_s=c.health_interval_s,
                               tls=tls, auth=None if tokens is None
                               else Authorizer(tokens, _owners(started.runtime)))
        try:
            _start_http(c, running, started, tokens, page)
        except BaseException:
            running.stop(grace=0)
            raise
    except BaseException:
        _cleanup(started)
        raise
    running.check_health_now()  # health answers the probes' result from the first call on
    log_kv(log, logging.INFO, "reidal_serving", address=running.address, services=names,
           data_dir=str(root) if root else "", triton=triton_url or "",
           store=started.runtime.store.describe() if started.runtime else "",
           embedding=c.embedding_url or "", image_roots=list(limits.allowed_roots or ()),
           review_page=started.review_http.url if started.review_http else "")
    return ReidalServer(running, started, names, root,
                        triton_url if needs_embedding and c.embedding_url is None else None,
                        grace_s=c.grace_s)


@dataclass
class _PageTLS:
    """How the review page serves HTTPS and calls the TLS gRPC port (all None without TLS)."""

    ssl: Any = None
    credentials: grpc.ChannelCredentials | None = None
    options: list[tuple[str, str]] = field(default_factory=list)


def _check_security(c: ServeConfig, names: list[str]) -> None:
    """The TLS and review-page combinations :func:`serve` refuses (ValueError)."""
    if c.http_port is not None and not PAGE_SERVICES <= set(names):
        raise ValueError("the review page (http_port) needs the collections, sampling and "
                         "constraints services in this process")
    if (c.tls_cert is None) != (c.tls_key is None):
        raise ValueError("TLS needs both tls_cert and tls_key")
    if c.tls_client_ca is not None and c.tls_cert is None:
        raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
    if (c.review_client_cert is None) != (c.review_client_key is None):
        raise ValueError("the review page's client certificate needs both review_client_cert "
                         "and review_client_key")
    if c.review_client_cert is not None and c.tls_client_ca is None:
        raise ValueError("review_client_cert / review_client_key are for mutual TLS: pass "
                         "tls_client_ca too, or leave them out")
    if c.http_port is not None and c.tls_client_ca is not None and c.review_client_cert is None:
        raise ValueError("under mutual TLS (tls_client_ca) the review page (http_port) must "
                         "present a client certificate to the gRPC port like every client: "
                         "pass review_client_cert and review_client_key (signed by the client "
                         "CA), or http_port=None")


def _check_state(c: ServeConfig, names: list[str], root: Path | None) -> bool:
    """Refuse (ValueError) services without the state or embedder they need; True when a
    served service embeds images."""
    stateful = [n for n in names if n in STATEFUL]
    needs_embedding = bool({"embedding", "collections", "training"} & set(names))
    if stateful and root is None:
        raise ValueError(f"service(s) {stateful} keep state: pass data_dir")
    if "embedding" in names and c.embedding_url is not None:
        raise ValueError("the embedding service embeds with Triton: pass triton_url or "
                         "start_triton, not embedding_url")
    local = needs_embedding and c.embedding_url is None and c.triton_url is None
    if local and not c.start_triton:
        raise ValueError("embedding needs triton_url, embedding_url or start_triton=True")
    if local and root is None:
        raise ValueError("start_triton writes its model repository into data_dir: pass data_dir")
    return needs_embedding


def _start_embedder(c: ServeConfig, root: Path | None, limits: ImageLimits,
                    started: Started) -> tuple[Any, str | None]:
    """The embedder (into ``started``): a client of the separate embedding service, or an
    ImageEmbedder on Triton (the bundled one started first when no URL is given), which
    the EmbeddingServicer returned wraps. Returns the servicer (None for a remote
    embedder) and the Triton URL embedded with."""
    if c.embedding_url is not None:
        started.embedder = RemoteEmbedder(c.embedding_url, c.model_name,
                                          max_message_mb=c.max_message_mb,
                                          credentials=c.embedding_credentials,
                                          token=c.embedding_token)
        return None, c.triton_url
    triton_url = c.triton_url
    if triton_url is None:
        assert root is not None
        started.triton = _start_triton(root, c.model_name, c.triton_startup_timeout_s)
        triton_url = started.triton.grpc_url
        started.triton_supervisor = TritonSupervisor(started.triton).start()
    started.embedder = ImageEmbedder(
        triton_url, c.model_name, batch_size=c.embed_batch_size, limits=limits,
        decode_budget=DecodeBudget(int(c.decode_budget_mb * MIB), c.decode_wait_s))
    return EmbeddingServicer(started.embedder), triton_url


def _start_runtime(c: ServeConfig, root: Path, limits: ImageLimits, embedder: Any) -> Runtime:
    """The store (operations a previous process left running are failed), blobs, notifier
    and operation runner the stateful services share."""
    store = Store(root) if c.database_url is None else Store(database_url=c.database_url)
    aborted = store.operations.fail_unfinished(
        "the server stopped while the operation ran; start it again")
    if aborted:
        log_kv(log, logging.WARNING, "operations_aborted", count=aborted)
    notifier = Notifier()
    operations = OperationRunner(store, notifier, workers=c.operation_workers)
    runtime = Runtime(store, BlobStore(root / "blobs"), embedder, notifier, operations,
                      image_limits=limits, ingest_batch=c.embed_batch_size)
    if c.database_url is not None:  # the other replicas' watch streams wake at once
        runtime.notifications = PgNotifications(c.database_url, notifier)
    return runtime


def _training_jobs(c: ServeConfig, started: Started, triton_url: str | None) -> Any:
    """The training service's jobs: where new versions go and how Triton loads them."""

    assert started.runtime is not None
    repo, loader = c.model_repository, c.load_model
    if started.triton is not None:
        repo = repo if repo is not None else started.triton.model_repository
        loader = loader or started.triton.load_versions  # records the new stubs
    if loader is None and triton_url is not None:
        loader = triton_loader(triton_url, repo)
    return TrainingJobs(started.runtime, repo, loader, c.model_name)


def _start_http(c: ServeConfig, running: RunningServer, started: Started,
                tokens: TokenFile | None, page: _PageTLS) -> None:
    """The metrics endpoint and the review page, when asked for (into ``started``)."""
    if c.metrics_port is not None:
        started.metrics_http = start_metrics_http(
            c.metrics_port,
            c.metrics_addr if c.metrics_addr is not None else _host(running.address))
    if c.http_port is None:
        return

    target = _page_target(running.address)
    if page.credentials is not None:
        _check_page_channel(target, page.credentials, page.options,
                            mutual=c.tls_client_ca is not None)
    started.review_http = start_review_http(
        target, host=_host(running.address), port=c.http_port,
        auth_required=tokens is not None,
        pinned_annotator=None if tokens is None else _pinned_annotator(tokens),
        ssl_context=page.ssl, credentials=page.credentials, channel_options=page.options)


def _owners(runtime: Runtime | None) -> dict[str, Callable[[str], str]]:
    """How the token check finds the collection of an operation or a training job."""
    if runtime is None:
        return {}
    store = runtime.store
    return {"operation_id": lambda i: store.operations.get(i).collection_id,
            "job_id": lambda i: store.jobs.get(i).collection_id}


def _pinned_annotator(tokens: TokenFile) -> Callable[[str], str]:
    """Token -> the annotator it pins ("" when none or unknown): the review page fills its
    name field with it (the Authorizer refuses any other name)."""

    def pinned(token: str) -> str:
        entry = tokens.lookup(token)
        return entry.annotator if entry is not None else ""

    return pinned


def _check_page_channel(target: str, credentials: grpc.ChannelCredentials,
                        options: list[tuple[str, str]], *, mutual: bool) -> None:
    """One health call over the review page's TLS channel before the page starts, so a
    client certificate the gRPC port refuses fails the start with the handshake's reason
    instead of every page request later. Health needs no token."""

    with grpc.secure_channel(target, credentials, options=options) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=10)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                hint = ("; check that review_client_cert is a client certificate signed "
                        "by tls_client_ca") if mutual else ""
                raise ValueError(f"the review page cannot call this server's TLS gRPC port "
                                 f"at {target} ({exc.details()}){hint}") from None


def _page_target(address: str) -> str:
    """The gRPC address the review page calls: this server, over loopback when it
    listens on every interface."""
    host, port = address.rsplit(":", 1)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


def _cleanup(started: Started) -> None:
    for step in (
        lambda: started.review_http and started.review_http.close(),
        lambda: started.runtime and started.runtime.close(),
        lambda: started.runtime and started.runtime.store.close(),
        lambda: started.embedder and started.embedder.close(),
        lambda: started.metrics_http and started.metrics_http.close(),
        lambda: started.triton and started.triton.stop(),
        lambda: started.triton_supervisor and started.triton_supervisor.stop(),
    ):
        try:
            step()
        except Exception:
            log.exception("cleanup after a failed start")


def _host(address: str) -> str:
    """The host of a gRPC ``host:port`` address, without an IPv6 address's brackets."""
    return address.rsplit(":", 1)[0].strip("[]")
