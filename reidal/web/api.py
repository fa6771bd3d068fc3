"""The review page's JSON API: a few HTTP routes over the gRPC services.

Why a JSON layer at all: a browser cannot speak gRPC over HTTP/2 without a proxy, and the
page must stay a plain static file. So the page calls these routes and each route makes
one or two calls through :class:`reidal_client.ReidalClient` (deadlines, retries on
UNAVAILABLE, request ids), turning the client's dataclasses into JSON. No state lives
here: the page keeps its own answers-in-flight and every stored fact comes from the server.

Routes (ids are URL path segments, percent-encoded; POST bodies are JSON):

========  ==========================================  ========================================
GET       /api/collections                            every collection with its progress
GET       /api/collections/{cid}                      one collection
POST      /api/collections/{cid}/batch                GetQueryPairs: {budget?, request_id?}
GET       /api/collections/{cid}/batches/{bid}        GetQueryBatch (which pairs are answered)
POST      /api/collections/{cid}/answers              SubmitConstraints of one answer
POST      /api/collections/{cid}/undo                 DeleteConstraint of one answer
GET       /api/collections/{cid}/identities           GetIdentities, contradictions included
GET       /api/images/{cid}/{iid}                     GetImage: the encoded file
GET       /api/session                                {auth_required, signed_in, pinned_...}
POST      /api/session                                sign in: {token} (checked with the server)
POST      /api/session/end                            sign out
========  ==========================================  ========================================

Access tokens (a gRPC server run with ``--auth-tokens``): a person signs in once with their
own token; the API keeps it in memory under a random session id, set as an HttpOnly,
SameSite=Strict cookie, and makes that person's calls with it (the gRPC server checks it,
so what a token may do is decided there, as for every client). The token never goes back
to the browser and is never logged; images load like every other route, with the cookie.
A token that pins an annotator (:mod:`reidal.auth`) records answers only under that name:
the session says which (``pinned_annotator`` of GET and POST /api/session, "" when the
name is free) and the page fills it in, read-only, instead of letting a person type a
name every answer would be refused for. The gRPC server's check stays the one that counts.

Errors are ``{"error": {"code": "NOT_FOUND", "message": "...", "retryable": false}}`` with
the HTTP status of :data:`HTTP_STATUS`; ``retryable`` tells the page to keep the answer and
send it again later (the server or its network is down), not to show it as refused.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import grpc

from reidal_client import ReidalClient, ReidalClientError
from reidal_client.types import (
    Answer,
    Collection,
    Contradiction,
    Identities,
    QueryBatch,
    QueryPair,
    StoredAnswer,
    parse_label,
)

#: HTTP status of each gRPC code (anything else: 502, the backend failed in an odd way).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}
#: Statuses after which the same request may simply be sent again later.
RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
#: Largest JSON body accepted (one answer is a few hundred bytes).
MAX_BODY_BYTES = 64 * 1024
#: Longest request id / annotator name accepted (ids of the API are at most 256 characters).
MAX_TEXT = 256

JSON_TYPE = "application/json; charset=utf-8"

log = logging.getLogger("reidal.web")


@dataclass(frozen=True)
class Reply:
    """What a route answers: status, body bytes, content type, extra headers."""

    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()


class ApiError(Exception):
    """A request the API refuses before (or instead of) calling the server."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"{status} {code}: {message}")


def json_reply(data: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode())


def error_reply(status: int, code: str, message: str) -> Reply:
    reply = json_reply({"error": {"code": code, "message": message,
                                  "retryable": status in RETRYABLE_HTTP}}, status)
    if status in RETRYABLE_HTTP:
        return Reply(reply.status, reply.body, reply.content_type, (("Retry-After", "2"),))
    return reply


def client_error_reply(exc: ReidalClientError) -> Reply:
    """A failed gRPC call as HTTP: its status code mapped, its message kept."""
    return error_reply(HTTP_STATUS.get(exc.code, 502), exc.code.name, exc.message)


# ------------------------------------------------------------------------ JSON of types


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def collection_json(c: Collection) -> dict[str, Any]:
    return {"collection_id": c.collection_id, "species": c.species,
            "model": str(c.model), "image_count": c.image_count,
            "excluded_image_count": c.excluded_image_count,
            "embedded_image_count": c.embedded_image_count, "answer_count": c.answer_count,
            "cycle": c.cycle, "pairs_asked": c.pairs_asked, "total_pairs": c.total_pairs,
            "budget_used": c.budget_used, "created_at": _iso(c.created_at)}


def why_asked(pair: QueryPair) -> str:
    """Why Ambiguity-Aware Sampling chose the pair, in the annotator's words (method.md
    steps 3 and 4)."""
    if pair.pool == "U_os":
        return ("Two nearby groups of uncertain images: are they one animal? (medoids of two "
                "regions of uncertainty; a clustering may have split one individual)")
    if pair.pool == "U_us":
        return (f"The closest pair across two clusters that the other clustering joins "
                f"(region {pair.region}): a clustering may have merged two individuals")
    if pair.pool == "continuation":
        return ("Two near neighbours right at the clustering's threshold: the answer decides "
                "whether they are linked (asked after the disagreements ran out, to use the "
                "rest of the cycle's budget)")
    return "Chosen where the two clusterings of the collection disagree"


def pair_json(p: QueryPair) -> dict[str, Any]:
    return {"pair_id": p.pair_id, "image_a": p.image_a, "image_b": p.image_b,
            "similarity": p.similarity, "pool": p.pool, "region": p.region,
            "probability": p.probability, "answered": p.answered, "why": why_asked(p)}


def batch_json(b: QueryBatch) -> dict[str, Any]:
    return {"batch_id": b.batch_id, "collection_id": b.collection_id, "cycle": b.cycle,
            "pairs": [pair_json(p) for p in b.pairs], "budget": b.budget, "reason": b.reason,
            "reason_text": b.reason_text, "finished": b.finished, "answered": b.answered,
            "sampled_images": b.sampled_images, "model": str(b.model),
            "created_at": _iso(b.created_at), "sampler": b.stats.get("sampler", ""),
            "clustering": asdict(b.clustering) if b.clustering is not None else None}


def answer_json(a: StoredAnswer) -> dict[str, Any]:
    return {"answer_id": a.answer_id, "image_a": a.image_a, "image_b": a.image_b,
            "label": a.label, "annotator_id": a.annotator_id, "batch_id": a.batch_id,
            "pair_id": a.pair_id, "request_id": a.request_id, "status": a.status,
            "received_at": _iso(a.received_at)}


def contradiction_json(c: Contradiction) -> dict[str, Any]:
    return {"answers": [answer_json(a) for a in c.answers],
            "dropped_answer_id": c.dropped_answer_id, "explanation": c.explanation}


def identities_json(ids: Identities) -> dict[str, Any]:
    return {"collection_id": ids.collection_id, "cycle": ids.cycle, "model": str(ids.model),
            "applied_answers": ids.applied_answers,
            "excluded_image_ids": list(ids.excluded_image_ids),
            "identities": [{"identity_id": x.identity_id, "image_ids": list(x.image_ids),
                            "size": x.size, "same_answers": x.same_answers,
                            "different_answers": x.different_answers, "names": list(x.names),
                            "new_individual": x.new_individual,
                            "name_conflict": x.name_conflict} for x in ids.identities],
            "contradictions": [contradiction_json(c) for c in ids.contradictions]}


# ------------------------------------------------------------------------ input checks


def _text(body: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    value = body.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ApiError(400, "INVALID_ARGUMENT", f"{key} must be a string")
    if required and not value.strip():
        raise ApiError(400, "INVALID_ARGUMENT", f"{key} is required")
    if len(value) > MAX_TEXT:
        raise ApiError(400, "INVALID_ARGUMENT", f"{key} is longer than {MAX_TEXT} characters")
    return value


def _epoch_ms(body: Mapping[str, Any], key: str) -> float | None:
    """A client time in epoch milliseconds (JavaScript's Date.now()) as epoch seconds."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value) or value < 0:
        raise ApiError(400, "INVALID_ARGUMENT", f"{key} must be epoch milliseconds")
    return float(value) / 1000.0


def _budget(body: Mapping[str, Any]) -> int | float | None:
    value = body.get("budget")
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, "INVALID_ARGUMENT",
                       "budget must be a number of pairs (20) or a fraction (0.0002)")
    if isinstance(value, float) and value.is_integer() and value >= 1:
        value = int(value)
    if isinstance(value, int) and value < 1 or \
            isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ApiError(400, "INVALID_ARGUMENT",
                       f"budget must be a count >= 1 or a fraction in (0, 1], got {value}")
    return value


def parse_body(body: bytes, content_type: str) -> dict[str, Any]:
    """The JSON object of a POST. Requiring application/json is also the CSRF guard: a
    cross-site page cannot send it without a CORS preflight, which this server never
    grants."""
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "INVALID_ARGUMENT", "send the body as application/json")
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, "INVALID_ARGUMENT", f"body over {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body.decode("utf-8") or "{}")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "INVALID_ARGUMENT", f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "INVALID_ARGUMENT", "body must be a JSON object")
    return data


# ------------------------------------------------------------------------ routes

Handler = Callable[..., Reply]


#: Name of the session cookie (a random id; the token stays on the server side).
SESSION_COOKIE = "reidal_session"
#: Sessions kept (least recently used dropped first: that person signs in again).
MAX_SESSIONS = 1000


def session_id_of(cookie_header: str) -> str:
    """The session id in a ``Cookie`` header ("" when none)."""
    for part in (cookie_header or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == SESSION_COOKIE:
            return value.strip()
    return ""


class ReviewAPI:
    """The routes of the module docstring over one :class:`ReidalClient`.

    auth_required: the gRPC server checks access tokens (the page then asks for one).
    secure_cookie: the page is served over HTTPS, so the session cookie is ``Secure``.
    pinned_annotator: token -> the annotator it pins ("" when none); None: unknown here
    (the page then keeps a free name field).
    """

    def __init__(self, client: ReidalClient, *, auth_required: bool = False,
                 secure_cookie: bool = False,
                 pinned_annotator: Callable[[str], str] | None = None) -> None:
        self._client = client
        self.auth_required = auth_required
        self._cookie_flags = "HttpOnly; SameSite=Strict; Path=/" + (
            "; Secure" if secure_cookie else "")
        self._pinned_annotator = pinned_annotator
        self._local = threading.local()
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._sessions_lock = threading.Lock()
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = [
            ("GET", re.compile(r"session"), self.session),
            ("POST", re.compile(r"session"), self.sign_in),
            ("POST", re.compile(r"session/end"), self.sign_out),
            ("GET", re.compile(r"collections"), self.list_collections),
            ("GET", re.compile(r"collections/([^/]+)"), self.get_collection),
            ("POST", re.compile(r"collections/([^/]+)/batch"), self.next_batch),
            ("GET", re.compile(r"collections/([^/]+)/batches/([^/]+)"), self.get_batch),
            ("POST", re.compile(r"collections/([^/]+)/answers"), self.submit_answer),
            ("POST", re.compile(r"collections/([^/]+)/undo"), self.undo_answer),
            ("GET", re.compile(r"collections/([^/]+)/identities"), self.identities),
            ("GET", re.compile(r"images/([^/]+)/([^/]+)"), self.image),
        ]

    @property
    def client(self) -> ReidalClient:
        """The client of the request being handled: with its session's token, if any."""
        return getattr(self._local, "client", None) or self._client

    def handle(self, method: str, path: str, *, body: bytes = b"", content_type: str = "",
               if_none_match: str = "", cookie: str = "") -> Reply:
        """Answer one request to ``/api/<path>`` (``path`` without the prefix, still
        percent-encoded, no query string; ``cookie``: the request's Cookie header)."""
        sid = session_id_of(cookie)
        with self._sessions_lock:
            token = self._sessions.get(sid) if sid else None
            if token is not None:
                self._sessions.move_to_end(sid)
        self._local.client = self._client.with_token(token) if token else None
        self._local.session = sid if token else ""
        self._local.token = token or ""
        try:
            return self._route(method, path, body=body, content_type=content_type,
                               if_none_match=if_none_match)
        finally:
            self._local.client = None
            self._local.session = ""
            self._local.token = ""

    def _route(self, method: str, path: str, *, body: bytes, content_type: str,
               if_none_match: str) -> Reply:
        allowed = []
        for verb, pattern, handler in self._routes:
            match = pattern.fullmatch(path.strip("/"))
            if match is None:
                continue
            if verb != method:
                allowed.append(verb)
                continue
            args = [urllib.parse.unquote(g) for g in match.groups()]
            try:
                if method == "POST":
                    return handler(*args, parse_body(body, content_type))
                if handler == self.image:
                    return handler(*args, if_none_match=if_none_match)
                return handler(*args)
            except ApiError as exc:
                return error_reply(exc.status, exc.code, exc.message)
            except ReidalClientError as exc:
                return client_error_reply(exc)
            except (ValueError, TypeError) as exc:  # the client's own argument checks
                return error_reply(400, "INVALID_ARGUMENT", str(exc))
            except Exception as exc:  # a bug here: a clear 500, not a dropped connection
                log.exception("review API %s /api/%s failed", method, path)
                return error_reply(500, "INTERNAL", f"{type(exc).__name__}: {exc}")
        if allowed:
            reply = error_reply(405, "METHOD_NOT_ALLOWED", f"use {', '.join(allowed)}")
            return Reply(reply.status, reply.body, reply.content_type,
                         (("Allow", ", ".join(allowed)),))
        return error_reply(404, "NOT_FOUND", f"no API route /api/{path.strip('/')}")

    # ------------------------------------------------------------------ sessions
    def _session_json(self, token: str) -> dict[str, Any]:
        """What the page knows of its session. pinned_annotator is looked up on every
        call, so a token file edited while people are signed in applies at once."""
        pinned = self._pinned_annotator(token) if token and self._pinned_annotator else ""
        return {"auth_required": self.auth_required, "signed_in": bool(token),
                "pinned_annotator": pinned}

    def session(self) -> Reply:
        return json_reply(self._session_json(getattr(self._local, "token", "")))

    def sign_in(self, body: dict[str, Any]) -> Reply:
        """Check the token with the server (a call it must authenticate), then remember
        it under a new session id set as a cookie (the request's old session, if any, is
        forgotten: its cookie no longer works)."""
        token = _text(body, "token").strip()
        self._client.with_token(token).list_collections()  # UNAUTHENTICATED -> 401
        sid = secrets.token_urlsafe(32)
        with self._sessions_lock:
            self._sessions.pop(getattr(self._local, "session", ""), None)
            self._sessions[sid] = token
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        reply = json_reply(self._session_json(token))
        return Reply(reply.status, reply.body, reply.content_type, (
            ("Set-Cookie", f"{SESSION_COOKIE}={sid}; {self._cookie_flags}"),))

    def sign_out(self, body: dict[str, Any]) -> Reply:
        sid = getattr(self._local, "session", "")
        with self._sessions_lock:
            self._sessions.pop(sid, None)
        reply = json_reply(self._session_json(""))
        return Reply(reply.status, reply.body, reply.content_type, (
            ("Set-Cookie", f"{SESSION_COOKIE}=; {self._cookie_flags}; Max-Age=0"),))

    # ------------------------------------------------------------------ collections

    def list_collections(self) -> Reply:
        return json_reply({"collections": [collection_json(c)
                                           for c in self.client.list_collections()]})

    def get_collection(self, cid: str) -> Reply:
        return json_reply(collection_json(self.client.get_collection(cid)))

    # ------------------------------------------------------------------ batches

    def next_batch(self, cid: str, body: dict[str, Any]) -> Reply:
        """One sampling cycle. The page sends a request id it keeps until the batch
        arrives, so a double click or a reload during the cycle returns the same batch."""
        request_id = _text(body, "request_id", required=False) or None
        batch = self.client.get_query_pairs(cid, _budget(body), request_id=request_id)
        return json_reply({"batch": batch_json(batch),
                           "collection": collection_json(self.client.get_collection(cid))})

    def get_batch(self, cid: str, bid: str) -> Reply:
        batch = self.client.get_query_batch(cid, bid)
        return json_reply({"batch": batch_json(batch),
                           "collection": collection_json(self.client.get_collection(cid))})

    # ------------------------------------------------------------------ answers

    def submit_answer(self, cid: str, body: dict[str, Any]) -> Reply:
        """One answer, to a batch's pair (batch_id + pair_id) or to two images (a re-check
        from the summary). The request id is required: it is what makes the page's
        resend after a lost response, or after a reload, store nothing twice."""
        request_id = _text(body, "request_id")
        annotator = _text(body, "annotator_id").strip()
        try:
            label = parse_label(_text(body, "label"))
        except ValueError as exc:
            raise ApiError(400, "INVALID_ARGUMENT", str(exc)) from None
        batch_id = _text(body, "batch_id", required=False)
        pair_id = _text(body, "pair_id", required=False)
        times = {"started_at": _epoch_ms(body, "started_at"),
                 "ended_at": _epoch_ms(body, "ended_at")}
        if pair_id:
            if not batch_id:
                raise ApiError(400, "INVALID_ARGUMENT", "an answer to pair_id needs its batch_id")
            answer = Answer.for_pair(pair_id, label, annotator_id=annotator, **times)
        else:
            a, b = _text(body, "image_a"), _text(body, "image_b")
            answer = Answer.for_images(a, b, label, annotator_id=annotator, **times)
        result = self.client.submit_answers(cid, [answer], batch_id=batch_id,
                                            request_id=request_id)
        return json_reply({
            "answer_id": result.answer_ids[0], "stored": result.stored_count,
            "replayed": result.replayed_count > 0, "superseded": result.superseded_count,
            "contradictions": [contradiction_json(c) for c in result.contradictions],
            "collection": collection_json(self.client.get_collection(cid))})

    def undo_answer(self, cid: str, body: dict[str, Any]) -> Reply:
        """Delete one answer (soft, audited; an earlier answer on the pair becomes current
        again). A retry after a lost response finds the answer already deleted: that is
        reported as done (``already_deleted``), not as an error."""
        answer_id = _text(body, "answer_id")
        actor = _text(body, "actor", required=False)
        try:
            deleted, restored = self.client.delete_constraint(
                cid, answer_id, actor=actor, reason="undone in the review page")
            already = False
        except ReidalClientError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
            batch_id = _text(body, "batch_id", required=False)
            history = self.client.list_constraints(cid, batch_id=batch_id,
                                                   include_history=True)
            deleted = next((a for a in history if a.answer_id == answer_id
                            and a.status == "DELETED"), None)
            if deleted is None:
                raise
            restored, already = None, True
        return json_reply({"deleted": answer_json(deleted),
                           "restored": answer_json(restored) if restored else None,
                           "already_deleted": already,
                           "collection": collection_json(self.client.get_collection(cid))})

    # ------------------------------------------------------------------ summary

    def identities(self, cid: str) -> Reply:
        data = identities_json(self.client.get_identities(cid))
        data["collection"] = collection_json(self.client.get_collection(cid))
        return json_reply(data)

    # ------------------------------------------------------------------ images

    def image(self, cid: str, iid: str, *, if_none_match: str = "") -> Reply:
        """The encoded file. Its SHA-256 is the ETag: a tablet on a slow link fetches each
        image once, then revalidates (304)."""
        held = [t.strip().strip('"') for t in if_none_match.split(",") if t.strip()]
        # One digest is passed on (the browser holds one copy of an image URL), so a kept
        # image that is still current is neither read nor sent over gRPC.
        content = self.client.get_image(cid, iid, if_none_match=held[0] if held else "")
        etag = f'"{content.sha256}"'
        headers = (("ETag", etag), ("Cache-Control", "private, max-age=300"))
        if content.not_modified or content.sha256 in held:
            return Reply(304, b"", content.mime_type or "application/octet-stream", headers)
        return Reply(200, content.data, content.mime_type, headers)
