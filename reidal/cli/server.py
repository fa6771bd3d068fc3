"""`reidal serve`, `reidal health`, `reidal triton`: run and probe the server processes.

The flags of `reidal serve` are what the Dockerfile's entry point and the Kubernetes
manifests pass (deploy/); tests/test_deploy.py parses every manifest's flags with this parser,
and :meth:`reidal.serve_config.ServeConfig.from_args` maps them onto the server's config.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from reidal.cli.common import CliError, out

#: gRPC port of `reidal serve` (--port).
DEFAULT_PORT = 50051
#: Port of the pair-review web page of `reidal serve` (--http-port).
DEFAULT_HTTP_PORT = 8080


def _serve(args: argparse.Namespace) -> int:
    from reidal.logs import configure_logging
    from reidal.serve import serve
    from reidal.serve_config import ServeConfig

    configure_logging(args.log_level, json_lines=args.log_json)
    try:
        server = serve(ServeConfig.from_args(args))
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    services = ", ".join(server.services)
    out(f"reidal serving {services} on {server.address}"
         + (f" (Triton {server.triton_url})" if server.triton_url else "")
         + (f", metrics on :{server.metrics_port}/metrics" if server.metrics_port else "")
         + (f", review page {server.http_url}" if server.http_url else ""))
    server.serve_forever(grace=args.grace)
    out("reidal stopped")
    return 0


def _health(args: argparse.Namespace) -> int:
    from reidal.health_probe import run

    return run(args)


def _triton(args: argparse.Namespace) -> int:
    """The Triton bundled in nvidia-pytriton as a process of its own (a Kubernetes pod on a
    CPU cluster), on fixed ports, with the default model written into the repository once."""
    import signal
    import threading

    from reidal.embedding.triton_repo import write_model_repository
    from reidal.embedding.triton_server import TritonServer

    repo = Path(args.model_repository)
    if not (repo / args.model / "config.pbtxt").exists():
        write_model_repository(repo, model_name=args.model)
    server = TritonServer(repo, models=[args.model], workdir=args.workdir, host=args.host,
                          grpc_port=args.grpc_port, http_port=args.http_port,
                          metrics_port=args.metrics_port,
                          startup_timeout_s=args.startup_timeout)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    out(f"Triton serving {args.model} from {repo}: gRPC {server.grpc_url}, HTTP "
         f"{server.http_url}, metrics {server.metrics_url}; log {server.log_path}")
    while not stop.wait(2.0):
        if not server.running:
            print(f"error: tritonserver exited; end of its log:\n{server.log_tail()}",
                  file=sys.stderr, flush=True)
            return 1
    server.stop()
    out("Triton stopped")
    return 0


def add_commands(sub: Any, client: argparse.ArgumentParser) -> None:
    """Register this group's commands on ``sub`` (``client``: the shared server-connection
    options, a parent parser)."""
    from reidal.embedding.spec import DEFAULT_MODEL_NAME
    from reidal.health_probe import add_arguments as health_arguments
    from reidal.serve_config import (
        DATABASE_URL_ENV,
        EMBEDDING_TOKEN_ENV,
        IMAGE_ROOTS_ENV,
        SERVICES,
        ServeConfig,
    )

    defaults = ServeConfig()  # the library's defaults; the command's own are below

    serve = sub.add_parser(
        "serve", help="run the gRPC server (all services, or some)",
        description="Serve reidal's gRPC services on one port until SIGTERM / Ctrl-C "
                    "(graceful: calls in flight get --grace seconds). Without --triton-url "
                    "or --embedding-url the bundled Triton starts on CPU with the default "
                    "model.")
    serve.add_argument("--service", nargs="+", default=["all"], choices=["all", *SERVICES],
                       metavar="NAME", help=f"all (default) or some of: {', '.join(SERVICES)}")
    serve.add_argument("--host", default="127.0.0.1",
                       help="interface to listen on (default: %(default)s; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help="port (default: %(default)s; 0 = any free port)")
    serve.add_argument("--data-dir", default="reidal-data",
                       help="durable state: SQLite, image blobs, model repository "
                            "(default: %(default)s)")
    serve.add_argument("--database-url", default=os.environ.get(DATABASE_URL_ENV, ""),
                       metavar="URL",
                       help="keep the store in PostgreSQL (postgresql://user:pass@host:5432/db; "
                            f"default: ${DATABASE_URL_ENV}) instead of SQLite in --data-dir, "
                            "so replicas can share it; blobs stay in --data-dir")
    serve.add_argument("--triton-url", default=None, metavar="HOST:PORT",
                       help="an already running Triton's gRPC endpoint")
    serve.add_argument("--embedding-url", default=None, metavar="HOST:PORT",
                       help="a separate reidal embedding service to embed with")
    serve.add_argument("--model", default=None, help="default embedding model name")
    serve.add_argument("--model-repository", default=None, metavar="DIR",
                       help="with --triton-url: that Triton's model repository (a shared "
                            "volume), where training writes new model versions")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="serve Prometheus /metrics on this port (default: none)")
    serve.add_argument("--metrics-host", default=None,
                       help="interface of the metrics port (default: the --host interface)")
    serve.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                       help="serve the pair-review web page on this port, on the --host "
                            "interface (default: %(default)s; 0 = any free port)")
    serve.add_argument("--no-http", action="store_true",
                       help="do not serve the pair-review web page")
    serve.add_argument("--workers", type=int, default=defaults.max_workers,
                       help="gRPC handler threads (default: %(default)s)")
    serve.add_argument("--grace", type=float, default=30.0,
                       help="seconds calls in flight get on SIGTERM (default: %(default)s)")
    serve.add_argument("--max-message-mb", type=float, default=defaults.max_message_mb,
                       metavar="MB",
                       help="largest gRPC message either way (default: %(default)s)")
    serve.add_argument("--tls-cert", default=None, metavar="PEM",
                       help="serve TLS with this certificate chain (needs --tls-key)")
    serve.add_argument("--tls-key", default=None, metavar="PEM",
                       help="the certificate's private key")
    serve.add_argument("--tls-client-ca", default=None, metavar="PEM",
                       help="require client certificates signed by this CA (mutual TLS)")
    serve.add_argument("--review-client-cert", default=None, metavar="PEM",
                       help="with --tls-client-ca: the client certificate (signed by that CA) "
                            "the review page presents to the gRPC port; without it the page "
                            "is off under mutual TLS")
    serve.add_argument("--review-client-key", default=None, metavar="PEM",
                       help="the review page's client certificate's key")
    serve.add_argument("--auth-tokens", default=None, metavar="JSON",
                       help="tokens file: every call needs a token allowed for its "
                            "collection (see `reidal token create`; docs/security.md)")
    serve.add_argument("--embedding-tls-ca", default=None, metavar="PEM",
                       help="with --embedding-url: TLS to it, trusting this CA")
    serve.add_argument("--embedding-tls-cert", default=None, metavar="PEM",
                       help="with --embedding-url: client certificate for mutual TLS")
    serve.add_argument("--embedding-tls-key", default=None, metavar="PEM",
                       help="with --embedding-url: the client certificate's key (its token: "
                            f"${EMBEDDING_TOKEN_ENV})")
    serve.add_argument("--image-roots", default=os.environ.get(IMAGE_ROOTS_ENV, ""),
                       metavar="DIR[,DIR...]",
                       help="directories whose files an image URI (a path or file://) may "
                            "name, symlinks resolved (default: $" + IMAGE_ROOTS_ENV + "; "
                            "none: no local path is read, clients send bytes)")
    serve.add_argument("--decode-budget-mb", type=float, default=defaults.decode_budget_mb,
                       metavar="MB",
                       help="most memory decoded images may hold at once, all requests "
                            "together (estimated from headers; default: %(default)s)")
    serve.add_argument("--decode-wait-s", type=float, default=defaults.decode_wait_s,
                       metavar="S",
                       help="how long a request waits for decode memory before "
                            "RESOURCE_EXHAUSTED (default: %(default)s)")
    serve.add_argument("--log-json", action="store_true", help="JSON log lines")
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(func=_serve)

    health = sub.add_parser(
        "health", help="check a server's grpc.health.v1 status (exit 0 when SERVING)",
        description="One health check, for scripts and container probes (a probe every few "
                    "seconds should run `python -m reidal.health_probe`, the same check "
                    "without the CLI's start-up cost).")

    health_arguments(health)
    health.set_defaults(func=_health)

    triton = sub.add_parser(
        "triton", help="run the bundled CPU Triton on fixed ports (a pod of its own)",
        description="Run the Triton server bundled in nvidia-pytriton on a model repository "
                    "(the default model is written into it when missing) until SIGTERM. "
                    "Point `reidal serve --triton-url` at its gRPC port.")
    triton.add_argument("--model-repository", default="model_repository", metavar="DIR",
                        help="the repository (default: %(default)s)")
    triton.add_argument("--model", default=DEFAULT_MODEL_NAME,
                        help="model to load at start (default: %(default)s)")
    triton.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default: %(default)s; 0.0.0.0 for all)")
    triton.add_argument("--grpc-port", type=int, default=8001)
    triton.add_argument("--http-port", type=int, default=8000)
    triton.add_argument("--metrics-port", type=int, default=8002)
    triton.add_argument("--workdir", default=None, metavar="DIR",
                        help="log and backend folder (default: a temporary folder)")
    triton.add_argument("--startup-timeout", type=float, default=180.0, metavar="S")
    triton.set_defaults(func=_triton)
