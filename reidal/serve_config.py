"""What a reidal server process starts from: one :class:`ServeConfig`, with its defaults.

:func:`reidal.serve.serve` takes a ServeConfig. It comes from `reidal serve`'s flags
(:meth:`ServeConfig.from_args`, which the Dockerfile's entry point and the Kubernetes
manifests use), from the environment (:meth:`ServeConfig.from_env`), or from code (the demo,
the tests, the benchmarks: ``ServeConfig(data_dir=..., triton_url=...)``).

Each field is declared once, with :func:`setting`: its default, its flag(s) with their help
(:class:`Flag`), its REIDAL_* variable, and how a parsed command line sets it. The flags of
`reidal serve` are generated from these declarations (:func:`add_serve_arguments`), and
:meth:`ServeConfig.from_args` / :meth:`ServeConfig.from_env` read them back, so a new setting
is one new field here. A field without a flag says why (``no_flag``: a Python object, a
secret, or a value derived from other flags); tests/test_serve.py fails on a field with
neither, and on a `reidal serve` flag that belongs to no field.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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

#: gRPC port of `reidal serve` (--port).
DEFAULT_PORT = 50051
#: Port of the pair-review web page of `reidal serve` (--http-port).
DEFAULT_HTTP_PORT = 8080

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


def _text(value: str) -> str | None:
    """A flag's or variable's text, stripped; empty means unset (None)."""
    return value.strip() or None


@dataclass(frozen=True)
class Flag:
    """One option of `reidal serve`: its name, its help (``%(default)s`` allowed) and the
    other :meth:`argparse.ArgumentParser.add_argument` keywords (type, metavar, nargs,
    choices, action, default). Without a ``default`` the flag's default is its field's
    (or, for a field with an environment variable, that variable's value)."""

    name: str
    help: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        """The attribute argparse stores the value under (``--data-dir`` -> ``data_dir``)."""
        return self.name.removeprefix("--").replace("-", "_")


#: Returned by a field's reader when the command line leaves the field to the environment
#: or the default.
UNSET: Any = object()


def setting(default: Any, *flags: Flag, env: str | None = None,
            parse: Callable[[Any], Any] | None = None,
            read: Callable[[argparse.Namespace], Any] | None = None,
            no_flag: str | None = None) -> Any:
    """Declare one ServeConfig field: its ``default``, its ``flags``, the environment
    variable ``env`` (its text through ``parse``; empty or falsy: unset), how a parsed
    command line sets it (``read``; by default its one flag's value through ``parse``,
    UNSET when that is None) and, for a field with no flag, why (``no_flag``)."""
    if bool(flags) == bool(no_flag):
        raise TypeError("a setting has flags or says why it has none (no_flag), not both")
    return field(default=default, metadata={"flags": flags, "env": env, "parse": parse,
                                            "read": read, "no_flag": no_flag})


def _flag_default(f: dataclasses.Field[Any], flag: Flag) -> Any:
    if "default" in flag.options:
        return flag.options["default"]
    env = f.metadata["env"]
    return os.environ.get(env, "") if env else f.default


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ServeConfig field's flags to ``parser`` (`reidal serve`), in field order;
    a flag backed by an environment variable defaults to its value now."""
    for f in dataclasses.fields(ServeConfig):
        for flag in f.metadata["flags"]:
            options = dict(flag.options)
            if options.get("action") not in ("store_true", "store_false"):
                options["default"] = _flag_default(f, flag)
            parser.add_argument(flag.name, dest=flag.dest, help=flag.help, **options)


def _read(f: dataclasses.Field[Any], args: argparse.Namespace) -> Any:
    meta = f.metadata
    if meta["read"] is not None:
        return meta["read"](args)
    if not meta["flags"]:
        return UNSET
    (flag,) = meta["flags"]
    raw = getattr(args, flag.dest)
    if raw is None:
        return UNSET
    return meta["parse"](raw) if meta["parse"] is not None else raw


def _address(args: argparse.Namespace) -> str:
    return f"{args.host}:{args.port}"


def _start_triton(args: argparse.Namespace) -> bool:
    """Without --triton-url or --embedding-url the bundled Triton starts."""
    return args.triton_url is None and args.embedding_url is None


def _embedding_credentials(args: argparse.Namespace) -> Any:
    """TLS to a separate embedding service (--embedding-tls-*), read now, so a wrong path
    fails before anything starts; None without those flags."""
    if not (args.embedding_tls_ca or args.embedding_tls_cert or args.embedding_tls_key):
        return None
    from reidal.tls import channel_credentials

    return channel_credentials(args.embedding_tls_ca, args.embedding_tls_cert,
                               args.embedding_tls_key)


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


_PEM = {"metavar": "PEM"}
_CODE_ONLY = "a Python object: set from code only"


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

    grace_s: the seconds calls in flight get when :meth:`ReidalServer.serve_forever
    <reidal.serve.ReidalServer.serve_forever>` stops on SIGTERM. log_level / log_json:
    configure the process's root logging (:func:`reidal.logs.configure_logging`) when
    serve() starts; None (the library's default) leaves logging as the caller set it.

    Each field's flag, help and environment variable are declared beside it
    (:func:`setting`); `reidal serve --help` lists them.
    """

    services: str | Sequence[str] = setting(
        "all", Flag("--service", f"all (default) or some of: {', '.join(SERVICES)}",
                    {"nargs": "+", "default": ["all"], "choices": ["all", *SERVICES],
                     "metavar": "NAME"}),
        read=lambda args: tuple(args.service))
    address: str = setting(
        "127.0.0.1:0",
        Flag("--host", "interface to listen on (default: %(default)s; 0.0.0.0 for all)",
             {"default": "127.0.0.1"}),
        Flag("--port", "port (default: %(default)s; 0 = any free port)",
             {"type": int, "default": DEFAULT_PORT}),
        read=_address)
    data_dir: str | Path | None = setting(
        None, Flag("--data-dir", "durable state: SQLite, image blobs, model repository "
                                 "(default: %(default)s)", {"default": "reidal-data"}))
    database_url: str | None = setting(
        None, Flag("--database-url", "keep the store in PostgreSQL "
                   "(postgresql://user:pass@host:5432/db; "
                   f"default: ${DATABASE_URL_ENV}) instead of SQLite in --data-dir, so "
                   "replicas can share it; blobs stay in --data-dir", {"metavar": "URL"}),
        env=DATABASE_URL_ENV, parse=_text)
    triton_url: str | None = setting(
        None, Flag("--triton-url", "an already running Triton's gRPC endpoint",
                   {"metavar": "HOST:PORT"}))
    start_triton: bool = setting(
        True, read=_start_triton,
        no_flag="derived: true unless --triton-url or --embedding-url is given")
    embedding_url: str | None = setting(
        None, Flag("--embedding-url", "a separate reidal embedding service to embed with",
                   {"metavar": "HOST:PORT"}))
    model_name: str = setting(
        DEFAULT_MODEL_NAME, Flag("--model", "default embedding model name "
                                            "(default: %(default)s)"))
    metrics_port: int | None = setting(
        None, Flag("--metrics-port", "serve Prometheus /metrics on this port (default: none)",
                   {"type": int}))
    metrics_addr: str | None = setting(
        None, Flag("--metrics-host", "interface of the metrics port (default: the --host "
                                     "interface)"))
    max_workers: int = setting(
        16, Flag("--workers", "gRPC handler threads (default: %(default)s)", {"type": int}))
    max_message_mb: float = setting(
        64.0, Flag("--max-message-mb", "largest gRPC message either way (default: "
                                       "%(default)s)", {"type": float, "metavar": "MB"}))
    max_concurrent_rpcs: int | None = setting(
        None, Flag("--max-concurrent-rpcs", "calls in progress at once before new ones get "
                                            "RESOURCE_EXHAUSTED (default: no bound)",
                   {"type": int, "metavar": "N"}))
    health_interval_s: float = setting(
        3.0, Flag("--health-interval-s", "seconds between the health checks of each service "
                                         "(default: %(default)s)",
                  {"type": float, "metavar": "S"}))
    embed_batch_size: int = setting(
        32, Flag("--embed-batch-size", "images per embedding call and per AddImages "
                                       "embedding batch (default: %(default)s)",
                 {"type": int, "metavar": "N"}))
    operation_workers: int = setting(
        1, Flag("--operation-workers", "threads running long operations (EmbedCollection, "
                                       "...; default: %(default)s)",
                {"type": int, "metavar": "N"}))
    triton_startup_timeout_s: float = setting(
        180.0, Flag("--triton-startup-timeout-s", "seconds the bundled Triton may take to "
                                                  "start (default: %(default)s)",
                    {"type": float, "metavar": "S"}))
    rpc_metrics: Any = setting(None, no_flag=_CODE_ONLY)  # reidal.metrics.RpcMetrics or None
    model_repository: str | Path | None = setting(
        None, Flag("--model-repository", "with --triton-url: that Triton's model repository "
                                         "(a shared volume), where training writes new model "
                                         "versions", {"metavar": "DIR"}))
    load_model: Callable[..., Any] | None = setting(None, no_flag=_CODE_ONLY)
    http_port: int | None = setting(
        None,
        Flag("--http-port", "serve the pair-review web page on this port, on the --host "
                            "interface (default: %(default)s; 0 = any free port)",
             {"type": int, "default": DEFAULT_HTTP_PORT}),
        Flag("--no-http", "do not serve the pair-review web page", {"action": "store_true"}),
        read=review_port)
    tls_cert: str | Path | None = setting(
        None, Flag("--tls-cert", "serve TLS with this certificate chain (needs --tls-key)",
                   _PEM))
    tls_key: str | Path | None = setting(
        None, Flag("--tls-key", "the certificate's private key", _PEM))
    tls_client_ca: str | Path | None = setting(
        None, Flag("--tls-client-ca", "require client certificates signed by this CA "
                                      "(mutual TLS)", _PEM))
    auth_tokens: str | Path | None = setting(
        None, Flag("--auth-tokens", "tokens file: every call needs a token allowed for its "
                                    "collection (see `reidal token create`; "
                                    "docs/security.md)", {"metavar": "JSON"}))
    embedding_credentials: Any = setting(  # grpc.ChannelCredentials or None
        None,
        Flag("--embedding-tls-ca", "with --embedding-url: TLS to it, trusting this CA", _PEM),
        Flag("--embedding-tls-cert", "with --embedding-url: client certificate for mutual "
                                     "TLS", _PEM),
        Flag("--embedding-tls-key", "with --embedding-url: the client certificate's key "
                                    f"(its token: ${EMBEDDING_TOKEN_ENV})", _PEM),
        read=_embedding_credentials)
    embedding_token: str | None = setting(
        None, env=EMBEDDING_TOKEN_ENV, parse=_text,
        no_flag=f"a secret: only from ${EMBEDDING_TOKEN_ENV}, never on a command line")
    review_client_cert: str | Path | None = setting(
        None, Flag("--review-client-cert", "with --tls-client-ca: the client certificate "
                                           "(signed by that CA) the review page presents to "
                                           "the gRPC port; without it the page is off under "
                                           "mutual TLS", _PEM))
    review_client_key: str | Path | None = setting(
        None, Flag("--review-client-key", "the review page's client certificate's key", _PEM))
    image_roots: Sequence[str | Path] | None = setting(
        None, Flag("--image-roots", "directories whose files an image URI (a path or "
                                    "file://) may name, symlinks resolved (default: $"
                   + IMAGE_ROOTS_ENV + "; none: no local path is read, clients send bytes)",
                   {"metavar": "DIR[,DIR...]"}),
        env=IMAGE_ROOTS_ENV, parse=split_roots)
    decode_budget_mb: float = setting(
        DEFAULT_BUDGET_MB,
        Flag("--decode-budget-mb", "most memory decoded images may hold at once, all requests "
                                   "together (estimated from headers; default: %(default)s)",
             {"type": float, "metavar": "MB"}))
    decode_wait_s: float = setting(
        DEFAULT_WAIT_S,
        Flag("--decode-wait-s", "how long a request waits for decode memory before "
                                "RESOURCE_EXHAUSTED (default: %(default)s)",
             {"type": float, "metavar": "S"}))
    grace_s: float = setting(
        30.0, Flag("--grace", "seconds calls in flight get on SIGTERM (default: %(default)s)",
                   {"type": float, "metavar": "S"}))
    log_level: str | None = setting(
        None, Flag("--log-level", "root log level (default: %(default)s)",
                   {"default": "INFO"}))
    log_json: bool = setting(False, Flag("--log-json", "JSON log lines",
                                         {"action": "store_true"}))

    def replace(self, **fields: Any) -> ServeConfig:
        """A copy with ``fields`` changed (a TypeError names a field that does not exist)."""
        return dataclasses.replace(self, **fields)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **fields: Any) -> ServeConfig:
        """The defaults, then what the fields' variables ($REIDAL_DATABASE_URL,
        $REIDAL_IMAGE_ROOTS, $REIDAL_EMBEDDING_TOKEN) set (empty = unset), then ``fields``."""
        env = os.environ if environ is None else environ
        from_env: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            var = f.metadata["env"]
            if var is not None and (value := f.metadata["parse"](env.get(var, ""))):
                from_env[f.name] = value
        return cls(**{**from_env, **fields})

    @classmethod
    def from_args(cls, args: argparse.Namespace,
                  environ: Mapping[str, str] | None = None) -> ServeConfig:
        """`reidal serve`'s flags (:func:`add_serve_arguments`: --database-url and
        --image-roots with the environment's values as defaults), each field read as its
        :func:`setting` says, over :meth:`from_env` (which adds the embedding token)."""
        values = {f.name: value for f in dataclasses.fields(cls)
                  if (value := _read(f, args)) is not UNSET}
        return cls.from_env(environ, **values)
