"""The limits of every request field, checked once at the gRPC edge.

Why here and not in each servicer: a limit a servicer forgets becomes an INTERNAL (an int
beyond SQLite's 64 bits, a timestamp protobuf cannot convert) or an error text that echoes
a megabyte back (gRPC then answers RESOURCE_EXHAUSTED for the oversized status). The server
(:mod:`reidal.grpc_server`) runs :func:`check_request` on every request message it has
deserialised, after authentication, so every RPC, present and future, gets the same rules
by walking the message's descriptor, and the servicers receive only messages within them.
The limits are published in the protos (common.proto's conventions); they are:

- strings: at most :data:`STRING_LIMITS` characters by field name (ids, annotator_id,
  actor, species, names 256; notes and URIs 4096), 1024 for any other string (a reason, a
  date bound); map keys and values (image metadata) at most 1024 (:mod:`reidal.limits`);
- ``ModelRef.version``: empty, or a positive decimal integer without leading zeros below
  2**63 (Triton's version numbers are int64);
- ``page_token``: empty, or a decimal integer below 2**63 (the token a page returned);
  ``page_size``: at most 1000 (0 = 100);
- ``google.protobuf.Timestamp``: seconds within 0001-01-01 .. 9999-12-31 and nanos in
  [0, 10**9), the range the protobuf spec defines.

Request bytes that are no message at all are handled here too: :func:`lenient` wraps a
deserializer so that it returns an :class:`UnparsedRequest` instead of raising (gRPC would
answer INTERNAL and log a traceback before any interceptor ran, so authentication could
not come first); the server refuses it with INVALID_ARGUMENT after authentication.

Messages name values through :func:`shown`, which cuts them, so no error text grows with
the input. Nothing here knows gRPC: it speaks protobuf messages and raises
:class:`reidal.errors.InvalidArgument`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from reidal.errors import InvalidArgument
from reidal.limits import (
    DEFAULT_PAGE_SIZE,
    MAX_ID_LENGTH,
    MAX_INT64,
    MAX_METADATA_TEXT,
    MAX_NAME_LENGTH,
    MAX_NOTE_LENGTH,
    MAX_PAGE_SIZE,
    MAX_TEXT_LENGTH,
    MAX_URI_LENGTH,
    MAX_WHO_LENGTH,
)

#: The range of google.protobuf.Timestamp: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)
#: How many characters of a value an error message shows.
SHOWN_CHARS = 40

_IDS = ("collection_id", "image_id", "id", "image_ids", "image_a", "image_b", "pair_id",
        "batch_id", "answer_id", "operation_id", "job_id", "request_id", "if_none_match")
#: Longest value of a string field, by field name (repeated fields: of each item).
STRING_LIMITS: dict[str, int] = {
    **dict.fromkeys(_IDS, MAX_ID_LENGTH),
    "annotator_id": MAX_WHO_LENGTH, "actor": MAX_WHO_LENGTH, "species": MAX_WHO_LENGTH,
    "name": MAX_NAME_LENGTH, "note": MAX_NOTE_LENGTH, "uri": MAX_URI_LENGTH,
}

_VERSION = re.compile(r"[1-9][0-9]{0,18}")
_TOKEN = re.compile(r"[0-9]{1,19}")
_TIMESTAMP = "google.protobuf.Timestamp"
_MODEL_REF = "reidal.v1.ModelRef"


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """``value`` quoted for an error message, cut after ``limit`` characters."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def check_model_version(version: str, where: str = "model.version") -> str:
    """A ModelRef.version: empty (the default version) or a Triton version number."""
    problem = _version_problem(version)
    if problem:
        raise InvalidArgument(f"{where} {problem}")
    return version


def page_size(value: int, where: str = "page_size") -> int:
    """The items of one page a request asks for: 1..MAX_PAGE_SIZE, 0 = DEFAULT_PAGE_SIZE."""
    if value > MAX_PAGE_SIZE:
        raise InvalidArgument(f"{where} {_size_problem(value)}")
    return value or DEFAULT_PAGE_SIZE


def parse_page_token(token: str, where: str = "page_token") -> int | None:
    """The position a page token holds (None for the first page)."""
    problem = _token_problem(token)
    if problem:
        raise InvalidArgument(f"{where} {problem}")
    return int(token) if token else None


def check_request(message: Message) -> None:
    """Raise InvalidArgument naming the first field of ``message`` outside its limits."""
    try:
        _walk(message)
    except _Refused as refused:
        where = ".".join(reversed(refused.path))
        raise InvalidArgument(f"{where} {refused.problem}") from None


# The walk runs on every request (10000 answers in one SubmitConstraints), so each message
# type's checks are planned once, and a field's path is built only when a check fails, as
# the refusal travels up.


class _Refused(Exception):
    def __init__(self, problem: str, field: str) -> None:
        self.problem = problem
        self.path = [field]


#: What is checked in a field: kind ("msg", "ts", "str", "token", "size", "map"), its name,
#: its length limit (strings), repeated.
_Plan = tuple[tuple[str, str, int, bool], ...]
_PLANS: dict[str, _Plan] = {}


def _plan(desc: Descriptor) -> _Plan:
    plan = _PLANS.get(desc.full_name)
    if plan is None:
        steps = []
        for f in desc.fields:
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                steps.append(("map", f.name, MAX_METADATA_TEXT, False))
            elif f.type == FieldDescriptor.TYPE_MESSAGE:
                timestamp = f.message_type.full_name == _TIMESTAMP
                steps.append(("ts" if timestamp else "msg", f.name, 0, f.is_repeated))
            elif f.type == FieldDescriptor.TYPE_STRING:
                steps.append(("token" if f.name == "page_token" else "str", f.name,
                              STRING_LIMITS.get(f.name, MAX_TEXT_LENGTH), f.is_repeated))
            elif f.name == "page_size" and not f.is_repeated:
                steps.append(("size", f.name, MAX_PAGE_SIZE, False))
        plan = _PLANS[desc.full_name] = tuple(steps)
    return plan


def _walk(message: Message) -> None:
    desc = message.DESCRIPTOR
    if desc.full_name == _TIMESTAMP:  # a request that is a bare Timestamp
        _timestamp(message)
        return
    if desc.full_name == _MODEL_REF:
        problem = _version_problem(message.version)
        if problem:
            raise _Refused(problem, "version")
    for kind, name, limit, repeated in _plan(desc):
        if kind == "str":
            value = getattr(message, name)
            if not repeated:
                if len(value) > limit:
                    raise _Refused(_length_problem(value, limit), name)
                continue
            for k, text in enumerate(value):
                if len(text) > limit:
                    raise _Refused(_length_problem(text, limit), f"{name}[{k}]")
        elif kind == "msg" or kind == "ts":
            check = None if kind == "msg" else _timestamp
            if repeated:
                for k, item in enumerate(getattr(message, name)):
                    _step(item, f"{name}[{k}]", check)
            elif message.HasField(name):
                _step(getattr(message, name), name, check)
        elif kind == "token":
            value = getattr(message, name)
            problem = _token_problem(value) or (
                _length_problem(value, limit) if len(value) > limit else None)
            if problem:
                raise _Refused(problem, name)
        elif kind == "size":
            value = getattr(message, name)
            if value > limit:
                raise _Refused(_size_problem(value), name)
        else:
            _map(getattr(message, name), name, limit)


def _step(message: Message, segment: str, check: Callable[[Message], None] | None = None
          ) -> None:
    """``check`` (default: the whole walk) of a field's message, the field named on failure."""
    try:
        (check or _walk)(message)
    except _Refused as refused:
        refused.path.append(segment)
        raise


def _map(entries: Any, name: str, limit: int) -> None:
    for key, item in entries.items():
        if isinstance(key, str) and len(key) > limit:
            raise _Refused(_length_problem(key, limit), f"{name} key")
        if isinstance(item, Message):
            _step(item, f"{name}[{shown(str(key))}]")
        elif isinstance(item, str) and len(item) > limit:
            raise _Refused(_length_problem(item, limit), f"{name}[{shown(str(key))}]")


def _timestamp(ts: Message) -> None:
    low, high = TIMESTAMP_SECONDS
    if not low <= ts.seconds <= high:
        raise _Refused(f"is {ts.seconds}, outside the timestamp range 0001-01-01 .. "
                       f"9999-12-31 ({low} .. {high})", "seconds")
    if not 0 <= ts.nanos < 1_000_000_000:
        raise _Refused(f"is {ts.nanos}, outside [0, 999999999]", "nanos")


def _length_problem(value: str, limit: int) -> str:
    return f"is {len(value)} characters long, at most {limit} are allowed: {shown(value)}"


def _size_problem(value: int) -> str:
    return f"must be at most {MAX_PAGE_SIZE}, got {value}"


def _version_problem(version: str) -> str | None:
    if not version or (_VERSION.fullmatch(version) and int(version) <= MAX_INT64):
        return None
    return (f"{shown(version)} is not a model version: a positive decimal integer below "
            "2**63 without leading zeros (\"3\"), or empty for the version Triton serves by "
            "default")


def _token_problem(token: str) -> str | None:
    if not token or (_TOKEN.fullmatch(token) and int(token) <= MAX_INT64):
        return None
    return (f"{shown(token)} is malformed: pass next_page_token of the previous page "
            "unchanged")


# --------------------------------------------------------------------- unparsed bytes


@dataclass(frozen=True)
class UnparsedRequest:
    """Request bytes that are not a message of the method's request type."""

    type_name: str
    reason: str

    def message(self) -> str:
        return (f"the request does not parse as a {self.type_name} message "
                f"({self.reason[:200]}): check that client and server use the same protos")


def lenient(deserializer: Callable[[bytes], Any] | None,
            type_name: str) -> Callable[[bytes], Any] | None:
    """``deserializer`` returning an :class:`UnparsedRequest` instead of raising."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or anything a parser may raise on garbage
            return UnparsedRequest(type_name, f"{type(exc).__name__}: {exc}")

    return parse


def request_type_name(deserializer: Callable[[bytes], Any] | None) -> str:
    """The protobuf type a generated deserializer (``Type.FromString``) parses, for messages."""
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return descriptor.full_name if descriptor is not None else "request"
