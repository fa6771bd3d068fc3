"""GetIdentities served from what was computed for the collection's state, over real gRPC
(a real ``serve`` on loopback, SQLite): calls on an unchanged state get the same answer
without computing again, and every change (an answer, a revised answer, a deleted
answer, an excluded or restored image, a new sampling cycle) shows in the very next call.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from _services_support import Stubs, by_images

from reidal.collection_state import effective_params, load_view
from reidal.identities import refined_labels
from reidal.serve import serve
from reidal.simulation.synthetic import make_reid_embeddings
from reidal.store import AnswerIn, ImageRecord, Store
from reidal.v1 import collections_pb2, constraints_pb2, sampling_pb2

C, K, S = collections_pb2, constraints_pb2, sampling_pb2
CID = "c"


@pytest.fixture()
def served(tmp_path):
    """A server (sampling + constraints) on data directory ``tmp_path`` over collection
    ``c`` of embedded images, and the image ids."""
    data = make_reid_embeddings(n_identities=8, dim=16, seed=0)
    ids = [f"img{k:03d}" for k in range(data.X.shape[0])]
    store = Store(tmp_path)
    store.collections.create(CID, model_name="m", model_version="1",
                             params=effective_params({"k1": 6, "k2": 2, "min_samples": 2}, None))
    store.images.add(CID, [ImageRecord(i) for i in ids])
    store.images.put_vectors(CID, "m", "1", ids, data.X.astype(np.float32))
    store.close()
    srv = serve(["sampling", "constraints"], data_dir=tmp_path, health_interval_s=60)
    stubs = Stubs.connect(srv.address)
    try:
        yield stubs, ids
    finally:
        stubs.close()
        srv.stop(grace=1)


def identities(stubs: Stubs) -> constraints_pb2.GetIdentitiesResponse:
    return stubs.constraints.GetIdentities(K.GetIdentitiesRequest(collection_id=CID))


def identity_of(resp: constraints_pb2.GetIdentitiesResponse) -> dict[str, str]:
    return {i: x.identity_id for x in resp.identities for i in x.image_ids}


def submit(stubs: Stubs, a: str, b: str, same: bool) -> str:
    out = stubs.constraints.SubmitConstraints(K.SubmitConstraintsRequest(
        collection_id=CID, answers=[by_images(a, b, same)]))
    return out.answer_ids[0]


def test_every_change_shows_in_the_next_call(served):
    stubs, ids = served
    first = identities(stubs)
    assert first.applied_answers == 0 and first.cycle == 0
    assert identities(stubs) == first  # unchanged state: the same answer
    # two images the clustering put apart: a SAME answer joins them in the very next call
    before = identity_of(first)
    a, b = next((x, y) for x in ids for y in ids if before[x] != before[y])
    same = submit(stubs, a, b, True)
    joined = identities(stubs)
    assert joined.applied_answers == 1
    assert identity_of(joined)[a] == identity_of(joined)[b]
    # the same pair revised to DIFFERENT: apart again, still one applied answer
    submit(stubs, a, b, False)
    revised = identities(stubs)
    assert revised.applied_answers == 1
    assert identity_of(revised)[a] != identity_of(revised)[b]
    # deleting the revision restores the SAME answer it superseded
    listed = stubs.constraints.ListConstraints(K.ListConstraintsRequest(collection_id=CID))
    newest = listed.constraints[0].answer_id
    assert newest != same
    stubs.constraints.DeleteConstraint(K.DeleteConstraintRequest(collection_id=CID,
                                                                 answer_id=newest))
    restored = identities(stubs)
    assert restored.applied_answers == 1
    assert identity_of(restored)[a] == identity_of(restored)[b]
    # an excluded image leaves the identities in the next call, and comes back on restore
    stubs.constraints.ExcludeImage(K.ExcludeImageRequest(collection_id=CID, image_id=a))
    excluded = identities(stubs)
    assert list(excluded.excluded_image_ids) == [a] and a not in identity_of(excluded)
    assert excluded.applied_answers == 0  # the SAME answer has lost one of its images
    stubs.constraints.RestoreImage(K.RestoreImageRequest(collection_id=CID, image_id=a))
    back = identities(stubs)
    assert not back.excluded_image_ids and back.applied_answers == 1
    assert identity_of(back)[a] == identity_of(back)[b]


def test_a_new_cycle_shows_in_the_next_call_without_moving_an_identity(served):
    stubs, ids = served
    submit(stubs, ids[0], ids[1], True)
    first = identities(stubs)
    batch = stubs.sampling.GetQueryPairs(S.GetQueryPairsRequest(
        collection_id=CID, budget=C.Budget(count=3)))
    assert batch.cycle == first.cycle + 1
    after = identities(stubs)
    assert after.cycle == batch.cycle
    # a cycle changes no answer, image or parameter: the identities are the same
    after.cycle = first.cycle
    assert after == first


def test_identities_do_not_wait_for_a_sampling_cycle(served, tmp_path):
    stubs, ids = served
    identities(stubs)
    submit(stubs, ids[0], ids[1], True)
    other = Store(tmp_path)  # another process's view of the same data directory
    try:
        with other.exclusive(f"collection:{CID}"):  # what a running cycle holds
            fresh = stubs.constraints.GetIdentities(
                K.GetIdentitiesRequest(collection_id=CID), timeout=60)
    finally:
        other.close()
    assert fresh.applied_answers == 1


def test_identities_from_kept_clusterings_equal_a_fresh_computation(tmp_path):
    """refined_labels on a view of shared (cached) rows equals the same computation on a
    private copy of the vectors, which no cache serves, after every answer."""
    data = make_reid_embeddings(n_identities=8, dim=16, seed=1)
    ids = [f"img{k:03d}" for k in range(data.X.shape[0])]
    store = Store(tmp_path)
    try:
        store.collections.create(CID, model_name="m", model_version="1",
                                 params=effective_params({"k1": 6, "k2": 2,
                                                          "min_samples": 2}, None))
        store.images.add(CID, [ImageRecord(i) for i in ids])
        store.images.put_vectors(CID, "m", "1", ids, data.X.astype(np.float32))
        rng = np.random.default_rng(0)
        for step in range(6):
            view = load_view(store, CID)
            assert not view.X.flags.writeable  # the shared rows
            fresh = refined_labels(replace(view, X=view.X.copy()))
            np.testing.assert_array_equal(refined_labels(view), fresh)
            a, b = rng.choice(len(ids), 2, replace=False)
            store.answers.submit(CID, [AnswerIn(ids[a], ids[b],
                                                 "SAME" if step % 2 else "DIFFERENT")])
    finally:
        store.close()
