"""The product API end to end: real gRPC on loopback, real SQLite, the real bundled Triton.

A seeded synthetic collection (8 individuals x 5 photos) is created, streamed in, sampled
and answered by a ground-truth oracle; what comes back is checked against independent
references: the torch model for vectors, a union-find over the answers for "never asks an
implied pair" and for the identities, plain counting for the summaries.
"""

from __future__ import annotations

import dataclasses
import io
import math
import threading
import time
import uuid
from collections import Counter

import grpc
import numpy as np
import pytest
from _services_support import (
    Stubs,
    by_images,
    create_and_fill,
    in_flight,
    ingest_message,
    oracle_answers,
    pictures,
    rpc_error,
    running_server,
    wait_in_flight,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from prometheus_client import REGISTRY

from reidal.embedding.preprocess import preprocess
from reidal.serve import serve
from reidal.v1 import collections_pb2, constraints_pb2, sampling_pb2

C, S, K = collections_pb2, sampling_pb2, constraints_pb2
SAME, DIFFERENT, UNSURE = (K.ANSWER_LABEL_SAME, K.ANSWER_LABEL_DIFFERENT,
                           K.ANSWER_LABEL_UNSURE)


@pytest.fixture(scope="module")
def server(triton, tmp_path_factory):
    with running_server(triton, tmp_path_factory.mktemp("reidal-e2e"),
                        image_roots=[tmp_path_factory.getbasetemp()]) as srv:
        yield srv


@pytest.fixture(scope="module")
def stubs(server):
    s = Stubs.connect(server.address)
    yield s
    s.close()


class Partition:
    """Independent reference: union-find over SAME answers, DIFFERENT between groups."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.cl: set[frozenset[str]] = set()

    def find(self, x: str) -> str:
        while self.parent.get(x, x) != x:
            x = self.parent[x]
        return x

    def add(self, a: str, b: str, same: bool) -> None:
        ra, rb = self.find(a), self.find(b)
        if same:
            self.parent[ra] = rb
        else:
            self.cl.add(frozenset((a, b)))

    def implied(self, a: str, b: str) -> bool:
        ra, rb = self.find(a), self.find(b)
        return ra == rb or any({self.find(x) for x in pair} == {ra, rb} for pair in self.cl)


def _metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_health_and_reflection_per_service(server):
    with grpc.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("reidal.v1.EmbeddingService", "reidal.v1.CollectionService",
                     "reidal.v1.SamplingService", "reidal.v1.ConstraintService", ""):
            got = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert got.status == health_pb2.HealthCheckResponse.SERVING, name
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
        [answer] = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), timeout=10)
        listed = {s.name for s in answer.list_services_response.service}
        assert {"reidal.v1.EmbeddingService", "reidal.v1.CollectionService",
                "reidal.v1.SamplingService", "reidal.v1.ConstraintService"} <= listed


def test_create_ingest_sample_answer_identities(server, stubs, triton):
    pics = pictures()
    truth = {p.image_id: p.identity for p in pics}
    individuals = sorted(set(truth.values()))
    known = set(individuals[:4])  # the platform already named half of the animals
    names = {p.image_id: p.identity for p in pics if p.identity in known}
    meta = {p.image_id: {"viewpoint": p.viewpoint, "site": "north" if k % 2 else "south"}
            for k, p in enumerate(pics)}
    asked_before = sum(_metric("reidal_pairs_asked_total", {"pool": pool})
                       for pool in ("U_os", "U_us"))
    stored_before = sum(_metric("reidal_answers_stored_total", {"label": label})
                        for label in ("SAME", "DIFFERENT", "UNSURE"))
    cycles_before = _metric("reidal_cycle_seconds_count")

    added = create_and_fill(stubs, "zebras", pics, names=names, metadata=meta,
                            species="plains zebra")
    assert (added.received, added.added, added.already_present, added.embedded) == (40, 40, 0, 40)
    assert (added.model.name, added.model.version) == (triton.model_name, "1")

    # Idempotent per image id: a resend adds nothing, a changed image is reported, not replaced.
    changed = pictures(seed=1)[0].png
    resend = ingest_message("zebras", pics[:16])
    resend.images[3].image.data = changed
    again = stubs.collections.AddImages(iter([resend]), timeout=60)
    assert (again.added, again.already_present, again.embedded) == (0, 16, 0)
    assert list(again.changed_ids) == [pics[3].image_id]

    # Stored vectors are the served model's (independent reference: torch on Pillow decoding).
    ids, X = server.runtime.store.images.vectors("zebras", triton.model_name, "1")
    assert ids == [p.image_id for p in pics]
    ref = triton.reference(preprocess([Image.open(io.BytesIO(p.png)).convert("RGB")
                                       for p in pics[:6]], triton.spec))
    np.testing.assert_allclose(X[:6], ref, atol=1e-4)

    col = stubs.collections.GetCollection(C.GetCollectionRequest(collection_id="zebras"))
    assert (col.image_count, col.embedded_image_count, col.cycle, col.total_pairs) == (40, 40, 0, 780)
    assert col.clustering.k1 == 6 and col.sampling.mixture_eps == pytest.approx(0.6)

    pages, token = [], ""
    while True:
        page = stubs.collections.ListImages(C.ListImagesRequest(
            collection_id="zebras", page_size=15, page_token=token))
        pages.append(page)
        token = page.next_page_token
        if not token:
            break
    listed = [img for page in pages for img in page.images]
    assert len(pages) == 3 and [i.image_id for i in listed] == [p.image_id for p in pics]
    assert dict(listed[5].metadata) == meta[pics[5].image_id] and listed[5].embedded

    reference = Partition()
    answered: list[tuple[str, str, bool]] = []
    asked: set[tuple[str, str]] = set()
    finished = None
    for cycle in range(1, 10):
        batch = stubs.sampling.GetQueryPairs(S.GetQueryPairsRequest(
            collection_id="zebras", budget=C.Budget(count=6)), timeout=60)
        assert batch.cycle == cycle and batch.budget == 6 and len(batch.pairs) <= 6
        assert batch.sampled_images == 40 and batch.model.version == "1"
        for p in batch.pairs:
            key = (p.image_a, p.image_b)
            assert p.image_a < p.image_b and p.image_a in truth and p.image_b in truth
            assert key not in asked, "an answered pair was asked again"
            assert not reference.implied(*key), "a pair implied by the answers was asked"
            assert p.pool in (S.POOL_OVERSEGMENTATION, S.POOL_UNDERSEGMENTATION)
            assert 0.0 < p.probability <= 1.0 and (p.model.name, p.model.version) == (
                triton.model_name, "1")
            assert not p.answered
            asked.add(key)
        if not batch.pairs:
            finished = batch
            break
        out = stubs.constraints.SubmitConstraints(K.SubmitConstraintsRequest(
            collection_id="zebras", batch_id=batch.batch_id,
            answers=oracle_answers(batch, truth), request_id=str(uuid.uuid4())), timeout=60)
        assert out.stored_count == len(batch.pairs) and not out.contradictions
        for p in batch.pairs:
            same = truth[p.image_a] == truth[p.image_b]
            reference.add(p.image_a, p.image_b, same)
            answered.append((p.image_a, p.image_b, same))
        again = stubs.sampling.GetQueryBatch(S.GetQueryBatchRequest(
            collection_id="zebras", batch_id=batch.batch_id))
        assert again.answered == len(batch.pairs) and all(p.answered for p in again.pairs)
    assert answered, "no cycle asked anything"
    assert finished is not None and finished.finished, "AAS did not run out of questions"
    assert finished.reason in (S.BATCH_REASON_NO_DISAGREEMENT, S.BATCH_REASON_ALL_RESOLVED,
                               S.BATCH_REASON_NO_CANDIDATES)

    ident = stubs.constraints.GetIdentities(K.GetIdentitiesRequest(collection_id="zebras"),
                                            timeout=60)
    of = {i: x.identity_id for x in ident.identities for i in x.image_ids}
    assert sorted(of) == sorted(truth) and sum(x.size for x in ident.identities) == 40
    for a, b, same in answered:  # every answer holds
        assert (of[a] == of[b]) == same
    assert ident.applied_answers == len(answered) and not ident.contradictions
    for x in ident.identities:  # summaries, counted independently
        members = set(x.image_ids)
        assert x.same_answers == sum(s and a in members and b in members for a, b, s in answered)
        assert x.different_answers == sum(not s and ((a in members) != (b in members))
                                          for a, b, s in answered)
        given = Counter(names[i] for i in x.image_ids if i in names)
        assert set(x.names) == set(given) and x.new_individual == (not given)
        assert x.name_conflict == (len(given) > 1)
    assert (ident.model.name, ident.model.version) == (triton.model_name, "1")
    # Stable: the same membership keeps its ids.
    twice = stubs.constraints.GetIdentities(K.GetIdentitiesRequest(collection_id="zebras"))
    assert {x.identity_id: list(x.image_ids) for x in twice.identities} == {
        x.identity_id: list(x.image_ids) for x in ident.identities}

    col = stubs.collections.GetCollection(C.GetCollectionRequest(collection_id="zebras"))
    assert col.answer_count == len(answered) and col.pairs_asked == len(asked)
    assert col.budget_used == pytest.approx(len(asked) / 780)
    asked_after = sum(_metric("reidal_pairs_asked_total", {"pool": pool})
                      for pool in ("U_os", "U_us"))
    stored_after = sum(_metric("reidal_answers_stored_total", {"label": label})
                       for label in ("SAME", "DIFFERENT", "UNSURE"))
    assert asked_after - asked_before == len(asked)
    assert stored_after - stored_before == len(answered)
    assert _metric("reidal_cycle_seconds_count") - cycles_before == col.cycle


def test_filters_exclusion_watch_and_operations(server, stubs):
    pics = pictures()
    dates = {p.image_id: f"2024-05-{1 + k % 10:02d}" for k, p in enumerate(pics)}
    meta = {p.image_id: {"site": "north" if k % 2 else "south", "date": dates[p.image_id]}
            for k, p in enumerate(pics)}
    create_and_fill(stubs, "filtered", pics, metadata=meta)
    events: list = []

    def watch() -> None:
        stream = stubs.sampling.WatchQueue(S.WatchQueueRequest(collection_id="filtered",
                                                               after_cycle=0), timeout=60)
        for event in stream:
            events.append(event)
            if len(events) == 2:
                stream.cancel()
                return

    watcher = threading.Thread(target=watch)
    watcher.start()

    north = {i for i, m in meta.items() if m["site"] == "north"}
    only_north = C.ImageFilter(metadata={"site": "north"})
    first = stubs.sampling.GetQueryPairs(S.GetQueryPairsRequest(
        collection_id="filtered", filter=only_north, budget=C.Budget(fraction=0.01)))
    assert dict(first.filter.metadata) == {"site": "north"}
    assert first.sampled_images == len(north) == 20
    assert first.budget == math.ceil(0.01 * 20 * 19 / 2)
    assert all(p.image_a in north and p.image_b in north for p in first.pairs)

    bad = sorted(north)[0]
    stubs.constraints.ExcludeImage(K.ExcludeImageRequest(collection_id="filtered", image_id=bad,
                                                         reason="two animals", actor="qa"))
    op = stubs.sampling.StartQueryPairs(S.GetQueryPairsRequest(
        collection_id="filtered", filter=only_north, budget=C.Budget(count=50)))
    assert op.kind == "sample"
    states = list(stubs.collections.WatchOperation(C.GetOperationRequest(
        operation_id=op.operation_id), timeout=60))
    last = states[-1]
    assert last.state == C.OPERATION_STATE_SUCCEEDED and last.done == last.total == 3
    second = stubs.sampling.GetQueryBatch(S.GetQueryBatchRequest(collection_id="filtered",
                                                                 batch_id=last.batch_id))
    assert second.cycle == 2 and second.sampled_images == 19
    assert all(bad not in (p.image_a, p.image_b) and p.image_a in north for p in second.pairs)

    watcher.join(timeout=60)
    assert [e.batch.batch_id for e in events] == [first.batch_id, second.batch_id]
    assert all(e.kind == S.QUEUE_EVENT_KIND_BATCH_READY for e in events)

    window = C.ImageFilter(date_from="2024-05-03", date_to="2024-05-05T23:00:00Z")
    dated = stubs.sampling.GetQueryPairs(S.GetQueryPairsRequest(
        collection_id="filtered", filter=window, budget=C.Budget(count=3)))
    in_window = {i for i, d in dates.items() if "2024-05-03" <= d <= "2024-05-05" and i != bad}
    assert dated.sampled_images == len(in_window)
    assert all(p.image_a in in_window and p.image_b in in_window for p in dated.pairs)
    assert dated.filter.date_from == "2024-05-03"

    ident = stubs.constraints.GetIdentities(K.GetIdentitiesRequest(collection_id="filtered"))
    assert list(ident.excluded_image_ids) == [bad]
    assert bad not in {i for x in ident.identities for i in x.image_ids}
    images = stubs.collections.ListImages(C.ListImagesRequest(
        collection_id="filtered", filter=C.ImageFilter(image_ids=[bad])))
    assert [(i.image_id, i.excluded, i.excluded_reason) for i in images.images] == [
        (bad, True, "two animals")]


def test_deferred_ingest_then_embed_collection_with_progress(server, stubs, triton, tmp_path):
    pics = pictures()[:12]
    stubs.collections.CreateCollection(C.CreateCollectionRequest(collection_id="later"))
    message = ingest_message("later", pics, defer=True)
    path = tmp_path / "on-disk.png"  # the last image comes as a path the server reads
    path.write_bytes(pics[-1].png)
    message.images[-1].image.uri = str(path)
    out = stubs.collections.AddImages(iter([message]))
    assert (out.added, out.embedded) == (12, 0)
    col = stubs.collections.GetCollection(C.GetCollectionRequest(collection_id="later"))
    assert (col.embedded_image_count, col.model.name, col.model.version) == (
        0, triton.model_name, "")
    err = rpc_error(stubs.sampling.GetQueryPairs,
                    S.GetQueryPairsRequest(collection_id="later"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "EmbedCollection" in err.details()

    op = stubs.collections.EmbedCollection(C.EmbedCollectionRequest(collection_id="later"))
    assert (op.model.name, op.model.version) == (triton.model_name, "1")
    states = list(stubs.collections.WatchOperation(C.GetOperationRequest(
        operation_id=op.operation_id), timeout=120))
    assert states[-1].state == C.OPERATION_STATE_SUCCEEDED
    assert states[-1].done == states[-1].total == 12
    assert all(a.done <= b.done for a, b in zip(states, states[1:], strict=False))
    polled = stubs.collections.GetOperation(C.GetOperationRequest(operation_id=op.operation_id))
    assert polled.state == C.OPERATION_STATE_SUCCEEDED
    col = stubs.collections.GetCollection(C.GetCollectionRequest(collection_id="later"))
    assert (col.embedded_image_count, col.model.version) == (12, "1")
    ids, X = server.runtime.store.images.vectors("later", triton.model_name, "1")
    # Kept bytes (and the file read by path) embed like the same images embedded at ingest
    # (a collection of this test's own: it must pass run alone).
    create_and_fill(stubs, "at-ingest", pics)
    ids0, X0 = server.runtime.store.images.vectors("at-ingest", triton.model_name, "1")
    assert ids0 == ids
    np.testing.assert_allclose(X, X0, atol=1e-5)
    batch = stubs.sampling.GetQueryPairs(S.GetQueryPairsRequest(collection_id="later"))
    assert batch.sampled_images == 12


def test_resubmitting_a_request_id_stores_nothing_twice(server, stubs):
    pics = pictures()[:10]
    create_and_fill(stubs, "retry", pics)
    ids = [p.image_id for p in pics]
    request = K.SubmitConstraintsRequest(
        collection_id="retry", request_id="req-1",
        answers=[by_images(ids[0], ids[1], True), by_images(ids[2], ids[3], False),
                 by_images(ids[4], ids[5], None)])
    first = stubs.constraints.SubmitConstraints(request)
    second = stubs.constraints.SubmitConstraints(request)
    assert (first.stored_count, first.replayed_count) == (3, 0)
    assert (second.stored_count, second.replayed_count) == (0, 3)
    assert list(second.answer_ids) == list(first.answer_ids)
    # Concurrent retries of one new request: exactly one stores.
    racing = K.SubmitConstraintsRequest(collection_id="retry", request_id="req-2",
                                        answers=[by_images(ids[6], ids[7], True)])
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(
        stubs.constraints.SubmitConstraints(racing))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.stored_count for r in results) == [0] * 5 + [1]
    assert len({tuple(r.answer_ids) for r in results}) == 1
    history = stubs.constraints.ListConstraints(K.ListConstraintsRequest(
        collection_id="retry", include_history=True))
    assert len(history.constraints) == 4
    reuse = K.SubmitConstraintsRequest(collection_id="retry", request_id="req-1",
                                       answers=[by_images(ids[0], ids[1], False)])
    err = rpc_error(stubs.constraints.SubmitConstraints, reuse)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "req-1" in err.details()


def test_contradictions_are_reported_and_every_answer_stored(server, stubs):
    pics = pictures()[:10]
    create_and_fill(stubs, "contra", pics)
    a, b, c, d = (p.image_id for p in pics[:4])
    sub = stubs.constraints.SubmitConstraints
    first = sub(K.SubmitConstraintsRequest(collection_id="contra", answers=[
        by_images(a, b, True, "ann"), by_images(b, c, True, "ann")]))
    assert not first.contradictions
    clash = sub(K.SubmitConstraintsRequest(collection_id="contra",
                                           answers=[by_images(c, a, False, "bob")]))
    assert clash.stored_count == 1
    [found] = clash.contradictions
    involved = {x.answer_id for x in found.answers}
    assert involved == {*first.answer_ids, *clash.answer_ids}
    assert found.dropped_answer_id == first.answer_ids[0]  # the oldest loses: newer wins
    assert a in found.explanation and first.answer_ids[0] in found.explanation
    listed = stubs.constraints.ListConstraints(K.ListConstraintsRequest(collection_id="contra"))
    assert len(listed.constraints) == 3
    assert all(x.status == K.CONSTRAINT_STATUS_CURRENT for x in listed.constraints)
    ident = stubs.constraints.GetIdentities(K.GetIdentitiesRequest(collection_id="contra"))
    of = {i: x.identity_id for x in ident.identities for i in x.image_ids}
    assert of[b] == of[c] and of[a] != of[c]  # the newer answers hold
    assert len(ident.contradictions) == 1 and ident.applied_answers == 2

    # A later answer on the same pair supersedes the earlier one, whose history is kept.
    revised = sub(K.SubmitConstraintsRequest(collection_id="contra",
                                             answers=[by_images(b, a, False, "ann")]))
    assert revised.superseded_count == 1 and not revised.contradictions
    history = stubs.constraints.ListConstraints(K.ListConstraintsRequest(
        collection_id="contra", image_id=a, include_history=True))
    status = {x.answer_id: (x.status, x.superseded_by) for x in history.constraints}
    assert status[first.answer_ids[0]] == (K.CONSTRAINT_STATUS_SUPERSEDED, revised.answer_ids[0])
    ident = stubs.constraints.GetIdentities(K.GetIdentitiesRequest(collection_id="contra"))
    assert not ident.contradictions

    # Deleting the revision (audited) makes the earlier answer current again.
    deleted = stubs.constraints.DeleteConstraint(K.DeleteConstraintRequest(
        collection_id="contra", answer_id=revised.answer_ids[0], actor="ann", reason="typo"))
    assert deleted.deleted.status == K.CONSTRAINT_STATUS_DELETED
    assert deleted.restored.answer_id == first.answer_ids[0]
    assert server.runtime.store.collections.audit_log("contra")[-1]["action"] == "delete_answer"
    # UNSURE is stored, never a constraint, and that pair is not asked again.
    unsure = sub(K.SubmitConstraintsRequest(collection_id="contra",
                                            answers=[by_images(c, d, None)]))
    assert unsure.stored_count == 1
    batch = stubs.sampling.GetQueryPairs(S.GetQueryPairsRequest(
        collection_id="contra", budget=C.Budget(count=45)))
    assert tuple(sorted((c, d))) not in {(p.image_a, p.image_b) for p in batch.pairs}


def test_eight_concurrent_clients_lose_nothing(server, stubs):
    pics = pictures()[:16]
    create_and_fill(stubs, "busy", pics)
    ids = [p.image_id for p in pics]
    rng = np.random.default_rng(7)
    plans = []
    for client in range(8):
        requests = []
        for r in range(12):
            pairs = rng.choice(len(ids), size=(4, 2), replace=True)
            answers = [by_images(ids[i], ids[j], [True, False, None][(i + j + r) % 3],
                                 f"client-{client}") for i, j in pairs.tolist() if i != j]
            if answers:
                requests.append(K.SubmitConstraintsRequest(
                    collection_id="busy", answers=answers, request_id=f"c{client}-r{r}"))
        plans.append(requests)
    failures: list[BaseException] = []

    def run(requests) -> None:
        s = Stubs.connect(server.address)
        try:
            for req in requests:
                out = s.constraints.SubmitConstraints(req, timeout=60)
                assert out.stored_count == len(req.answers)
        except BaseException as exc:
            failures.append(exc)
        finally:
            s.close()

    threads = [threading.Thread(target=run, args=(p,)) for p in plans]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:1]
    expected = sum(len(req.answers) for p in plans for req in p)
    got, token = [], ""
    while True:
        page = stubs.constraints.ListConstraints(K.ListConstraintsRequest(
            collection_id="busy", include_history=True, page_size=100, page_token=token))
        got.extend(page.constraints)
        token = page.next_page_token
        if not token:
            break
    assert len(got) == expected and len({x.answer_id for x in got}) == expected
    assert Counter(x.annotator_id for x in got) == Counter(
        a.annotator_id for p in plans for req in p for a in req.answers)
    assert time.perf_counter() - tic < 60
    # Every pair has exactly one current answer: the newest.
    current = [x for x in got if x.status == K.CONSTRAINT_STATUS_CURRENT]
    assert len(current) == len({(x.image_a, x.image_b) for x in got})


def test_restart_on_the_same_data_directory_finds_everything(triton, tmp_path):
    data = tmp_path / "data"
    pics = pictures()[:24]
    truth = {p.image_id: p.identity for p in pics}
    kwargs = dict(data_dir=data, triton_url=triton.grpc_url, health_interval_s=60)
    first = serve(["collections", "sampling", "constraints"], **kwargs)
    try:
        s = Stubs.connect(first.address)
        create_and_fill(s, "kept", pics)
        b1 = s.sampling.GetQueryPairs(S.GetQueryPairsRequest(collection_id="kept",
                                                             budget=C.Budget(count=4)))
        s.constraints.SubmitConstraints(K.SubmitConstraintsRequest(
            collection_id="kept", batch_id=b1.batch_id, answers=oracle_answers(b1, truth),
            request_id="before-restart"))
        ids = [p.image_id for p in pics]
        s.constraints.SubmitConstraints(K.SubmitConstraintsRequest(collection_id="kept", answers=[
            by_images(ids[0], ids[9], None), by_images(ids[1], ids[2], False),
            by_images(ids[1], ids[2], True)]))
        s.constraints.ExcludeImage(K.ExcludeImageRequest(collection_id="kept", image_id=ids[5]))
        b2 = s.sampling.GetQueryPairs(S.GetQueryPairsRequest(collection_id="kept",
                                                             budget=C.Budget(count=3)))
        op = s.sampling.StartQueryPairs(S.GetQueryPairsRequest(collection_id="kept",
                                                               budget=C.Budget(count=2)))
        list(s.collections.WatchOperation(C.GetOperationRequest(operation_id=op.operation_id)))

        def snapshot(st: Stubs) -> dict:
            ident = st.constraints.GetIdentities(K.GetIdentitiesRequest(collection_id="kept"))
            return {
                "collection": st.collections.GetCollection(C.GetCollectionRequest(
                    collection_id="kept")),
                "images": st.collections.ListImages(C.ListImagesRequest(
                    collection_id="kept", page_size=1000)),
                "batches": [st.sampling.GetQueryBatch(S.GetQueryBatchRequest(
                    collection_id="kept", batch_id=b)) for b in (b1.batch_id, b2.batch_id)],
                "answers": st.constraints.ListConstraints(K.ListConstraintsRequest(
                    collection_id="kept", include_history=True, page_size=1000)),
                "identities": {x.identity_id: list(x.image_ids) for x in ident.identities},
                "operation": st.collections.GetOperation(C.GetOperationRequest(
                    operation_id=op.operation_id)),
            }

        before = snapshot(s)
        vectors_before = first.runtime.store.images.vectors("kept", triton.model_name, "1")
        s.close()
    finally:
        first.stop(grace=1)

    second = serve(["collections", "sampling", "constraints"], **kwargs)
    try:
        s = Stubs.connect(second.address)
        after = snapshot(s)
        assert after == before
        assert before["collection"].cycle == 3 and before["collection"].excluded_image_count == 1
        vectors_after = second.runtime.store.images.vectors("kept", triton.model_name, "1")
        assert vectors_after[0] == vectors_before[0]
        np.testing.assert_array_equal(vectors_after[1], vectors_before[1])
        # Pair ids issued before the restart still resolve; a retried request id replays.
        answered = s.constraints.SubmitConstraints(K.SubmitConstraintsRequest(
            collection_id="kept", batch_id=b2.batch_id, answers=oracle_answers(b2, truth)))
        assert answered.stored_count == len(b2.pairs)
        replay = s.constraints.SubmitConstraints(K.SubmitConstraintsRequest(
            collection_id="kept", batch_id=b1.batch_id, answers=oracle_answers(b1, truth),
            request_id="before-restart"))
        assert (replay.stored_count, replay.replayed_count) == (0, len(b1.pairs))
        third = s.sampling.GetQueryPairs(S.GetQueryPairsRequest(collection_id="kept"))
        assert third.cycle == 4
        s.close()
    finally:
        second.stop(grace=1)
    assert not any(data.glob("*.sqlite3-wal")) or all(
        p.stat().st_size == 0 for p in data.glob("*.sqlite3-wal"))


def test_deleting_a_collection_ends_watchers_and_frees_its_blobs(server, stubs):
    own = tuple(dataclasses.replace(p, image_id=f"own-{p.image_id}")
                for p in pictures(seed=2)[:3])  # bytes no other collection holds
    shared = pictures()[:3]  # bytes another collection holds too (its own: runnable alone)
    create_and_fill(stubs, "keeps-shared", shared)
    create_and_fill(stubs, "doomed", own + shared)
    blobs = server.runtime.blobs
    from reidal.blobs import sha256_hex

    own_blobs = {sha256_hex(p.png) for p in own}
    shared_blobs = {sha256_hex(p.png) for p in shared}
    assert own_blobs | shared_blobs <= blobs.all()
    events: list = []
    watching = in_flight("reidal.v1.SamplingService", "WatchQueue")
    watcher = threading.Thread(target=lambda: events.extend(stubs.sampling.WatchQueue(
        S.WatchQueueRequest(collection_id="doomed"), timeout=30)))
    watcher.start()
    wait_in_flight("reidal.v1.SamplingService", "WatchQueue", watching + 1)
    stubs.collections.DeleteCollection(C.DeleteCollectionRequest(collection_id="doomed"))
    watcher.join(timeout=30)
    assert [e.kind for e in events] == [S.QUEUE_EVENT_KIND_COLLECTION_DELETED]
    assert not own_blobs & blobs.all() and shared_blobs <= blobs.all()
    err = rpc_error(stubs.collections.GetCollection, C.GetCollectionRequest(collection_id="doomed"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "doomed" in err.details()
