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

    @property
    def max_seq(self) -> int:
        return self.version.max_seq

    @classmethod
    def load(cls, store: Store, collection_id: str, version: AnswerLogVersion) -> AnswerState:
        """Build from the store's current answers (once per process, or after a reload)."""
        excluded = frozenset(store.images.excluded(collection_id))
        # answers newer than ``version`` (committed since it was read, when this runs
        # outside a transaction: :meth:`AnswerStates.prepare`) are left to catch_up
        rows = [r for r in store.answers.rows(collection_id) if r.seq <= version.max_seq
                and r.label != "UNSURE" and r.image_a not in excluded
                and r.image_b not in excluded]
        seq, a_ids, b_ids, labels = (list(col) for col in zip(*rows, strict=True)) \
            if rows else ([], [], [], [])
        items: dict[str, int] = {}
        # one dict step per answer end, once per process
        a = np.array([items.setdefault(x, len(items)) for x in a_ids], dtype=np.int64)
        b = np.array([items.setdefault(x, len(items)) for x in b_ids], dtype=np.int64)
        cs = ConstraintSet.from_arrays(len(items), a, b,
                                       np.array(labels, dtype=object) == "SAME",
                                       np.array(seq, dtype=np.int64))
        cs.warm()
        return cls(version, excluded, items, cs)

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
        if _deletions_since(store, collection_id, state, version) is not None:
            return None
        state = AnswerState.load(store, collection_id, version)
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
        deletions = _deletions_since(store, collection_id, state, version)
        if state is None or deletions is None:
            state = AnswerState.load(store, collection_id, version)
        elif state.max_seq < version.max_seq or deletions:
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

    def forget(self, collection_id: str) -> None:
        with self._guard:
            self._states.pop(collection_id, None)


def _deletions_since(store: Store, collection_id: str, state: AnswerState | None,
                     version: AnswerLogVersion) -> list[AnswerDeletion] | None:
    """What moves ``state`` to ``version`` besides new answers: the deletions logged since
    its epoch ([] when the epoch is the same), or None when it must be loaded again (no
    state, a re-created collection, a newer state than the store (a rolled-back write),
    or an epoch step that logged no deletion: an exclusion, a restore, new vectors)."""
    if (state is None or state.version.created_at != version.created_at
            or state.max_seq > version.max_seq):
        return None
    if state.version.epoch == version.epoch:
        return []
    log = [d for d in store.answers.deletions(collection_id, state.version.epoch)
           if d.epoch <= version.epoch]
    steps = set(range(state.version.epoch + 1, version.epoch + 1))
    return log if {d.epoch for d in log} == steps else None


_STATES: weakref.WeakKeyDictionary[Store, AnswerStates] = weakref.WeakKeyDictionary()
_STATES_GUARD = threading.Lock()


def answer_states(store: Store) -> AnswerStates:
    """The answer states kept for ``store`` (one set per open store, i.e. per process)."""
    with _STATES_GUARD:
        states = _STATES.get(store)
        if states is None:
            states = _STATES[store] = AnswerStates()
        return states
