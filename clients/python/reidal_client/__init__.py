"""Python client of the reidal active-learning server (gRPC), for scripts and notebooks.

>>> from reidal_client import ReidalClient
>>> with ReidalClient("127.0.0.1:50051") as client:
...     client.create_collection("zebras", species="plains zebra")
...     client.add_images("zebras", [("z1", "photos/z1.jpg"), ("z2", "photos/z2.jpg")])
...     batch = client.get_query_pairs("zebras", budget=20)
...     client.submit_answers("zebras", [(p.pair_id, "same") for p in batch.pairs])
...     client.export_identities_csv("zebras", "identities.csv")

Every method returns plain dataclasses (:mod:`reidal_client.types`), has a deadline, is
retried on UNAVAILABLE when repeating it is safe, and raises :mod:`reidal_client.errors`
exceptions carrying the gRPC code and the server's message.
"""

from reidal_client.client import DEFAULT_ADDRESS, ReidalClient, default_channel_options
from reidal_client.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OperationFailed,
    PermissionDenied,
    ReidalClientError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from reidal_client.types import (
    AddImagesResult,
    Answer,
    ClusteringChoice,
    ClusteringParams,
    Collection,
    Contradiction,
    Embeddings,
    Identities,
    Identity,
    ImageContent,
    ImageExclusion,
    ImageFilter,
    ImageInfo,
    ImageInput,
    ModelRef,
    Operation,
    QueryBatch,
    QueryPair,
    QueueEvent,
    SamplingParams,
    StoredAnswer,
    SubmitResult,
    TrainingJob,
    parse_budget,
    parse_label,
)

__all__ = [
    "DEFAULT_ADDRESS", "ReidalClient", "default_channel_options",
    "AlreadyExists", "Cancelled", "DeadlineExceeded", "FailedPrecondition", "Internal",
    "InvalidArgument", "NotFound", "OperationFailed", "ReidalClientError",
    "ResourceExhausted", "Unavailable", "Unauthenticated", "PermissionDenied",
    "AddImagesResult", "Answer", "ClusteringChoice", "ClusteringParams", "Collection", "Contradiction",
    "Embeddings", "Identities", "Identity", "TrainingJob", "ImageContent", "ImageExclusion", "ImageFilter",
    "ImageInfo", "ImageInput", "ModelRef", "Operation", "QueryBatch", "QueryPair", "QueueEvent",
    "SamplingParams", "StoredAnswer", "SubmitResult", "parse_budget", "parse_label",
]
