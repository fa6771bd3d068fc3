"""The incremental answer state behind SubmitConstraints, over a real store (no gRPC).

The reference is the full recomputation from the store (answers.current_contradictions):
whatever answers arrive in whatever calls, from this store handle or another one on the
same database, a submit reports exactly the contradictions of the full rebuild that
involve its answers.
"""

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reidal import answer_state
from reidal.answer_state import answer_states
from reidal.answers import AnswerSubmission, current_contradictions, submit
from reidal.store import AnswerIn, ImageRecord, Store

IMAGES = [f"i{k}" for k in range(7)]
_names = itertools.count()


@pytest.fixture()
def store(store_target):
    s = Store.open(store_target)
    yield s
    s.close()


def new_collection(store: Store) -> str:
    cid = f"c{next(_names)}"
    store.collections.create(cid)
    store.images.add(cid, [ImageRecord(i) for i in IMAGES])
    return cid


def reference(store: Store, cid: str, seqs) -> list[tuple[tuple[int, ...], int]]:
    mine = set(seqs)
    return [(c.answer_ids, c.dropped_answer_id) for c in current_contradictions(store, cid)
            if mine.intersection(c.answer_ids)]


def reported(outcome) -> list[tuple[tuple[int, ...], int]]:
    return [(c.answer_ids, c.dropped_answer_id) for c in outcome.contradictions]


answer_st = st.tuples(st.integers(0, len(IMAGES) - 1), st.integers(1, len(IMAGES) - 1),
                      st.sampled_from(["SAME", "SAME", "DIFFERENT", "UNSURE"]))
call_st = st.lists(answer_st, min_size=1, max_size=4)
event_st = st.one_of(call_st, st.tuples(st.just("exclude"), st.integers(0, len(IMAGES) - 1)),
                     st.tuples(st.just("delete"), st.integers(0, 50)))


def as_submissions(call):
    return [AnswerSubmission(label, image_a=IMAGES[a], image_b=IMAGES[(a + d) % len(IMAGES)])
            for a, d, label in call]


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(event_st, min_size=1, max_size=10))
def test_submits_in_several_calls_report_what_a_full_rebuild_reports(store, events):
    cid = new_collection(store)
    given_seqs: list[int] = []
    for event in events:
        if event[0] == "exclude":
            image = IMAGES[event[1]]
            if image in store.images.excluded(cid):
                store.images.restore(cid, image)
            else:
                store.images.exclude(cid, image, "test")
            continue
        if event[0] == "delete":
            if given_seqs:
                seq = given_seqs[event[1] % len(given_seqs)]
                if not store.answers.get(cid, seq).deleted:
                    store.answers.delete(cid, seq)
            continue
        out = submit(store, cid, as_submissions(event))
        given_seqs += out.seqs
        assert reported(out) == reference(store, cid, out.seqs)
    # the state now equals the rebuild as a whole, not only around the last answers
    state = answer_states(store).sync(store, cid)
    assert [(c.answer_ids, c.dropped_answer_id) for c in state.constraints.contradictions] \
        == [(c.answer_ids, c.dropped_answer_id) for c in current_contradictions(store, cid)]


def test_a_chain_contradiction_is_reported_once_formed_and_a_revision_clears_it(store):
    cid = new_collection(store)
    first = submit(store, cid, as_submissions([(0, 1, "SAME"), (1, 1, "SAME")]))
    assert not first.contradictions
    clash = submit(store, cid, as_submissions([(0, 2, "DIFFERENT")]))
    [(seqs, dropped)] = reported(clash)
    assert set(seqs) == {*first.seqs, *clash.seqs} and dropped == min(first.seqs)
    revised = submit(store, cid, as_submissions([(0, 1, "DIFFERENT")]))  # supersedes i0-i1
    assert revised.superseded == 1 and not revised.contradictions
    assert current_contradictions(store, cid) == []


def test_answers_written_through_another_store_handle_are_picked_up(store, store_target):
    cid = new_collection(store)
    submit(store, cid, as_submissions([(0, 1, "SAME")]))  # this handle's state exists now
    other = Store.open(store_target)  # a second process / replica on the same database
    try:
        theirs = submit(other, cid, as_submissions([(1, 1, "SAME")]))
        other.images.exclude(cid, "i6", "blurred")
        submit(other, cid, as_submissions([(3, 1, "SAME"), (3, 2, "DIFFERENT")]))
        other.images.delete(cid, "i4")  # retires the answers about it
    finally:
        other.close()
    mine = submit(store, cid, as_submissions([(0, 2, "DIFFERENT"), (5, 1, "SAME")]))
    [(seqs, _)] = reported(mine)
    assert theirs.seqs[0] in seqs and mine.seqs[0] in seqs
    assert reported(mine) == reference(store, cid, mine.seqs)  # i5-i6 not applied: excluded
    assert answer_states(store).sync(store, cid).constraints.contradictions[0].answer_ids == seqs


def test_a_recreated_collection_starts_from_nothing(store):
    cid = new_collection(store)
    submit(store, cid, as_submissions([(0, 1, "SAME"), (1, 1, "SAME")]))
    store.collections.delete(cid)
    store.collections.create(cid)
    store.images.add(cid, [ImageRecord(i) for i in IMAGES])
    out = submit(store, cid, as_submissions([(0, 2, "DIFFERENT")]))
    assert not out.contradictions


def test_consistent_answers_are_applied_without_rebuilding(store):
    cid = new_collection(store)
    submit(store, cid, as_submissions([(0, 1, "SAME")]))
    state = answer_states(store).sync(store, cid)
    before = state.constraints.rebuilds
    for call in ([(1, 1, "SAME")], [(3, 1, "DIFFERENT"), (4, 2, "UNSURE")], [(5, 1, "SAME")]):
        submit(store, cid, as_submissions(call))
    state = answer_states(store).sync(store, cid)
    assert state.constraints.rebuilds == before and len(state.constraints) == 4


def test_a_deleted_image_takes_its_answers_out_of_the_state(store):
    cid = new_collection(store)
    submit(store, cid, as_submissions([(0, 1, "SAME"), (1, 3, "SAME"), (4, 5, "SAME")]))
    store.images.delete(cid, "i4")  # the chain i0 - i1 - i4 - i2 loses its middle
    out = submit(store, cid, as_submissions([(0, 2, "DIFFERENT")]))
    assert not out.contradictions and reference(store, cid, out.seqs) == []


def test_a_failed_transaction_leaves_no_answer_in_the_state(store):
    cid = new_collection(store)
    submit(store, cid, as_submissions([(0, 1, "SAME"), (1, 1, "SAME")]))
    states = answer_states(store)

    with pytest.raises(RuntimeError), states.writing(cid), store.answers.transaction(cid) as tx:
        tx.insert([AnswerIn("i0", "i2", "DIFFERENT")])
        states.sync(store, cid)  # holds the inserted answer now
        raise RuntimeError("failed before the commit")
    out = submit(store, cid, as_submissions([(3, 1, "SAME")]))  # SQLite reuses the seq
    assert reported(out) == reference(store, cid, out.seqs) == []
    state = states.sync(store, cid)
    assert state.constraints.contradictions == [] and len(state.constraints) == 3


def test_a_state_built_before_the_transaction_catches_up_with_what_came_after(
        store, store_target):
    """A process's first write builds the state outside the write transaction
    (AnswerStates.prepare); answers another handle commits after that build, a revision of
    a built answer among them, are caught up inside the transaction, not loaded again."""
    cid = new_collection(store)
    other = Store.open(store_target)  # another process on the same database
    try:
        submit(other, cid, as_submissions([(0, 1, "SAME"), (1, 1, "SAME"), (4, 1, "SAME")]))
        states = answer_states(store)
        built = states.prepare(store, cid)
        assert built is not None and len(built.constraints) == 3
        assert states.prepare(store, cid) is None  # current: nothing to build again
        submit(other, cid, as_submissions([(0, 1, "DIFFERENT"), (3, 2, "DIFFERENT")]))
    finally:
        other.close()
    mine = submit(store, cid, as_submissions([(0, 2, "SAME"), (3, 1, "SAME")]))
    assert reported(mine) == reference(store, cid, mine.seqs)
    assert states.sync(store, cid) is built  # caught up, never reloaded


def state_of(store: Store, cid: str) -> list[tuple[tuple[int, ...], int]]:
    cs = answer_states(store).sync(store, cid).constraints
    return [(c.answer_ids, c.dropped_answer_id) for c in cs.contradictions]


@pytest.mark.parametrize("seed", range(3))
def test_relabels_and_deletes_move_the_state_without_reloading_it(store, store_target, seed):
    """Seeded random submits (some on pairs already answered, with the other label),
    DeleteConstraint-style deletions and deleted images, some through another store handle
    (another process): after every step the kept state equals a rebuild from the store,
    every reply reports what the rebuild reports, and the state was never loaded again
    nor rebuilt as a whole (relabels and deletions rebuild only their part)."""
    rng = random.Random(seed)
    cid = f"r{seed}-{next(_names)}"
    images = [f"x{k}" for k in range(24)]
    store.collections.create(cid)
    store.images.add(cid, [ImageRecord(i) for i in images])
    other = Store.open(store_target)
    try:
        first = submit(store, cid, [AnswerSubmission("SAME", image_a="x0", image_b="x1")])
        state = answer_states(store).sync(store, cid)
        full_builds = state.constraints.rebuilds
        answered: list[tuple[str, str]] = [("x0", "x1")]
        seqs = list(first.seqs)
        alive = list(images)
        contradicted = 0  # steps after which the collection held a contradiction
        for _ in range(50):
            handle = other if rng.random() < 0.25 else store
            roll = rng.random()
            if roll < 0.15 and seqs:
                seq = rng.choice(seqs)
                if not store.answers.get(cid, seq).deleted:
                    handle.answers.delete(cid, seq)
            elif roll < 0.2 and len(alive) > 12:
                gone = alive.pop(rng.randrange(len(alive)))
                handle.images.delete(cid, gone)
                answered = [p for p in answered if gone not in p]
            else:
                calls = []
                for _ in range(rng.randint(1, 3)):
                    if answered and rng.random() < 0.4:
                        a, b = rng.choice(answered)  # a revision, mostly a relabel
                    else:  # mostly inside groups of 6, so contradictions form
                        g = rng.randrange(len(alive) // 6) * 6
                        a, b = rng.sample(alive[g:g + 6], 2)
                        answered.append((a, b))
                    label = rng.choice(["SAME", "SAME", "DIFFERENT", "UNSURE"])
                    calls.append(AnswerSubmission(label, image_a=a, image_b=b))
                out = submit(handle, cid, calls)
                seqs += out.seqs
                if handle is store:
                    assert reported(out) == reference(store, cid, out.seqs)
            rebuilt = [(c.answer_ids, c.dropped_answer_id)
                       for c in current_contradictions(store, cid)]
            assert state_of(store, cid) == rebuilt
            contradicted += bool(rebuilt)
        kept = answer_states(store).sync(store, cid)
        assert kept is state and kept.constraints.rebuilds == full_builds
        assert kept.constraints.local_rebuilds > 0 and contradicted > 5
    finally:
        other.close()


def test_a_restarted_process_loads_the_snapshot_and_catches_up(store, store_target,
                                                               monkeypatch):
    """Once enough answers came, a submit keeps a snapshot of the state in the store; a
    new process (another store handle) builds its state from that snapshot, not from
    every answer, and catches up with the answers, relabels and deletions stored since,
    reporting what a rebuild reports. An exclusion since makes the snapshot unusable."""
    monkeypatch.setattr(answer_state, "SNAPSHOT_EVERY", 4)
    monkeypatch.setattr(answer_state, "SNAPSHOT_MIN_ANSWERS", 4)
    cid = new_collection(store)
    submit(store, cid, as_submissions([(0, 1, "SAME"), (1, 1, "SAME"), (3, 1, "DIFFERENT")]))
    assert store.answers.snapshot(cid) is None  # 3 answers: not due yet
    last = submit(store, cid, as_submissions([(4, 1, "SAME"), (0, 2, "DIFFERENT")]))
    snapshot_version, _ = store.answers.snapshot(cid)
    assert snapshot_version.max_seq == max(last.seqs)
    relabel = submit(store, cid, as_submissions([(0, 1, "DIFFERENT")]))  # after the snapshot
    store.answers.delete(cid, last.seqs[0])
    restarted = Store.open(store_target)
    try:
        states = answer_states(restarted)
        built = states.prepare(restarted, cid)
        assert built is not None and built.snapshot_seq == snapshot_version.max_seq
        assert built.version == snapshot_version  # from the snapshot: it catches up next
        mine = submit(restarted, cid, as_submissions([(2, 3, "SAME"), (0, 2, "SAME")]))
        assert reported(mine) == reference(restarted, cid, mine.seqs)
        assert states.sync(restarted, cid) is built
        assert state_of(restarted, cid) == [(c.answer_ids, c.dropped_answer_id)
                                            for c in current_contradictions(restarted, cid)]
        assert relabel.seqs[0] in built.constraints
        restarted.images.exclude(cid, "i6", "blurred")  # an unlogged epoch step
    finally:
        restarted.close()
    again = Store.open(store_target)
    try:
        rebuilt = answer_states(again).prepare(again, cid)
        assert rebuilt is not None and rebuilt.snapshot_seq == -1  # loaded every answer
    finally:
        again.close()


def test_the_columnar_load_reads_every_current_answer_whatever_the_image_ids(store,
                                                                           store_target):
    """A restarted process loads the answers as columns (store.answers.constraint_columns): the
    same contradictions as a rebuild, UNSURE, superseded, deleted and excluded answers
    left out, also when an image id holds the column separator (stored directly; the
    API refuses control characters) and the load reads row by row instead."""
    for images in (IMAGES, [f"odd\x1f{k}" for k in range(7)]):
        cid = f"cols{next(_names)}"
        store.collections.create(cid)
        store.images.add(cid, [ImageRecord(i) for i in images])
        pairs = [(0, 1, "SAME"), (1, 2, "SAME"), (0, 2, "DIFFERENT"), (3, 4, "UNSURE"),
                 (4, 5, "SAME"), (5, 6, "DIFFERENT"), (2, 3, "SAME"), (2, 3, "DIFFERENT")]
        out = submit(store, cid, [AnswerSubmission(lab, image_a=images[a], image_b=images[b])
                                  for a, b, lab in pairs])
        store.answers.delete(cid, out.seqs[4])
        store.images.exclude(cid, images[6], "blurred")
        restarted = Store.open(store_target)
        try:
            cols = restarted.answers.constraint_columns(cid, max(out.seqs))
            got = sorted(zip(cols.seqs.tolist(), (cols.image_ids[k] for k in cols.a),
                             (cols.image_ids[k] for k in cols.b), cols.same.tolist(),
                             strict=True))
            kept = [0, 1, 2, 7]  # not UNSURE, superseded, deleted, excluded
            assert got == [(out.seqs[k], *sorted((images[pairs[k][0]], images[pairs[k][1]])),
                            pairs[k][2] == "SAME") for k in kept]
            state = answer_states(restarted).sync(restarted, cid)
            assert [(c.answer_ids, c.dropped_answer_id) for c in state.constraints.contradictions] \
                == [(c.answer_ids, c.dropped_answer_id)
                    for c in current_contradictions(restarted, cid)] != []
        finally:
            restarted.close()


def test_a_clean_stop_leaves_every_state_as_a_snapshot_and_keeps_the_newest(store,
                                                                           store_target,
                                                                           monkeypatch):
    """snapshot_all (Runtime.close) writes every held state newer than its snapshot, not
    waiting for SNAPSHOT_EVERY; a process holding an older state does not replace a newer
    snapshot another one wrote."""
    monkeypatch.setattr(answer_state, "SNAPSHOT_MIN_ANSWERS", 2)
    cid = new_collection(store)
    other = Store.open(store_target)  # a process that will hold an older state
    try:
        submit(other, cid, as_submissions([(0, 1, "SAME"), (1, 1, "SAME")]))
        last = submit(store, cid, as_submissions([(3, 1, "DIFFERENT")]))
        assert store.answers.snapshot(cid) is None  # not due
        assert answer_states(store).snapshot_all(store) == 1
        assert answer_states(store).snapshot_all(store) == 0  # nothing newer since
        assert store.answers.snapshot(cid)[0].max_seq == last.seqs[0]
        assert answer_states(other).snapshot_all(other) == 1  # its state is older ...
        assert store.answers.snapshot(cid)[0].max_seq == last.seqs[0]  # ... and not kept
    finally:
        other.close()
