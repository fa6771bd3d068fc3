"""What the servicers share: message conversions (times, budgets, filters, operations)
and the caller's deadline. One home for them, so no servicer imports another's helpers.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from reidal.collection_state import ImageFilter
from reidal.grpc_server import deadline_left
from reidal.store import OperationRecord
from reidal.v1 import collections_pb2, common_pb2


def timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(round(seconds * 1e9)))
    return ts


def seconds_of(ts: Timestamp) -> float:
    return ts.ToNanoseconds() / 1e9


def budget_dict(msg: collections_pb2.Budget) -> dict[str, Any] | None:
    which = msg.WhichOneof("amount")
    return None if which is None else {which: getattr(msg, which)}


def budget_pb(budget: dict[str, Any] | None) -> collections_pb2.Budget:
    if not budget:
        return collections_pb2.Budget()
    if "count" in budget:
        return collections_pb2.Budget(count=int(budget["count"]))
    return collections_pb2.Budget(fraction=float(budget["fraction"]))


def filter_from_pb(msg: collections_pb2.ImageFilter) -> ImageFilter:
    return ImageFilter(metadata=dict(msg.metadata), date_key=msg.date_key,
                       date_from=msg.date_from, date_to=msg.date_to,
                       image_ids=tuple(msg.image_ids))


def filter_pb(data: dict[str, Any]) -> collections_pb2.ImageFilter:
    f = ImageFilter.from_dict(data)
    return collections_pb2.ImageFilter(metadata=dict(f.metadata), date_key=f.date_key,
                                       date_from=f.date_from, date_to=f.date_to,
                                       image_ids=list(f.image_ids))


_STATES = {name: collections_pb2.OperationState.Value(f"OPERATION_STATE_{name}")
           for name in ("PENDING", "RUNNING", "SUCCEEDED", "FAILED")}


def operation_pb(op: OperationRecord) -> collections_pb2.Operation:
    r = op.result
    return collections_pb2.Operation(
        operation_id=op.operation_id, collection_id=op.collection_id, kind=op.kind,
        state=_STATES[op.state], done=op.done, total=op.total, stage=op.stage,
        error_code=op.error_code, error_message=op.error_message,
        batch_id=r.get("batch_id", ""),
        model=common_pb2.ModelRef(name=r.get("model_name", ""),
                                  version=r.get("model_version", "")),
        created_at=timestamp(op.created_at), updated_at=timestamp(op.updated_at),
        skipped_image_ids=r.get("skipped_image_ids", []),
    )


def deadline_at(context: grpc.ServicerContext) -> float | None:
    """The caller's deadline as a ``time.monotonic()`` instant (None: the call has none),
    the form the workflows and the embedder take."""
    left = deadline_left(context)
    return None if left is None else time.monotonic() + left
