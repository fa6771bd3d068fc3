"""TLS for reidal's gRPC servers and for the channels between reidal processes.

A server gets a certificate chain and its private key (PEM); with a client CA as well it
asks every client for a certificate signed by that CA and refuses the handshake without
one (mutual TLS). Channels (the Python client, a collections service calling a separate
embedding service) trust a CA bundle (or the system roots) and may present a client
certificate for mutual TLS.

Certificates are read once, when the server or channel is built: rotating them means
restarting the process (Kubernetes: a rolling restart after the Secret changed).

The review page of ``reidal serve`` uses the same material twice (:func:`https_context`
serves it over HTTPS, :func:`own_server_channel` lets it call its own TLS gRPC port).
"""

from __future__ import annotations

import ssl
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


# ------------------------------------------------------------------ the review page's TLS


def first_certificate(pem: bytes) -> bytes:
    """The first ``CERTIFICATE`` block of a PEM chain: the server's own (leaf) certificate."""
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    start = pem.find(begin)
    stop = pem.find(end, start)
    if start < 0 or stop < 0:
        raise ValueError("the TLS certificate chain holds no CERTIFICATE block")
    return pem[start:stop + len(end)] + b"\n"


def certificate_names(pem: bytes) -> list[str]:
    """The host names the first certificate of ``pem`` is valid for, as a TLS client checks
    them: its subjectAltName DNS names then IP addresses, or its subject CN when it has no
    subjectAltName. ValueError when the certificate cannot be read."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(first_certificate(pem))
    except ValueError as exc:
        raise ValueError(f"cannot read the names of the TLS certificate: {exc}") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return ([str(n) for n in san.get_values_for_type(x509.DNSName)]
            + [str(ip) for ip in san.get_values_for_type(x509.IPAddress)])


def own_server_channel(tls: ServerTLS, client_cert: PathOrPem | None = None,
                       client_key: PathOrPem | None = None
                       ) -> tuple[grpc.ChannelCredentials, list[tuple[str, str]]]:
    """Channel credentials and options for a client inside the server that holds ``tls``,
    calling that server's own TLS port over loopback (the review page of ``reidal serve``).

    Design: the client trusts exactly the server's own certificate (the first one of its
    chain file) and nothing else. gRPC accepts a leaf certificate as the trust anchor, so
    this works for a self-signed certificate and for a CA-signed one alike, without a CA
    bundle to configure, and nobody but the holder of that certificate's key can answer.
    The host name checked is one the certificate names (``grpc.ssl_target_name_override``),
    because the page dials a loopback address the certificate need not name (a server
    certificate for ``reidal.example.org`` on ``--host 0.0.0.0``). Under mutual TLS the
    server also wants a client certificate: ``client_cert`` / ``client_key``, one signed by
    the client CA (the server's own certificate is usually not one).
    """
    names = certificate_names(tls.cert_chain)
    if not names:
        raise ValueError("the TLS certificate names no host (no subjectAltName, no CN): "
                         "the review page cannot check it")
    # A concrete name: "*.example.org" is checked as "reidal.example.org".
    name = next((n for n in names if not n.startswith("*")), names[0].replace("*", "reidal", 1))
    credentials = channel_credentials(first_certificate(tls.cert_chain), client_cert, client_key)
    return credentials, [("grpc.ssl_target_name_override", name)]


def https_context(cert: str | Path, key: str | Path,
                  client_ca: PathOrPem | None = None) -> ssl.SSLContext:
    """An :class:`ssl.SSLContext` serving HTTPS with the gRPC port's certificate and key;
    with ``client_ca`` it requires a client certificate signed by it, as the gRPC port does
    under mutual TLS (so the page is no way around client-certificate authentication).
    ValueError when the files do not load (e.g. a key that is not the certificate's)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"TLS certificate {str(cert)!r} with key {str(key)!r} does not load "
                         f"for HTTPS: {exc}") from None
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=read_pem(client_ca, "TLS client CA").decode())
    return context
