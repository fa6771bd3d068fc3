"""`reidal serve`, `reidal health`, `reidal triton`: run and probe the server processes.

The flags of `reidal serve` are what the Dockerfile's entry point and the Kubernetes
manifests pass (deploy/); tests/test_deploy.py parses every manifest's flags with this parser.
They are generated from the ServeConfig declaration
(:func:`reidal.serve_config.add_serve_arguments`), and
:meth:`reidal.serve_config.ServeConfig.from_args` maps them back onto the server's config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from reidal.cli.common import CliError, out
from reidal.serve_config import (  # noqa: F401 - the ports: re-exported
    DEFAULT_HTTP_PORT,
    DEFAULT_PORT,
    ServeConfig,
    add_serve_arguments,
)


def _serve(args: argparse.Namespace) -> int:
    from reidal.serve import serve

    try:
        server = serve(ServeConfig.from_args(args))
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    services = ", ".join(server.services)
    out(f"reidal serving {services} on {server.address}"
         + (f" (Triton {server.triton_url})" if server.triton_url else "")
         + (f", metrics on :{server.metrics_port}/metrics" if server.metrics_port else "")
         + (f", review page {server.http_url}" if server.http_url else ""))
    server.serve_forever()
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

    from reidal.embedding.triton_repo import ensure_default_model
    from reidal.embedding.triton_server import TritonServer

    repo = Path(args.model_repository)
    ensure_default_model(repo, args.model)
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
    serve = sub.add_parser(
        "serve", help="run the gRPC server (all services, or some)",
        description="Serve reidal's gRPC services on one port until SIGTERM / Ctrl-C "
                    "(graceful: calls in flight get --grace seconds). Without --triton-url "
                    "or --embedding-url the bundled Triton starts on CPU with the default "
                    "model.")
    add_serve_arguments(serve)  # one flag per ServeConfig setting, declared there
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
