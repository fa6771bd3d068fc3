"""Domain errors shared by the core, the store, the workflows and the services.

Each error names the gRPC status code it is answered with (``code``: the name of a
``grpc.StatusCode`` member) here, and only here: the gRPC layer turns that name into the
call's status (``reidal.grpc_server.status_for``, used by the interceptor), and a
background operation records the same name (:mod:`reidal.runtime`), so no servicer or
workflow keeps its own mapping and nothing below the transport imports gRPC. Backends
(Triton, an embedding service in another process) raise subclasses of these, so their
failures get a status the same way.
"""

from __future__ import annotations


class ReidalError(Exception):
    """Base class of reidal's domain errors.

    ``code``: the status code name a call failing with this error answers; None (the base
    class): not a known failure, answered INTERNAL and logged with its traceback.
    """

    code: str | None = None


class NotFound(ReidalError, LookupError):
    """A named thing (collection, image, pair, answer, model) does not exist -> NOT_FOUND."""

    code = "NOT_FOUND"


class AlreadyExists(ReidalError):
    """A create call named something that already exists -> ALREADY_EXISTS."""

    code = "ALREADY_EXISTS"


class InvalidArgument(ReidalError, ValueError):
    """The request itself is wrong (bad id, empty batch, malformed value) -> INVALID_ARGUMENT."""

    code = "INVALID_ARGUMENT"


class FailedPrecondition(ReidalError):
    """The request is fine but the state is not ready for it (no vectors yet) -> FAILED_PRECONDITION."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(ReidalError):
    """A server-wide resource (the decode memory budget) stayed full -> RESOURCE_EXHAUSTED."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(ReidalError):
    """A backend (Triton, a separate embedding service) cannot be reached now; the same
    call may succeed later -> UNAVAILABLE."""

    code = "UNAVAILABLE"


class DeadlineExceeded(ReidalError):
    """The caller's deadline ran out before the work was done -> DEADLINE_EXCEEDED."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(ReidalError):
    """The caller went away; the rest of the work was skipped -> CANCELLED."""

    code = "CANCELLED"


class Aborted(ReidalError):
    """The server stopped during the work; start it again -> ABORTED."""

    code = "ABORTED"


class BackendFailed(ReidalError):
    """A backend answered with an error the caller cannot fix (a model Triton cannot run):
    INTERNAL with the backend's message, not a bug of ours (no traceback) -> INTERNAL."""

    code = "INTERNAL"


class RemoteError(ReidalError):
    """Another reidal service (a separate embedding service) failed a call with a status:
    the failure travels on with that status code and its message."""

    def __init__(self, code: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.code = code
        #: The remote's own message, without the words that say where it came from.
        self.detail = detail or message


def status_code(exc: BaseException) -> str | None:
    """The status code name of a domain error, or None when ``exc`` is not one."""
    return exc.code if isinstance(exc, ReidalError) else None
