"""Images as an attacker or a clumsy client sends them, over real loopback gRPC with the
real Triton (issue 15): local paths confined to the server's image roots with one answer
for every refused path.
"""

from __future__ import annotations

import io
from pathlib import Path

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
