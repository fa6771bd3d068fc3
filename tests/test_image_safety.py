"""Images as an attacker or a clumsy client sends them, over real loopback gRPC with the
real Triton (issue 15): local paths confined to the server's image roots with one answer
for every refused path (finding 1); an undecodable stored image excluded or deleted no
longer blocks its collection (finding 6).
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from _services_support import Stubs, rpc_error, running_server
from PIL import Image

from reidal.embedding.images import PATH_REFUSED, PATHS_OFF
from reidal.v1 import collections_pb2, common_pb2, embedding_pb2, embedding_pb2_grpc

C = collections_pb2
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _png(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _by_uri(cid: str, image_id: str, uri: str, *, defer: bool = False) -> C.AddImagesRequest:
    return C.AddImagesRequest(collection_id=cid, defer_embedding=defer, images=[
        C.IngestImage(image=common_pb2.Image(id=image_id, uri=uri))])


# ------------------------------------------------------------------------ finding 1: URIs


def test_uris_read_only_inside_the_image_roots_with_one_answer(triton, tmp_path):
    roots = tmp_path / "photos"
    roots.mkdir()
    (roots / "ok.png").write_bytes(_png(1))
    secret = tmp_path / "secret.png"  # a file the server may read, outside the roots
    secret.write_bytes(_png(2))
    (tmp_path / "notes.txt").write_text("private")
    (roots / "link.png").symlink_to(secret)
    outside = [str(secret), secret.as_uri(), str(roots / ".." / "secret.png"),
               str(roots / "link.png"), str(tmp_path / "notes.txt"), str(tmp_path / "gone.png"),
               str(roots / "gone.png"), str(roots), "/etc/passwd", "/proc/self/environ",
               "/dev/zero"]
    with running_server(triton, tmp_path / "data", image_roots=[roots]) as srv:
        stubs = Stubs.connect(srv.address)
        embed = embedding_pb2_grpc.EmbeddingServiceStub(stubs.channel)
        try:
            stubs.collections.CreateCollection(C.CreateCollectionRequest(collection_id="c"),
                                               timeout=30)
            added = stubs.collections.AddImages(iter([_by_uri("c", "ok", str(roots / "ok.png"))]),
                                                timeout=60)
            assert added.added == 1 and added.embedded == 1
            got = stubs.collections.GetImage(C.GetImageRequest(collection_id="c", image_id="ok"),
                                             timeout=30)
            assert got.data == (roots / "ok.png").read_bytes()

            answers = set()
            for k, uri in enumerate(outside):
                for defer in (False, True):  # a deferred URI is checked too, never stored
                    err = rpc_error(stubs.collections.AddImages,
                                    iter([_by_uri("c", f"x{k}", uri, defer=defer)]), timeout=60)
                    assert err.code() == INVALID, uri
                    answers.add(err.details().replace(f"'x{k}'", "ID"))
                err = rpc_error(embed.Embed, embedding_pb2.EmbedRequest(
                    images=[common_pb2.Image(id=f"x{k}", uri=uri)]), timeout=60)
                assert err.code() == INVALID, uri
                answers.add(err.details().replace(f"'x{k}'", "ID"))
            # one text per RPC whatever the path: no oracle for what exists where
            assert len(answers) == 2 and all(PATH_REFUSED in a for a in answers), answers
            listed = stubs.collections.ListImages(C.ListImagesRequest(collection_id="c"),
                                                  timeout=30)
            assert [i.image_id for i in listed.images] == ["ok"]

            # the file under an accepted URI swapped for a link out of the roots: refused
            (roots / "ok.png").unlink()
            (roots / "ok.png").symlink_to(secret)
            err = rpc_error(stubs.collections.GetImage,
                            C.GetImageRequest(collection_id="c", image_id="ok"), timeout=30)
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert PATH_REFUSED in err.details()
        finally:
            stubs.close()


def test_a_server_without_image_roots_reads_no_local_path(triton, tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_png(3))
    with running_server(triton, tmp_path / "data") as srv:
        stubs = Stubs.connect(srv.address)
        embed = embedding_pb2_grpc.EmbeddingServiceStub(stubs.channel)
        try:
            stubs.collections.CreateCollection(C.CreateCollectionRequest(collection_id="c"),
                                               timeout=30)
            for uri in (str(path), path.as_uri()):
                err = rpc_error(stubs.collections.AddImages,
                                iter([_by_uri("c", "a", uri, defer=True)]), timeout=60)
                assert err.code() == INVALID and PATHS_OFF in err.details()
                err = rpc_error(embed.Embed, embedding_pb2.EmbedRequest(
                    images=[common_pb2.Image(id="a", uri=uri)]), timeout=60)
                assert err.code() == INVALID and PATHS_OFF in err.details()
        finally:
            stubs.close()


def test_an_image_root_must_be_a_directory(tmp_path):
    from reidal.serve import serve

    with pytest.raises(ValueError, match="not a directory"):
        serve(["collections"], data_dir=tmp_path / "data", triton_url="127.0.0.1:1",
              image_roots=[tmp_path / "missing"])


# ------------------------------------------------------------------------ finding 6: a bad
# stored image


def _embed_to_end(stubs: Stubs, cid: str) -> C.Operation:
    op = stubs.collections.EmbedCollection(C.EmbedCollectionRequest(collection_id=cid),
                                           timeout=30)
    return list(stubs.collections.WatchOperation(
        C.GetOperationRequest(operation_id=op.operation_id), timeout=120))[-1]


def test_an_undecodable_deferred_image_no_longer_blocks_its_collection(triton, tmp_path,
                                                                       capsys):
    from _services_support import SMALL_CLUSTERING, by_images, ingest_message, pictures

    from reidal.v1 import constraints_pb2, sampling_pb2

    pics = pictures()[:12]
    good = [p.image_id for p in pics]
    with running_server(triton, tmp_path / "data") as srv:
        stubs = Stubs.connect(srv.address)
        col = stubs.collections
        try:
            col.CreateCollection(C.CreateCollectionRequest(collection_id="c",
                                                           clustering=SMALL_CLUSTERING),
                                 timeout=30)
            message = ingest_message("c", pics, defer=True)
            message.images.add(image=common_pb2.Image(id="bad", data=b"not an image at all"))
            assert col.AddImages(iter([message]), timeout=60).added == 13
            stubs.constraints.SubmitConstraints(constraints_pb2.SubmitConstraintsRequest(
                collection_id="c", answers=[by_images(good[0], good[1], True),
                                            by_images(good[0], "bad", False),
                                            by_images(good[2], "bad", None)]), timeout=30)

            def sample() -> sampling_pb2.QueryBatch:
                return stubs.sampling.GetQueryPairs(sampling_pb2.GetQueryPairsRequest(
                    collection_id="c", budget=C.Budget(count=4)), timeout=60)

            # the bad image fails only itself: named, the 12 good vectors stored
            done = _embed_to_end(stubs, "c")
            assert done.state == C.OPERATION_STATE_FAILED
            assert done.error_code == "INVALID_ARGUMENT" and "'bad'" in done.error_message
            assert "DeleteImage" in done.error_message
            assert len(srv.runtime.store.images.vector_ids("c", triton.model_name, "1")) == 12
            assert rpc_error(sample).code() == grpc.StatusCode.FAILED_PRECONDITION

            # excluded: EmbedCollection succeeds, listing it as skipped; sampling works
            stubs.constraints.ExcludeImage(constraints_pb2.ExcludeImageRequest(
                collection_id="c", image_id="bad", reason="undecodable"), timeout=30)
            done = _embed_to_end(stubs, "c")
            assert done.state == C.OPERATION_STATE_SUCCEEDED, done.error_message
            assert list(done.skipped_image_ids) == ["bad"]
            assert sample().sampled_images == 12

            # restored it blocks sampling again; deleted it is gone for good
            stubs.constraints.RestoreImage(constraints_pb2.RestoreImageRequest(
                collection_id="c", image_id="bad"), timeout=30)
            assert rpc_error(sample).code() == grpc.StatusCode.FAILED_PRECONDITION
            deleted = col.DeleteImage(C.DeleteImageRequest(collection_id="c", image_id="bad",
                                                           actor="curator"), timeout=30)
            assert deleted.answers_retired == 2
            assert sample().sampled_images == 12
            info = col.GetCollection(C.GetCollectionRequest(collection_id="c"), timeout=30)
            assert (info.image_count, info.embedded_image_count, info.answer_count) == (12, 12, 1)
            current = stubs.constraints.ListConstraints(constraints_pb2.ListConstraintsRequest(
                collection_id="c"), timeout=30)
            assert [(a.image_a, a.image_b) for a in current.constraints] == [
                tuple(sorted(good[:2]))]  # the answer about other images is untouched
            history = stubs.constraints.ListConstraints(constraints_pb2.ListConstraintsRequest(
                collection_id="c", include_history=True), timeout=30)
            assert sorted(a.status for a in history.constraints) == [  # retired, kept
                constraints_pb2.CONSTRAINT_STATUS_CURRENT] + [
                constraints_pb2.CONSTRAINT_STATUS_DELETED] * 2
            for call, request in (
                    (col.GetImage, C.GetImageRequest(collection_id="c", image_id="bad")),
                    (col.DeleteImage, C.DeleteImageRequest(collection_id="c", image_id="bad")),
                    (col.DeleteImage, C.DeleteImageRequest(collection_id="nope", image_id="x"))):
                assert rpc_error(call, request, timeout=30).code() == grpc.StatusCode.NOT_FOUND

            # the id added again (good bytes) starts afresh: no vector, no answer inherited
            again = ingest_message("c", [pics[0]], defer=True)
            again.images[0].image.id = "bad"
            col.AddImages(iter([again]), timeout=60)
            assert _embed_to_end(stubs, "c").state == C.OPERATION_STATE_SUCCEEDED
            info = col.GetCollection(C.GetCollectionRequest(collection_id="c"), timeout=30)
            assert (info.image_count, info.embedded_image_count, info.answer_count) == (13, 13, 1)
            assert sample().sampled_images == 13

            # the CLI (through the Python client) deletes it again
            from reidal.cli import main as cli_main

            assert cli_main(["image", "delete", "c", "bad", "--server", srv.address,
                             "--actor", "curator"]) == 0
            assert "deleted image 'bad'" in capsys.readouterr().out
            assert cli_main(["image", "delete", "c", "bad", "--server", srv.address]) == 1
            assert "NOT_FOUND" in capsys.readouterr().err
            assert col.GetCollection(C.GetCollectionRequest(collection_id="c"),
                                     timeout=30).image_count == 12
        finally:
            stubs.close()


# ------------------------------------------------------------------------ finding 3: memory


def _big_png(mode: str, side: int = 6000) -> bytes:
    """A blank ``side`` x ``side`` PNG: a few KiB on the wire, ``side``**2 pixels decoded."""
    buf = io.BytesIO()
    Image.new(mode, (side, side)).save(buf, "PNG")
    return buf.getvalue()


def test_decoded_images_in_flight_stay_within_the_server_budget(triton, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from reidal.embedding.decode_budget import MIB
    from reidal.embedding.images import decoded_bytes

    one_bit, rgba = _big_png("1"), _big_png("RGBA")
    assert len(one_bit) < 10_000  # 36 MP behind a few KiB
    cost = decoded_bytes(Image.open(io.BytesIO(one_bit)))
    budget_mb = 256
    assert cost < budget_mb * MIB < 2 * cost  # one such image at a time fits, two do not
    small = [(f"s{k}", _png(k)) for k in range(3)]
    with running_server(triton, tmp_path / "data", decode_budget_mb=budget_mb,
                        decode_wait_s=120) as srv:
        budget = srv.runtime.embedder.budget
        stub = embedding_pb2_grpc.EmbeddingServiceStub(grpc.insecure_channel(srv.address))

        def embed(images: list[tuple[str, bytes]]) -> tuple[grpc.StatusCode, str]:
            try:
                out = stub.Embed(embedding_pb2.EmbedRequest(
                    images=[common_pb2.Image(id=i, data=d) for i, d in images]), timeout=300)
            except grpc.RpcError as exc:
                return exc.code(), exc.details()
            assert [e.id for e in out.embeddings] == [i for i, _ in images]
            return grpc.StatusCode.OK, ""

        requests = [[(f"r{r}-{k}", one_bit) for k in range(2)] + small[:1] for r in range(4)]
        requests += [small, [("too-big", rgba)]]
        with ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(embed, requests))
        # the budget's own accounting: never more than its capacity reserved at once, and
        # the large images really went through it
        assert cost <= budget.peak <= budget.capacity == budget_mb * MIB
        assert budget.in_use == 0
        assert {code for code, _ in results[:5]} <= {grpc.StatusCode.OK,
                                                     grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert results[4][0] == grpc.StatusCode.OK  # normal images still embed
        for code, message in results[:4]:
            assert code == grpc.StatusCode.OK or "decode budget" in message
        code, message = results[5]  # more than the whole budget: refused at once, clearly
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "decode budget of 256 MiB" in message and "fewer or smaller" in message
        assert embed(small)[0] == grpc.StatusCode.OK


def test_decode_budget_waits_in_turn_then_refuses():
    import threading

    from reidal.embedding.decode_budget import DecodeBudget
    from reidal.errors import ResourceExhausted

    budget = DecodeBudget(10, wait_s=0)
    with budget.reserve(8):
        with pytest.raises(ResourceExhausted, match="busy decoding"):
            with budget.reserve(5):
                pass
        assert budget.in_use == 8
    waiting = DecodeBudget(10, wait_s=600)
    got = threading.Event()
    held = waiting.reserve(5)
    with waiting.reserve(8):
        thread = threading.Thread(target=lambda: held.__enter__() or got.set())
        thread.start()
        assert not got.wait(0.2)  # blocked while the first holds its bytes
    thread.join(60)
    assert got.is_set() and waiting.in_use == 5 and waiting.peak == 8
    held.__exit__(None, None, None)
    assert waiting.in_use == 0
    with pytest.raises(ResourceExhausted, match="whole decode budget"):
        with waiting.reserve(11):
            pass
