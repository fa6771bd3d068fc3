"""What a reidal server process starts from: one :class:`ServeConfig`, with its defaults.

:func:`reidal.serve.serve` takes a ServeConfig. It comes from `reidal serve`'s flags
(:meth:`ServeConfig.from_args`, which the Dockerfile's entry point and the Kubernetes
manifests use), from the environment (:meth:`ServeConfig.from_env`), or from code (the demo,
the tests, the benchmarks: ``ServeConfig(data_dir=..., triton_url=...)``), so every flag, every
REIDAL_* variable and every default maps onto a field in this one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reidal.embedding.decode_budget import DEFAULT_BUDGET_MB, DEFAULT_WAIT_S
from reidal.embedding.spec import DEFAULT_MODEL_NAME

#: Every service name ``serve`` knows, in the order "all" registers them.
SERVICES: tuple[str, ...] = ("embedding", "collections", "sampling", "constraints", "training")
#: Services that need the durable store (a data directory).
STATEFUL = frozenset({"collections", "sampling", "constraints", "training"})
#: What the review page (http_port) calls: these services must run in the same process.
PAGE_SERVICES = frozenset({"collections", "sampling", "constraints"})

#: Environment variable with the PostgreSQL URL of the store (field ``database_url``).
DATABASE_URL_ENV = "REIDAL_DATABASE_URL"
#: Environment variable with the image roots, comma-separated (field ``image_roots``).
IMAGE_ROOTS_ENV = "REIDAL_IMAGE_ROOTS"
#: Environment variable with the access token a collections service sends to its separate
#: embedding service (field ``embedding_token``).
EMBEDDING_TOKEN_ENV = "REIDAL_EMBEDDING_TOKEN"


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


def split_roots(text: str) -> list[str]:
    """``--image-roots`` / $REIDAL_IMAGE_ROOTS: comma-separated directories, blanks dropped."""
    return [r for r in text.split(",") if r.strip()]


@dataclass(frozen=True)
class ServeConfig:
    """Everything one server process is started with (:func:`reidal.serve.serve`). The
    defaults are the library's: a server on a free loopback port with nothing optional;
    `reidal serve`'s own (port 50051, ./reidal-data, the review page on 8080) are its
    flags' defaults (:meth:`from_args`).

    services (names, or "all") are served on address. data_dir: the durable state
    (required by collections, sampling, constraints; with ``start_triton`` also by
    embedding). database_url: keep the store in this PostgreSQL database
    (``postgresql://user:password@host:port/db``) instead of SQLite in data_dir, which still
    holds the blobs. triton_url / start_triton / embedding_url: how images are embedded
    (module docstring); ignored when no served service embeds. model_name: the default
    embedding model. metrics_port: serve Prometheus ``/metrics`` there (0: any free port,
    read ``.metrics_port``; None: no endpoint), on the interface ``metrics_addr`` (None:
    the gRPC address's host, so a server bound to loopback does not expose its metrics on
    every interface). max_message_mb: largest gRPC message either way (RESOURCE_EXHAUSTED
    beyond). max_workers, max_concurrent_rpcs, health_interval_s, rpc_metrics tune the
    server (see :func:`reidal.grpc_server.build_server`); embed_batch_size the embedder's
    calls and AddImages' embedding batches, operation_workers the long operations,
    triton_startup_timeout_s the bundled Triton.
    model_repository / load_model: where training writes new model versions and how it has
    Triton serve exactly a set of a model's versions, ``load_model(name, versions)``
    (defaults: with ``start_triton``, its repository; the model-control API of the Triton
    at ``triton_url`` or started, :func:`reidal.embedding.triton_versions.triton_loader`;
    without a repository, training is refused with FAILED_PRECONDITION). tls_cert /
    tls_key: serve TLS with this certificate chain and key (PEM files); tls_client_ca:
    also require client certificates signed by it (mutual TLS). auth_tokens: a tokens file
    (:mod:`reidal.auth`): every call but health and reflection needs a token allowed for
    its collection. embedding_credentials / embedding_token: TLS channel credentials
    (:func:`reidal.tls.channel_credentials`) and the token for the separate embedding
    service at ``embedding_url``.

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

    services: str | Sequence[str] = "all"
    address: str = "127.0.0.1:0"
    data_dir: str | Path | None = None
    database_url: str | None = None
    triton_url: str | None = None
    start_triton: bool = True
    embedding_url: str | None = None
    model_name: str = DEFAULT_MODEL_NAME
    metrics_port: int | None = None
    metrics_addr: str | None = None
    max_workers: int = 16
    max_message_mb: float = 64.0
    max_concurrent_rpcs: int | None = None
    health_interval_s: float = 3.0
    embed_batch_size: int = 32
    operation_workers: int = 1
    triton_startup_timeout_s: float = 180.0
    rpc_metrics: Any = None  # reidal.metrics.RpcMetrics or None
    model_repository: str | Path | None = None
    load_model: Callable[..., Any] | None = None
    http_port: int | None = None
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    tls_client_ca: str | Path | None = None
    auth_tokens: str | Path | None = None
    embedding_credentials: Any = None  # grpc.ChannelCredentials or None
    embedding_token: str | None = None
    review_client_cert: str | Path | None = None
    review_client_key: str | Path | None = None
    image_roots: Sequence[str | Path] | None = None
    decode_budget_mb: float = DEFAULT_BUDGET_MB
    decode_wait_s: float = DEFAULT_WAIT_S

    def replace(self, **fields: Any) -> ServeConfig:
        """A copy with ``fields`` changed (a TypeError names a field that does not exist)."""
        return dataclasses.replace(self, **fields)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **fields: Any) -> ServeConfig:
        """The defaults, then what $REIDAL_DATABASE_URL, $REIDAL_IMAGE_ROOTS and
        $REIDAL_EMBEDDING_TOKEN set (empty = unset), then ``fields``."""
        env = os.environ if environ is None else environ
        from_env: dict[str, Any] = {}
        if env.get(DATABASE_URL_ENV, "").strip():
            from_env["database_url"] = env[DATABASE_URL_ENV].strip()
        if split_roots(env.get(IMAGE_ROOTS_ENV, "")):
            from_env["image_roots"] = split_roots(env[IMAGE_ROOTS_ENV])
        if env.get(EMBEDDING_TOKEN_ENV, "").strip():
            from_env["embedding_token"] = env[EMBEDDING_TOKEN_ENV].strip()
        return cls(**{**from_env, **fields})

    @classmethod
    def from_args(cls, args: argparse.Namespace,
                  environ: Mapping[str, str] | None = None) -> ServeConfig:
        """`reidal serve`'s flags (reidal/cli/server.py declares them, --database-url and
        --image-roots with the environment's values as defaults), plus the embedding token
        of the environment (:meth:`from_env`). Without --triton-url or
        --embedding-url the bundled Triton starts. TLS to a separate embedding service
        (--embedding-tls-*) is read here, so a wrong path fails before anything starts."""
        embedding_credentials = None
        if args.embedding_tls_ca or args.embedding_tls_cert or args.embedding_tls_key:
            from reidal.tls import channel_credentials

            embedding_credentials = channel_credentials(
                args.embedding_tls_ca, args.embedding_tls_cert, args.embedding_tls_key)
        flags: dict[str, Any] = dict(
            services=tuple(args.service), address=f"{args.host}:{args.port}",
            data_dir=args.data_dir, triton_url=args.triton_url,
            start_triton=args.triton_url is None and args.embedding_url is None,
            embedding_url=args.embedding_url, metrics_port=args.metrics_port,
            metrics_addr=args.metrics_host, max_workers=args.workers,
            max_message_mb=args.max_message_mb, tls_cert=args.tls_cert,
            tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
            auth_tokens=args.auth_tokens, embedding_credentials=embedding_credentials,
            model_repository=args.model_repository, http_port=review_port(args),
            review_client_cert=args.review_client_cert,
            review_client_key=args.review_client_key,
            decode_budget_mb=args.decode_budget_mb, decode_wait_s=args.decode_wait_s,
            # their flags' defaults are the environment's values (read by the parser)
            database_url=args.database_url or None, image_roots=split_roots(args.image_roots))
        if args.model:
            flags["model_name"] = args.model
        return cls.from_env(environ, **flags)


def review_port(args: argparse.Namespace) -> int | None:
    """The review page's port from `reidal serve`'s flags: --http-port, unless --no-http,
    the served services lack what the page calls (collections, sampling, constraints), or
    the gRPC port wants client certificates (--tls-client-ca) and the page was given none of
    its own (--review-client-cert/--review-client-key; a notice on stderr says so). With
    --tls-cert the page is HTTPS; with --auth-tokens it asks each person for their token."""
    if args.no_http or not PAGE_SERVICES <= set(resolve_services(args.service)):
        return None
    if args.tls_client_ca and not args.review_client_cert:
        print("review page off: under mutual TLS it needs its own client certificate "
              "(--review-client-cert/--review-client-key)", file=sys.stderr)
        return None
    return args.http_port
