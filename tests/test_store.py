"""The durable store, every test on both backends: a real SQLite file in a temporary data
directory and a fresh database of a real PostgreSQL server (conftest ``store_target``)."""

import subprocess
import sys
import threading

import numpy as np
import pytest

from reidal.errors import AlreadyExists, InvalidArgument, NotFound
from reidal.store import AnswerIn, ImageRecord, Store


@pytest.fixture()
def store(store_target):
    s = Store.open(store_target)
    s.collections.create("zebras", species="plains zebra", model_name="m", model_version="1")
    s.images.add("zebras", [ImageRecord(f"img{i}", metadata={"site": "a" if i % 2 else "b"})
                            for i in range(6)])
    yield s
    s.close()


def test_collections_crud(store):
    assert [c.id for c in store.collections.all()] == ["zebras"]
    with pytest.raises(AlreadyExists):
        store.collections.create("zebras")
    with pytest.raises(NotFound, match="nope"):
        store.collections.get("nope")
    with pytest.raises(InvalidArgument):
        store.collections.create("")
    store.collections.delete("zebras")
    assert store.collections.all() == []
    with pytest.raises(NotFound):
        store.collections.delete("zebras")


def test_add_images_is_idempotent_and_ordered(store):
    added, present = store.images.add("zebras", [ImageRecord("img5"), ImageRecord("img6")])
    assert (added, present) == (1, 1)
    assert [r.image_id for r in store.images.all("zebras")] == [f"img{i}" for i in range(7)]
    assert store.images.all("zebras")[1].metadata == {"site": "a"}


def test_vectors_round_trip_in_ingest_order(store):
    ids = [f"img{i}" for i in range(6)]
    vecs = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    store.images.put_vectors("zebras", "m", "1", ids[::-1], vecs[::-1])
    got_ids, got = store.images.vectors("zebras", "m", "1")
    assert got_ids == ids
    np.testing.assert_array_equal(got, vecs)
    assert store.images.vectors("zebras", "m", "2")[0] == []


def test_answers_supersede_and_keep_history(store):
    store.answers.submit("zebras", [AnswerIn("img1", "img0", "SAME", annotator="ann")])
    store.answers.submit("zebras", [AnswerIn("img0", "img1", "DIFFERENT", annotator="bob")])
    current = store.answers.all("zebras")
    assert [(a.image_a, a.image_b, a.label) for a in current] == [("img0", "img1", "DIFFERENT")]
    history = store.answers.all("zebras", current_only=False)
    assert [a.label for a in history] == ["SAME", "DIFFERENT"]
    assert history[0].superseded_by == history[1].seq
    # deleting the newer answer makes the older one current again, and is audited
    store.answers.delete("zebras", history[1].seq, actor="bob", reason="mistake")
    assert [a.label for a in store.answers.all("zebras")] == ["SAME"]
    assert store.collections.audit_log("zebras")[-1]["action"] == "delete_answer"


def test_bad_answers_store_nothing(store):
    with pytest.raises(NotFound, match="img99"):
        store.answers.submit("zebras", [AnswerIn("img0", "img1", "SAME"),
                                        AnswerIn("img0", "img99", "SAME")])
    with pytest.raises(InvalidArgument, match="label"):
        store.answers.submit("zebras", [AnswerIn("img0", "img1", "MAYBE")])
    with pytest.raises(InvalidArgument, match="itself"):
        store.answers.submit("zebras", [AnswerIn("img0", "img0", "SAME")])
    assert store.answers.all("zebras", current_only=False) == []


def test_request_id_replay(store):
    store.answers.submit("zebras", [AnswerIn("img0", "img1", "SAME")], request_id="r1",
                         response={"stored": 1})
    assert store.answers.replayed("zebras", "r1") == {"stored": 1}
    assert store.answers.replayed("zebras", "r2") is None


def test_concurrent_writers_lose_nothing(store):
    def worker(k):
        for t in range(20):
            store.answers.submit("zebras", [AnswerIn(f"img{k}", f"img{(k + 1) % 6}", "UNSURE",
                                                     annotator=f"w{k}-{t}")])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.answers.all("zebras", current_only=False)) == 120


def test_answers_survive_a_killed_process(store_target):
    """An answer is durable once answers.submit returns: kill -9 the writer, reopen, find it."""
    code = f"""
import os, signal
from reidal.store import Store, ImageRecord, AnswerIn
s = Store.open({store_target!r})
s.collections.create("c")
s.images.add("c", [ImageRecord("a"), ImageRecord("b")])
s.answers.submit("c", [AnswerIn("a", "b", "SAME", annotator="field")])
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    reopened = Store.open(store_target)
    try:
        [ans] = reopened.answers.all("c")
        assert (ans.image_a, ans.image_b, ans.label, ans.annotator) == ("a", "b", "SAME", "field")
    finally:
        reopened.close()


def test_image_record_and_sources_of_some_images(store):
    from reidal.store import ImageSource

    store.collections.create("c")
    images = [ImageRecord(f"i{k:04d}", uri=f"/p/{k}.png" if k % 2 else "", name=f"n{k}")
              for k in range(1200)]  # more than one 500-id chunk
    sources = {img.image_id: (ImageSource("uri", f"{k:064x}") if k % 2 else
                              ImageSource("data", f"{k + 1:064x}", size=k))
               for k, img in enumerate(images)}
    store.images.ingest("c", images, sources)
    assert store.images.get("c", "i0007") == images[7]
    with pytest.raises(NotFound, match="i9999"):
        store.images.get("c", "i9999")
    wanted = [f"i{k:04d}" for k in range(0, 1200, 7)] + ["i0007", "nope"]
    got = store.images.sources("c", wanted)
    assert got == {i: sources[i] for i in wanted if i in sources}
    assert store.images.sources("c") == sources
