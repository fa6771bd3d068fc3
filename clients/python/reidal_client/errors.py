"""What a failed call raises: one exception class per gRPC status the API documents.

Every class carries the status ``code`` (a :class:`grpc.StatusCode`), the server's
``message`` (which names the offending collection, image or pair), the ``method`` called
and how many ``attempts`` were made, so a notebook can ``except NotFound`` and a CLI can
print ``str(exc)`` without a traceback. Classes also derive from the matching built-in
exception where one exists (``NotFound`` is a ``LookupError``, ``InvalidArgument`` a
``ValueError``, ``DeadlineExceeded`` a ``TimeoutError``), so generic handlers work too.
"""

from __future__ import annotations

import grpc


class ReidalClientError(Exception):
    """A reidal call failed; ``code`` and ``message`` are the server's (or gRPC's)."""

    def __init__(self, code: grpc.StatusCode, message: str, *, method: str = "",
                 attempts: int = 1) -> None:
        self.code = code
        self.message = message
        self.method = method
        self.attempts = attempts
        super().__init__(f"{code.name}: {message}")


class NotFound(ReidalClientError, LookupError):
    """An unknown collection, image, batch, pair, answer, operation or model."""


class AlreadyExists(ReidalClientError):
    """A collection id that is taken, or a request id reused for different answers."""


class InvalidArgument(ReidalClientError, ValueError):
    """The request is malformed; the message names the field or item."""


class FailedPrecondition(ReidalClientError):
    """The collection is not in a state that allows the call (e.g. images not embedded)."""


class Unavailable(ReidalClientError, ConnectionError):
    """The server (or its Triton) cannot be reached; raised after the retries ran out."""


class DeadlineExceeded(ReidalClientError, TimeoutError):
    """The call's deadline passed before the server answered."""


class ResourceExhausted(ReidalClientError):
    """A message over the size limit, or the server's concurrency limit reached."""


class Cancelled(ReidalClientError):
    """The call was cancelled."""


class Unauthenticated(ReidalClientError, PermissionError):
    """No access token, or one the server does not know (mistyped, revoked)."""


class PermissionDenied(ReidalClientError, PermissionError):
    """The token is valid but not for this collection, method or annotator name."""


class Internal(ReidalClientError):
    """An unexpected server-side failure (its message is logged by the server)."""


class OperationFailed(ReidalClientError):
    """A long-running operation ended FAILED; ``code`` is the code it recorded."""


_BY_CODE: dict[grpc.StatusCode, type[ReidalClientError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The status code of a gRPC error (UNKNOWN when it carries none)."""
    code = getattr(exc, "code", None)
    value = code() if callable(code) else None
    return value if isinstance(value, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def error_for(code: grpc.StatusCode, message: str, *, method: str = "",
              attempts: int = 1) -> ReidalClientError:
    """The exception class of ``code`` (the base class for codes without one)."""
    return _BY_CODE.get(code, ReidalClientError)(code, message, method=method, attempts=attempts)


def from_rpc_error(exc: BaseException, method: str, attempts: int = 1) -> ReidalClientError:
    """Translate a :class:`grpc.RpcError` into this hierarchy."""
    details = getattr(exc, "details", None)
    message = details() if callable(details) else None
    code = status_code(exc)
    return error_for(code, message or f"{method} failed with {code.name}", method=method,
                     attempts=attempts)


def operation_failed(error_code: str, message: str, operation_id: str) -> OperationFailed:
    """The OperationFailed of an operation that recorded ``error_code`` (a status name)."""
    code = getattr(grpc.StatusCode, error_code, grpc.StatusCode.UNKNOWN)
    return OperationFailed(code, f"operation {operation_id} failed: {message}",
                           method="CollectionService.GetOperation")
