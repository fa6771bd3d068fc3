"""TLS for reidal's gRPC servers and for the channels between reidal processes.

A server gets a certificate chain and its private key (PEM); with a client CA as well it
asks every client for a certificate signed by that CA and refuses the handshake without
one (mutual TLS). Channels (the Python client, a collections service calling a separate
embedding service) trust a CA bundle (or the system roots) and may present a client
certificate for mutual TLS.

Certificates are read once, when the server or channel is built: rotating them means
restarting the process (Kubernetes: a rolling restart after the Secret changed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

PathOrPem = str | Path | bytes


def read_pem(source: PathOrPem, what: str) -> bytes:
    """PEM bytes from a path (or the bytes themselves); ValueError naming ``what`` when the
    file is missing or holds no PEM block, so a wrong flag fails at start, not at the first
    handshake."""
    if isinstance(source, bytes):
        data, where = source, f"the {what} given"
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{what} file {str(path)!r} does not exist")
        data, where = path.read_bytes(), f"{what} file {str(path)!r}"
    if b"-----BEGIN " not in data:
        raise ValueError(f"{where} is not PEM (no '-----BEGIN ' line)")
    return data


@dataclass(frozen=True)
class ServerTLS:
    """A server's TLS material. client_ca: set -> mutual TLS (client certificates required
    and checked against it)."""

    cert_chain: bytes
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = None

    @classmethod
    def from_files(cls, cert: PathOrPem, key: PathOrPem,
                   client_ca: PathOrPem | None = None) -> ServerTLS:
        return cls(read_pem(cert, "TLS certificate"), read_pem(key, "TLS private key"),
                   None if client_ca is None else read_pem(client_ca, "TLS client CA"))

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)], root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None)


def channel_credentials(ca: PathOrPem | None = None, cert: PathOrPem | None = None,
                        key: PathOrPem | None = None) -> grpc.ChannelCredentials:
    """TLS credentials for a channel to a reidal server.

    ca: the CA bundle that signed the server's certificate (None: the system roots).
    cert / key: this client's certificate and key, for servers that require mutual TLS
    (both or neither).
    """
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key and a key its certificate: "
                         "pass both tls_cert and tls_key, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=None if ca is None else read_pem(ca, "TLS CA"),
        private_key=None if key is None else read_pem(key, "TLS client key"),
        certificate_chain=None if cert is None else read_pem(cert, "TLS client certificate"))
