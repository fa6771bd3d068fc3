"""How a reidal process opens a gRPC channel to another reidal service.

The collection service calling a separate embedding service and the Python client
(``reidal_client``, which imports this) use the same options, so a restarted pod is
reached again within about a second instead of after gRPC's own back-off (up to 120 s,
every call failing UNAVAILABLE meanwhile). Only options live here: the server side owns
them, and the client package builds on them.
"""

from __future__ import annotations

from typing import Any

#: Largest message either way, as the server's default (64 MiB).
DEFAULT_MAX_MESSAGE_MB = 64


def default_channel_options(max_message_mb: float = DEFAULT_MAX_MESSAGE_MB,
                            max_reconnect_backoff_s: float = 2.0) -> dict[str, Any]:
    """gRPC channel options: message limits both ways and a short reconnect back-off."""
    limit = int(max_message_mb * 1024 * 1024)
    return {
        "grpc.max_receive_message_length": limit,
        "grpc.max_send_message_length": limit,
        # Reconnect soon after a restart instead of gRPC's default (up to 120 s).
        "grpc.initial_reconnect_backoff_ms": 100,
        "grpc.min_reconnect_backoff_ms": 100,
        "grpc.max_reconnect_backoff_ms": max(int(max_reconnect_backoff_s * 1000), 100),
    }
