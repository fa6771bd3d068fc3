"""The review page's HTTP server: the static page and the JSON API, standard library only.

One :class:`http.server.ThreadingHTTPServer` serves ``/`` (the page), ``/static/*`` (its
script and style sheet, from the package's ``static`` folder) and ``/api/*``
(:class:`reidal.web.api.ReviewAPI`, which talks to reidal over gRPC). Why no web
framework: the page is three files and the API eight routes; a dependency would cost
more than it saves, and a field laptop runs this next to the gRPC server.

Guards for a page that has no login of its own: POST bodies must be JSON (see
:func:`reidal.web.api.parse_body`), no CORS headers are ever sent, and when bound to a
loopback address the ``Host`` header must name loopback, so a web site cannot reach the
API by pointing its own domain at 127.0.0.1 (DNS rebinding).

HTTPS (``ssl_context``): the TLS handshake of a connection runs in that connection's own
handler thread, so a client that never finishes it holds up only itself (for at most
:data:`HANDSHAKE_TIMEOUT_S`), not the accept loop; a failed handshake (plain HTTP, no or
an unknown client certificate under mutual TLS) just closes the connection.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc

from reidal.web.api import MAX_BODY_BYTES, Reply, ReviewAPI, error_reply
from reidal_client import ReidalClient

log = logging.getLogger("reidal.web")

STATIC_DIR = Path(__file__).with_name("static")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
#: Same-origin only: no inline script or style, images from the API (and blob: for none).
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: Seconds a client gets to finish its TLS handshake.
HANDSHAKE_TIMEOUT_S = 10.0


class ReviewHTTP:
    """A running review page. ``port``: the bound port; ``url``: where to open it;
    ``close()``: stop serving and close the gRPC channel (idempotent)."""

    def __init__(self, server: _ReviewServer, thread: threading.Thread,
                 client: ReidalClient, url_host: str, scheme: str = "http") -> None:
        self._server = server
        self._thread = thread
        self._client = client
        self._closed = False
        self.port: int = server.server_address[1]
        self.url: str = f"{scheme}://{url_host}:{self.port}/"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server.end_connections(wait_s=5)
        self._client.close()

    def __enter__(self) -> ReviewHTTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ReviewHTTP({self.url!r})"


class _ReviewServer(ThreadingHTTPServer):
    """The HTTP server; with ``ssl_context`` set, HTTPS (module docstring).

    It knows its open connections so that :meth:`end_connections` can end them: browsers
    keep a connection open between requests, and its handler thread would otherwise outlive
    the page, answering with a closed gRPC channel (an error the page cannot retry, so an
    answer sent during a restart was lost) and holding its socket until the browser leaves.
    """

    daemon_threads = True
    ssl_context: ssl.SSLContext | None = None

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._open: set[socket.socket] = set()
        self._open_changed = threading.Condition()
        self._ending = False
        super().__init__(*args, **kwargs)

    def _swap(self, old: socket.socket | None, new: socket.socket | None) -> bool:
        """Forget ``old`` and remember ``new`` as open; False once connections are ending."""
        with self._open_changed:
            self._open.discard(old)  # type: ignore[arg-type]
            self._open_changed.notify_all()
            if new is None or self._ending:
                return False
            self._open.add(new)
            return True

    def finish_request(self, request, client_address) -> None:  # type: ignore[override]
        conn = request
        try:
            if not self._swap(None, request):
                return
            if self.ssl_context is not None:
                try:
                    request.settimeout(HANDSHAKE_TIMEOUT_S)
                    wrapped = self.ssl_context.wrap_socket(request, server_side=True)
                except OSError as exc:  # ssl.SSLError included
                    log.debug("TLS handshake with %s failed: %s", client_address, exc)
                    return  # process_request_thread closes the socket
                conn = wrapped
                if not self._swap(request, wrapped):
                    return
                wrapped.settimeout(None)
            super().finish_request(conn, client_address)
        finally:
            self._swap(conn, None)
            if conn is not request:
                self.shutdown_request(conn)

    def end_connections(self, wait_s: float) -> None:
        """Stop reading from every open connection, so idle ones end at once and one in
        the middle of a request ends after its reply, and wait up to ``wait_s`` for them."""
        with self._open_changed:
            self._ending = True
            for conn in self._open:
                try:  # the plain socket's shutdown: SSLSocket's would drop its TLS state
                    socket.socket.shutdown(conn, socket.SHUT_RD)
                except OSError:
                    pass
            self._open_changed.wait_for(lambda: not self._open, timeout=wait_s)


def _static_files() -> dict[str, Path]:
    """URL path -> file: exactly the files shipped, so no path from a request is ever
    joined onto the file system."""
    files = {f"/static/{p.name}": p for p in STATIC_DIR.iterdir()
             if p.is_file() and p.suffix in _TYPES}
    files["/"] = files["/index.html"] = STATIC_DIR / "index.html"
    return files


def _handler(api: ReviewAPI, static: dict[str, Path], loopback_only: bool
             ) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "reidal-review"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            log.debug("%s %s", self.address_string(), format % args)

        def do_GET(self) -> None:  # noqa: N802 - http.server's method name
            self._dispatch("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch("POST")

        def _dispatch(self, method: str) -> None:
            path = urllib.parse.urlsplit(self.path).path
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                self.close_connection = True
                self._send(error_reply(400, "INVALID_ARGUMENT", "bad Content-Length"))
                return
            if length > MAX_BODY_BYTES:
                self.close_connection = True
                self._send(error_reply(413, "INVALID_ARGUMENT",
                                       f"body over {MAX_BODY_BYTES} bytes"))
                return
            body = self.rfile.read(length) if length > 0 else b""
            if loopback_only and not self._host_is_loopback():
                self._send(error_reply(403, "PERMISSION_DENIED",
                                       "this page only answers requests for a loopback host "
                                       "name (127.0.0.1 or localhost)"))
                return
            if path.startswith("/api/"):
                reply = api.handle(method, path[len("/api/"):], body=body,
                                   content_type=self.headers.get("Content-Type", ""),
                                   if_none_match=self.headers.get("If-None-Match", ""),
                                   cookie=self.headers.get("Cookie", ""))
                self._send(reply)
            elif path in static and method == "GET":
                file = static[path]
                self._send(Reply(200, file.read_bytes(), _TYPES[file.suffix],
                                 (("Cache-Control", "no-cache"),)))
            else:
                self._send(error_reply(404, "NOT_FOUND", f"nothing at {path}"))

        def _host_is_loopback(self) -> bool:
            host = (self.headers.get("Host") or "").strip().lower()
            if host.startswith("["):
                host = host[1:].split("]", 1)[0]
            else:
                host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
            return host in _LOOPBACK

        def _send(self, reply: Reply) -> None:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("X-Frame-Options", "DENY")
            if reply.content_type.startswith("text/html"):
                self.send_header("Content-Security-Policy", CSP)
            if reply.content_type.startswith("application/json"):
                self.send_header("Cache-Control", "no-store")
            for name, value in reply.headers:
                self.send_header(name, value)
            self.end_headers()
            if reply.status != 304:
                self.wfile.write(reply.body)

    return Handler


def start_review_http(grpc_target: str, *, host: str = "127.0.0.1", port: int = 0,
                      token: str | None = None,
                      credentials: grpc.ChannelCredentials | None = None,
                      metadata: Sequence[tuple[str, str]] = (), retries: int = 3,
                      timeout_s: float = 60.0, auth_required: bool = False,
                      channel_options: Sequence[tuple[str, str]] = (),
                      ssl_context: ssl.SSLContext | None = None,
                      pinned_annotator: Callable[[str], str] | None = None) -> ReviewHTTP:
    """Serve the pair-review page on ``http://host:port/`` (``https://`` with
    ``ssl_context``; ``port=0``: any free port), calling the reidal gRPC server at
    ``grpc_target``.

    token / credentials / metadata: the hook for a gRPC server that wants authentication
    or TLS: ``token`` is sent as ``authorization: Bearer <token>`` with every call,
    ``credentials`` makes the channel TLS, ``metadata`` adds other pairs; channel_options:
    gRPC channel arguments (e.g. ``grpc.ssl_target_name_override``).
    auth_required: the gRPC server checks access tokens, so the page asks each person for
    theirs (:mod:`reidal.web.api`, sessions) and calls with it. Without tokens the page
    has no login: bind it to loopback (the default) unless the network is trusted.
    pinned_annotator: token -> the annotator name it pins ("" when none), so the page can
    fill in (and lock) the name of a person whose token pins one; without it the page
    cannot tell and the gRPC server still refuses another name.
    ssl_context: serve HTTPS with it (:func:`reidal.tls.https_context`) instead of HTTP.
    retries: UNAVAILABLE retries of each gRPC call before the page is told to retry later
    (it keeps the answer and resends it). Raises RuntimeError when the port cannot be
    bound.
    """
    client = ReidalClient(grpc_target, timeout_s=timeout_s, retries=retries,
                          max_backoff_s=2.0, credentials=credentials, metadata=metadata,
                          token=token or None, channel_options=channel_options)
    bare = host.strip("[]")
    loopback_only = bare in _LOOPBACK
    server_class = type("ReviewServer", (_ReviewServer,), {
        "ssl_context": ssl_context,
        "address_family": socket.AF_INET6 if ":" in bare else socket.AF_INET})
    api = ReviewAPI(client, auth_required=auth_required, secure_cookie=ssl_context is not None,
                    pinned_annotator=pinned_annotator)
    try:
        server = server_class((bare, port), _handler(api, _static_files(), loopback_only))
    except OSError as exc:
        client.close()
        raise RuntimeError(f"cannot bind the review page to {host}:{port}: {exc}") from None
    thread = threading.Thread(target=server.serve_forever, name="reidal-review-http",
                              daemon=True)
    thread.start()
    url_host = "127.0.0.1" if bare in ("", "0.0.0.0") else \
        "[::1]" if bare == "::" else f"[{bare}]" if ":" in bare else bare
    scheme = "https" if ssl_context is not None else "http"
    log.info("review page on %s://%s:%d/ (gRPC %s)", scheme, url_host, server.server_address[1],
             grpc_target)
    return ReviewHTTP(server, thread, client, url_host, scheme)
