"""A grpc.health.v1 probe for containers: ``python -m reidal.health_probe`` or ``reidal health``.

Kubernetes probes pods with its native gRPC probe, which needs nothing in the image. Two
callers still need a client inside the image: Docker's ``HEALTHCHECK`` (Docker has no gRPC
probe) and Kubernetes exec probes once the server speaks TLS (the native probe is
plaintext only). The image ships no Go ``grpc_health_probe`` binary, so this is it.

It imports only grpc, the health stubs and :mod:`reidal.tls` (which needs grpc alone): run
as ``python -m reidal.health_probe`` it costs about 0.15 s of CPU, against about 1.5 s for
``reidal health`` (the CLI's parser imports the server), which matters for a probe that
runs every few seconds in every container.

Exit status: 0 SERVING; 1 anything else (NOT_SERVING, a service the server does not know,
unreachable, TLS failure, deadline); 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ADDRESS = "127.0.0.1:50051"


@dataclass(frozen=True)
class HealthResult:
    """What one check found: ``status`` is the health enum name (SERVING, NOT_SERVING,
    SERVICE_UNKNOWN, ...) or the gRPC code name when the call failed (UNAVAILABLE, ...)."""

    address: str
    service: str
    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "SERVING"

    def line(self) -> str:
        what = f"{self.address} service {self.service!r}" if self.service else self.address
        return f"{what}: {self.status}" + (f" ({self.detail})" if self.detail else "")


def check(address: str, service: str = "", *, timeout_s: float = 3.0,
          tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
          tls_key: str | Path | None = None, tls_server_name: str | None = None) -> HealthResult:
    """Ask ``address`` for the health of ``service`` ("" = the server as a whole).

    tls_ca switches to TLS (the CA that signed the server's certificate); tls_cert/tls_key
    add a client certificate for mutual TLS; tls_server_name overrides the name checked
    against the certificate (probing 127.0.0.1 with a certificate issued for the Service's
    DNS name). ValueError for bad arguments; a failed call is a result, never an exception.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from reidal.tls import channel_credentials

    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs its key: pass both tls_cert and tls_key")
    if tls_ca is None and (tls_cert is not None or tls_server_name):
        raise ValueError("tls_cert / tls_server_name need tls_ca (TLS is off without it)")
    if tls_ca is None:
        channel = grpc.insecure_channel(address)
    else:
        creds = channel_credentials(tls_ca, tls_cert, tls_key)
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        channel = grpc.secure_channel(address, creds, options=options)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return HealthResult(address, service, status)
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.NOT_FOUND:  # the health servicer's "unknown service"
            return HealthResult(address, service, "SERVICE_UNKNOWN", exc.details() or "")
        return HealthResult(address, service, code.name if code else "UNKNOWN",
                            exc.details() or "")
    finally:
        channel.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The probe's options, shared by ``python -m reidal.health_probe`` and ``reidal health``."""
    parser.add_argument("--address", default=DEFAULT_ADDRESS, metavar="HOST:PORT",
                        help="the server to probe (default: %(default)s)")
    parser.add_argument("--service", default="", metavar="NAME",
                        help="a full service name, e.g. reidal.v1.SamplingService (default: "
                             "the server as a whole)")
    parser.add_argument("--timeout", type=float, default=3.0, metavar="S",
                        help="deadline in seconds (default: %(default)s)")
    parser.add_argument("--tls-ca", default=None, metavar="PEM",
                        help="use TLS, trusting this CA for the server's certificate")
    parser.add_argument("--tls-cert", default=None, metavar="PEM",
                        help="client certificate (mutual TLS; with --tls-key)")
    parser.add_argument("--tls-key", default=None, metavar="PEM", help="client private key")
    parser.add_argument("--tls-server-name", default=None, metavar="NAME",
                        help="name to check the server's certificate against")
    parser.add_argument("--quiet", action="store_true", help="print nothing; exit status only")


def run(args: argparse.Namespace) -> int:
    """Check once and print one line; the exit status (module docstring)."""
    try:
        result = check(args.address, args.service, timeout_s=args.timeout, tls_ca=args.tls_ca,
                       tls_cert=args.tls_cert, tls_key=args.tls_key,
                       tls_server_name=args.tls_server_name)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    if not args.quiet:
        print(result.line(), file=sys.stdout if result.ok else sys.stderr, flush=True)
    return 0 if result.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reidal.health_probe",
        description="Check a reidal server's grpc.health.v1 status (exit 0 when SERVING).")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
