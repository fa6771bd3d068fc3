"""Schema-2 store features and the runtime's operations, on SQLite and on PostgreSQL."""

from __future__ import annotations

import sqlite3
import threading
import time

import numpy as np
import pytest

from reidal.blobs import BlobStore, sha256_hex
from reidal.errors import FailedPrecondition, NotFound
from reidal.runtime import Notifier, OperationRunner, operation_key
from reidal.store import SCHEMA_VERSION, AnswerIn, ImageRecord, ImageSource, PairRecord, Store
from reidal.store.backend import Backend


@pytest.fixture()
def store(store_target):
    s = Store.open(store_target)
    s.collections.create("c", model_name="m")
    s.images.add("c", [ImageRecord(f"i{k}") for k in range(6)])
    yield s
    s.close()


def _pairs(*pairs):
    return [PairRecord("", a, b, "U_us", 0, 0.5, 0.9) for a, b in pairs]


def test_each_engine_is_a_backend_of_the_protocol(store):
    engine = store.db.engine  # what Store opened for this target
    assert isinstance(engine, Backend) and engine.kind == store.backend
    assert {"sqlite": "SqliteBackend", "postgresql": "PostgresBackend"}[store.backend] == \
        type(engine).__name__


def test_batches_pairs_pending_and_request_replay(store):
    batch, created = store.batches.create(
        "c", lambda cycle: f"b{cycle}", _pairs(("i0", "i1"), ("i2", "i3")), budget=2,
        reason="budget filled", finished=False, model_name="m", model_version="1",
        filter={"metadata": {"site": "n"}}, n_items=6, stats={"regions": 2}, request_id="r")
    assert created and (batch.batch_id, batch.cycle) == ("b1", 1)
    assert store.collections.get("c").cycle == 1
    again, created = store.batches.create("c", lambda cycle: f"b{cycle}", _pairs(("i4", "i5")),
                                          budget=1, reason="x", finished=False, model_name="m",
                                          model_version="1", request_id="r")
    assert not created and again == batch and store.collections.get("c").cycle == 1
    pairs = store.batches.pairs("c", "b1")
    assert [(p.pair_id, answered) for p, answered in pairs] == [("b1/0", False), ("b1/1", False)]
    assert store.batches.pairs_by_id("c", ["b1/1", "nope"]) == {"b1/1": ("b1", pairs[1][0])}
    store.answers.submit("c", [AnswerIn("i1", "i0", "UNSURE")])
    assert [answered for _, answered in store.batches.pairs("c", "b1")] == [True, False]
    assert store.batches.pending_pairs("c") == [("i2", "i3")]
    assert store.collections.counts("c")["pairs_asked"] == 2
    assert store.batches.by_request("c", "r") == batch
    assert store.batches.by_request("c", "q") is None
    assert [b.batch_id for b in store.batches.all("c", after_cycle=0)] == ["b1"]
    with pytest.raises(NotFound, match="b9"):
        store.batches.get("c", "b9")


def test_ingest_is_all_or_nothing_and_pins_the_model(store):
    vecs = np.eye(2, 3, dtype=np.float32)
    sources = {"n0": ImageSource("data", "0" * 64, 3), "n1": ImageSource("uri", "1" * 64)}
    added, present = store.images.ingest("c", [ImageRecord("n0"), ImageRecord("n1", uri="/x.png"),
                                               ImageRecord("i0")], sources, model_name="m",
                                         model_version="4", vector_ids=["n0", "n1"], vectors=vecs)
    assert (added, present) == (2, 1)
    assert store.collections.get("c").model_version == "4"
    assert store.images.sources("c", ["n0", "n1", "i0"]) == sources
    assert store.images.vector_ids("c", "m", "4") == {"n0", "n1"}
    with pytest.raises(FailedPrecondition, match="version 4"):
        store.images.ingest("c", [ImageRecord("n2")], {}, model_name="m", model_version="5",
                            vector_ids=["n2"], vectors=vecs[:1])
    assert store.images.present("c", ["n2", "n0"]) == {"n0"}  # nothing of the failure
    assert store.images.referenced_blobs() == {"0" * 64}


def test_an_answer_transaction_reads_its_own_writes_and_replays(store):
    def submit_once(answer: AnswerIn, request_id: str) -> tuple[dict, bool, int]:
        with store.answers.transaction("c") as tx:
            earlier = tx.response_of(request_id)
            if earlier is not None:
                return earlier, True, -1
            seqs = tx.insert([answer], request_id)
            seen = len(store.answers.all("c"))  # sees its own answers (same transaction)
            response = {"seqs": seqs, "n": len(seqs)}
            tx.record_response(request_id, response)
        return response, False, seen

    first, replayed, seen = submit_once(AnswerIn("i0", "i1", "SAME"), "r1")
    assert not replayed and first["n"] == 1 and seen == 1
    again, replayed, _ = submit_once(AnswerIn("i0", "i1", "SAME"), "r1")
    assert replayed and again == first
    assert len(store.answers.all("c", current_only=False)) == 1
    with pytest.raises(RuntimeError), store.answers.transaction("c") as tx:  # rolled back
        tx.insert([AnswerIn("i2", "i3", "SAME")], "r3")
        tx.record_response("r3", {"seqs": []})
        raise RuntimeError("failed before the commit")
    assert len(store.answers.all("c", current_only=False)) == 1
    assert store.answers.replayed("c", "r3") is None

    results = []

    def racer():
        results.append(store.answers.submit_once("c", [AnswerIn("i2", "i3", "DIFFERENT")],
                                                 request_id="r2")[1])

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] + [True] * 7
    assert len(store.answers.all("c", current_only=False)) == 2


def test_listing_answers_and_deletion_restores(store):
    seqs = store.answers.submit("c", [AnswerIn("i0", "i1", "SAME", annotator="a"),
                                      AnswerIn("i0", "i1", "DIFFERENT", annotator="b"),
                                      AnswerIn("i2", "i3", "UNSURE", annotator="a")])
    assert store.answers.count_superseded_by("c", seqs[1:2]) == 1
    assert [a.seq for a in store.answers.page("c")] == [seqs[2], seqs[1]]
    assert [a.seq for a in store.answers.page("c", include_history=True, limit=2)] == seqs[:0:-1]
    assert [a.seq for a in store.answers.page("c", include_history=True,
                                              before_seq=seqs[1])] == [seqs[0]]
    assert [a.seq for a in store.answers.page("c", annotator="a", include_history=True)] == [
        seqs[2], seqs[0]]
    assert [a.seq for a in store.answers.page("c", image_id="i3")] == [seqs[2]]
    assert [a.seq for a in store.answers.page("c", label="SAME")] == []
    assert store.answers.delete("c", seqs[0]) is None  # not current: nothing comes back
    assert store.answers.delete("c", seqs[2]) is None
    assert store.answers.delete("c", seqs[1]) is None  # the older one is deleted too
    store.answers.submit("c", [AnswerIn("i4", "i5", "SAME")])
    newer = store.answers.submit("c", [AnswerIn("i4", "i5", "DIFFERENT")])[0]
    restored = store.answers.delete("c", newer)
    assert store.answers.get("c", restored).label == "SAME"
    assert store.answers.by_seq("c", [restored, 999])[restored].seq == restored


def test_identities_counters_exclusion_and_model_switch(store):
    store.collections.save_identities("c", {"i0": "id-000001", "i1": "id-000001"},
                                      counter_name="identity", counter_value=2)
    assert store.collections.identities("c") == {"i0": "id-000001", "i1": "id-000001"}
    assert store.collections.counter("c", "identity") == 2
    assert store.collections.counter("c", "other", 7) == 7
    store.images.exclude("c", "i2", "blurred", actor="qa")
    assert store.collections.counts("c")["excluded"] == 1
    store.images.restore("c", "i2", actor="qa")
    assert store.images.excluded("c") == {}
    assert [e["action"] for e in store.collections.audit_log("c")][-2:] == [
        "exclude_image", "restore_image"]
    store.collections.set_model("c", "m", "7")
    assert store.collections.get("c").model_version == "7"
    rows = store.images.page("c", after_seq=2, limit=2)
    assert [r.image_id for r in rows] == ["i3", "i4"] and rows[0].seq == 3


def test_delete_collection_cascades(store):
    store.batches.create("c", lambda k: f"b{k}", _pairs(("i0", "i1")), budget=1, reason="",
                         finished=False, model_name="m", model_version="1")
    store.operations.create("op-1", "c", "sample")
    store.collections.save_identities("c", {"i0": "id-000001"}, counter_name="identity",
                                      counter_value=2)
    store.jobs.create("c", {"epochs": 1}, base_model_name="m", base_model_version="1")
    store.collections.delete("c")
    for table in ("images", "batches", "batch_pairs", "identities", "counters", "operations",
                  "image_sources", "training_jobs"):
        assert store.db.query(f"SELECT COUNT(*) FROM {table}")[0][0] == 0, table


def test_schema_1_file_upgrades_in_place(tmp_path):
    s = Store(tmp_path)
    s.collections.create("old")
    s.close()
    db = sqlite3.connect(tmp_path / "reidal.sqlite3")
    for table in ("batch_pairs", "batches", "identities", "counters", "operations",
                  "image_sources"):
        db.execute(f"DROP TABLE {table}")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    s = Store(tmp_path)
    try:
        assert s.collections.counts("old")["pairs_asked"] == 0
        assert s.db.query("SELECT value FROM meta WHERE key = 'schema_version'")[0][0] == str(
            SCHEMA_VERSION)
        assert s.operations.create("op", "old", "embed").state == "PENDING"  # owner column added
    finally:
        s.close()


def test_schema_3_database_gets_the_cancel_column(store_target):
    """A database written before schema 4 (no ``cancel_requested``) opens, keeps its jobs
    and takes cancel requests, on both backends."""
    s = Store.open(store_target)
    s.collections.create("old", model_name="m")
    job = s.jobs.create("old", {"epochs": 1}, base_model_name="m",
                        base_model_version="1")
    with s.db.tx() as db:  # back to the schema-3 layout
        db.execute("ALTER TABLE training_jobs DROP COLUMN cancel_requested")
        db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    s.close()
    s = Store.open(store_target)
    try:
        assert s.db.query("SELECT value FROM meta WHERE key = 'schema_version'")[0][0] == str(
            SCHEMA_VERSION)
        assert not s.jobs.get(job.job_id).cancel_requested
        done = s.jobs.request_cancel(job.job_id)  # QUEUED, its owner gone
        assert (done.state, done.cancel_requested) == ("CANCELLED", True)
    finally:
        s.close()


def test_blob_store(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    sha = blobs.put(b"pixels")
    assert sha == sha256_hex(b"pixels") and blobs.put(b"pixels") == sha
    assert blobs.get(sha) == b"pixels" and blobs.all() == {sha}
    other = blobs.put(b"more")
    assert blobs.remove_except({other}) == 1 and blobs.all() == {other}
    with pytest.raises(FileNotFoundError, match=sha):
        blobs.get(sha)
    with pytest.raises(ValueError, match="SHA-256"):
        blobs.path("../etc/passwd")


def test_operation_runner_records_progress_failure_and_exclusivity(store):
    notifier = Notifier()
    runner = OperationRunner(store, notifier, workers=2)
    gate = threading.Event()

    def slow(progress):
        progress.update(total=2, done=1, stage="half")
        gate.wait(10)
        progress.update(done=2)
        return {"batch_id": "b1"}

    op = runner.start("c", "embed", slow)
    with pytest.raises(FailedPrecondition, match=op.operation_id):
        runner.start("c", "embed", slow)
    seen = []
    watcher = threading.Thread(target=lambda: seen.extend(
        runner.watch(op.operation_id, lambda: True, poll_s=5)))
    watcher.start()
    deadline = time.time() + 10
    while store.operations.get(op.operation_id).done < 1 and time.time() < deadline:
        time.sleep(0.01)
    gate.set()
    watcher.join(10)
    final = seen[-1]
    assert (final.state, final.done, final.total, final.result) == ("SUCCEEDED", 2, 2,
                                                                    {"batch_id": "b1"})
    assert [r.done for r in seen] == sorted(r.done for r in seen)

    def broken(progress):
        raise NotFound("image 'x' vanished")

    failed = runner.start("c", "embed", broken)
    last = list(runner.watch(failed.operation_id, lambda: True, poll_s=5))[-1]
    assert (last.state, last.error_code, last.error_message) == (
        "FAILED", "NOT_FOUND", "image 'x' vanished")

    def crash(progress):
        raise RuntimeError("bug")

    crashed = runner.start("c", "sample", crash, exclusive=False)
    last = list(runner.watch(crashed.operation_id, lambda: True, poll_s=5))[-1]
    assert (last.state, last.error_code) == ("FAILED", "INTERNAL") and "bug" in last.error_message
    runner.close()
    assert notifier.version(operation_key(op.operation_id)) >= 3


def test_an_operation_seen_final_frees_its_slot_at_once(store, monkeypatch):
    """A client that watches an operation to its end may start the next one at once. The
    store write of the final state is slowed here (real store, a delay after the write), to
    widen the window where the final state was visible but the slot still taken."""
    record_final = store.operations.update

    def slow_after_final(op_id, **fields):
        record_final(op_id, **fields)
        if fields.get("state") in ("SUCCEEDED", "FAILED"):
            time.sleep(0.5)

    monkeypatch.setattr(store.operations, "update", slow_after_final)
    runner = OperationRunner(store, Notifier(), workers=2)

    def succeed(progress):
        return {"n": 1}

    def fail(progress):
        raise NotFound("x")

    for kind, work in (("embed", succeed), ("sample", fail)):
        op = runner.start("c", kind, work)
        deadline = time.time() + 10
        while not store.operations.get(op.operation_id).final and time.time() < deadline:
            time.sleep(0.005)
        assert store.operations.get(op.operation_id).final
        runner.start("c", kind, succeed)  # was FailedPrecondition
    runner.close()


def test_unfinished_operations_are_failed_at_start(store_target):
    s = Store.open(store_target)
    s.collections.create("c")
    s.operations.create("op-a", "c", "embed")
    s.operations.create("op-b", "c", "embed")
    s.operations.update("op-b", state="SUCCEEDED")
    assert s.operations.fail_unfinished("restarted") == 1
    op_a = s.operations.get("op-a")
    assert (op_a.state, op_a.error_code) == ("FAILED", "ABORTED")
    assert s.operations.get("op-b").state == "SUCCEEDED"
    s.close()


def test_closing_the_runner_aborts_a_running_operation(store):
    runner = OperationRunner(store, Notifier())

    def endless(progress):
        for k in range(100_000):
            progress.update(done=k)
            time.sleep(0.005)
        return {}

    op = runner.start("c", "embed", endless)
    deadline = time.time() + 10
    while store.operations.get(op.operation_id).done < 2 and time.time() < deadline:
        time.sleep(0.01)
    tic = time.perf_counter()
    runner.close(wait=True)
    assert time.perf_counter() - tic < 5
    record = store.operations.get(op.operation_id)
    assert (record.state, record.error_code) == ("FAILED", "ABORTED")
    assert "start it again" in record.error_message


def test_a_training_jobs_image_decoding_stops_at_a_cancel(store, tmp_path):
    """Issue 15 finding 5: a job decodes its collection's images with the cancel flag
    checked before each image, so a cancel during decoding of a large collection of big
    photos is seen at once instead of after every image is in memory."""
    import io

    from PIL import Image

    from reidal.training_jobs import collection_images

    blobs = BlobStore(tmp_path / "blobs")
    store.collections.create("t")
    images, sources = [], {}
    for k in range(6):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (40 * k, 10, 200)).save(buf, format="PNG")
        data = buf.getvalue()
        digest = blobs.put(data)
        images.append(ImageRecord(f"p{k}"))
        sources[f"p{k}"] = ImageSource("data", digest, size=len(data))
    store.images.ingest("t", images, sources)

    class CancelAfter(threading.Event):
        """Set itself at its ``n``-th check: a cancel arriving mid-decoding."""

        def __init__(self, n: int) -> None:
            super().__init__()
            self.checks, self.n = 0, n

        def is_set(self) -> bool:
            self.checks += 1
            if self.checks >= self.n:
                self.set()
            return super().is_set()

    ids, decoded = collection_images(store, blobs, "t", cancel=threading.Event())
    assert ids == [f"p{k}" for k in range(6)] and len(decoded) == 6
    cancel = CancelAfter(3)
    assert collection_images(store, blobs, "t", cancel=cancel) is None
    assert cancel.checks == 3  # stopped at the check that saw the cancel, not at the end
