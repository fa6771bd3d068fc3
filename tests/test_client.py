"""reidal_client against a real server: real gRPC on loopback, real SQLite, the real Triton.

What is checked against independent references: the answers stored (read back through
ListConstraints and compared with the ground truth), identities (every answer holds),
the exported CSV (re-read and compared with GetIdentities). Network failures are real
(a stopped server, a closed port) or, for "the server did the work but the response was
lost", a gRPC client interceptor that drops a response after the server answered: a test
double of the network, not of reidal code.
"""

from __future__ import annotations

import csv
import io
import socket
import threading
import time

import grpc
import pytest
from _services_support import pictures, running_server

from reidal.serve import serve
from reidal_client import (
    AlreadyExists,
    Answer,
    ClusteringParams,
    DeadlineExceeded,
    FailedPrecondition,
    ImageInput,
    InvalidArgument,
    NotFound,
    ReidalClient,
    SamplingParams,
    Unavailable,
)

SMALL = ClusteringParams(k1=6, k2=2, min_samples=2)


@pytest.fixture(scope="module")
def server(triton, tmp_path_factory):
    with running_server(triton, tmp_path_factory.mktemp("reidal-client")) as srv:
        yield srv


@pytest.fixture
def client(server):
    with ReidalClient(server.address, timeout_s=60) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LostResponse(grpc.RpcError):
    """What a client sees when the connection drops after the server answered."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection lost after the server answered (simulated)"


class LoseResponses(grpc.UnaryUnaryClientInterceptor):
    """Lets the first ``n`` calls of each named method reach the server and finish there,
    then raises UNAVAILABLE instead of returning the response."""

    def __init__(self, **methods: int) -> None:
        self.left = dict(methods)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        outcome = continuation(client_call_details, request)
        name = client_call_details.method.rsplit("/", 1)[-1]
        if self.left.get(name, 0) > 0:
            self.left[name] -= 1
            outcome.result()  # the server did the work (raises if it failed)
            raise LostResponse()
        return outcome


def test_round_trip_create_ingest_pairs_answers_identities_csv(server, client, tmp_path):
    pics = pictures()[:24]
    truth = {p.image_id: p.identity for p in pics}
    col = client.create_collection("herd", species="plains zebra", clustering=SMALL,
                                   sampling=SamplingParams(seed=3, default_budget=5))
    assert (col.collection_id, col.species, col.image_count, col.cycle) == (
        "herd", "plains zebra", 0, 0)
    assert (col.clustering.k1, col.clustering.k2, col.clustering.min_samples) == (6, 2, 2)
    assert col.clustering.dbscan_eps == pytest.approx(0.6)  # the server's default, filled in
    assert (col.sampling.seed, col.sampling.default_budget) == (3, 5)

    # Three ways to give an image: bytes, a local path the client reads, an ImageInput.
    for p in pics[8:16]:
        (tmp_path / f"{p.image_id}.png").write_bytes(p.png)
    images = ([(p.image_id, p.png, {"viewpoint": p.viewpoint}) for p in pics[:8]]
              + [(p.image_id, tmp_path / f"{p.image_id}.png") for p in pics[8:16]]
              + [ImageInput(p.image_id, data=p.png, name=p.identity) for p in pics[16:]])
    seen: list[tuple[int, int | None]] = []
    added = client.add_images("herd", images, batch_size=8, messages_per_call=1,
                              progress=lambda done, total: seen.append((done, total)))
    assert seen == [(8, 24), (16, 24), (24, 24)]
    assert (added.received, added.added, added.already_present, added.embedded) == (24, 24, 0, 24)
    assert added.model.version == "1"
    again = client.add_images("herd", images[:8], batch_size=3, messages_per_call=2)
    assert (again.received, again.added, again.already_present) == (8, 0, 8)

    listed = client.list_images("herd", page_size=10)
    assert [i.image_id for i in listed] == [p.image_id for p in pics]
    assert listed[0].metadata == {"viewpoint": pics[0].viewpoint} and listed[0].embedded
    assert listed[20].name == pics[20].identity and not listed[20].uri
    assert [i.image_id for i in client.list_images("herd", filter={"viewpoint": "left"})] == [
        p.image_id for p in pics[:8] if p.viewpoint == "left"]
    col = client.get_collection("herd")
    assert (col.image_count, col.embedded_image_count, col.total_pairs) == (24, 24, 276)

    # A cycle with a request id runs once: the retry returns the same batch.
    batch = client.get_query_pairs("herd", 6, request_id="cycle-1")
    assert batch.cycle == 1 and batch.budget == 6 and 0 < len(batch.pairs) <= 6
    assert client.get_query_pairs("herd", 6, request_id="cycle-1").batch_id == batch.batch_id
    assert client.get_collection("herd").cycle == 1
    for p in batch.pairs:
        assert p.image_a < p.image_b and {p.image_a, p.image_b} <= truth.keys()
        assert p.pool in ("U_os", "U_us") and 0 < p.probability <= 1 and not p.answered
    assert len({p.pair_id for p in batch.pairs}) == len(batch.pairs)

    # The response of SubmitConstraints is lost once: the client retries with the same
    # request id, the server replays, and every answer is stored exactly once.
    retried: list[tuple[str, int, grpc.StatusCode]] = []
    with ReidalClient(server.address, interceptors=[LoseResponses(SubmitConstraints=1)],
                      backoff_s=0.01,
                      on_retry=lambda m, a, d, e: retried.append((m, a, e.code))) as flaky:
        answers = [Answer.for_pair(p.pair_id, truth[p.image_a] == truth[p.image_b])
                   for p in batch.pairs]
        result = flaky.submit_answers("herd", answers, batch_id=batch.batch_id,
                                      annotator_id="oracle")
    assert retried == [("ConstraintService.SubmitConstraints", 1, grpc.StatusCode.UNAVAILABLE)]
    assert (result.stored_count, result.replayed_count) == (0, len(batch.pairs))
    stored = client.list_constraints("herd", include_history=True)
    assert len(stored) == len(batch.pairs)
    assert {a.answer_id for a in stored} == set(result.answer_ids)
    for a in stored:
        assert a.request_id == result.request_id and a.annotator_id == "oracle"
        assert a.label == ("SAME" if truth[a.image_a] == truth[a.image_b] else "DIFFERENT")
        assert a.status == "CURRENT" and a.batch_id == batch.batch_id
    with pytest.raises(AlreadyExists):  # the same request id for other answers
        client.submit_answers("herd", [Answer.for_images(pics[0].image_id, pics[1].image_id,
                                                         None)], request_id=result.request_id)
    assert client.get_query_batch("herd", batch.batch_id).answered == len(batch.pairs)

    # By image ids, and the tuple forms.
    a, b, c = pics[0].image_id, pics[1].image_id, pics[7].image_id
    assert truth[a] == truth[b] != truth[c]
    extra = client.submit_answers("herd", [
        (a, b, "same"), Answer.for_images(b, c, False, tags=("poor_quality",), confidence=0.5)])
    assert extra.stored_count == 2 and not extra.contradictions
    latest = client.list_constraints("herd", image_id=c)
    assert latest[0].tags == ("POOR_QUALITY",) and latest[0].confidence == pytest.approx(0.5)

    ident = client.get_identities("herd")
    of = ident.assignment()
    assert sorted(of) == sorted(truth) and sum(x.size for x in ident.identities) == 24
    current = client.list_constraints("herd")
    for ans in current:
        assert (of[ans.image_a] == of[ans.image_b]) == (ans.label == "SAME")
    assert ident.applied_answers == len(current)

    client.exclude_image("herd", pics[5].image_id, reason="blurred")
    path = tmp_path / "identities.csv"
    exported = client.export_identities_csv("herd", path)
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["image_id"] for r in rows][-1] == pics[5].image_id
    assert rows[-1]["excluded"] == "True" and rows[-1]["identity_id"] == ""
    assert {r["image_id"]: r["identity_id"] for r in rows[:-1]} == exported.assignment()
    sizes = {x.identity_id: x.size for x in exported.identities}
    assert all(int(r["identity_size"]) == sizes[r["identity_id"]] for r in rows[:-1])
    assert len(rows) == 24 and pics[5].image_id not in exported.assignment()
    assert client.restore_image("herd", pics[5].image_id).excluded is False

    # WatchQueue catch-up, StartQueryPairs + wait_operation.
    c0 = client.get_collection("herd").cycle
    op = client.start_query_pairs("herd", 4)
    done = client.wait_operation(op.operation_id, timeout_s=60)
    assert done.state == "SUCCEEDED" and done.batch_id and done.kind == "sample"
    events = client.watch_queue("herd", after_cycle=c0, timeout_s=30)
    event = next(events)
    events.close()
    assert event.kind == "BATCH_READY" and event.batch.batch_id == done.batch_id
    assert client.get_query_batch("herd", done.batch_id).cycle == c0 + 1


def test_deferred_embedding_and_operation_wait(client):
    pics = pictures()[24:32]
    client.create_collection("later", clustering=SMALL)
    added = client.add_images("later", [(p.image_id, p.png) for p in pics], defer_embedding=True)
    assert (added.added, added.embedded) == (8, 0)
    with pytest.raises(FailedPrecondition):
        client.get_query_pairs("later", 2)
    states = []
    op = client.embed_collection("later", progress=lambda o: states.append(o.state))
    assert op.state == "SUCCEEDED" and op.model.version == "1" and states[-1] == "SUCCEEDED"
    assert client.get_collection("later").embedded_image_count == 8
    client.delete_collection("later")
    with pytest.raises(NotFound) as err:
        client.get_collection("later")
    assert "later" in err.value.message


def test_errors_carry_code_and_server_message(client):
    with pytest.raises(NotFound) as err:
        client.get_query_pairs("no-such-collection", 3)
    e = err.value
    assert e.code == grpc.StatusCode.NOT_FOUND and "no-such-collection" in e.message
    assert e.method == "SamplingService.GetQueryPairs" and e.attempts == 1
    assert isinstance(e, LookupError) and str(e).startswith("NOT_FOUND: ")
    with pytest.raises(InvalidArgument) as bad:
        client.create_collection("bad", clustering=ClusteringParams(dbscan_eps=1.5))
    assert "eps" in bad.value.message and isinstance(bad.value, ValueError)
    client.create_collection("twice")
    with pytest.raises(AlreadyExists):
        client.create_collection("twice")
    with pytest.raises(ValueError):  # checked before anything is sent
        client.get_query_pairs("twice", 0)


def test_deadlines(server, client):
    client.create_collection("slow", clustering=SMALL)
    client.add_images("slow", [(p.image_id, p.png) for p in pictures()[:6]])
    retried = []
    with ReidalClient(server.address, timeout_s=0.001,
                      on_retry=lambda *a: retried.append(a)) as hasty:
        with pytest.raises(DeadlineExceeded) as err:
            hasty.get_identities("slow")
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and not retried
    tic = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        for _ in client.watch_queue("slow", timeout_s=0.5):
            pass
    assert 0.4 < time.monotonic() - tic < 10


def test_retries_on_unavailable_across_a_restart(triton, tmp_path):
    port = free_port()
    kwargs = dict(address=f"127.0.0.1:{port}", data_dir=tmp_path / "data",
                  triton_url=triton.grpc_url, health_interval_s=60)
    first = serve(["collections", "sampling", "constraints"], **kwargs)
    retried: list[tuple[int, float, grpc.StatusCode]] = []
    client = ReidalClient(f"127.0.0.1:{port}", timeout_s=10, retries=8, backoff_s=0.1,
                          max_backoff_s=1.0,
                          on_retry=lambda m, a, d, e: retried.append((a, d, e.code)))
    second = None
    try:
        client.create_collection("kept", species="turtle")
        first.stop(grace=1)

        def restart() -> None:
            nonlocal second
            time.sleep(1.0)
            second = serve(["collections", "sampling", "constraints"], **kwargs)

        starter = threading.Thread(target=restart)
        starter.start()
        got = client.get_collection("kept")  # fails until the new server listens
        starter.join()
        assert got.species == "turtle"
        assert retried and all(code == grpc.StatusCode.UNAVAILABLE for _, _, code in retried)
        assert [a for a, _, _ in retried] == list(range(1, len(retried) + 1))
        delays = [d for _, d, _ in retried]
        assert all(later > earlier for earlier, later in zip(delays[:3], delays[1:4], strict=False))
        assert client.health() == "SERVING"
    finally:
        client.close()
        if second is not None:
            second.stop(grace=1)


def test_retries_run_out_and_unsafe_calls_are_not_retried(tmp_path):
    port = free_port()  # nothing listens there
    retried = []
    with ReidalClient(f"127.0.0.1:{port}", timeout_s=5, retries=2, backoff_s=0.01,
                      on_retry=lambda *a: retried.append(a)) as client:
        with pytest.raises(Unavailable) as err:
            client.list_collections()
        assert err.value.attempts == 3 and len(retried) == 2
        retried.clear()
        with pytest.raises(Unavailable) as err:
            client.delete_constraint("c", "answer-1")
        assert err.value.attempts == 1 and not retried


def test_create_and_delete_resolve_a_lost_response(server):
    with ReidalClient(server.address, backoff_s=0.01,
                      interceptors=[LoseResponses(CreateCollection=1, DeleteCollection=1)]
                      ) as flaky:
        col = flaky.create_collection("lost-once", species="chimpanzee")
        assert col.species == "chimpanzee"  # created by the first attempt, found by the retry
        flaky.delete_collection("lost-once")  # deleted by the first attempt
        with pytest.raises(NotFound):
            flaky.get_collection("lost-once")


def test_local_parsing_and_progress():
    from reidal_client import parse_budget, parse_label
    from reidal_client.progress import TextProgress

    assert [parse_label(x) for x in (True, "s", "Yes", "1", False, "d", "no", None, "u", "?")] \
        == ["SAME"] * 4 + ["DIFFERENT"] * 3 + ["UNSURE"] * 3
    with pytest.raises(ValueError, match="maybe"):
        parse_label("maybe")
    assert parse_budget("40") == 40 and parse_budget("0.0002") == 0.0002
    assert isinstance(parse_budget("2e-4"), float)
    with pytest.raises(ValueError, match="pair_id or two images"):
        Answer(pair_id="p", images=("a", "b"), label="same").to_pb()
    with pytest.raises(ValueError, match="exactly one of data, path or uri"):
        ImageInput("x", data=b"1", uri="file:///x")
    assert ImageInput.coerce(("x", "file:///srv/x.jpg")).uri == "file:///srv/x.jpg"

    stream = io.StringIO()  # not a TTY: a line at most every every_s, and the last one
    bar = TextProgress("ingest", stream=stream, every_s=3600)
    for done in (10, 20, 30):
        bar(done, 30)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("ingest [##########----")
    assert lines[-1].startswith("ingest [" + "#" * 30 + "] 30/30 images")
    bar(30, 30)  # an operation stream repeats its last state as it finishes: printed once
    assert len(stream.getvalue().splitlines()) == 2


def test_tokens_and_training_configs_are_checked_before_any_call():
    from reidal_client import ReidalClient
    from reidal_client.types import training_config_pb

    for bad in ("", "  ", "bad\ntoken", "tök"):
        with pytest.raises(ValueError) as err:
            ReidalClient("127.0.0.1:9", token=bad)
        assert "bad\ntoken" not in str(err.value) and "tök" not in str(err.value)
    client = ReidalClient("127.0.0.1:9", token="t1", metadata=[("x-trace", "1")])
    view = client.with_token("t2")
    try:
        assert [m for m in view.metadata if m[0] == "authorization"] == [
            ("authorization", "Bearer t2")]
        assert ("x-trace", "1") in view.metadata
        assert [m for m in client.metadata if m[0] == "authorization"] == [
            ("authorization", "Bearer t1")]
    finally:
        view.close()  # a view leaves the shared channel open
        client.close()
    with pytest.raises(ValueError, match="epochs"):
        training_config_pb({"epochs": -1})
    with pytest.raises(ValueError, match="mode"):
        training_config_pb({"mode": 5})
    with pytest.raises(ValueError, match="unknown training config"):
        training_config_pb({"colour": "red"})
