"""Serve any set of reidal services on one port: ``serve(["sampling"])`` or ``serve("all")``.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from reidal.auth import Authorizer, TokenFile
from reidal.blobs import BlobStore
from reidal.embedding.decode_budget import DEFAULT_BUDGET_MB, DEFAULT_WAIT_S, MIB, DecodeBudget
from reidal.embedding.images import ImageLimits
from reidal.embedding.spec import DEFAULT_MODEL_NAME
from reidal.grpc_server import RunningServer, ServiceBinding, build_server, log_kv
from reidal.metrics import MetricsHTTP, RpcMetrics, start_metrics_http
from reidal.runtime import Notifier, OperationRunner, Runtime
from reidal.store import Store
from reidal.tls import ServerTLS, https_context, own_server_channel
from reidal.triton_supervisor import TritonSupervisor

log = logging.getLogger("reidal.serve")

#: Every service name ``serve`` knows, in the order "all" registers them.
SERVICES: tuple[str, ...] = ("embedding", "collections", "sampling", "constraints", "training")
#: Services that need the durable store (a data directory).
STATEFUL = frozenset({"collections", "sampling", "constraints", "training"})
#: What the review page (http_port) calls: these services must run in the same process.
PAGE_SERVICES = frozenset({"collections", "sampling", "constraints"})


def resolve_services(services: str | Sequence[str]) -> list[str]:
    """``"all"`` -> every service; a name or names -> checked, deduplicated, in SERVICES order."""
    names = [services] if isinstance(services, str) else list(services)
    if "all" in names:
        return list(SERVICES)
    unknown = sorted(set(names) - set(SERVICES))
    if unknown or not names:
        raise ValueError(f"unknown service(s) {unknown or names}: choose from "
                         f"{', '.join(SERVICES)} or 'all'")
    return [s for s in SERVICES if s in names]


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
                 data_dir: Path | None, triton_url: str | None) -> None:
        self.running = running
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

    def serve_forever(self, grace: float = 30.0) -> None:
        """Stop gracefully on SIGTERM / SIGINT and block until stopped (main thread only)."""

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
    from reidal.embedding.triton_repo import name_pretrained_default, write_model_repository
    from reidal.embedding.triton_server import TritonServer

    repo = data_dir / "model_repository"
    if not (repo / model_name / "config.pbtxt").exists():
        log_kv(log, logging.INFO, "writing_model_repository", path=str(repo), model=model_name)
        write_model_repository(repo, model_name=model_name)
    else:
        name_pretrained_default(repo, model_name)
    server = TritonServer(repo, models=[model_name], workdir=data_dir / "triton",
                          startup_timeout_s=startup_timeout_s)
    server.start()
    log_kv(log, logging.INFO, "triton_started", grpc=server.grpc_url, repo=str(repo))
    return server


def build_bindings(names: Sequence[str], runtime: Runtime | None,
                   embedding_servicer: Any = None, training: Any = None) -> list[ServiceBinding]:
    """One binding per service name, all sharing ``runtime`` (``training``: the
    :class:`reidal.training_jobs.TrainingJobs` of the training service)."""
    from reidal.services.collections import CollectionsServicer
    from reidal.services.constraints import ConstraintsServicer
    from reidal.services.sampling import SamplingServicer

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
    from reidal.services.training import TrainingServicer

    return TrainingServicer(training).binding()


def serve(
    services: str | Sequence[str] = "all",
    *,
    address: str = "127.0.0.1:0",
    data_dir: str | Path | None = None,
    database_url: str | None = None,
    triton_url: str | None = None,
    start_triton: bool = True,
    embedding_url: str | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    metrics_port: int | None = None,
    metrics_addr: str | None = None,
    max_workers: int = 16,
    max_message_mb: float = 64,
    max_concurrent_rpcs: int | None = None,
    health_interval_s: float = 3.0,
    embed_batch_size: int = 32,
    operation_workers: int = 1,
    triton_startup_timeout_s: float = 180.0,
    rpc_metrics: RpcMetrics | None = None,
    model_repository: str | Path | None = None,
    load_model: Callable[..., Any] | None = None,
    http_port: int | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    tls_client_ca: str | Path | None = None,
    auth_tokens: str | Path | None = None,
    embedding_credentials: Any = None,
    embedding_token: str | None = None,
    review_client_cert: str | Path | None = None,
    review_client_key: str | Path | None = None,
    image_roots: Sequence[str | Path] | None = None,
    decode_budget_mb: float = DEFAULT_BUDGET_MB,
    decode_wait_s: float = DEFAULT_WAIT_S,
) -> ReidalServer:
    """Start ``services`` (names, or "all") on ``address`` and return the running server.

    data_dir: the durable state (required by collections, sampling, constraints; with
    ``start_triton`` also by embedding). database_url: keep the store in this PostgreSQL
    database (``postgresql://user:password@host:port/db``) instead of SQLite in data_dir,
    which still holds the blobs. triton_url / start_triton / embedding_url: how
    images are embedded (module docstring); ignored when no served service embeds.
    model_name: the default embedding model. metrics_port: serve Prometheus ``/metrics``
    there (0: any free port, read ``.metrics_port``; None: no endpoint), on the interface
    ``metrics_addr`` (None: the gRPC address's host, so a server bound to loopback does not
    expose its metrics on every interface). max_message_mb:
    largest gRPC message either way (RESOURCE_EXHAUSTED beyond). The rest tune the server
    (see :func:`reidal.grpc_server.build_server`). model_repository / load_model: where
    training writes new model versions and how it has Triton serve exactly a set of a
    model's versions, ``load_model(name, versions)`` (defaults: with ``start_triton``, its
    repository; the model-control API of the Triton at ``triton_url`` or started,
    :func:`reidal.embedding.triton_versions.triton_loader`; without a repository, training
    is refused with FAILED_PRECONDITION). tls_cert / tls_key: serve TLS with this certificate chain
    and key (PEM files); tls_client_ca: also require client certificates signed by it
    (mutual TLS). auth_tokens: a tokens file (:mod:`reidal.auth`): every call but health
    and reflection needs a token allowed for its collection. embedding_credentials /
    embedding_token: TLS channel credentials (:func:`reidal.tls.channel_credentials`) and
    the token for the separate embedding service at ``embedding_url``. Raises ValueError
    for a bad combination or an unreadable TLS / tokens file, RuntimeError when the address
    cannot be bound; nothing is left running on failure.

    http_port: also serve the pair-review web page (:mod:`reidal.web`) on this port (0: any
    free port, read ``.http_url``; None: no page), on the gRPC address's interface; it calls
    this server's gRPC services over loopback. With TLS the page is HTTPS with the same
    certificate and key, and calls the TLS gRPC port trusting exactly this server's own
    certificate (:func:`reidal.tls.own_server_channel` says why that needs no CA). Under
    mutual TLS the HTTPS port too requires client certificates from ``tls_client_ca``, and
    the page presents ``review_client_cert`` / ``review_client_key`` (a client certificate
    signed by that CA) to the gRPC port: without them the combination is refused, since
    the page would otherwise need a way in that skips client certificates.

    image_roots: the directories whose files an image URI (a path or ``file://``) may name,
    in AddImages, Embed, GetImage, EmbedCollection and training; every symlink is resolved
    first, so a link out of a root is refused, and every refused path gets the same message.
    None or empty (the default): no local path is read at all, callers send bytes
    (:class:`reidal.embedding.images.ImageLimits`). A root that is not a directory is a
    ValueError.

    decode_budget_mb: the most memory (estimated from the images' headers) that decoded
    images may hold at once, every request and handler thread together; a request whose
    images do not fit waits its turn up to ``decode_wait_s`` seconds (or its deadline),
    then gets RESOURCE_EXHAUSTED (:class:`reidal.embedding.decode_budget.DecodeBudget`).
    """
    names = resolve_services(services)
    if http_port is not None and not PAGE_SERVICES <= set(names):
        raise ValueError("the review page (http_port) needs the collections, sampling and "
                         "constraints services in this process")
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both tls_cert and tls_key")
    if tls_client_ca is not None and tls_cert is None:
        raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
    if (review_client_cert is None) != (review_client_key is None):
        raise ValueError("the review page's client certificate needs both review_client_cert "
                         "and review_client_key")
    if review_client_cert is not None and tls_client_ca is None:
        raise ValueError("review_client_cert / review_client_key are for mutual TLS: pass "
                         "tls_client_ca too, or leave them out")
    if http_port is not None and tls_client_ca is not None and review_client_cert is None:
        raise ValueError("under mutual TLS (tls_client_ca) the review page (http_port) must "
                         "present a client certificate to the gRPC port like every client: "
                         "pass review_client_cert and review_client_key (signed by the client "
                         "CA), or http_port=None")
    limits = ImageLimits(allowed_roots=tuple(str(r) for r in image_roots or ()))
    # Read the TLS and token files first: a wrong path fails before anything starts.
    tls = None if tls_cert is None else ServerTLS.from_files(tls_cert, tls_key, tls_client_ca)
    tokens = None if auth_tokens is None else TokenFile(auth_tokens)
    page_ssl, page_credentials, page_options = None, None, []
    if http_port is not None and tls is not None:
        assert tls_cert is not None and tls_key is not None
        page_ssl = https_context(tls_cert, tls_key, tls.client_ca)
        page_credentials, page_options = own_server_channel(tls, review_client_cert,
                                                            review_client_key)
    stateful = [n for n in names if n in STATEFUL]
    needs_embedding = bool({"embedding", "collections", "training"} & set(names))
    root = Path(data_dir) if data_dir is not None else None
    if stateful and root is None:
        raise ValueError(f"service(s) {stateful} keep state: pass data_dir")
    if "embedding" in names and embedding_url is not None:
        raise ValueError("the embedding service embeds with Triton: pass triton_url or "
                         "start_triton, not embedding_url")
    if needs_embedding and embedding_url is None and triton_url is None and not start_triton:
        raise ValueError("embedding needs triton_url, embedding_url or start_triton=True")
    if needs_embedding and embedding_url is None and triton_url is None and root is None:
        raise ValueError("start_triton writes its model repository into data_dir: pass data_dir")

    started = Started(None, None, None, None)
    try:
        embedding_servicer = None
        if needs_embedding:
            if embedding_url is not None:
                from reidal.services.collections import RemoteEmbedder

                started.embedder = RemoteEmbedder(embedding_url, model_name,
                                                  max_message_mb=max_message_mb,
                                                  credentials=embedding_credentials,
                                                  token=embedding_token)
            else:
                from reidal.services.embedding import EmbeddingServicer

                if triton_url is None:
                    assert root is not None
                    started.triton = _start_triton(root, model_name, triton_startup_timeout_s)
                    triton_url = started.triton.grpc_url
                    started.triton_supervisor = TritonSupervisor(started.triton).start()
                embedding_servicer = EmbeddingServicer(
                    triton_url, model_name, batch_size=embed_batch_size, limits=limits,
                    decode_budget=DecodeBudget(int(decode_budget_mb * MIB), decode_wait_s))
                started.embedder = embedding_servicer
        if stateful:
            from reidal.services.collections import classify

            assert root is not None
            store = Store(root) if database_url is None else Store(database_url=database_url)
            aborted = store.fail_unfinished_operations(
                "the server stopped while the operation ran; start it again")
            if aborted:
                log_kv(log, logging.WARNING, "operations_aborted", count=aborted)
            notifier = Notifier()
            operations = OperationRunner(store, notifier, workers=operation_workers,
                                         classify=classify)
            started.runtime = Runtime(store, BlobStore(root / "blobs"), started.embedder,
                                      notifier, operations, image_limits=limits,
                                      ingest_batch=embed_batch_size)
            if database_url is not None:  # the other replicas' watch streams wake at once
                from reidal.notify_pg import PgNotifications

                started.runtime.notifications = PgNotifications(database_url, notifier)
        training = None
        if "training" in names:
            from reidal.embedding.triton_versions import triton_loader
            from reidal.training_jobs import TrainingJobs

            assert started.runtime is not None
            repo = model_repository
            loader = load_model
            if started.triton is not None:
                repo = repo if repo is not None else started.triton.model_repository
                loader = loader or started.triton.load_versions  # records the new stubs
            if loader is None and triton_url is not None:
                loader = triton_loader(triton_url, repo)
            training = TrainingJobs(started.runtime, repo, loader, model_name)
        bindings = build_bindings(names, started.runtime, embedding_servicer, training)
        running = build_server(bindings, address=address, max_workers=max_workers,
                               max_message_mb=max_message_mb,
                               max_concurrent_rpcs=max_concurrent_rpcs, metrics=rpc_metrics,
                               health_interval_s=health_interval_s, tls=tls,
                               auth=None if tokens is None
                               else Authorizer(tokens, _owners(started.runtime)))
        if metrics_port is not None:
            try:
                started.metrics_http = start_metrics_http(
                    metrics_port, metrics_addr if metrics_addr is not None else _host(running.address))
            except BaseException:
                running.stop(grace=0)
                raise
        if http_port is not None:
            from reidal.web import start_review_http

            target = _page_target(running.address)
            try:
                if page_credentials is not None:
                    _check_page_channel(target, page_credentials, page_options,
                                        mutual=tls_client_ca is not None)
                started.review_http = start_review_http(
                    target, host=_host(running.address),
                    port=http_port, auth_required=tokens is not None,
                    pinned_annotator=None if tokens is None else _pinned_annotator(tokens),
                    ssl_context=page_ssl, credentials=page_credentials,
                    channel_options=page_options)
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
           embedding=embedding_url or "", image_roots=list(limits.allowed_roots or ()),
           review_page=started.review_http.url if started.review_http else "")
    return ReidalServer(running, started, names, root,
                        triton_url if needs_embedding and embedding_url is None else None)


def _owners(runtime: Runtime | None) -> dict[str, Callable[[str], str]]:
    """How the token check finds the collection of an operation or a training job."""
    if runtime is None:
        return {}
    store = runtime.store
    return {"operation_id": lambda i: store.operation(i).collection_id,
            "job_id": lambda i: store.get_training_job(i).collection_id}


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
    from grpc_health.v1 import health_pb2, health_pb2_grpc

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
