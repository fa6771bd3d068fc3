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

from google.protobuf.descriptor import FieldDescriptor
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
    if version and not (_VERSION.fullmatch(version) and int(version) <= MAX_INT64):
        raise InvalidArgument(f"{where} {shown(version)} is not a model version: a positive "
                              "decimal integer below 2**63 without leading zeros (\"3\"), or "
                              "empty for the version Triton serves by default")
    return version


def page_size(value: int, where: str = "page_size") -> int:
    """The items of one page a request asks for: 1..MAX_PAGE_SIZE, 0 = DEFAULT_PAGE_SIZE."""
    if value > MAX_PAGE_SIZE:
        raise InvalidArgument(f"{where} must be at most {MAX_PAGE_SIZE}, got {value}")
    return value or DEFAULT_PAGE_SIZE


def parse_page_token(token: str, where: str = "page_token") -> int | None:
    """The position a page token holds (None for the first page)."""
    if not token:
        return None
    if not (_TOKEN.fullmatch(token) and int(token) <= MAX_INT64):
        raise InvalidArgument(f"malformed {where} {shown(token)}: pass next_page_token of the "
                              "previous page unchanged")
    return int(token)


def check_request(message: Message) -> None:
    """Raise InvalidArgument naming the first field of ``message`` outside its limits."""
    _check_message(message, "")


def _check_message(message: Message, path: str) -> None:
    name = message.DESCRIPTOR.full_name
    if name == _TIMESTAMP:
        _check_timestamp(message, path.rstrip("."))
        return
    if name == _MODEL_REF:
        check_model_version(message.version, f"{path}version")
    for field, value in message.ListFields():
        where = f"{path}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            _check_map(field, value, where)
        elif field.is_repeated:
            for k, item in enumerate(value):
                _check_value(field, item, f"{where}[{k}]")
        else:
            _check_value(field, value, where)


def _check_value(field: FieldDescriptor, value: Any, where: str) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        _check_message(value, f"{where}.")
    elif field.type == FieldDescriptor.TYPE_STRING:
        _check_length(value, STRING_LIMITS.get(field.name, MAX_TEXT_LENGTH), where)
        if field.name == "page_token":
            parse_page_token(value, where)
    elif field.name == "page_size":
        page_size(value, where)


def _check_map(field: FieldDescriptor, value: Any, where: str) -> None:
    value_field = field.message_type.fields_by_name["value"]
    for key, item in value.items():
        if isinstance(key, str):
            _check_length(key, MAX_METADATA_TEXT, f"{where} key")
        if value_field.type == FieldDescriptor.TYPE_MESSAGE:
            _check_message(item, f"{where}[{shown(str(key))}].")
        elif isinstance(item, str):
            _check_length(item, MAX_METADATA_TEXT, f"{where}[{shown(str(key))}]")


def _check_length(value: str, limit: int, where: str) -> None:
    if len(value) > limit:
        raise InvalidArgument(f"{where} is {len(value)} characters long, at most {limit} are "
                              f"allowed: {shown(value)}")


def _check_timestamp(ts: Message, where: str) -> None:
    low, high = TIMESTAMP_SECONDS
    if not low <= ts.seconds <= high:
        raise InvalidArgument(f"{where}: seconds {ts.seconds} is outside the timestamp range "
                              "0001-01-01 .. 9999-12-31")
    if not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidArgument(f"{where}: nanos {ts.nanos} is outside [0, 999999999]")


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
