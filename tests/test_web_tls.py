"""The review page with TLS: HTTPS with the gRPC port's certificate, and mutual TLS.

Real ``serve()`` processes (collections, sampling, constraints; no Triton: the embedding
backend is a closed port and images are ingested with defer_embedding), driven with the
standard library's HTTPS client, verifying the page's certificate. What the page did is
checked through the gRPC API over TLS. Certificates come from the openssl command line
with the helpers of tests/test_security.py (no key is committed).
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import urllib.error
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from _services_support import pictures
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from test_security import _EC, CLOSED_PORT, _make_ca, _make_leaf, _openssl

from reidal.serve import serve
from reidal.tls import ServerTLS, certificate_names, own_server_channel
from reidal_client import ReidalClient

PAGE_SERVICES = ["collections", "sampling", "constraints"]


def _self_signed(d: Path, name: str, *ext: str) -> tuple[Path, Path]:
    _openssl(d, "req", "-x509", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN={name}", *[a for e in ext for a in ("-addext", e)])
    return d / f"{name}.pem", d / f"{name}.key"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed server certificate naming only localhost (the page dials 127.0.0.1:
    its check must use a name the certificate holds), a CA with a server certificate, the
    page's and a person's client certificates, and a client certificate of an untrusted CA."""
    d = tmp_path_factory.mktemp("web-pki")
    _self_signed(d, "self", "subjectAltName=DNS:localhost")
    _make_ca(d, "ca")
    _make_ca(d, "rogue-ca")
    _make_leaf(d, "server", "ca", "serverAuth", 1)
    _make_leaf(d, "page", "ca", "clientAuth", 2)
    _make_leaf(d, "person", "ca", "clientAuth", 3)
    _make_leaf(d, "rogue", "rogue-ca", "clientAuth", 4)
    return d


@pytest.fixture(scope="module")
def server(certs: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = serve(PAGE_SERVICES, data_dir=tmp_path_factory.mktemp("web-tls"),
                triton_url=CLOSED_PORT, model_name="m", health_interval_s=60, http_port=0,
                tls_cert=certs / "self.pem", tls_key=certs / "self.key")
    try:
        yield srv
    finally:
        srv.stop(grace=0)


def https(url: str, context: ssl.SSLContext, method: str = "GET", body: object = None
          ) -> tuple[int, object]:
    """(status, parsed JSON or bytes) of one request; HTTP errors are returned too."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as resp:
            status, payload, kind = resp.status, resp.read(), resp.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        status, payload, kind = exc.code, exc.read(), exc.headers["Content-Type"]
    return status, json.loads(payload) if kind.startswith("application/json") else payload


def trusting(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


# ------------------------------------------------------------------------ names


def test_certificate_names_and_the_channel_to_its_own_server(certs: Path, tmp_path: Path):
    """The names read from a certificate are the ones openssl was told, and the page's
    channel (pinned to the certificate, checked under one of its names) reaches a server
    on 127.0.0.1 whatever the certificate names: a wildcard, an IP, a bare CN, a CA-signed
    certificate."""
    made = {
        "wild": (["subjectAltName=DNS:*.example.org"], ["*.example.org"]),
        "mixed": (["subjectAltName=IP:10.0.0.5,DNS:a.example,IP:::1,DNS:b.example"],
                  ["a.example", "b.example", "10.0.0.5", "::1"]),
        "bare": ([], ["bare"]),
    }
    cases = {name: (*_self_signed(tmp_path, name, *ext), names)
             for name, (ext, names) in made.items()}
    cases["ca-signed"] = (certs / "server.pem", certs / "server.key", ["localhost", "127.0.0.1"])
    for name, (cert, key, names) in cases.items():
        tls = ServerTLS.from_files(cert, key)
        assert certificate_names(tls.cert_chain) == names, name
        grpc_server = grpc.server(futures.ThreadPoolExecutor(2))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), grpc_server)
        port = grpc_server.add_secure_port("127.0.0.1:0", tls.credentials())
        grpc_server.start()
        try:
            credentials, options = own_server_channel(tls)
            with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
            if name == "ca-signed":  # pinned: another certificate for localhost is refused
                other = ServerTLS.from_files(certs / "self.pem", certs / "self.key")
                credentials, options = own_server_channel(other)
                with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options) as ch:
                    with pytest.raises(grpc.RpcError) as refused:
                        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                             timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            grpc_server.stop(0)
    with pytest.raises(ValueError, match="CERTIFICATE"):
        certificate_names(b"-----BEGIN PRIVATE KEY-----\n")


# ------------------------------------------------------------------------ TLS


def test_page_over_https_calls_the_tls_grpc_port(server, certs: Path):
    context = trusting(certs / "self.pem")
    assert server.http_url == f"https://127.0.0.1:{server.http_port}/"
    page = f"https://localhost:{server.http_port}/"  # the name the certificate holds
    status, body = https(page, context)
    assert status == 200 and b"static/review.js" in body

    pics = pictures(2, 2, seed=5)
    with ReidalClient(f"localhost:{server.port}", tls_ca=certs / "self.pem") as client:
        client.create_collection("herd-tls")
        client.add_images("herd-tls", [(p.image_id, p.png) for p in pics],
                          defer_embedding=True)
        status, body = https(f"{page}api/collections", context)
        assert status == 200
        assert [c["collection_id"] for c in body["collections"]] == [
            c.collection_id for c in client.list_collections()]
        status, body = https(f"{page}api/images/herd-tls/{pics[0].image_id}", context)
        assert status == 200 and body == pics[0].png
        a, b = pics[0].image_id, pics[1].image_id
        status, body = https(f"{page}api/collections/herd-tls/answers", context, "POST", {
            "image_a": a, "image_b": b, "label": "same", "annotator_id": "tess",
            "request_id": "tls-1"})
        assert status == 200 and body["stored"] == 1, body
        stored = client.list_constraints("herd-tls")
        assert [(x.image_a, x.image_b, x.label, x.annotator_id) for x in stored] == [
            (min(a, b), max(a, b), "SAME", "tess")]

    plain = f"http://localhost:{server.http_port}/api/collections"
    with pytest.raises((OSError, http.client.HTTPException)):  # no answer to plain HTTP
        urllib.request.urlopen(plain, timeout=10)
    with pytest.raises(urllib.error.URLError) as untrusted:  # its own certificate, no other
        https(page, trusting(certs / "ca.pem"))
    assert isinstance(untrusted.value.reason, ssl.SSLCertVerificationError)


# ------------------------------------------------------------------------ mutual TLS


def test_mutual_tls_page_requires_client_certificates(certs: Path, tmp_path: Path):
    mutual = dict(triton_url=CLOSED_PORT, model_name="m", health_interval_s=60, http_port=0,
                  tls_cert=certs / "server.pem", tls_key=certs / "server.key",
                  tls_client_ca=certs / "ca.pem")
    with pytest.raises(ValueError, match="review_client_cert"):  # no way around the CA
        serve(PAGE_SERVICES, data_dir=tmp_path / "a", **mutual)
    with pytest.raises(ValueError, match="mutual TLS"):
        serve(PAGE_SERVICES, data_dir=tmp_path / "b", tls_cert=certs / "server.pem",
              tls_key=certs / "server.key", review_client_cert=certs / "page.pem",
              review_client_key=certs / "page.key")
    with pytest.raises(ValueError, match="cannot call"):  # a page certificate the port refuses
        serve(PAGE_SERVICES, data_dir=tmp_path / "c", review_client_cert=certs / "rogue.pem",
              review_client_key=certs / "rogue.key", **mutual)

    srv = serve(PAGE_SERVICES, data_dir=tmp_path / "d", review_client_cert=certs / "page.pem",
                review_client_key=certs / "page.key", **mutual)
    try:
        url = f"https://localhost:{srv.http_port}/api/collections"
        with ReidalClient(f"localhost:{srv.port}", tls_ca=certs / "ca.pem",
                          tls_cert=certs / "person.pem", tls_key=certs / "person.key") as c:
            c.create_collection("herd-mtls")
        for refused in (trusting(certs / "ca.pem"),
                        trusting(certs / "ca.pem", certs / "rogue.pem", certs / "rogue.key")):
            with pytest.raises((OSError, http.client.HTTPException)):
                https(url, refused)
        status, body = https(url, trusting(certs / "ca.pem", certs / "person.pem",
                                           certs / "person.key"))
        assert status == 200 and [c["collection_id"] for c in body["collections"]] == [
            "herd-mtls"]
    finally:
        srv.stop(grace=0)


# ------------------------------------------------------------------------ stop


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_stop_ends_kept_alive_connections(certs: Path, tmp_path: Path, tls: bool):
    """A browser keeps its connection open between requests. After stop() that connection
    must end (the page then sees a network error, keeps the answer and resends it after
    the restart), not stay served by a leftover thread whose gRPC channel is closed (which
    refused the answer for good) and hold a socket and a thread until the browser leaves."""
    keys = dict(tls_cert=certs / "self.pem", tls_key=certs / "self.key") if tls else {}
    srv = serve(PAGE_SERVICES, data_dir=tmp_path, triton_url=CLOSED_PORT, model_name="m",
                health_interval_s=60, http_port=0, **keys)
    kind = http.client.HTTPSConnection if tls else http.client.HTTPConnection
    extra = {"context": trusting(certs / "self.pem")} if tls else {}
    conn = kind("localhost", srv.http_port, timeout=10, **extra)
    try:
        conn.request("GET", "/api/collections")
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read()) == {"collections": []}
        srv.stop(grace=0)
        body = json.dumps({"image_a": "a", "image_b": "b", "label": "same",
                           "annotator_id": "tess", "request_id": "after-stop"})
        with pytest.raises((OSError, http.client.HTTPException)):
            conn.request("POST", "/api/collections/c/answers", body,
                         {"Content-Type": "application/json"})
            conn.getresponse().read()
    finally:
        conn.close()
        srv.stop(grace=0)
    for thread in threading.enumerate():  # the connection's thread ends with it
        if "process_request_thread" in thread.name:
            thread.join(timeout=5)
            assert not thread.is_alive()
