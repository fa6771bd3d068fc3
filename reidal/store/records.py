"""The records the store reads and writes: frozen dataclasses (and the constants that
give their fields meaning), free of any database concern."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

LABELS = ("SAME", "DIFFERENT", "UNSURE")
#: Counter moved by every write that changes the current answers of a collection other
#: than by inserting new ones (a deletion, an exclusion or restore of an image): a cached
#: answer state (:mod:`reidal.answer_state`) seeing it move reloads instead of catching up.
ANSWERS_EPOCH = "answers_epoch"


#: States of a training job; a job in a final state never changes again.
JOB_QUEUED, JOB_RUNNING, JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED = (
    "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
JOB_FINAL_STATES = frozenset({JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED})

OPERATION_STATES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED")


@dataclass(frozen=True)
class TrainingJobRecord:
    """One training job as stored. ``progress``: epoch, loss, clusters, unclustered,
    pairs_asked, answers_used, metrics of the last finished epoch. ``cancel_requested``:
    CancelJob asked it to stop (on any replica); the process running it stops at its next
    check (:meth:`Store.request_training_job_cancel`)."""

    job_id: str
    collection_id: str
    state: str
    config: dict[str, Any]
    progress: dict[str, Any] = field(default_factory=dict)
    base_model_name: str = ""
    base_model_version: str = ""
    model_name: str = ""
    model_version: str = ""
    error_code: str = ""
    error_message: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    cancel_requested: bool = False

    @property
    def final(self) -> bool:
        return self.state in JOB_FINAL_STATES



@dataclass(frozen=True)
class Collection:
    id: str
    species: str
    model_name: str
    model_version: str
    params: dict[str, Any]
    cycle: int
    created_at: float


@dataclass(frozen=True)
class ImageRecord:
    image_id: str
    uri: str = ""
    name: str = ""  # the identity name the platform already knows, if any
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AnswerIn:
    image_a: str
    image_b: str
    label: str  # SAME / DIFFERENT / UNSURE
    annotator: str = ""
    confidence: float | None = None
    tags: tuple[str, ...] = ()
    note: str = ""
    started_at: float | None = None
    ended_at: float | None = None
    batch_id: str = ""
    pair_id: str = ""


@dataclass(frozen=True)
class StoredAnswer:
    seq: int
    image_a: str
    image_b: str
    label: str
    annotator: str
    confidence: float | None
    tags: tuple[str, ...]
    note: str
    received_at: float
    batch_id: str
    pair_id: str
    request_id: str
    superseded_by: int | None
    deleted: bool
    started_at: float | None = None
    ended_at: float | None = None


@dataclass(frozen=True)
class AnswerLogVersion:
    """Where a collection's answers stand: the collection's creation time (a re-created
    collection of the same id differs), :data:`ANSWERS_EPOCH` and the newest answer seq
    (-1 when none)."""

    created_at: float
    epoch: int
    max_seq: int


class AnswerDeletion(NamedTuple):
    """One answer retired at one step of :data:`ANSWERS_EPOCH` (DeleteConstraint, or a
    deleted image's answers; seq -1: that step retired none), and the answer of its pair
    that the deletion made current again (None: none)."""

    epoch: int
    seq: int
    restored: int | None


class ConstraintColumns(NamedTuple):
    """A collection's current SAME / DIFFERENT answers as columns: answer k joins images
    ``image_ids[a[k]]`` and ``image_ids[b[k]]`` (the collection's images in ingest
    order), is a SAME when ``same[k]``, and has the store's seq ``seqs[k]``."""

    image_ids: list[str]
    seqs: np.ndarray
    a: np.ndarray
    b: np.ndarray
    same: np.ndarray


class AnswerRow(NamedTuple):
    """The part of an answer the constraint state needs (a tuple: a million load fast)."""

    seq: int
    image_a: str
    image_b: str
    label: str


@dataclass(frozen=True)
class ImageSource:
    """Where an image's pixels are: a blob named by ``sha256`` (kind ``data``) or ``uri``."""

    kind: str  # 'data' or 'uri'
    sha256: str  # of the bytes (data) or of the URI text (uri)
    size: int = 0  # bytes of a data image


@dataclass(frozen=True)
class ImageRow:
    """An image as listed: ingest position, ids, metadata and exclusion."""

    seq: int
    image_id: str
    uri: str
    name: str
    metadata: dict[str, str]
    excluded_reason: str | None
    added_at: float


@dataclass(frozen=True)
class PairRecord:
    """One pair of a stored query batch; ``image_a < image_b``."""

    pair_id: str
    image_a: str
    image_b: str
    pool: str
    region: int
    probability: float
    similarity: float


@dataclass(frozen=True)
class BatchRecord:
    """A stored query batch (its pairs are read with :meth:`Store.batch_pairs`)."""

    batch_id: str
    cycle: int
    budget: int
    reason: str
    finished: bool
    model_name: str
    model_version: str
    filter: dict[str, Any]
    n_items: int
    stats: dict[str, Any]
    request_id: str
    created_at: float


@dataclass(frozen=True)
class BatchDraft:
    """A query batch about to be stored (:class:`~reidal.store.batches.BatchTransaction`):
    its pairs in draw order (their ``pair_id`` is assigned on insert) and what is recorded
    with it."""

    pairs: Sequence[PairRecord]
    budget: int
    reason: str
    finished: bool
    model_name: str
    model_version: str
    filter: Mapping[str, Any] = field(default_factory=dict)
    n_items: int = 0
    stats: Mapping[str, Any] = field(default_factory=dict)
    request_id: str = ""


@dataclass(frozen=True)
class OperationRecord:
    """A long-running operation's durable state."""

    operation_id: str
    collection_id: str
    kind: str
    state: str  # PENDING, RUNNING, SUCCEEDED, FAILED
    done: int
    total: int
    stage: str
    error_code: str
    error_message: str
    result: dict[str, Any]
    created_at: float
    updated_at: float

    @property
    def final(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED")
