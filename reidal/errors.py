"""Domain errors shared by the store and the services.

The core and the store raise these; the gRPC layer maps each to one status code in one
place (``reidal.grpc_server.status_for``), so no servicer invents its own status handling.
"""

from __future__ import annotations


class ReidalError(Exception):
    """Base class of reidal's domain errors."""


class NotFound(ReidalError, LookupError):
    """A named thing (collection, image, pair, answer, model) does not exist -> NOT_FOUND."""


class AlreadyExists(ReidalError):
    """A create call named something that already exists -> ALREADY_EXISTS."""


class InvalidArgument(ReidalError, ValueError):
    """The request itself is wrong (bad id, empty batch, malformed value) -> INVALID_ARGUMENT."""


class FailedPrecondition(ReidalError):
    """The request is fine but the state is not ready for it (no vectors yet) -> FAILED_PRECONDITION."""


class ResourceExhausted(ReidalError):
    """A server-wide resource (the decode memory budget) stayed full -> RESOURCE_EXHAUSTED."""
