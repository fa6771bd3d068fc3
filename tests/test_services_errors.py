"""Bad input over real gRPC: the right status code and a message that names the problem.

The server here has 1 MiB message limits so oversized messages are cheap to provoke; it
embeds with the real bundled Triton (``triton``).
"""

from __future__ import annotations

import socket

import grpc
import pytest
from _services_support import (
    Stubs,
    by_images,
    create_and_fill,
    ingest_message,
    pictures,
    rpc_error,
    running_server,
)

from reidal.serve import serve
from reidal.v1 import collections_pb2, common_pb2, constraints_pb2, sampling_pb2

C, S, K = collections_pb2, sampling_pb2, constraints_pb2
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def server(triton, tmp_path_factory):
    with running_server(triton, tmp_path_factory.mktemp("reidal-errors"), max_message_mb=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def stubs(server):
    s = Stubs.connect(server.address)
    yield s
    s.close()


@pytest.fixture(scope="module")
def filled(stubs):
    """A collection "c" of 12 embedded images and one stored batch."""
    pics = pictures()[:12]
    create_and_fill(stubs, "c", pics)
    batch = stubs.sampling.GetQueryPairs(S.GetQueryPairsRequest(
        collection_id="c", budget=C.Budget(count=3)))
    return [p.image_id for p in pics], batch


def expect(code: grpc.StatusCode, *needles: str):
    def check(err: grpc.RpcError) -> None:
        assert err.code() == code, (err.code(), err.details())
        for needle in needles:
            assert needle in err.details(), (needle, err.details())
    return check


def test_unknown_collection_is_not_found_everywhere(stubs):
    cid = "no-such-collection"
    calls = [
        (stubs.collections.GetCollection, C.GetCollectionRequest(collection_id=cid)),
        (stubs.collections.DeleteCollection, C.DeleteCollectionRequest(collection_id=cid)),
        (stubs.collections.ListImages, C.ListImagesRequest(collection_id=cid)),
        (stubs.collections.EmbedCollection, C.EmbedCollectionRequest(collection_id=cid)),
        (stubs.collections.AddImages, iter([ingest_message(cid, pictures()[:1])])),
        (stubs.sampling.GetQueryPairs, S.GetQueryPairsRequest(collection_id=cid)),
        (stubs.sampling.StartQueryPairs, S.GetQueryPairsRequest(collection_id=cid)),
        (stubs.sampling.GetQueryBatch, S.GetQueryBatchRequest(collection_id=cid, batch_id="x")),
        (stubs.sampling.WatchQueue, S.WatchQueueRequest(collection_id=cid)),
        (stubs.constraints.SubmitConstraints, K.SubmitConstraintsRequest(
            collection_id=cid, answers=[by_images("a", "b", True)])),
        (stubs.constraints.ListConstraints, K.ListConstraintsRequest(collection_id=cid)),
        (stubs.constraints.DeleteConstraint, K.DeleteConstraintRequest(
            collection_id=cid, answer_id="answer-1")),
        (stubs.constraints.ExcludeImage, K.ExcludeImageRequest(collection_id=cid, image_id="a")),
        (stubs.constraints.GetIdentities, K.GetIdentitiesRequest(collection_id=cid)),
    ]
    for call, request in calls:
        expect(NOT_FOUND, cid)(rpc_error(call, request, timeout=30))
    expect(NOT_FOUND, "op-nope")(rpc_error(stubs.collections.GetOperation,
                                           C.GetOperationRequest(operation_id="op-nope")))


def test_unknown_image_pair_batch_and_answer_ids(stubs, filled):
    ids, batch = filled
    history = K.ListConstraintsRequest(collection_id="c", include_history=True)
    before = stubs.constraints.ListConstraints(history).constraints
    submit = stubs.constraints.SubmitConstraints
    expect(NOT_FOUND, "'ghost'")(rpc_error(submit, K.SubmitConstraintsRequest(
        collection_id="c", answers=[by_images(ids[0], "ghost", True)])))
    expect(NOT_FOUND, "no-such-pair")(rpc_error(submit, K.SubmitConstraintsRequest(
        collection_id="c", answers=[K.AnswerInput(pair_id="no-such-pair",
                                                   label=K.ANSWER_LABEL_SAME)])))
    expect(NOT_FOUND, "other-batch")(rpc_error(submit, K.SubmitConstraintsRequest(
        collection_id="c", batch_id="other-batch", answers=[by_images(ids[0], ids[1], True)])))
    expect(NOT_FOUND, "zzz")(rpc_error(stubs.sampling.GetQueryBatch, S.GetQueryBatchRequest(
        collection_id="c", batch_id="zzz")))
    expect(NOT_FOUND, "ghost")(rpc_error(stubs.constraints.ExcludeImage, K.ExcludeImageRequest(
        collection_id="c", image_id="ghost")))
    expect(NOT_FOUND, "answer-999999")(rpc_error(
        stubs.constraints.DeleteConstraint,
        K.DeleteConstraintRequest(collection_id="c", answer_id="answer-999999")))
    expect(NOT_FOUND, "garbage")(rpc_error(
        stubs.constraints.DeleteConstraint,
        K.DeleteConstraintRequest(collection_id="c", answer_id="garbage")))
    expect(NOT_FOUND, "ghost")(rpc_error(stubs.sampling.GetQueryPairs, S.GetQueryPairsRequest(
        collection_id="c", filter=C.ImageFilter(image_ids=["ghost"]))))
    if batch.pairs:  # a pair of this batch answered under another batch id
        other = stubs.sampling.GetQueryPairs(S.GetQueryPairsRequest(
            collection_id="c", budget=C.Budget(count=1)))
        expect(INVALID, batch.pairs[0].pair_id, other.batch_id)(rpc_error(
            submit, K.SubmitConstraintsRequest(
                collection_id="c", batch_id=other.batch_id,
                answers=[K.AnswerInput(pair_id=batch.pairs[0].pair_id,
                                       label=K.ANSWER_LABEL_SAME)])))
    # Nothing of the failed requests was stored (other tests' answers, in any order, may be).
    assert stubs.constraints.ListConstraints(history).constraints == before


def test_empty_requests(stubs, filled):
    expect(INVALID, "no answers")(rpc_error(stubs.constraints.SubmitConstraints,
                                            K.SubmitConstraintsRequest(collection_id="c")))
    expect(INVALID, "no images")(rpc_error(stubs.collections.AddImages, iter([
        C.AddImagesRequest(collection_id="c")])))
    expect(INVALID, "no images")(rpc_error(stubs.collections.AddImages, iter([])))
    expect(INVALID, "non-empty")(rpc_error(stubs.collections.CreateCollection,
                                           C.CreateCollectionRequest()))
    expect(INVALID, "names no pair")(rpc_error(
        stubs.constraints.SubmitConstraints, K.SubmitConstraintsRequest(
            collection_id="c", answers=[K.AnswerInput(label=K.ANSWER_LABEL_SAME)])))


def test_malformed_enums_and_values(stubs, filled):
    ids, _ = filled
    submit = stubs.constraints.SubmitConstraints

    def answers(**fields) -> K.SubmitConstraintsRequest:
        base = dict(images=K.ImagePair(image_a=ids[0], image_b=ids[1]),
                    label=K.ANSWER_LABEL_SAME)
        base.update(fields)
        return K.SubmitConstraintsRequest(collection_id="c", answers=[K.AnswerInput(**base)])

    expect(INVALID, "answer 0", "label 7")(rpc_error(submit, answers(label=7)))
    expect(INVALID, "ANSWER_LABEL_UNSPECIFIED")(rpc_error(submit, answers(label=0)))
    expect(INVALID, "tag 42")(rpc_error(submit, answers(tags=[K.ANSWER_TAG_PHOTOBOMB, 42])))
    expect(INVALID, "confidence")(rpc_error(submit, answers(confidence=1.5)))
    expect(INVALID, "itself")(rpc_error(submit, answers(
        images=K.ImagePair(image_a=ids[0], image_b=ids[0]))))
    expect(INVALID, "label 9")(rpc_error(stubs.constraints.ListConstraints,
                                         K.ListConstraintsRequest(collection_id="c", label=9)))
    expect(INVALID, "page_token")(rpc_error(stubs.constraints.ListConstraints,
                                            K.ListConstraintsRequest(collection_id="c",
                                                                     page_token="x1")))
    expect(INVALID, "page_size")(rpc_error(stubs.collections.ListImages, C.ListImagesRequest(
        collection_id="c", page_size=5000)))
    # A valid tag list is accepted and stored by name.
    ok = submit(answers(tags=[K.ANSWER_TAG_SCENERY_MATCH], confidence=0.5, note="same stripes"))
    listed = stubs.constraints.ListConstraints(K.ListConstraintsRequest(collection_id="c"))
    [stored] = [x for x in listed.constraints if x.answer_id == ok.answer_ids[0]]
    assert list(stored.tags) == [K.ANSWER_TAG_SCENERY_MATCH] and stored.note == "same stripes"
    assert stored.confidence == pytest.approx(0.5)
    stubs.constraints.DeleteConstraint(K.DeleteConstraintRequest(
        collection_id="c", answer_id=ok.answer_ids[0]))


def test_bad_collection_parameters_budgets_and_filters(stubs, filled):
    create = stubs.collections.CreateCollection
    expect(INVALID, "eps")(rpc_error(create, C.CreateCollectionRequest(
        collection_id="p1", clustering=C.ClusteringParams(dbscan_eps=1.5))))
    expect(INVALID, "s_min")(rpc_error(create, C.CreateCollectionRequest(
        collection_id="p2", sampling=C.SamplingParams(s_min=0.0))))
    expect(INVALID, "type_weights")(rpc_error(create, C.CreateCollectionRequest(
        collection_id="p3", sampling=C.SamplingParams(type_weights="loud"))))
    expect(INVALID, "fraction")(rpc_error(create, C.CreateCollectionRequest(
        collection_id="p4", sampling=C.SamplingParams(default_budget=C.Budget(fraction=3.0)))))
    expect(INVALID, "control")(rpc_error(create, C.CreateCollectionRequest(
        collection_id="bad\nid")))
    expect(grpc.StatusCode.ALREADY_EXISTS, "'c'")(rpc_error(create, C.CreateCollectionRequest(
        collection_id="c")))
    pairs = stubs.sampling.GetQueryPairs
    expect(INVALID, "budget")(rpc_error(pairs, S.GetQueryPairsRequest(
        collection_id="c", budget=C.Budget(fraction=2.0))))
    expect(INVALID, "budget", "> 0")(rpc_error(pairs, S.GetQueryPairsRequest(
        collection_id="c", budget=C.Budget(count=0))))
    expect(INVALID, "date_from", "yesterday")(rpc_error(pairs, S.GetQueryPairsRequest(
        collection_id="c", filter=C.ImageFilter(date_from="yesterday"))))
    expect(INVALID, "after")(rpc_error(pairs, S.GetQueryPairsRequest(
        collection_id="c", filter=C.ImageFilter(date_from="2024-02-01", date_to="2024-01-01"))))
    expect(INVALID, "only 0 image")(rpc_error(pairs, S.GetQueryPairsRequest(
        collection_id="c", filter=C.ImageFilter(metadata={"site": "moon"}))))


def test_bad_images_fail_the_message_and_store_nothing(stubs, filled):
    stubs.collections.CreateCollection(C.CreateCollectionRequest(collection_id="imgs"))
    good = pictures()[:3]
    msg = ingest_message("imgs", good)
    msg.images.add(image=common_pb2.Image(id="broken", data=b"not an image"))
    msg.images.add(image=common_pb2.Image(id="nothing"))
    expect(INVALID, "message 0", "'nothing'", "exactly one of data or uri")(
        rpc_error(stubs.collections.AddImages, iter([msg])))
    del msg.images[-1]
    expect(INVALID, "message 0", "'broken'")(rpc_error(stubs.collections.AddImages, iter([msg])))
    dup = ingest_message("imgs", [good[0], good[0]])
    expect(INVALID, "more than once")(rpc_error(stubs.collections.AddImages, iter([dup])))
    other = ingest_message("c", good[:1])
    expect(INVALID, "message 1", "'c'")(rpc_error(stubs.collections.AddImages, iter([
        ingest_message("imgs", good[:1]), other])))
    col = stubs.collections.GetCollection(C.GetCollectionRequest(collection_id="imgs"))
    assert col.image_count == 1  # only the first message of the last stream was stored
    meta = ingest_message("imgs", good[1:2], metadata={good[1].image_id: {"": "x"}})
    expect(INVALID, "metadata")(rpc_error(stubs.collections.AddImages, iter([meta])))


def test_oversized_messages_are_refused(stubs, filled):
    big = common_pb2.Image(id="huge", data=b"\x00" * (2 * 1024 * 1024))
    err = rpc_error(stubs.collections.AddImages, iter([C.AddImagesRequest(
        collection_id="c", images=[C.IngestImage(image=big)])]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.details() or "message" in err.details().lower()
    col = stubs.collections.GetCollection(C.GetCollectionRequest(collection_id="c"))
    assert col.image_count == 12


def test_request_id_reuse_and_missing_vectors(stubs):
    """On a collection of its own ("rv"): it stores an answer and adds images without
    vectors, which the other tests' collection "c" must not see, in any test order."""
    pics = pictures()[:6]
    ids = [p.image_id for p in pics]
    create_and_fill(stubs, "rv", pics)
    submit = stubs.constraints.SubmitConstraints
    submit(K.SubmitConstraintsRequest(collection_id="rv", request_id="r-1",
                                      answers=[by_images(ids[2], ids[3], True)]))
    expect(grpc.StatusCode.ALREADY_EXISTS, "r-1")(rpc_error(submit, K.SubmitConstraintsRequest(
        collection_id="rv", request_id="r-1", answers=[by_images(ids[2], ids[4], True)])))
    stubs.collections.AddImages(iter([ingest_message("rv", pictures()[12:14], defer=True)]))
    for call, request in ((stubs.sampling.GetQueryPairs,
                           S.GetQueryPairsRequest(collection_id="rv")),
                          (stubs.constraints.GetIdentities,
                           K.GetIdentitiesRequest(collection_id="rv"))):
        expect(grpc.StatusCode.FAILED_PRECONDITION, "2 of 8", "no vector")(
            rpc_error(call, request))


def test_triton_down_is_unavailable(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    srv = serve(["collections"], data_dir=tmp_path, triton_url=dead, health_interval_s=60)
    try:
        s = Stubs.connect(srv.address)
        s.collections.CreateCollection(C.CreateCollectionRequest(collection_id="x"))
        expect(grpc.StatusCode.UNAVAILABLE, "retry")(rpc_error(
            s.collections.AddImages, iter([ingest_message("x", pictures()[:2])]), timeout=60))
        assert s.collections.GetCollection(C.GetCollectionRequest(
            collection_id="x")).image_count == 0
        s.close()
    finally:
        srv.stop(grace=1)
