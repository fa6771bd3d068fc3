"""AddImages gathers the messages of a stream into embedding batches (issue 14, item 3), on a
real server with the real Triton. The batches are observed through the server's own metric
``reidal_ingest_batch_images`` (images per embedding call of an ingest); what is stored is
read back over gRPC."""

from __future__ import annotations

import time

import grpc
import numpy as np
from prometheus_client import REGISTRY

from reidal.v1 import collections_pb2 as C
from reidal.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc
from tests._services_support import (
    Stubs,
    create_and_fill,
    ingest_message,
    pictures,
    rpc_error,
    running_server,
)


def _embedding_calls() -> tuple[float, float]:
    """(embedding calls of ingests so far, those of at most 4 images)."""
    count = REGISTRY.get_sample_value("reidal_ingest_batch_images_count") or 0.0
    small = REGISTRY.get_sample_value("reidal_ingest_batch_images_bucket", {"le": "4.0"}) or 0.0
    return count, small


def _stored_vectors(stubs: Stubs, cid: str) -> dict[str, np.ndarray]:
    out = {}
    for part in stubs.collections.GetVectors(C.GetVectorsRequest(collection_id=cid)):
        out.update({v.image_id: np.array(v.vector, dtype=np.float32) for v in part.vectors})
    return out


def _count(stubs: Stubs, cid: str) -> int:
    return stubs.collections.GetCollection(C.GetCollectionRequest(collection_id=cid)).image_count


def test_a_stream_of_small_messages_reaches_the_embedder_in_larger_batches(triton, tmp_path):
    pics = pictures()[:24]
    with running_server(triton, tmp_path) as srv:
        stubs = Stubs.connect(srv.address)
        calls0, small0 = _embedding_calls()
        out = create_and_fill(stubs, "batched", pics, chunk=4)  # 6 messages of 4 images
        calls, small = (a - b for a, b in zip(_embedding_calls(), (calls0, small0), strict=True))
        assert (out.received, out.added, out.embedded) == (24, 24, 24)
        assert 1 <= calls < 6, "every message was embedded on its own"
        assert small < calls, "no embedding call held more than one message's images"

        # Each stored vector is the one of its own image (the batch kept ids and rows
        # together): the EmbeddingService embeds three of them alone.
        stored = _stored_vectors(stubs, "batched")
        assert sorted(stored) == sorted(p.image_id for p in pics)
        embed = embedding_pb2_grpc.EmbeddingServiceStub(stubs.channel)
        for p in (pics[0], pics[9], pics[23]):
            alone = embed.Embed(embedding_pb2.EmbedRequest(
                images=[common_pb2.Image(id=p.image_id, data=p.png)]), timeout=60)
            np.testing.assert_allclose(stored[p.image_id], alone.embeddings[0].vector,
                                       atol=1e-5)
        stubs.close()


def test_a_bad_image_fails_its_message_and_the_messages_before_it_stay_stored(triton, tmp_path):
    pics = pictures()[:12]
    with running_server(triton, tmp_path) as srv:
        stubs = Stubs.connect(srv.address)
        stubs.collections.CreateCollection(C.CreateCollectionRequest(collection_id="bad"))
        bad = ingest_message("bad", pics[8:12])
        bad.images.add(image=common_pb2.Image(id="broken", data=b"not an image"))
        # Sent at once, the three messages are gathered into one batch: the embedder
        # rejects it, and the batch is ingested again message by message.
        err = rpc_error(stubs.collections.AddImages, iter([
            ingest_message("bad", pics[0:4]), ingest_message("bad", pics[4:8]), bad]),
            timeout=120)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith("message 2: ") and "'broken'" in err.details()
        assert sorted(_stored_vectors(stubs, "bad")) == sorted(p.image_id for p in pics[:8])

        # An id repeated in a later message is not gathered with its first occurrence:
        # it is already present when its message is ingested, and changed content is named.
        again = ingest_message("bad", pics[8:10])
        again.images[1].image.data = pics[0].png
        out = stubs.collections.AddImages(iter([again, ingest_message("bad", pics[9:12])]),
                                          timeout=120)
        assert (out.received, out.added, out.already_present) == (5, 4, 1)
        assert list(out.changed_ids) == [pics[9].image_id]
        stubs.close()


def test_a_slow_stream_has_its_images_stored_before_it_ends(triton, tmp_path):
    """A gathered batch waits at most ``ingest_wait_s`` for the next message: the images
    of a client that pauses are stored (visible to others: progress) while it pauses."""
    pics = pictures()[:8]
    with running_server(triton, tmp_path) as srv:
        stubs = Stubs.connect(srv.address)
        stubs.collections.CreateCollection(C.CreateCollectionRequest(collection_id="slow"))
        seen_mid_stream = []

        def messages():
            yield ingest_message("slow", pics[:4])
            deadline = time.monotonic() + 120  # a guard, not a timing: stored in ~0.2 s + embed
            while _count(stubs, "slow") < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            seen_mid_stream.append(_count(stubs, "slow"))
            yield ingest_message("slow", pics[4:])

        out = stubs.collections.AddImages(messages(), timeout=300)
        assert seen_mid_stream == [4]
        assert (out.added, out.embedded) == (8, 8)
        stubs.close()
