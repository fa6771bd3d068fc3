"""A collection's current answers as a constraint set kept up to date per answer.

SubmitConstraints must report the contradictions its answers take part in, under the
rule of :mod:`reidal.core.constraints` applied to every current answer of the collection
(between images not excluded). Recomputing that from the whole history on each call
costs O(history) inside the write transaction. Instead each process keeps, per
collection, an :class:`AnswerState`: a :class:`~reidal.core.constraints.ConstraintSet`
over the answered images (item index by first appearance) whose answer ids are the
store's seqs, built once from the store and then moved forward answer by answer, so a
submit costs O(its own answers); an answer that contradicts, relabels or removes an
applied one rebuilds only the ML components around its images
(:meth:`~reidal.core.constraints.ConstraintSet._rebuild_around`).

The store stays the source of truth. Inside each write transaction the state is checked
against :meth:`~reidal.store.answers.Answers.log_version`: answers another process (a
replica) wrote since are applied from the rows newer than the state's last seq, and
answers deleted since (DeleteConstraint, a deleted image) from the store's deletion log
(:meth:`~reidal.store.answers.Answers.deletions`); an exclusion, a restore or new vectors
(an epoch step that logged no deletion) or a re-created collection makes it reload. If the transaction fails after the state moved,
the state is dropped before this process's next writer of the collection reads it (the
next call reloads), so it never holds an answer that was not committed.

Exactness: what the reply reports is what a full rebuild would report. An incremental
add applies exactly the answers a rebuild applies, but a rebuild may name other answers
for an older contradiction (the path through a new must-link); so an answer touching the
ML group of an answer already dropped rebuilds that part of the set instead of being
applied incrementally (the constraint set does it).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from reidal.core.constraints import Answer, ConstraintSet, Contradiction
from reidal.errors import NotFound
from reidal.store import AnswerDeletion, AnswerLogVersion, AnswerRow, Store


@dataclass
class AnswerState:
    """The current SAME / DIFFERENT answers of one collection (see the module docstring)."""

    version: AnswerLogVersion
    excluded: frozenset[str]
    items: dict[str, int]
    constraints: ConstraintSet
    #: The max seq of the snapshot this state was loaded from or last wrote (-1: none).
    snapshot_seq: int = -1

    @property
    def max_seq(self) -> int:
        return self.version.max_seq

    @classmethod
    def load(cls, store: Store, collection_id: str, version: AnswerLogVersion) -> AnswerState:
        """Build from the store's current answers (once per process, or after a reload),
        as integer columns (:meth:`~reidal.store.answers.Answers.constraint_columns`)."""
        excluded = frozenset(store.images.excluded(collection_id))
        # answers newer than ``version`` (committed since it was read, when this runs
        # outside a transaction: :meth:`AnswerStates.prepare`) are left to catch_up
        cols = store.answers.constraint_columns(collection_id, version.max_seq)
        return cls._of(version, excluded, cols.image_ids, cols.a, cols.b, cols.same, cols.seqs)

    @classmethod
    def _of(cls, version: AnswerLogVersion, excluded: frozenset[str], items: list[str],
            a: np.ndarray, b: np.ndarray, same: np.ndarray, seqs: np.ndarray,
            snapshot_seq: int = -1) -> AnswerState:
        cs = ConstraintSet.from_arrays(len(items), a, b, same, seqs)
        cs.warm()
        return cls(version, excluded, dict(zip(items, range(len(items)), strict=True)), cs,
                   snapshot_seq)

    def encode(self) -> bytes:
        """The state as bytes (an ``.npz``: the answers' columns, the image ids of the
        item indices and the excluded images, as JSON), for
        :meth:`~reidal.store.answers.Answers.put_snapshot`; :meth:`decode` reads it."""
        seqs, a, b, same = self.constraints.answer_arrays()
        buf = io.BytesIO()
        np.savez(buf, seqs=seqs, a=a.astype(np.int32), b=b.astype(np.int32), same=same,
                 items=_json_bytes(list(self.items)), excluded=_json_bytes(sorted(self.excluded)))
        return buf.getvalue()

    @classmethod
    def decode(cls, version: AnswerLogVersion, data: bytes) -> AnswerState:
        """The state :meth:`encode` wrote at ``version``."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls._of(version, frozenset(json.loads(z["excluded"].tobytes())),
                           json.loads(z["items"].tobytes()), z["a"], z["b"], z["same"],
                           z["seqs"], snapshot_seq=version.max_seq)

    def _item(self, image_id: str) -> int:
        k = self.items.get(image_id)
        if k is None:
            k = self.items[image_id] = len(self.items)
            if k >= self.constraints.n_items:  # capacity doubling: amortised O(1)
                self.constraints.grow(max(64, 2 * self.constraints.n_items))
        return k

    def _constraint(self, r: AnswerRow) -> bool:
        return not (r.label == "UNSURE" or r.image_a in self.excluded
                    or r.image_b in self.excluded)

    def catch_up(self, rows: Sequence[AnswerRow], supersessions: Iterable[tuple[int, int]],
                 version: AnswerLogVersion, deleted: Iterable[int] = (),
                 restored: Sequence[AnswerRow] = ()) -> None:
        """Move the state to ``version``: apply the answers newer than the state (``rows``,
        in seq order) and the supersessions they made, take out the answers ``deleted``
        since (the store's :meth:`~reidal.store.answers.Answers.deletions`), and put back the
        answers those deletions made current again that still are (``restored``). The
        constraint set keeps its contradictions those of a full rebuild."""
        cs = self.constraints
        superseded: dict[int, list[int]] = {}
        for old, new in supersessions:
            superseded.setdefault(new, []).append(old)
        gone = set(deleted)
        for r in rows:  # one step per new answer
            olds = [old for old in superseded.get(r.seq, ()) if old in cs]
            constraint = r.seq not in gone and self._constraint(r)
            if constraint:
                i, j = self._item(r.image_a), self._item(r.image_b)
                answer = Answer(i, j, r.label == "SAME", r.seq)
                if len(olds) == 1:  # a revision: no rebuild when it says the same again
                    cs.replace(olds[0], answer)
                else:
                    for old in olds:
                        cs.remove(old)
                    cs.add(answer)
            else:
                for old in olds:
                    cs.remove(old)
        for seq in sorted(gone):  # one step per deleted answer
            if seq in cs:
                cs.remove(seq)
        for r in restored:
            if r.seq not in cs and self._constraint(r):
                cs.add(Answer(self._item(r.image_a), self._item(r.image_b), r.label == "SAME",
                              r.seq))
        self.version = version

    def contradictions_with(self, seqs: Iterable[int]) -> list[Contradiction]:
        """The contradictions (of the whole collection) that involve one of ``seqs``."""
        mine = set(seqs)
        return [c for c in self.constraints.contradictions if mine.intersection(c.answer_ids)]


#: A process keeps a snapshot of a collection's answer state in the store once this many
#: answers came since the last one (OURS): a restart then loads the snapshot and fetches
#: at most about this many answers, where a full load fetches them all (seconds at a
#: million, docs/benchmarks.md); each write costs one blob of ~17 bytes an answer.
SNAPSHOT_EVERY = 20_000
#: ... and only for states of at least this many answers (smaller ones load in well under
#: a second without one).
SNAPSHOT_MIN_ANSWERS = 10_000

log = logging.getLogger("reidal.answer_state")


class AnswerStates:
    """The :class:`AnswerState` of each collection of one store, for this process."""

    def __init__(self) -> None:
        self._states: dict[str, AnswerState] = {}
        self._writers: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @contextmanager
    def writing(self, collection_id: str) -> Iterator[None]:
        """Hold around a write transaction that calls :meth:`sync`: this process's writers
        of the collection run one at a time, and if the transaction fails the state is
        dropped before the next writer can read it (it may hold the rolled-back answers,
        whose seqs SQLite may then reuse)."""
        with self._guard:
            lock = self._writers.setdefault(collection_id, threading.Lock())
        with lock:
            try:
                yield
            except BaseException:
                self.forget(collection_id)
                raise

    def prepare(self, store: Store, collection_id: str) -> AnswerState | None:
        """Build the collection's state before its write transaction when this process
        has none (its first write after a restart) or one of another epoch; returns it
        (None when the kept one is current). Call it inside :meth:`writing`, outside the
        transaction: the load is the expensive part (16-25 s at a million answers,
        docs/benchmarks.md), and inside the transaction it held the collection's writers
        everywhere and, on SQLite, every store call of the process. Only answers up to
        the log version read first are loaded; what is committed after it (new answers,
        supersessions by them, deletions) is caught up by :meth:`sync` inside the
        transaction, and an exclusion since makes :meth:`sync` load again."""
        version = store.answers.log_version(collection_id)
        with self._guard:
            state = self._states.get(collection_id)
        if state is not None and _deletions_since(store, collection_id, state.version,
                                                  version) is not None:
            return None
        state, _ = _load(store, collection_id, version)
        with self._guard:
            self._states[collection_id] = state
        return state

    def sync(self, store: Store, collection_id: str) -> AnswerState:
        """The collection's state, caught up with the store. Call it inside the
        collection's write transaction (which serialises every writer of the collection,
        in every process), itself inside :meth:`writing`."""
        try:
            version = store.answers.log_version(collection_id)
        except NotFound:
            self.forget(collection_id)  # a deleted collection's state is not kept
            raise
        with self._guard:
            state = self._states.get(collection_id)
        deletions = (None if state is None
                     else _deletions_since(store, collection_id, state.version, version))
        if state is None or deletions is None:
            state, deletions = _load(store, collection_id, version)
        if state.max_seq < version.max_seq or deletions:
            back = [d.restored for d in deletions if d.restored is not None]
            state.catch_up(store.answers.rows(collection_id, after_seq=state.max_seq),
                           store.answers.supersessions_after(collection_id, state.max_seq), version,
                           deleted=[d.seq for d in deletions],
                           restored=[AnswerRow(a.seq, a.image_a, a.image_b, a.label)
                                     for a in store.answers.by_seq(collection_id, back).values()
                                     if a.superseded_by is None and not a.deleted])
        with self._guard:
            self._states[collection_id] = state
        return state

    def snapshot_if_due(self, store: Store, collection_id: str) -> bool:
        """Keep a snapshot of the collection's state in the store when it holds at least
        :data:`SNAPSHOT_MIN_ANSWERS` answers and :data:`SNAPSHOT_EVERY` answers came since
        the last one; True when it wrote one. Call it inside :meth:`writing` after the
        write transaction committed (the state is then exactly the committed answers).
        A restarted process loads the snapshot and catches up from it (:func:`_load`).
        A snapshot is a cache: failing to write one is logged, not raised (the answers
        are committed already)."""
        return self._snapshot(store, collection_id, SNAPSHOT_EVERY)

    def snapshot_all(self, store: Store) -> int:
        """Keep a snapshot of every state this process holds that is newer than its last
        one (of at least :data:`SNAPSHOT_MIN_ANSWERS` answers); how many it wrote. For a
        clean shutdown (:meth:`reidal.runtime.Runtime.close`, after the server stopped
        taking calls): the next start then has nothing to catch up."""
        with self._guard:
            collection_ids = list(self._states)
        written = 0
        for collection_id in collection_ids:
            with self.writing(collection_id):
                written += self._snapshot(store, collection_id, 1)
        return written

    def _snapshot(self, store: Store, collection_id: str, every: int) -> bool:
        with self._guard:
            state = self._states.get(collection_id)
        if (state is None or len(state.constraints) < SNAPSHOT_MIN_ANSWERS
                or state.max_seq - state.snapshot_seq < every):
            return False
        try:
            store.answers.put_snapshot(collection_id, state.version, state.encode())
        except Exception:  # noqa: BLE001 - a cache write must not fail a committed submit
            log.warning("could not keep the answer-state snapshot of collection %r",
                        collection_id, exc_info=True)
            return False
        state.snapshot_seq = state.max_seq
        return True

    def forget(self, collection_id: str) -> None:
        with self._guard:
            self._states.pop(collection_id, None)


def _load(store: Store, collection_id: str, version: AnswerLogVersion
          ) -> tuple[AnswerState, list[AnswerDeletion]]:
    """A new state of the collection and the deletions logged since it: its snapshot when
    one is usable for ``version`` (it is at an earlier version: catch up from it), else
    every answer up to ``version`` (no deletions since)."""
    snapshot = store.answers.snapshot(collection_id)
    if snapshot is not None:
        deletions = _deletions_since(store, collection_id, snapshot[0], version)
        if deletions is not None:
            return AnswerState.decode(*snapshot), deletions
    return AnswerState.load(store, collection_id, version), []


def _deletions_since(store: Store, collection_id: str, held: AnswerLogVersion,
                     version: AnswerLogVersion) -> list[AnswerDeletion] | None:
    """What moves a state at ``held`` to ``version`` besides new answers: the deletions
    logged since its epoch ([] when the epoch is the same), or None when it must be
    loaded again (a re-created collection, a newer state than the store (a rolled-back
    write), or an epoch step that logged no deletion: an exclusion, a restore, new
    vectors)."""
    if held.created_at != version.created_at or held.max_seq > version.max_seq:
        return None
    if held.epoch == version.epoch:
        return []
    log = [d for d in store.answers.deletions(collection_id, held.epoch)
           if d.epoch <= version.epoch]
    steps = set(range(held.epoch + 1, version.epoch + 1))
    return log if {d.epoch for d in log} == steps else None


def _json_bytes(value: object) -> np.ndarray:
    return np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)


_STATES: weakref.WeakKeyDictionary[Store, AnswerStates] = weakref.WeakKeyDictionary()
_STATES_GUARD = threading.Lock()


def answer_states(store: Store) -> AnswerStates:
    """The answer states kept for ``store`` (one set per open store, i.e. per process)."""
    with _STATES_GUARD:
        states = _STATES.get(store)
        if states is None:
            states = _STATES[store] = AnswerStates()
        return states
