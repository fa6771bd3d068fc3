"""A small Wildbook stand-in speaking the REST subset of docs/wildbook.md (stdlib only).

It is a test double of Wildbook, not of reidal code: it serves encounters (with media
assets and annotations), their images and the encounter search, records every request
and every proposal, and refuses a proposal for an encounter that carries an individual
(as a real receiver must). Failures are injected per path prefix: an HTTP status, a
non-JSON body, or a delay.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    authorization: str | None


@dataclass
class FakeWildbook:
    encounters: dict[str, dict[str, Any]] = field(default_factory=dict)
    media: dict[str, bytes] = field(default_factory=dict)
    proposals: list[dict[str, Any]] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    failures: dict[str, tuple[int, str]] = field(default_factory=dict)
    not_json: set[str] = field(default_factory=set)
    delays: dict[str, float] = field(default_factory=dict)
    token: str | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ data

    def add_media(self, name: str, data: bytes) -> str:
        self.media[name] = data
        return f"/media/{name}"

    def add_encounter(self, enc_id: str, taxonomy: str, assets: list[dict[str, Any]], *,
                      individual_id: str | None = None, name: str | None = None) -> None:
        """assets: [{"id", "url", "annotations": [{"id", ...}]}]; annotations get this
        encounter's id unless they name another one."""
        for asset in assets:
            for ann in asset["annotations"]:
                ann.setdefault("encounterId", enc_id)
        self.encounters[enc_id] = {"id": enc_id, "taxonomy": taxonomy,
                                   "individualId": individual_id,
                                   "individualDisplayName": name, "mediaAssets": assets}

    def set_individual(self, enc_id: str, individual_id: str | None,
                       name: str | None = None) -> None:
        with self._lock:
            self.encounters[enc_id]["individualId"] = individual_id
            self.encounters[enc_id]["individualDisplayName"] = name

    def writes(self) -> list[Recorded]:
        """Requests that would change an encounter (PATCH / PUT / DELETE)."""
        return [r for r in self.requests if r.method in ("PATCH", "PUT", "DELETE")]

    # ------------------------------------------------------------------ server

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeWildbook:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _any(self) -> None:
                try:
                    fake._handle(self, self.command)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True,
                         name="fake-wildbook").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ------------------------------------------------------------------ handling

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str,
              headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def _json(self, h: BaseHTTPRequestHandler, status: int, doc: Any,
              headers: dict[str, str] | None = None) -> None:
        self._send(h, status, json.dumps(doc).encode(), "application/json", headers)

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parsed = urllib.parse.urlsplit(h.path)
        path = urllib.parse.unquote(parsed.path)
        query = urllib.parse.parse_qs(parsed.query)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = raw
        auth = h.headers.get("Authorization")
        with self._lock:
            self.requests.append(Recorded(method, path, query, body, auth))
        for prefix, seconds in list(self.delays.items()):
            if path.startswith(prefix):
                time.sleep(seconds)
        if self.token is not None and auth != f"Bearer {self.token}":
            return self._json(h, 401, {"error": 401})
        for prefix, (status, message) in list(self.failures.items()):
            if path.startswith(prefix):
                return self._json(h, status, {"success": False, "error": message})
        if any(path.startswith(p) for p in list(self.not_json)):
            return self._send(h, 200, b"<html>maintenance</html>", "text/html")
        if method == "POST" and path == "/api/v3/search/encounter":
            return self._search(h, query, body)
        if method == "GET" and path.startswith("/api/v3/encounters/"):
            enc = self.encounters.get(path.removeprefix("/api/v3/encounters/"))
            if enc is None:
                return self._json(h, 404, {"success": False, "statusCode": 404,
                                           "error": "not found"})
            return self._json(h, 200, json.loads(json.dumps(enc)))
        if method == "GET" and path.startswith("/media/"):
            data = self.media.get(path.removeprefix("/media/"))
            if data is None:
                return self._json(h, 404, {"error": "no such media asset"})
            return self._send(h, 200, data, "image/png")
        if method == "POST" and path == "/api/v3/identity-proposals":
            return self._proposals(h, body)
        if method in ("PATCH", "PUT", "DELETE"):
            return self._json(h, 405, {"error": "this fake accepts no writes"})
        return self._json(h, 404, {"error": f"no route {method} {path}"})

    def _search(self, h: BaseHTTPRequestHandler, query: dict[str, list[str]],
                body: Any) -> None:
        start = int(query.get("from", ["0"])[0])
        size = int(query.get("size", ["10"])[0])
        taxonomy = None
        try:
            for f in body["query"]["bool"]["filter"]:
                taxonomy = f["match"]["taxonomy"]
        except (KeyError, TypeError):
            if not (isinstance(body, dict) and "match_all" in body.get("query", {})):
                return self._json(h, 400, {"error": "unsupported query"})
        docs = [e for _, e in sorted(self.encounters.items())
                if taxonomy is None or e["taxonomy"] == taxonomy]
        hits = [{"id": e["id"], "individualId": e["individualId"],
                 "individualDisplayName": e["individualDisplayName"],
                 "taxonomy": e["taxonomy"], "access": "full",
                 "numberAnnotations": sum(len(a["annotations"]) for a in e["mediaAssets"])}
                for e in docs[start:start + size]]
        self._json(h, 200, {"success": True, "searchQueryId": "q-1", "hits": hits},
                   {"X-Wildbook-Total-Hits": str(len(docs))})

    def _proposals(self, h: BaseHTTPRequestHandler, body: Any) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("proposals"), list):
            return self._json(h, 400, {"success": False, "error": "no proposals list"})
        accepted, rejected = 0, []
        with self._lock:
            for p in body["proposals"]:
                enc = self.encounters.get(p.get("encounterId"))
                if enc is None:
                    rejected.append({"encounterId": p.get("encounterId"),
                                     "reason": "unknown encounter"})
                elif enc["individualId"]:
                    rejected.append({"encounterId": p["encounterId"],
                                     "reason": f"already assigned to {enc['individualId']}"})
                else:
                    self.proposals.append(p)
                    accepted += 1
        self._json(h, 200, {"success": True, "accepted": accepted, "rejected": rejected})
