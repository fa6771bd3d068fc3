"""Access tokens: who may call which reidal method on which collection.

A server started with a tokens file (``reidal serve --auth-tokens FILE``) refuses every call
without a known token, except health checks and reflection (Kubernetes probes and grpcurl
discovery stay open). A client sends ``authorization: Bearer <token>`` metadata.

The tokens file (JSON) holds, per token, the SHA-256 of the token, never the token itself,
so the file (a ConfigMap, a Secret, a backup) gives nobody access::

    {"tokens": [
      {"name": "field-team", "sha256": "<64 hex>", "role": "annotator",
       "collections": ["zebras-2024"], "annotator": "alice"},
      {"name": "ops", "sha256": "<64 hex>", "role": "admin", "collections": "*"}
    ]}

``reidal token create`` makes a token and its entry. The file is read again when it
changes (its modification time), so tokens are added and revoked without a restart; a file
that no longer parses is logged and the previous tokens stay in force.

What a token allows:

- ``collections``: the collections it may touch (``"*"``: all, including ones not created
  yet). Every request naming another collection fails with PERMISSION_DENIED, including
  each message of a streaming request; requests naming an operation or a training job are
  checked against the collection that owns it; list responses (ListCollections,
  ListTrainingJobs without a collection) hold only the allowed collections.
- ``role``: ``reader`` (read-only methods), ``annotator`` (also get pairs, submit, delete
  and exclude: the annotation loop), ``admin`` (also create, delete, ingest, embed, train).
  :data:`METHOD_ROLES` lists the least role of every method; a method missing there needs
  ``admin``, so an RPC added later is closed until it is classified.
- ``annotator`` (optional): the name recorded with this token's answers and actions. Set,
  it is enforced: an answer's empty ``annotator_id`` (and an empty ``actor``) is filled with
  it and any other name is refused (PERMISSION_DENIED), so a person's token cannot record
  answers as someone else. Unset, empty ``annotator_id`` / ``actor`` fields get the token's
  ``name`` and given ones are kept (a shared token or a platform relaying its users).

Missing, malformed, unknown or revoked tokens -> UNAUTHENTICATED; a known token outside its
role or collections -> PERMISSION_DENIED. Tokens and the authorization metadata are never
logged; a token's ``name`` is (in the status message of a refusal).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from reidal import errors
from reidal.request_checks import UnparsedRequest

log = logging.getLogger("reidal.auth")

#: Roles, weakest first: each may do what the ones before it may.
ROLES: tuple[str, ...] = ("reader", "annotator", "admin")
_RANK = {role: k for k, role in enumerate(ROLES)}
#: ``collections`` value of a token that may use every collection.
ALL_COLLECTIONS = "*"
#: The metadata key carrying ``Bearer <token>``.
METADATA_KEY = "authorization"
#: Prefix of tokens made by :func:`create_token` (recognisable in a leaked-secret scan).
TOKEN_PREFIX = "reidal_"

#: Services callable without a token: health (Kubernetes probes) and reflection.
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})

_R, _A, _ADMIN = "reader", "annotator", "admin"
#: The least role of each method. Not listed (a new RPC) -> admin.
METHOD_ROLES: dict[str, str] = {
    "/reidal.v1.CollectionService/CreateCollection": _ADMIN,
    "/reidal.v1.CollectionService/GetCollection": _R,
    "/reidal.v1.CollectionService/ListCollections": _R,
    "/reidal.v1.CollectionService/DeleteCollection": _ADMIN,
    "/reidal.v1.CollectionService/AddImages": _ADMIN,
    "/reidal.v1.CollectionService/ListImages": _R,
    "/reidal.v1.CollectionService/GetImage": _R,
    "/reidal.v1.CollectionService/DeleteImage": _ADMIN,
    "/reidal.v1.CollectionService/GetVectors": _R,
    "/reidal.v1.CollectionService/PutVectors": _ADMIN,
    "/reidal.v1.CollectionService/EmbedCollection": _ADMIN,
    "/reidal.v1.CollectionService/GetOperation": _R,
    "/reidal.v1.CollectionService/WatchOperation": _R,
    "/reidal.v1.SamplingService/GetQueryPairs": _A,
    "/reidal.v1.SamplingService/StartQueryPairs": _A,
    "/reidal.v1.SamplingService/GetQueryBatch": _R,
    "/reidal.v1.SamplingService/WatchQueue": _R,
    "/reidal.v1.ConstraintService/SubmitConstraints": _A,
    "/reidal.v1.ConstraintService/ListConstraints": _R,
    "/reidal.v1.ConstraintService/DeleteConstraint": _A,
    "/reidal.v1.ConstraintService/ExcludeImage": _A,
    "/reidal.v1.ConstraintService/RestoreImage": _A,
    "/reidal.v1.ConstraintService/GetIdentities": _R,
    "/reidal.v1.EmbeddingService/Embed": _R,
    "/reidal.v1.EmbeddingService/EmbedStream": _R,
    "/reidal.v1.EmbeddingService/ListModels": _R,
    "/reidal.v1.EmbeddingService/GetModel": _R,
    "/reidal.v1.TrainingService/StartTraining": _ADMIN,
    "/reidal.v1.TrainingService/GetJob": _R,
    "/reidal.v1.TrainingService/WatchJob": _R,
    "/reidal.v1.TrainingService/CancelJob": _ADMIN,
    "/reidal.v1.TrainingService/ListTrainingJobs": _R,
    "/reidal.v1.TrainingService/PromoteModel": _ADMIN,
}

#: Request fields naming something owned by a collection (looked up with the ``owners``
#: functions given to :class:`Authorizer`).
OWNED_ID_FIELDS: tuple[str, ...] = ("operation_id", "job_id")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_ENTRY_KEYS = frozenset({"name", "sha256", "role", "collections", "annotator"})


def hash_token(token: str) -> str:
    """The hex SHA-256 stored in the tokens file for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenEntry:
    """One token of the tokens file. collections: None = all. annotator: "" = not pinned."""

    name: str
    sha256: str
    role: str
    collections: frozenset[str] | None
    annotator: str = ""

    def may_use(self, collection_id: str) -> bool:
        return self.collections is None or collection_id in self.collections

    def may_call(self, role: str) -> bool:
        return _RANK[self.role] >= _RANK[role]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "sha256": self.sha256, "role": self.role,
            "collections": ALL_COLLECTIONS if self.collections is None
            else sorted(self.collections)}
        if self.annotator:
            out["annotator"] = self.annotator
        return out


def parse_entry(raw: Any, where: str = "entry") -> TokenEntry:
    """One entry of the tokens file, checked; ValueError naming ``where`` and the problem."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be an object, got {type(raw).__name__}")
    if "token" in raw:
        raise ValueError(f"{where}: holds a plain 'token'; store only its 'sha256' "
                         "(reidal token create prints both)")
    unknown = sorted(set(raw) - _ENTRY_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_ENTRY_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: 'name' must be a non-empty string")
    digest = raw.get("sha256")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest.lower()):
        raise ValueError(f"{where} ({name!r}): 'sha256' must be 64 hex digits")
    role = raw.get("role", "annotator")
    if role not in _RANK:
        raise ValueError(f"{where} ({name!r}): 'role' must be one of {list(ROLES)}, got {role!r}")
    cols = raw.get("collections")
    if cols == ALL_COLLECTIONS:
        collections = None
    elif isinstance(cols, list) and cols and all(isinstance(c, str) and c for c in cols):
        if ALL_COLLECTIONS in cols:
            raise ValueError(f"{where} ({name!r}): write \"collections\": \"*\" for all, "
                             "not a list holding '*'")
        collections = frozenset(cols)
    else:
        raise ValueError(f"{where} ({name!r}): 'collections' must be \"*\" or a non-empty "
                         f"list of collection ids, got {cols!r}")
    annotator = raw.get("annotator", "")
    if not isinstance(annotator, str):
        raise ValueError(f"{where} ({name!r}): 'annotator' must be a string")
    return TokenEntry(name.strip(), digest.lower(), role, collections, annotator.strip())


def parse_tokens(doc: Any, where: str = "tokens file") -> tuple[TokenEntry, ...]:
    """Entries of a tokens document: ``{"tokens": [...]}`` or the bare list."""
    items = doc.get("tokens") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise ValueError(f"{where}: expected {{\"tokens\": [...]}} or a list of entries")
    entries = tuple(parse_entry(raw, f"{where} entry {k}") for k, raw in enumerate(items))
    for field_name in ("name", "sha256"):
        seen: set[str] = set()
        for e in entries:
            value = getattr(e, field_name)
            if value in seen:
                shown = e.name if field_name == "name" else f"of token {e.name!r}"
                raise ValueError(f"{where}: duplicate {field_name} {shown!r}")
            seen.add(value)
    return entries


def load_tokens(path: str | Path) -> tuple[TokenEntry, ...]:
    """Read and check a tokens file (ValueError naming the file and the problem)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"tokens file {str(p)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"tokens file {str(p)!r} is not JSON: {exc}") from None
    return parse_tokens(doc, f"tokens file {str(p)!r}")


def create_token(name: str, collections: Sequence[str] | str, role: str = "annotator",
                 annotator: str = "") -> tuple[str, TokenEntry]:
    """A new random token (shown once) and its entry for the tokens file."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    cols: Any = collections if collections == ALL_COLLECTIONS else list(collections)
    entry = parse_entry({"name": name, "sha256": hash_token(token), "role": role,
                         "collections": cols, "annotator": annotator})
    return token, entry


def add_entry(path: str | Path, entry: TokenEntry) -> None:
    """Append ``entry`` to a tokens file (created when missing), refusing duplicates; the
    file is replaced atomically so a running server never reads half of it."""
    p = Path(path)
    entries = list(load_tokens(p)) if p.exists() else []
    entries.append(entry)
    doc = {"tokens": [e.to_json() for e in entries]}
    parse_tokens(doc, f"tokens file {str(p)!r}")  # duplicates fail before anything is written
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, p)


class TokenTable:
    """Token lookup. Every entry's digest is compared with :func:`hmac.compare_digest`, so
    the time taken says nothing about how close a guess was."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self.entries = tuple(entries)

    def lookup(self, token: str) -> TokenEntry | None:
        digest = hash_token(token).encode("ascii")
        found = None
        for e in self.entries:
            if hmac.compare_digest(digest, e.sha256.encode("ascii")):
                found = e
        return found


class TokenFile:
    """The tokens of a file, re-read when its modification time or size changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._table = TokenTable(load_tokens(self.path))  # a bad file fails the start
        if not self._table.entries:
            log.warning("tokens file %s has no tokens: every call will be refused", self.path)

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def table(self) -> TokenTable:
        """The current tokens. A file that disappears revokes every token (fail closed:
        deleting the file must not leave the last tokens valid); it comes back with the file."""
        stamp = self._stat()
        with self._lock:
            if stamp is None and self._stamp is not None:
                self._stamp = None
                self._table = TokenTable([])
                log.error("tokens file %s is gone: every call is refused until it is back",
                          self.path)
            elif stamp != self._stamp and stamp is not None:
                self._stamp = stamp
                try:
                    self._table = TokenTable(load_tokens(self.path))
                    log.info("tokens file %s reloaded: %d tokens", self.path,
                             len(self._table.entries))
                except ValueError as exc:
                    log.error("tokens file %s not reloaded, the previous tokens stay: %s",
                              self.path, exc)
            return self._table

    def lookup(self, token: str) -> TokenEntry | None:
        return self.table().lookup(token)


class Authorizer(grpc.ServerInterceptor):
    """The server interceptor enforcing tokens (module docstring).

    An interceptor sees only the method and metadata, so it wraps each handler: the token
    is checked when the call starts, collections once each request message is deserialised
    (every message of a stream), and responses on their way out. ``build_server`` installs
    it inside its logging interceptor, so refusals are counted and logged like any status.

    tokens: a :class:`TokenFile` or :class:`TokenTable`. owners: for the fields in
    :data:`OWNED_ID_FIELDS`, a function from the id to its collection id (raising
    :class:`reidal.errors.NotFound` for an unknown id, which is then left to the handler);
    without one, only tokens for all collections may use such a request.
    """

    def __init__(self, tokens: TokenFile | TokenTable,
                 owners: Mapping[str, Callable[[str], str]] | None = None) -> None:
        self.tokens = tokens
        self.owners = dict(owners or {})

    @classmethod
    def from_file(cls, path: str | Path,
                  owners: Mapping[str, Callable[[str], str]] | None = None) -> Authorizer:
        return cls(TokenFile(path), owners)

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.lstrip("/").rpartition("/")[0] in OPEN_SERVICES:
            return handler
        need = METHOD_ROLES.get(method, _ADMIN)
        streaming_in = handler.request_streaming
        streaming_out = handler.response_streaming
        kind = (f"{'stream' if streaming_in else 'unary'}_"
                f"{'stream' if streaming_out else 'unary'}")
        behavior = getattr(handler, kind)

        def begin(request_or_iterator, context):
            entry = self._authenticate(context)
            if not entry.may_call(need):
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"token {entry.name!r} ({entry.role}) may not call {method}: "
                              f"it needs the {need} role")
            if streaming_in:
                return entry, self._checked_stream(entry, request_or_iterator, context)
            self._check_request(entry, request_or_iterator, context)
            return entry, request_or_iterator

        if streaming_out:
            def call(request_or_iterator, context):
                entry, request = begin(request_or_iterator, context)
                for response in behavior(request, context):
                    yield self._check_response(entry, response, context)
        else:
            def call(request_or_iterator, context):
                entry, request = begin(request_or_iterator, context)
                return self._check_response(entry, behavior(request, context), context)

        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(call, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    # ------------------------------------------------------------------------ checks

    def _authenticate(self, context: grpc.ServicerContext) -> TokenEntry:
        values = [v for k, v in (context.invocation_metadata() or ()) if k == METADATA_KEY]
        if not values:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "no credentials: send the metadata 'authorization: Bearer <token>'")
        scheme, _, token = str(values[0]).strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "malformed authorization metadata: expected 'Bearer <token>'")
        entry = self.tokens.lookup(token)
        if entry is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token")
        return entry

    def _checked_stream(self, entry: TokenEntry, requests: Iterator[Any],
                        context: grpc.ServicerContext) -> Iterator[Any]:
        for request in requests:
            self._check_request(entry, request, context)
            yield request

    def _check_request(self, entry: TokenEntry, request: Any,
                       context: grpc.ServicerContext) -> None:
        for cid, via in self._collections_of(request, entry, context):
            if not entry.may_use(cid):
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"token {entry.name!r} may not use collection {cid!r}{via}")
        self._stamp_identity(entry, request, context)

    def _collections_of(self, request: Any, entry: TokenEntry,
                        context: grpc.ServicerContext) -> Iterator[tuple[str, str]]:
        """(collection id, how it was found) of everything the request names."""
        desc = getattr(request, "DESCRIPTOR", None)
        if isinstance(request, UnparsedRequest):
            return  # bytes that are no message: INVALID_ARGUMENT from the request checks
        if desc is None:  # not a protobuf message: its collection cannot be told
            if entry.collections is not None:
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"token {entry.name!r} is limited to some collections and this "
                              "request names none this server can read")
            return
        fields = desc.fields_by_name
        if "collection_id" in fields and request.collection_id:
            yield request.collection_id, ""
        if entry.collections is None:
            return  # no lookups needed: every owner is allowed
        for name in OWNED_ID_FIELDS:
            if name not in fields or not getattr(request, name):
                continue
            owner = self.owners.get(name)
            if owner is None:
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"token {entry.name!r} is limited to some collections and this "
                              f"server cannot tell which collection a {name} belongs to")
            try:
                cid = owner(getattr(request, name))
            except errors.NotFound:
                continue  # the handler answers NOT_FOUND, the same for every caller
            yield cid, f" (it owns {name} {getattr(request, name)!r})"

    def _stamp_identity(self, entry: TokenEntry, request: Any,
                        context: grpc.ServicerContext) -> None:
        """Record who: fill empty actor / annotator_id fields, enforce a pinned annotator."""
        if not hasattr(request, "DESCRIPTOR"):
            return
        fields = request.DESCRIPTOR.fields_by_name
        targets: list[tuple[Any, str]] = []
        if "actor" in fields:
            targets.append((request, "actor"))
        answers = fields.get("answers")
        if answers is not None and answers.message_type is not None \
                and "annotator_id" in answers.message_type.fields_by_name:
            targets.extend((a, "annotator_id") for a in request.answers)
        who = entry.annotator or entry.name
        for message, field_name in targets:
            given = getattr(message, field_name)
            if not given:
                setattr(message, field_name, who)
            elif entry.annotator and given != entry.annotator:
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"token {entry.name!r} records as {entry.annotator!r}; it may "
                              f"not set {field_name} {given!r}")

    def _check_response(self, entry: TokenEntry, response: Any,
                        context: grpc.ServicerContext) -> Any:
        """Refuse a response about another collection; drop other collections from lists."""
        if entry.collections is None or not hasattr(response, "DESCRIPTOR"):
            return response
        desc = response.DESCRIPTOR
        if "collection_id" in desc.fields_by_name and response.collection_id \
                and not entry.may_use(response.collection_id):
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"token {entry.name!r} may not see an answer about collection "
                          f"{response.collection_id!r}")
        for f in desc.fields:
            if f.is_repeated and f.message_type is not None \
                    and "collection_id" in f.message_type.fields_by_name:
                items = getattr(response, f.name)
                keep = [item for item in items if entry.may_use(item.collection_id)]
                if len(keep) != len(items):
                    kept = [type(item)() for item in keep]
                    for copy, item in zip(kept, keep, strict=True):
                        copy.CopyFrom(item)
                    del items[:]
                    items.extend(kept)
        return response
