"""The answers workflow (reidal.answers.submit) over a real SQLite store: no gRPC, no Triton.

What SubmitConstraints promises, checked where it is decided: answers by image ids or by
pair ids of a stored batch, all or nothing, durable when submit returns, superseded by a
later answer on the same pair, contradictions reported with the store's seqs (the newer
answers win), and a request id that makes a retry store nothing twice. Each test makes its
own store, so every one runs alone.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from reidal.answers import AnswerSubmission, current_contradictions, explain, submit
from reidal.core.constraints import Contradiction
from reidal.errors import AlreadyExists, InvalidArgument, NotFound
from reidal.store import ImageRecord, PairRecord, Store

IMAGES = [f"i{k}" for k in range(6)]


@pytest.fixture()
def store(tmp_path: Path):
    s = Store(tmp_path)
    s.collections.create("c")
    s.images.add("c", [ImageRecord(i) for i in IMAGES])
    yield s
    s.close()


def by_images(a: str, b: str, label: str, **kw) -> AnswerSubmission:
    return AnswerSubmission(label, image_a=a, image_b=b, **kw)


def stored(store: Store) -> int:
    """Every answer row of the collection, superseded and deleted ones included."""
    return len(store.answers.all("c", current_only=False))


def batch_of(store: Store, *pairs: tuple[str, str]) -> list[str]:
    """A stored batch of ``pairs``; its pair ids."""
    records = [PairRecord("", *sorted(p), "pool", 0, 0.5, 0.5) for p in pairs]
    batch, _ = store.batches.create("c", lambda cycle: f"b{cycle}", records, budget=len(pairs),
                                    reason="", finished=False, model_name="", model_version="")
    return [p.pair_id for p, _ in store.batches.pairs("c", batch.batch_id)]


def test_answers_are_durable_once_submit_returns(tmp_path: Path):
    s = Store(tmp_path)
    s.collections.create("c")
    s.images.add("c", [ImageRecord(i) for i in IMAGES])
    out = submit(s, "c", [by_images("i1", "i0", "SAME", annotator="ann", confidence=0.9)])
    assert (out.stored, out.replayed, out.superseded, out.contradictions) == (1, 0, 0, [])
    s.close()
    reopened = Store(tmp_path)
    try:
        [a] = reopened.answers.all("c")
    finally:
        reopened.close()
    assert (a.seq, a.image_a, a.image_b, a.label, a.annotator, a.confidence) == \
        (out.seqs[0], "i0", "i1", "SAME", "ann", 0.9)


def test_pair_ids_resolve_to_their_images_and_batch(store):
    p0, p1 = batch_of(store, ("i0", "i1"), ("i2", "i3"))
    out = submit(store, "c", [AnswerSubmission("DIFFERENT", pair_id=p1)], batch_id="b1")
    [a] = store.answers.all("c")
    assert out.seqs == [a.seq] and (a.image_a, a.image_b, a.pair_id, a.batch_id) == \
        ("i2", "i3", p1, "b1")
    # without a batch id the pair's own batch is recorded
    submit(store, "c", [AnswerSubmission("SAME", pair_id=p0)])
    assert {a.pair_id: a.batch_id for a in store.answers.all("c")} == {p0: "b1", p1: "b1"}


def test_a_pair_of_another_batch_or_an_unknown_pair_stores_nothing(store):
    [p0] = batch_of(store, ("i0", "i1"))
    [p1] = batch_of(store, ("i2", "i3"))
    with pytest.raises(InvalidArgument, match="belongs to batch 'b1', not to batch 'b2'"):
        submit(store, "c", [AnswerSubmission("SAME", pair_id=p1),
                            AnswerSubmission("SAME", pair_id=p0)], batch_id="b2")
    with pytest.raises(NotFound, match="b1/7"):
        submit(store, "c", [AnswerSubmission("SAME", pair_id=p0),
                            AnswerSubmission("SAME", pair_id="b1/7")])
    with pytest.raises(NotFound, match="batch 'b9'"):
        submit(store, "c", [AnswerSubmission("SAME", pair_id=p0)], batch_id="b9")
    assert stored(store) == 0


@pytest.mark.parametrize(("answers", "error", "match"), [
    ([], InvalidArgument, "no answers"),
    ([by_images("i0", "i1", "MAYBE")], InvalidArgument, "label"),
    ([by_images("i0", "i0", "SAME")], InvalidArgument, "with itself"),
    ([AnswerSubmission("SAME", pair_id="b1/0", image_a="i0", image_b="i1")], InvalidArgument,
     "either a pair id or two image ids"),
    ([by_images("i0", "", "SAME")], InvalidArgument, "both image ids"),
    ([by_images("i0", "i1", "SAME", tags=("blurry",))], InvalidArgument, "unknown tag"),
    ([by_images("i0", "i1", "SAME", confidence=1.5)], InvalidArgument, "confidence"),
    ([by_images("i0", "i1", "SAME", started_at=2.0, ended_at=1.0)], InvalidArgument,
     "ended_at"),
    ([by_images("i0", "i1", "SAME"), by_images("i0", "nope", "SAME")], NotFound, "'nope'"),
])
def test_bad_answers_are_refused_and_none_of_the_request_is_stored(store, answers, error, match):
    with pytest.raises(error, match=match):
        submit(store, "c", answers)
    assert stored(store) == 0


def test_an_unknown_collection_is_not_found(store):
    with pytest.raises(NotFound, match="'other'"):
        submit(store, "other", [by_images("i0", "i1", "SAME")])


def test_a_contradiction_is_reported_with_the_store_seqs_and_the_oldest_answer_dropped(store):
    first = submit(store, "c", [by_images("i0", "i1", "SAME"), by_images("i1", "i2", "SAME")])
    assert first.contradictions == []
    clash = submit(store, "c", [by_images("i2", "i0", "DIFFERENT")])
    seqs = (*first.seqs, *clash.seqs)
    assert clash.contradictions == [Contradiction(seqs, first.seqs[0])]
    assert current_contradictions(store, "c") == clash.contradictions  # the full recomputation
    text = explain(clash.contradictions[0], store.answers.by_seq("c", seqs))
    assert f"answer-{first.seqs[0]} SAME (i0, i1)" in text and \
        f"answer-{first.seqs[0]} (the oldest) is not applied" in text
    # answers not involved report nothing, whatever the collection holds
    assert submit(store, "c", [by_images("i4", "i5", "SAME")]).contradictions == []


def test_a_revised_answer_supersedes_the_earlier_one_and_resolves_its_contradiction(store):
    first = submit(store, "c", [by_images("i0", "i1", "SAME"), by_images("i1", "i2", "SAME"),
                                by_images("i0", "i2", "DIFFERENT")])
    assert len(first.contradictions) == 1
    revised = submit(store, "c", [by_images("i2", "i0", "SAME", note="looked again")])
    assert revised.superseded == 1 and revised.contradictions == []
    assert current_contradictions(store, "c") == []
    history = {a.seq: a.superseded_by for a in store.answers.all("c", current_only=False)}
    assert history[first.seqs[2]] == revised.seqs[0] and history[revised.seqs[0]] is None
    assert stored(store) == 4 and len(store.answers.all("c")) == 3
    # answering the same pair again within one request: the later answer wins
    again = submit(store, "c", [by_images("i3", "i4", "SAME"), by_images("i4", "i3", "UNSURE")])
    assert again.superseded == 1
    assert [a.label for a in store.answers.all("c") if a.image_a == "i3"] == ["UNSURE"]


def test_a_retried_request_is_stored_once_and_answered_as_the_first_call(store):
    answers = [by_images("i0", "i1", "SAME"), by_images("i1", "i2", "SAME"),
               by_images("i0", "i2", "DIFFERENT")]
    first = submit(store, "c", answers, request_id="r1")
    assert (first.stored, first.replayed) == (3, 0) and len(first.contradictions) == 1
    retry = submit(store, "c", answers, request_id="r1")
    assert (retry.stored, retry.replayed) == (0, 3)
    assert (retry.seqs, retry.superseded, retry.contradictions) == \
        (first.seqs, first.superseded, first.contradictions)
    assert stored(store) == 3
    # the request id with other answers is refused, and stores nothing
    with pytest.raises(AlreadyExists, match="'r1' was already used"):
        submit(store, "c", [by_images("i3", "i4", "SAME")], request_id="r1")
    assert stored(store) == 3
    # a request id is per collection
    store.collections.create("d")
    store.images.add("d", [ImageRecord(i) for i in IMAGES])
    assert submit(store, "d", answers, request_id="r1").stored == 3


def test_a_retry_replays_the_first_outcome_even_after_later_answers(store):
    first = submit(store, "c", [by_images("i0", "i1", "SAME")], request_id="r1")
    submit(store, "c", [by_images("i0", "i1", "DIFFERENT")])  # supersedes it
    retry = submit(store, "c", [by_images("i0", "i1", "SAME")], request_id="r1")
    assert retry.replayed == 1 and retry.seqs == first.seqs and stored(store) == 2
    assert [a.label for a in store.answers.all("c")] == ["DIFFERENT"]


def test_deleting_an_answer_brings_back_the_one_it_superseded(store):
    first = submit(store, "c", [by_images("i0", "i1", "SAME"), by_images("i1", "i2", "SAME")])
    later = submit(store, "c", [by_images("i0", "i2", "DIFFERENT")])
    assert len(later.contradictions) == 1
    store.answers.delete("c", later.seqs[0], actor="reviewer")
    assert current_contradictions(store, "c") == []
    # the incremental state reloads after the deletion: a new clash is reported exactly
    clash = submit(store, "c", [by_images("i2", "i0", "DIFFERENT")])
    assert clash.contradictions == [Contradiction((*first.seqs, *clash.seqs), first.seqs[0])]


def test_an_excluded_image_s_answers_are_no_constraints_until_it_is_restored(store):
    submit(store, "c", [by_images("i0", "i1", "SAME"), by_images("i1", "i2", "SAME")])
    store.images.exclude("c", "i1", "blurry")
    out = submit(store, "c", [by_images("i0", "i2", "DIFFERENT")])
    assert out.contradictions == [] and stored(store) == 3  # the chain went through i1
    store.images.restore("c", "i1")
    out = submit(store, "c", [by_images("i3", "i4", "SAME")])
    assert out.contradictions == [] and len(current_contradictions(store, "c")) == 1


def test_concurrent_retries_of_one_request_store_it_once(store):
    answers = [by_images("i0", "i1", "SAME"), by_images("i1", "i2", "DIFFERENT")]
    outcomes = []

    def call() -> None:
        outcomes.append(submit(store, "c", answers, request_id="r"))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.stored for o in outcomes) == [0] * 7 + [2]
    assert sorted(o.replayed for o in outcomes) == [0] + [2] * 7
    assert len({tuple(o.seqs) for o in outcomes}) == 1 and stored(store) == 2
