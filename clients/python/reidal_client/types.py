"""Plain dataclasses for what the reidal API sends and returns, and their protobuf mapping.

A notebook works with these, never with protobuf messages: they print readably, compare
by value, and hold Python types (``datetime``, tuples, dicts, enum names as strings such
as ``"SAME"`` or ``"BUDGET_FILLED"``). The field meanings are those of the .proto files in
protos/reidal/v1, which document every field; here only the Python side is described.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from reidal.v1 import collections_pb2, common_pb2, constraints_pb2, sampling_pb2

# ------------------------------------------------------------------------- scalars


def _time(msg: Any, name: str) -> datetime | None:
    if not msg.HasField(name):
        return None
    return getattr(msg, name).ToDatetime(tzinfo=UTC)


def _timestamp(value: datetime | float | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"timestamp {value!r} has no time zone; use an aware datetime")
        ts.FromDatetime(value.astimezone(UTC))
    else:
        ts.FromNanoseconds(int(round(float(value) * 1e9)))
    return ts


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    """``ANSWER_LABEL_SAME`` -> ``"SAME"``; an unknown number -> its decimal string."""
    try:
        name = enum.Name(value)
    except ValueError:
        return str(value)
    return "" if name.endswith("_UNSPECIFIED") else name.removeprefix(prefix)


# -------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelRef:
    """An embedding model: Triton name and version ("" = the server's default model / the
    model's default version, which training never changes)."""

    name: str = ""
    version: str = ""

    @classmethod
    def parse(cls, text: str | None) -> ModelRef:
        """``"name"`` or ``"name:version"`` (None or "" = the default model)."""
        if not text:
            return cls()
        name, _, version = text.partition(":")
        return cls(name, version)

    def to_pb(self) -> common_pb2.ModelRef:
        return common_pb2.ModelRef(name=self.name, version=self.version)

    @classmethod
    def from_pb(cls, msg: common_pb2.ModelRef) -> ModelRef:
        return cls(msg.name, msg.version)

    def __str__(self) -> str:
        return f"{self.name}:{self.version}" if self.version else self.name


# --------------------------------------------------------------------------- budget


def budget_pb(budget: int | float | None) -> collections_pb2.Budget | None:
    """An int is a number of pairs, a float a fraction of all n(n-1)/2 pairs (None: unset)."""
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise TypeError("budget must be an int (pairs) or a float (fraction), not a bool")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"a budget count must be >= 1, got {budget}")
        return collections_pb2.Budget(count=budget)
    value = float(budget)
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"a budget fraction must be in (0, 1], got {budget}")
    return collections_pb2.Budget(fraction=value)


def budget_of(msg: collections_pb2.Budget) -> int | float | None:
    which = msg.WhichOneof("amount")
    return None if which is None else getattr(msg, which)


def parse_budget(text: str) -> int | float:
    """Command-line budget: ``"40"`` -> 40 pairs, ``"0.0002"`` or ``"2e-4"`` -> a fraction."""
    s = text.strip()
    try:
        if any(c in s for c in ".eE"):
            return float(s)
        return int(s)
    except ValueError:
        raise ValueError(f"budget {text!r} is neither a pair count (40) nor a fraction "
                         "(0.0002)") from None


# ---------------------------------------------------------------------- parameters


_CLUSTERING_VALUES = ("dbscan_eps", "min_samples", "k1", "k2", "finch_level")


@dataclass(frozen=True)
class ClusteringParams:
    """DBSCAN on the k-reciprocal Jaccard distance and FINCH's level; None = the server's
    default. ``mode``: "fixed" (the server's default: these values) or "calibrated"
    (chosen every cycle from the vectors and the answers; a value set here is kept as
    the user's override, and a collection read back holds only those); "" = default."""

    dbscan_eps: float | None = None
    min_samples: int | None = None
    k1: int | None = None
    k2: int | None = None
    mode: str = ""
    finch_level: int | None = None

    def to_pb(self) -> collections_pb2.ClusteringParams:
        return collections_pb2.ClusteringParams(
            **{k: v for k, v in vars(self).items() if v is not None})

    @classmethod
    def from_pb(cls, msg: collections_pb2.ClusteringParams) -> ClusteringParams:
        return cls(**{k: getattr(msg, k) if msg.HasField(k) else None
                      for k in _CLUSTERING_VALUES}, mode=msg.mode)


@dataclass(frozen=True)
class ClusteringChoice:
    """The clustering one sampling cycle used (BatchStats.clustering): ``mode``, the
    values, and where eps / the FINCH level came from ("fixed", "user", "rho",
    "default", "answers"); ``same_answers`` / ``different_answers``: the answers it saw."""

    mode: str
    dbscan_eps: float
    min_samples: int
    k1: int
    k2: int
    finch_level: int
    eps_source: str
    finch_source: str
    same_answers: int
    different_answers: int

    @classmethod
    def from_pb(cls, msg: sampling_pb2.ClusteringChoice) -> ClusteringChoice:
        return cls(**{f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields})


@dataclass(frozen=True)
class SamplingParams:
    """Ambiguity-Aware Sampling parameters; None / "" = the server's default."""

    mixture_eps: float | None = None
    k_max: int | None = None
    s_min: float | None = None
    type_weights: str = ""
    region_weights: str = ""
    pair_weights: str = ""
    seed: int | None = None
    default_budget: int | float | None = None
    #: "aas" (the paper's) or "aas-continued" (AAS, then the continuation fills the budget)
    sampler: str = ""
    #: what U_os ranks medoid pairs by: "jaccard" (the paper's) or "cosine"
    os_similarity: str = ""

    def to_pb(self) -> collections_pb2.SamplingParams:
        scalars = {k: getattr(self, k) for k in ("mixture_eps", "k_max", "s_min", "seed")
                   if getattr(self, k) is not None}
        msg = collections_pb2.SamplingParams(
            type_weights=self.type_weights, region_weights=self.region_weights,
            pair_weights=self.pair_weights, sampler=self.sampler,
            os_similarity=self.os_similarity, **scalars)
        budget = budget_pb(self.default_budget)
        if budget is not None:
            msg.default_budget.CopyFrom(budget)
        return msg

    @classmethod
    def from_pb(cls, msg: collections_pb2.SamplingParams) -> SamplingParams:
        return cls(
            **{k: getattr(msg, k) if msg.HasField(k) else None
               for k in ("mixture_eps", "k_max", "s_min", "seed")},
            type_weights=msg.type_weights, region_weights=msg.region_weights,
            pair_weights=msg.pair_weights,
            default_budget=budget_of(msg.default_budget)
            if msg.HasField("default_budget") else None, sampler=msg.sampler,
            os_similarity=msg.os_similarity)


# ---------------------------------------------------------------------- collections


@dataclass(frozen=True)
class Collection:
    """A collection and where its active learning stands (budget_used is a fraction)."""

    collection_id: str
    species: str
    model: ModelRef
    clustering: ClusteringParams
    sampling: SamplingParams
    image_count: int
    excluded_image_count: int
    embedded_image_count: int
    answer_count: int
    cycle: int
    pairs_asked: int
    total_pairs: int
    budget_used: float
    created_at: datetime | None

    @classmethod
    def from_pb(cls, msg: collections_pb2.Collection) -> Collection:
        return cls(
            collection_id=msg.collection_id, species=msg.species,
            model=ModelRef.from_pb(msg.model),
            clustering=ClusteringParams.from_pb(msg.clustering),
            sampling=SamplingParams.from_pb(msg.sampling),
            image_count=msg.image_count, excluded_image_count=msg.excluded_image_count,
            embedded_image_count=msg.embedded_image_count, answer_count=msg.answer_count,
            cycle=msg.cycle, pairs_asked=msg.pairs_asked, total_pairs=msg.total_pairs,
            budget_used=msg.budget_used, created_at=_time(msg, "created_at"))


@dataclass(frozen=True)
class ImageInput:
    """One image to ingest: the caller's id and exactly one of ``data``, ``path``, ``uri``.

    ``path``: a local file the client reads and sends as bytes (the server may run on
    another machine). ``uri``: a location the *server* reads (its filesystem, or http(s)
    when it allows downloads). ``name``: the platform's identity name, when known.
    """

    image_id: str
    data: bytes | None = None
    path: str | os.PathLike[str] | None = None
    uri: str | None = None
    name: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        given = [k for k in ("data", "path", "uri") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"image {self.image_id!r}: give exactly one of data, path or uri, "
                             f"got {given or 'none'}")

    @classmethod
    def coerce(cls, item: ImageInput | Sequence[Any]) -> ImageInput:
        """An ImageInput, or a tuple ``(id, source[, metadata])`` where source is bytes,
        a path (str or PathLike) or a ``file://`` / ``http(s)://`` URI the server reads."""
        if isinstance(item, ImageInput):
            return item
        if not isinstance(item, Sequence) or isinstance(item, str | bytes) or \
                len(item) not in (2, 3):
            raise TypeError(f"an image is an ImageInput or (id, path|bytes[, metadata]), "
                            f"got {item!r:.80}")
        image_id, source = str(item[0]), item[1]
        metadata = dict(item[2]) if len(item) == 3 and item[2] else {}
        if isinstance(source, bytes | bytearray | memoryview):
            return cls(image_id, data=bytes(source), metadata=metadata)
        if isinstance(source, str) and source.startswith(("file://", "http://", "https://")):
            return cls(image_id, uri=source, metadata=metadata)
        if isinstance(source, str | os.PathLike):
            return cls(image_id, path=source, metadata=metadata)
        raise TypeError(f"image {image_id!r}: source must be bytes, a path or a URI, "
                        f"got {type(source).__name__}")

    def to_pb(self) -> collections_pb2.IngestImage:
        if self.data is not None:
            image = common_pb2.Image(id=self.image_id, data=self.data)
        elif self.path is not None:
            image = common_pb2.Image(id=self.image_id, data=Path(self.path).read_bytes())
        else:
            image = common_pb2.Image(id=self.image_id, uri=self.uri)
        return collections_pb2.IngestImage(
            image=image, name=self.name,
            metadata={str(k): str(v) for k, v in self.metadata.items()})


@dataclass(frozen=True)
class AddImagesResult:
    """Totals of an ingest (summed over every AddImages call it made)."""

    collection_id: str
    received: int = 0
    added: int = 0
    already_present: int = 0
    embedded: int = 0
    changed_ids: tuple[str, ...] = ()
    model: ModelRef = ModelRef()

    @classmethod
    def from_pb(cls, msg: collections_pb2.AddImagesResponse) -> AddImagesResult:
        return cls(msg.collection_id, msg.received, msg.added, msg.already_present,
                   msg.embedded, tuple(msg.changed_ids), ModelRef.from_pb(msg.model))

    def __add__(self, other: AddImagesResult) -> AddImagesResult:
        return AddImagesResult(
            self.collection_id or other.collection_id, self.received + other.received,
            self.added + other.added, self.already_present + other.already_present,
            self.embedded + other.embedded, self.changed_ids + other.changed_ids,
            other.model if other.model.version else self.model)


@dataclass(frozen=True)
class ImageInfo:
    image_id: str
    name: str
    metadata: dict[str, str]
    uri: str
    excluded: bool
    excluded_reason: str
    embedded: bool
    added_at: datetime | None

    @classmethod
    def from_pb(cls, msg: collections_pb2.ImageInfo) -> ImageInfo:
        return cls(msg.image_id, msg.name, dict(msg.metadata), msg.uri, msg.excluded,
                   msg.excluded_reason, msg.embedded, _time(msg, "added_at"))


@dataclass(frozen=True)
class ImageFilter:
    """A subset of a collection's images by ingest metadata (see collections.proto)."""

    metadata: Mapping[str, str] = field(default_factory=dict)
    date_key: str = ""
    date_from: str = ""
    date_to: str = ""
    image_ids: tuple[str, ...] = ()

    @classmethod
    def coerce(cls, value: ImageFilter | Mapping[str, str] | None) -> ImageFilter | None:
        """A filter, or a plain mapping meaning "metadata equal to these values"."""
        if value is None or isinstance(value, ImageFilter):
            return value
        return cls(metadata=dict(value))

    def to_pb(self) -> collections_pb2.ImageFilter:
        return collections_pb2.ImageFilter(
            metadata={str(k): str(v) for k, v in self.metadata.items()},
            date_key=self.date_key, date_from=self.date_from, date_to=self.date_to,
            image_ids=list(self.image_ids))

    @classmethod
    def from_pb(cls, msg: collections_pb2.ImageFilter) -> ImageFilter:
        return cls(dict(msg.metadata), msg.date_key, msg.date_from, msg.date_to,
                   tuple(msg.image_ids))


@dataclass(frozen=True)
class ImageContent:
    """The encoded file of one image as ingested; ``sha256`` (hex) is a cache key."""

    image_id: str
    data: bytes
    mime_type: str
    sha256: str
    not_modified: bool = False  # asked with if_none_match and still that file: no data

    @classmethod
    def from_pb(cls, msg: collections_pb2.ImageContent) -> ImageContent:
        return cls(msg.image_id, msg.data, msg.mime_type, msg.sha256, msg.not_modified)


OPERATION_STATES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED")


@dataclass(frozen=True)
class Operation:
    """A long-running piece of work; ``state`` is one of OPERATION_STATES."""

    operation_id: str
    collection_id: str
    kind: str
    state: str
    done: int
    total: int
    stage: str
    error_code: str
    error_message: str
    batch_id: str
    model: ModelRef
    created_at: datetime | None
    updated_at: datetime | None
    #: embed_collection: excluded images that could not be embedded (left without a vector).
    skipped_image_ids: tuple[str, ...] = ()

    @property
    def finished(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED")

    @classmethod
    def from_pb(cls, msg: collections_pb2.Operation) -> Operation:
        return cls(msg.operation_id, msg.collection_id, msg.kind,
                   _enum_name(collections_pb2.OperationState, msg.state, "OPERATION_STATE_"),
                   msg.done, msg.total, msg.stage, msg.error_code, msg.error_message,
                   msg.batch_id, ModelRef.from_pb(msg.model), _time(msg, "created_at"),
                   _time(msg, "updated_at"), tuple(msg.skipped_image_ids))


# ------------------------------------------------------------------------- sampling

_POOL_NAMES = {sampling_pb2.POOL_OVERSEGMENTATION: "U_os",
               sampling_pb2.POOL_UNDERSEGMENTATION: "U_us",
               sampling_pb2.POOL_CONTINUATION: "continuation"}


@dataclass(frozen=True)
class QueryPair:
    """One question; ``pool`` is "U_os" (over-segmentation), "U_us" (under-) or
    "continuation" (sampler "aas-continued", after AAS's pools ran dry)."""

    pair_id: str
    image_a: str
    image_b: str
    similarity: float
    pool: str
    region: int
    probability: float
    model: ModelRef
    answered: bool

    @classmethod
    def from_pb(cls, msg: sampling_pb2.QueryPair) -> QueryPair:
        return cls(msg.pair_id, msg.image_a, msg.image_b, msg.similarity,
                   _POOL_NAMES.get(msg.pool, ""), msg.region, msg.probability,
                   ModelRef.from_pb(msg.model), msg.answered)


@dataclass(frozen=True)
class QueryBatch:
    """The pairs of one sampling cycle; ``reason`` is a BatchReason name ("BUDGET_FILLED").

    ``stats``: the cycle's counts and the sampler's name (BatchStats); ``clustering``: the
    parameters the cycle clustered with (None for batches stored before they were kept).
    """

    batch_id: str
    collection_id: str
    cycle: int
    pairs: tuple[QueryPair, ...]
    budget: int
    reason: str
    reason_text: str
    finished: bool
    filter: ImageFilter | None
    sampled_images: int
    model: ModelRef
    stats: dict[str, float | str]
    answered: int
    created_at: datetime | None
    clustering: ClusteringChoice | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per pair (for a CSV or ``pandas.DataFrame(batch.rows())``)."""
        return [{"batch_id": self.batch_id, "cycle": self.cycle, "pair_id": p.pair_id,
                 "image_a": p.image_a, "image_b": p.image_b,
                 "similarity": round(p.similarity, 6), "pool": p.pool, "region": p.region,
                 "probability": round(p.probability, 6), "answered": p.answered}
                for p in self.pairs]

    @classmethod
    def from_pb(cls, msg: sampling_pb2.QueryBatch) -> QueryBatch:
        stats = {f.name: v for f, v in msg.stats.ListFields() if f.name != "clustering"}
        return cls(
            msg.batch_id, msg.collection_id, msg.cycle,
            tuple(QueryPair.from_pb(p) for p in msg.pairs), msg.budget,
            _enum_name(sampling_pb2.BatchReason, msg.reason, "BATCH_REASON_"),
            msg.reason_text, msg.finished,
            ImageFilter.from_pb(msg.filter) if msg.HasField("filter") else None,
            msg.sampled_images, ModelRef.from_pb(msg.model), stats, msg.answered,
            _time(msg, "created_at"),
            ClusteringChoice.from_pb(msg.stats.clustering)
            if msg.stats.HasField("clustering") else None)


@dataclass(frozen=True)
class QueueEvent:
    """``kind`` is "BATCH_READY" (``batch`` set) or "COLLECTION_DELETED"."""

    kind: str
    collection_id: str
    batch: QueryBatch | None

    @classmethod
    def from_pb(cls, msg: sampling_pb2.QueueEvent) -> QueueEvent:
        return cls(_enum_name(sampling_pb2.QueueEventKind, msg.kind, "QUEUE_EVENT_KIND_"),
                   msg.collection_id,
                   QueryBatch.from_pb(msg.batch) if msg.HasField("batch") else None)


# ---------------------------------------------------------------------- constraints

LABELS = ("SAME", "DIFFERENT", "UNSURE")
TAGS = ("PHOTOBOMB", "SCENERY_MATCH", "POOR_QUALITY")
_LABEL_WORDS = {
    "SAME": ("same", "s", "yes", "y", "true", "1", "must-link", "ml"),
    "DIFFERENT": ("different", "diff", "d", "no", "n", "false", "0", "cannot-link", "cl"),
    "UNSURE": ("unsure", "u", "?", "unknown", "skip"),
}
_WORD_LABEL = {w: label for label, words in _LABEL_WORDS.items() for w in words}


def parse_label(value: str | bool | None) -> str:
    """An answer as "SAME", "DIFFERENT" or "UNSURE".

    True / False / None, or a word: same/s/yes/y/1, different/d/no/n/0, unsure/u/?.
    """
    if value is None:
        return "UNSURE"
    if isinstance(value, bool):
        return "SAME" if value else "DIFFERENT"
    word = str(value).strip().lower()
    if word in _WORD_LABEL:
        return _WORD_LABEL[word]
    raise ValueError(f"answer {value!r} is not same (s/yes/1), different (d/no/0) or "
                     "unsure (u/?)")


@dataclass(frozen=True)
class Answer:
    """One answer to submit: to a ``pair_id`` of a batch, or to two ``images`` by id.

    ``label``: "SAME", "DIFFERENT" or "UNSURE" (or anything :func:`parse_label` reads:
    True, False, None, "s", "d", ...). ``tags``: names from TAGS. Times: aware datetimes
    or epoch seconds.
    """

    pair_id: str = ""
    images: tuple[str, str] | None = None
    label: str | bool | None = "UNSURE"
    annotator_id: str = ""
    tags: tuple[str, ...] = ()
    confidence: float | None = None
    started_at: datetime | float | None = None
    ended_at: datetime | float | None = None
    note: str = ""

    @classmethod
    def for_pair(cls, pair_id: str, label: str | bool | None, **kw: Any) -> Answer:
        return cls(pair_id=pair_id, label=label, **kw)

    @classmethod
    def for_images(cls, image_a: str, image_b: str, label: str | bool | None,
                   **kw: Any) -> Answer:
        return cls(images=(image_a, image_b), label=label, **kw)

    @classmethod
    def coerce(cls, item: Answer | Sequence[Any]) -> Answer:
        """An Answer, ``(pair_id, label)`` or ``(image_a, image_b, label)``."""
        if isinstance(item, Answer):
            return item
        if isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
            return cls.for_pair(str(item[0]), item[1])
        if isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 3:
            return cls.for_images(str(item[0]), str(item[1]), item[2])
        raise TypeError(f"an answer is an Answer, (pair_id, label) or (image_a, image_b, "
                        f"label), got {item!r:.80}")

    def to_pb(self) -> constraints_pb2.AnswerInput:
        if bool(self.pair_id) == (self.images is not None):
            raise ValueError(f"an answer names either a pair_id or two images, got "
                             f"pair_id={self.pair_id!r}, images={self.images!r}")
        label = parse_label(self.label)
        bad = [t for t in self.tags if t.upper() not in TAGS]
        if bad:
            raise ValueError(f"unknown answer tag(s) {bad}; choose from {TAGS}")
        msg = constraints_pb2.AnswerInput(
            label=constraints_pb2.AnswerLabel.Value(f"ANSWER_LABEL_{label}"),
            annotator_id=self.annotator_id, note=self.note,
            tags=[constraints_pb2.AnswerTag.Value(f"ANSWER_TAG_{t.upper()}")
                  for t in self.tags])
        if self.pair_id:
            msg.pair_id = self.pair_id
        else:
            a, b = self.images  # type: ignore[misc]
            msg.images.CopyFrom(constraints_pb2.ImagePair(image_a=a, image_b=b))
        if self.confidence is not None:
            msg.confidence = float(self.confidence)
        for name in ("started_at", "ended_at"):
            ts = _timestamp(getattr(self, name))
            if ts is not None:
                getattr(msg, name).CopyFrom(ts)
        return msg


@dataclass(frozen=True)
class StoredAnswer:
    """An answer as stored; ``status`` is "CURRENT", "SUPERSEDED" or "DELETED"."""

    answer_id: str
    image_a: str
    image_b: str
    label: str
    annotator_id: str
    tags: tuple[str, ...]
    confidence: float | None
    note: str
    started_at: datetime | None
    ended_at: datetime | None
    received_at: datetime | None
    batch_id: str
    pair_id: str
    request_id: str
    status: str
    superseded_by: str

    @classmethod
    def from_pb(cls, msg: constraints_pb2.StoredConstraint) -> StoredAnswer:
        return cls(
            msg.answer_id, msg.image_a, msg.image_b,
            _enum_name(constraints_pb2.AnswerLabel, msg.label, "ANSWER_LABEL_"),
            msg.annotator_id,
            tuple(_enum_name(constraints_pb2.AnswerTag, t, "ANSWER_TAG_") for t in msg.tags),
            msg.confidence if msg.HasField("confidence") else None, msg.note,
            _time(msg, "started_at"), _time(msg, "ended_at"), _time(msg, "received_at"),
            msg.batch_id, msg.pair_id, msg.request_id,
            _enum_name(constraints_pb2.ConstraintStatus, msg.status, "CONSTRAINT_STATUS_"),
            msg.superseded_by)


@dataclass(frozen=True)
class Contradiction:
    answers: tuple[StoredAnswer, ...]
    dropped_answer_id: str
    explanation: str

    @classmethod
    def from_pb(cls, msg: constraints_pb2.Contradiction) -> Contradiction:
        return cls(tuple(StoredAnswer.from_pb(a) for a in msg.answers), msg.dropped_answer_id,
                   msg.explanation)


@dataclass(frozen=True)
class SubmitResult:
    """``request_id``: the idempotency key sent (generated when the caller gave none)."""

    stored_count: int
    replayed_count: int
    answer_ids: tuple[str, ...]
    contradictions: tuple[Contradiction, ...]
    superseded_count: int
    request_id: str

    @classmethod
    def from_pb(cls, msg: constraints_pb2.SubmitConstraintsResponse,
                request_id: str) -> SubmitResult:
        return cls(msg.stored_count, msg.replayed_count, tuple(msg.answer_ids),
                   tuple(Contradiction.from_pb(c) for c in msg.contradictions),
                   msg.superseded_count, request_id)


@dataclass(frozen=True)
class ImageExclusion:
    image_id: str
    excluded: bool
    reason: str

    @classmethod
    def from_pb(cls, msg: constraints_pb2.ExcludeImageResponse) -> ImageExclusion:
        return cls(msg.image_id, msg.excluded, msg.reason)


@dataclass(frozen=True)
class Identity:
    identity_id: str
    image_ids: tuple[str, ...]
    size: int
    same_answers: int
    different_answers: int
    names: tuple[str, ...]
    new_individual: bool
    name_conflict: bool

    @classmethod
    def from_pb(cls, msg: constraints_pb2.Identity) -> Identity:
        return cls(msg.identity_id, tuple(msg.image_ids), msg.size, msg.same_answers,
                   msg.different_answers, tuple(msg.names), msg.new_individual,
                   msg.name_conflict)


IDENTITY_CSV_FIELDS = ("image_id", "identity_id", "identity_size", "same_answers",
                       "different_answers", "names", "new_individual", "name_conflict",
                       "excluded")


@dataclass(frozen=True)
class Identities:
    """Every identity, largest first, and the images left out because excluded."""

    collection_id: str
    identities: tuple[Identity, ...]
    excluded_image_ids: tuple[str, ...]
    model: ModelRef
    applied_answers: int
    contradictions: tuple[Contradiction, ...]
    cycle: int

    def __len__(self) -> int:
        return len(self.identities)

    def assignment(self) -> dict[str, str]:
        """image id -> identity id (excluded images absent)."""
        return {i: x.identity_id for x in self.identities for i in x.image_ids}

    def rows(self) -> list[dict[str, Any]]:
        """One dict per image (IDENTITY_CSV_FIELDS), excluded images last with no identity."""
        out = [{"image_id": i, "identity_id": x.identity_id, "identity_size": x.size,
                "same_answers": x.same_answers, "different_answers": x.different_answers,
                "names": ";".join(x.names), "new_individual": x.new_individual,
                "name_conflict": x.name_conflict, "excluded": False}
               for x in self.identities for i in x.image_ids]
        out += [{"image_id": i, "identity_id": "", "identity_size": 0, "same_answers": 0,
                 "different_answers": 0, "names": "", "new_individual": False,
                 "name_conflict": False, "excluded": True} for i in self.excluded_image_ids]
        return out

    @classmethod
    def from_pb(cls, msg: constraints_pb2.GetIdentitiesResponse) -> Identities:
        return cls(msg.collection_id, tuple(Identity.from_pb(x) for x in msg.identities),
                   tuple(msg.excluded_image_ids), ModelRef.from_pb(msg.model),
                   msg.applied_answers,
                   tuple(Contradiction.from_pb(c) for c in msg.contradictions), msg.cycle)


# ------------------------------------------------------------------------ embedding


@dataclass(frozen=True)
class Embeddings:
    """Vectors in request order: ``vectors[k]`` is the L2-normalised vector of ``ids[k]``."""

    ids: tuple[str, ...]
    vectors: Any  # numpy.ndarray (n, dim), float32
    model: ModelRef


# ------------------------------------------------------------------------- training

JOB_STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")

#: TrainingConfig fields (training.proto), the keyword arguments of ``start_training``.
TRAINING_FIELDS = (
    "mode", "epochs", "epochs_per_cycle", "iters_per_epoch", "num_identities",
    "num_instances", "lr", "weight_decay", "step_size", "gamma", "momentum", "temperature",
    "eps", "min_samples", "k1", "k2", "eps_gap", "reliability_percentile", "self_paced",
    "cluster_features", "seed", "trainable_stages", "augment_views", "pair_loss_weight")


def training_config_pb(config: Mapping[str, Any]) -> Any:
    """A TrainingConfig message from keyword values; an unknown name, or a value of the
    wrong type or out of its field's range, is a ValueError naming the field."""
    from reidal.v1 import training_pb2

    unknown = sorted(set(config) - set(TRAINING_FIELDS))
    if unknown:
        raise ValueError(f"unknown training config field(s) {unknown}; "
                         f"known: {', '.join(TRAINING_FIELDS)}")
    msg = training_pb2.TrainingConfig()
    for name, value in config.items():
        if value is None:
            continue
        try:
            setattr(msg, name, value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"training config {name}={value!r}: {exc}") from None
    return msg


@dataclass(frozen=True)
class TrainingJob:
    """A training job; ``state`` is one of JOB_STATES, ``config`` every value it runs with."""

    job_id: str
    collection_id: str
    state: str
    epoch: int
    epochs: int
    loss: float
    clusters: int
    unclustered: int
    answers_used: int
    metrics: dict[str, float]
    base_model: ModelRef
    model: ModelRef
    error_code: str
    error_message: str
    config: dict[str, Any]
    created_at: datetime | None
    updated_at: datetime | None
    #: CancelJob was asked; the replica running the job stops it at its next check.
    cancel_requested: bool = False

    @property
    def finished(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED", "CANCELLED")

    @classmethod
    def from_pb(cls, msg: Any) -> TrainingJob:
        from reidal.v1 import training_pb2

        config = {f: getattr(msg.config, f) for f in TRAINING_FIELDS
                  if msg.config.HasField(f)}
        return cls(msg.job_id, msg.collection_id,
                   _enum_name(training_pb2.JobState, msg.state, "JOB_STATE_"),
                   msg.epoch, msg.epochs, msg.loss, msg.clusters, msg.unclustered,
                   msg.answers_used, dict(msg.metrics), ModelRef.from_pb(msg.base_model),
                   ModelRef.from_pb(msg.model), msg.error_code, msg.error_message, config,
                   _time(msg, "created_at"), _time(msg, "updated_at"),
                   bool(msg.cancel_requested))
