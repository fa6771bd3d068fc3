"""Submitting answers: resolve pair ids, store durably once, report contradictions.

The rules (constraints.proto has the contract):

- An answer names a pair id of a stored batch or two image ids. With a batch id, every pair
  id must belong to that batch (a stale UI answering another batch is caught).
- All answers of a request are stored in one transaction, or none (every check runs first).
- A request id makes a retry safe: the response of the first call is stored in the same
  transaction as the answers and returned again; the same request id with other answers is
  refused (AlreadyExists) instead of silently answering with the first call's result.
- This workflow opens the collection's write transaction itself (the unit of work,
  :meth:`~reidal.store.answers.Answers.transaction`): replay check, inserts, contradictions and
  the recorded response, committed durably before :func:`submit` returns.
- Contradictions are found among the current answers right after the insert (inside the same
  transaction, so concurrent submitters each see exactly the answers committed before them)
  by :class:`~reidal.core.constraints.ConstraintSet`: the newer answer wins, the oldest
  answer of the contradicting set is not applied, every answer stays stored. The set is the
  collection's :class:`~reidal.answer_state.AnswerState`, caught up with the store inside
  the transaction, so a submit costs O(its answers), not O(history). A contradiction keeps
  the core's shape (:class:`~reidal.core.constraints.Contradiction`, answer ids = store
  seqs) up to the servicer; only the recorded response holds it as JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from reidal.answer_state import answer_states
from reidal.collection_state import constraints_from_answers
from reidal.core.constraints import Contradiction
from reidal.errors import AlreadyExists, InvalidArgument, NotFound
from reidal.limits import MAX_NOTE_LENGTH
from reidal.logs import log_kv
from reidal.metrics import counter
from reidal.store import LABELS, AnswerIn, Store, StoredAnswer

log = logging.getLogger("reidal.constraints")

#: Most answers per request.
MAX_ANSWERS_PER_REQUEST = 10_000
MAX_LISTED = 20
#: Tags an answer may carry (AnswerTag in constraints.proto, lower case).
TAGS = ("photobomb", "scenery_match", "poor_quality")

_STORED = counter("reidal_answers_stored", "Answers stored, per label", ("label",))

_ANSWER_ID = re.compile(r"answer-(\d{1,18})")


def answer_id(seq: int) -> str:
    """The wire id of a stored answer."""
    return f"answer-{int(seq)}"


def parse_answer_id(text: str, collection_id: str) -> int:
    """The store's seq of an answer id; NotFound for anything that is not one."""
    match = _ANSWER_ID.fullmatch(text or "")
    if match is None:
        raise NotFound(f"answer {text!r} does not exist in collection {collection_id!r}")
    return int(match.group(1))


@dataclass(frozen=True)
class AnswerSubmission:
    """One answer as a client sent it (a pair id, or two image ids)."""

    label: str
    pair_id: str = ""
    image_a: str = ""
    image_b: str = ""
    annotator: str = ""
    tags: tuple[str, ...] = ()
    confidence: float | None = None
    note: str = ""
    started_at: float | None = None
    ended_at: float | None = None


@dataclass
class SubmitOutcome:
    """What a submit did. A contradiction is the core's, its answer ids the store's seqs."""

    seqs: list[int]
    stored: int
    replayed: int
    superseded: int
    contradictions: list[Contradiction] = field(default_factory=list)


def _check(submissions: Sequence[AnswerSubmission]) -> None:
    if not submissions:
        raise InvalidArgument("the request has no answers")
    if len(submissions) > MAX_ANSWERS_PER_REQUEST:
        raise InvalidArgument(f"the request has {len(submissions)} answers, at most "
                              f"{MAX_ANSWERS_PER_REQUEST} are allowed: split it")
    for k, s in enumerate(submissions):
        if s.label not in LABELS:
            raise InvalidArgument(f"answer {k}: label {s.label!r} is not one of {list(LABELS)}")
        if bool(s.pair_id) == bool(s.image_a or s.image_b):
            raise InvalidArgument(f"answer {k}: give either a pair id or two image ids")
        if not s.pair_id and not (s.image_a and s.image_b):
            raise InvalidArgument(f"answer {k}: both image ids of the pair must be set")
        if s.image_a and s.image_a == s.image_b:
            raise InvalidArgument(f"answer {k} pairs image {s.image_a!r} with itself")
        bad_tags = [t for t in s.tags if t not in TAGS]
        if bad_tags:
            raise InvalidArgument(f"answer {k}: unknown tag(s) {bad_tags}, known: {list(TAGS)}")
        if s.confidence is not None and not (math.isfinite(s.confidence)
                                             and 0.0 <= s.confidence <= 1.0):
            raise InvalidArgument(f"answer {k}: confidence must be in [0, 1], got {s.confidence}")
        if len(s.note) > MAX_NOTE_LENGTH:
            raise InvalidArgument(f"answer {k}: note is longer than {MAX_NOTE_LENGTH} characters")
        if s.started_at is not None and s.ended_at is not None and s.ended_at < s.started_at:
            raise InvalidArgument(f"answer {k}: ended_at is before started_at")


def _resolve(store: Store, collection_id: str, submissions: Sequence[AnswerSubmission],
             batch_id: str) -> list[AnswerIn]:
    if batch_id:
        store.batches.get(collection_id, batch_id)  # NotFound names it
    pair_ids = [s.pair_id for s in submissions if s.pair_id]
    pairs = store.batches.pairs_by_id(collection_id, pair_ids) if pair_ids else {}
    missing = sorted({p for p in pair_ids if p not in pairs})
    if missing:
        raise NotFound(f"{len(missing)} pair id(s) are not in collection {collection_id!r}: "
                       f"{missing[:MAX_LISTED]}")
    out = []
    for k, s in enumerate(submissions):
        if s.pair_id:
            owner, pair = pairs[s.pair_id]
            if batch_id and owner != batch_id:
                raise InvalidArgument(f"answer {k}: pair {s.pair_id!r} belongs to batch "
                                      f"{owner!r}, not to batch {batch_id!r}")
            a, b, bid = pair.image_a, pair.image_b, owner
        else:
            a, b, bid = s.image_a, s.image_b, batch_id
        out.append(AnswerIn(a, b, s.label, annotator=s.annotator, confidence=s.confidence,
                            tags=tuple(s.tags), note=s.note, started_at=s.started_at,
                            ended_at=s.ended_at, batch_id=bid, pair_id=s.pair_id))
    return out


def fingerprint(batch_id: str, submissions: Sequence[AnswerSubmission]) -> str:
    text = json.dumps([batch_id, [asdict(s) for s in submissions]], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def current_contradictions(store: Store, collection_id: str) -> list[Contradiction]:
    """Every contradiction among the current answers between images not excluded, computed
    from the whole history (what the incremental state of :mod:`reidal.answer_state` must
    agree with)."""
    rows = [img.image_id for img in store.images.all(collection_id, include_excluded=False)]
    return constraints_from_answers(rows, store.answers.all(collection_id)).contradictions()


def submit(store: Store, collection_id: str, submissions: Sequence[AnswerSubmission], *,
           batch_id: str = "", request_id: str = "") -> SubmitOutcome:
    """Check, resolve and store ``submissions`` (see the module docstring). The answers
    are committed (durably) before this returns."""
    _check(submissions)
    store.collections.get(collection_id)
    answers = _resolve(store, collection_id, submissions, batch_id)
    print_ = fingerprint(batch_id, submissions)
    store.answers.check(collection_id, answers)
    states = answer_states(store)
    # a failed transaction's state is dropped (writing); the state reads see the inserts;
    # a state this process lacks is built before the transaction (prepare), not in it
    with states.writing(collection_id):
        states.prepare(store, collection_id)
        with store.answers.transaction(collection_id) as tx:
            record = tx.response_of(request_id)
            if record is None:
                seqs = tx.insert(answers, request_id)
                outcome = SubmitOutcome(
                    seqs, stored=len(answers), replayed=0,
                    superseded=store.answers.count_superseded_by(collection_id, seqs),
                    contradictions=states.sync(store, collection_id).contradictions_with(seqs))
                tx.record_response(request_id, _record(print_, outcome))
        if record is None:  # committed: the state is exactly the stored answers
            states.snapshot_if_due(store, collection_id)
    if record is not None:
        if record.get("fingerprint") != print_:
            raise AlreadyExists(
                f"request id {request_id!r} was already used for other answers in collection "
                f"{collection_id!r}; use a new request id for a new submission")
        outcome = _replayed(record, len(answers))
    else:
        for a in answers:
            _STORED.labels(a.label).inc()
    log_kv(log, logging.INFO, "answers", collection=collection_id, stored=outcome.stored,
           replayed=record is not None, request_id=request_id,
           contradictions=len(outcome.contradictions))
    return outcome


def _record(print_: str, outcome: SubmitOutcome) -> dict[str, Any]:
    """The outcome as kept for a retry of its request (JSON: this layout is in databases)."""
    return {"fingerprint": print_, "seqs": outcome.seqs, "superseded": outcome.superseded,
            "contradictions": [{"answers": list(c.answer_ids), "dropped": c.dropped_answer_id}
                               for c in outcome.contradictions]}


def _replayed(record: dict[str, Any], n_answers: int) -> SubmitOutcome:
    """The outcome a retry gets: the first call's, with its answers counted as replayed."""
    return SubmitOutcome(
        seqs=[int(s) for s in record["seqs"]], stored=0, replayed=n_answers,
        superseded=int(record.get("superseded", 0)),
        contradictions=[Contradiction(tuple(int(x) for x in c["answers"]), int(c["dropped"]))
                        for c in record.get("contradictions", [])])


def explain(contradiction: Contradiction, answers: dict[int, StoredAnswer]) -> str:
    """The contradiction in words, with image ids and answer ids."""
    parts = []
    for seq in contradiction.answer_ids:
        a = answers.get(seq)
        if a is not None:
            parts.append(f"{answer_id(seq)} {a.label} ({a.image_a}, {a.image_b})")
    return (f"answers {', '.join(parts)} cannot all hold; the newer answers win, so "
            f"{answer_id(contradiction.dropped_answer_id)} (the oldest) is not applied until one of them is "
            "revised or deleted")
