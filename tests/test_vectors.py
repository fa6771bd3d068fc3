"""GetVectors / PutVectors over a real server on loopback (real SQLite, the real Triton).

Checked against independent references: read-back vectors against the EmbeddingService's
vectors of the same images; external vectors against the caller's own, normalised here;
sampling and identities running on external vectors of a model Triton does not serve at
all (so nothing can have been embedded); and every refusal leaving the stored vectors as
they were.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from _services_support import pictures, running_server

from reidal.cli import main
from reidal.errors import FailedPrecondition as StoreFailedPrecondition
from reidal.errors import InvalidArgument as StoreInvalidArgument
from reidal.errors import NotFound as StoreNotFound
from reidal.limits import MAX_VECTOR_BYTES_PER_MESSAGE
from reidal.store import ImageRecord, Store
from reidal.v1 import collections_pb2, collections_pb2_grpc
from reidal_client import (
    ClusteringParams,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ReidalClient,
)

SMALL = ClusteringParams(k1=6, k2=2, min_samples=2)
EXTERNAL = "miewid-test"


@pytest.fixture(scope="module")
def server(triton, tmp_path_factory):
    with running_server(triton, tmp_path_factory.mktemp("reidal-vectors")) as srv:
        yield srv


@pytest.fixture
def client(server):
    with ReidalClient(server.address, timeout_s=60) as c:
        yield c


def _external_vectors(identities: list[str], dim: int = 24, seed: int = 0) -> np.ndarray:
    """Unnormalised vectors, one tight cluster per identity (what a trained model gives)."""
    rng = np.random.default_rng(seed)
    centres = {name: rng.normal(size=dim) for name in sorted(set(identities))}
    return np.stack([3.0 * (centres[name] + 0.05 * rng.normal(size=dim))
                     for name in identities]).astype(np.float32)


def test_stored_vectors_read_back_equal_what_embed_gives(client):
    pics = pictures()[:12]
    client.create_collection("rt", clustering=SMALL)
    added = client.add_images("rt", [(p.image_id, p.png) for p in pics])
    got = client.get_vectors("rt")
    assert got.ids == tuple(p.image_id for p in pics)  # ingest order
    assert got.model == added.model
    direct = client.embed([(p.image_id, p.png) for p in pics], model=added.model)
    np.testing.assert_allclose(got.vectors, direct.vectors, atol=1e-5)
    some = client.get_vectors("rt", [pics[5].image_id, pics[1].image_id])
    assert some.ids == (pics[1].image_id, pics[5].image_id)
    np.testing.assert_array_equal(some.vectors, got.vectors[[1, 5]])
    with pytest.raises(NotFound, match="nope"):
        client.get_vectors("rt", ["nope"])
    with pytest.raises(NotFound):
        client.get_vectors("no-such-collection")
    # another model version than the stored one: nothing, not an error
    assert client.get_vectors("rt", model=f"{added.model.name}:99").ids == ()


def test_external_vectors_drive_sampling_and_identities_without_triton(client):
    pics = pictures()
    ids = [p.image_id for p in pics]
    client.create_collection("ext", model=EXTERNAL, clustering=SMALL)
    client.add_images("ext", [(p.image_id, p.png) for p in pics], defer_embedding=True)
    X = _external_vectors([p.identity for p in pics])
    ref = client.put_vectors("ext", ids, X, model=EXTERNAL, batch_size=16, actor="platform")
    assert (ref.name, ref.version) == (EXTERNAL, "1")
    col = client.get_collection("ext")
    assert (col.model.name, col.model.version) == (EXTERNAL, "1")
    assert col.embedded_image_count == len(pics)
    got = client.get_vectors("ext")
    assert got.ids == tuple(ids)
    np.testing.assert_allclose(got.vectors, X / np.linalg.norm(X, axis=1, keepdims=True),
                               atol=1e-6)
    # Triton serves no model of that name: these ran on the external vectors only
    batch = client.get_query_pairs("ext", 10)
    assert batch.pairs
    identities = client.get_identities("ext").assignment()
    assert set(identities) == set(ids)
    truth = {p.image_id: p.identity for p in pics}
    same = [(a, b) for a in ids for b in ids if a < b and truth[a] == truth[b]]
    together = sum(identities[a] == identities[b] for a, b in same)
    assert together >= 0.8 * len(same)  # tight clusters are found from the vectors put

    # replacing one image's vector is allowed (same model, same length)
    client.put_vectors("ext", [ids[0]], X[1:2], model=EXTERNAL)
    np.testing.assert_allclose(client.get_vectors("ext", [ids[0]]).vectors[0],
                               got.vectors[1], atol=1e-6)


def test_bad_vectors_are_refused_and_nothing_changes(client):
    pics = pictures()[:6]
    ids = [p.image_id for p in pics]
    client.create_collection("bad", model=EXTERNAL, clustering=SMALL)
    client.add_images("bad", [(p.image_id, p.png) for p in pics], defer_embedding=True)
    X = _external_vectors([p.identity for p in pics], dim=8)
    client.put_vectors("bad", ids[:3], X[:3], model=EXTERNAL)
    before = client.get_vectors("bad")

    nan = X[3:5].copy()
    nan[1, 2] = np.nan
    cases = [
        (InvalidArgument, "NaN or infinite", dict(image_ids=ids[3:5], vectors=nan)),
        (InvalidArgument, "all zeros", dict(image_ids=ids[3:4], vectors=np.zeros((1, 8)))),
        (InvalidArgument, "stored vectors", dict(image_ids=ids[3:4], vectors=X[3:4, :7])),
        (InvalidArgument, "different lengths",
         dict(image_ids=ids[3:5], vectors=[list(X[3]), list(X[4][:7])])),
        (InvalidArgument, "repeated", dict(image_ids=[ids[3], ids[3]], vectors=X[3:5])),
        (InvalidArgument, "1 to 4096", dict(image_ids=ids[3:4], vectors=np.ones((1, 5000)))),
        (NotFound, "ghost", dict(image_ids=["ghost"], vectors=X[3:4])),
        (FailedPrecondition, "uses model", dict(image_ids=ids[3:4], vectors=X[3:4],
                                                model="megadescriptor")),
        (FailedPrecondition, "uses model", dict(image_ids=ids[3:4], vectors=X[3:4],
                                                model=f"{EXTERNAL}:2")),
        (InvalidArgument, "model.name", dict(image_ids=ids[3:4], vectors=X[3:4], model="")),
    ]
    for error, text, kwargs in cases:
        kwargs.setdefault("model", EXTERNAL)
        with pytest.raises(error, match=text):
            client.put_vectors("bad", **kwargs)
    after = client.get_vectors("bad")
    assert after.ids == before.ids
    np.testing.assert_array_equal(after.vectors, before.vectors)


def test_external_vectors_cannot_mix_into_a_triton_embedded_collection(client):
    pics = pictures()[:4]
    client.create_collection("mixed", clustering=SMALL)
    client.add_images("mixed", [(p.image_id, p.png) for p in pics])
    stored = client.get_vectors("mixed")
    with pytest.raises(FailedPrecondition, match="uses model"):
        client.put_vectors("mixed", [pics[0].image_id], np.ones((1, stored.vectors.shape[1])),
                           model=EXTERNAL)
    np.testing.assert_array_equal(client.get_vectors("mixed").vectors, stored.vectors)


def test_cli_puts_and_gets_vectors(server, client, tmp_path, capsys):
    pics = pictures()[:5]
    ids = [p.image_id for p in pics]
    client.create_collection("cli", model=EXTERNAL, clustering=SMALL)
    client.add_images("cli", [(p.image_id, p.png) for p in pics], defer_embedding=True)
    X = _external_vectors([p.identity for p in pics], dim=6)
    np.savez(tmp_path / "in.npz", ids=np.array(ids), vectors=X)
    srv = ["--server", server.address]
    assert main(["vectors", "put", "cli", str(tmp_path / "in.npz"), "--model", EXTERNAL,
                 *srv]) == 0
    assert main(["vectors", "get", "cli", "--out", str(tmp_path / "out.npz"), *srv]) == 0
    printed = capsys.readouterr().out
    assert f"stored 5 vector(s) of {EXTERNAL}:1" in printed
    with np.load(tmp_path / "out.npz") as out:
        assert list(out["ids"]) == ids and str(out["model"]) == f"{EXTERNAL}:1"
        np.testing.assert_allclose(out["vectors"], X / np.linalg.norm(X, axis=1)[:, None],
                                   atol=1e-6)
    np.savez(tmp_path / "nan.npz", ids=np.array(ids[:1]), vectors=np.full((1, 6), np.nan))
    assert main(["vectors", "put", "cli", str(tmp_path / "nan.npz"), "--model", EXTERNAL,
                 *srv]) != 0
    assert "NaN" in capsys.readouterr().err


def test_long_vectors_stream_in_messages_a_default_client_reads(server, client):
    """4096-component vectors: each GetVectors message stays within 1 MiB of components,
    so a plain grpc channel (4 MiB default receive limit) reads them all."""
    pics = pictures(n_individuals=14)  # 70 images: more than one message of 64
    ids = [p.image_id for p in pics]
    client.create_collection("long", model=EXTERNAL, clustering=SMALL)
    client.add_images("long", [(p.image_id, p.png) for p in pics], defer_embedding=True)
    X = np.random.default_rng(3).normal(size=(len(ids), 4096)).astype(np.float32)
    client.put_vectors("long", ids, X, model=EXTERNAL, batch_size=35)
    with grpc.insecure_channel(server.address) as ch:
        stub = collections_pb2_grpc.CollectionServiceStub(ch)
        messages = list(stub.GetVectors(collections_pb2.GetVectorsRequest(
            collection_id="long"), timeout=60))
    assert len(messages) >= 2
    assert all(4 * sum(len(v.vector) for v in m.vectors) <= MAX_VECTOR_BYTES_PER_MESSAGE
               for m in messages)
    got = np.array([list(v.vector) for m in messages for v in m.vectors], dtype=np.float32)
    assert [v.image_id for m in messages for v in m.vectors] == ids
    np.testing.assert_allclose(got, X / np.linalg.norm(X, axis=1, keepdims=True), atol=1e-6)


def test_store_add_vectors_on_both_backends(store_target):
    store = Store.open(store_target)
    try:
        store.collections.create("c", model_name=EXTERNAL)
        store.images.ingest("c", [ImageRecord(f"i{k}", "", "", {}) for k in range(3)], {})
        X = np.eye(3, 5, dtype=np.float32)
        store.images.add_vectors("c", EXTERNAL, "1", ["i0", "i1"], X[:2], actor="t")
        col = store.collections.get("c")
        assert (col.model_name, col.model_version) == (EXTERNAL, "1")
        with pytest.raises(StoreInvalidArgument, match="have 5"):
            store.images.add_vectors("c", EXTERNAL, "1", ["i2"], np.ones((1, 4), np.float32))
        with pytest.raises(StoreNotFound, match="ghost"):
            store.images.add_vectors("c", EXTERNAL, "1", ["ghost"], X[:1])
        with pytest.raises(StoreFailedPrecondition, match="uses model"):
            store.images.add_vectors("c", "other", "1", ["i2"], X[2:3])
        store.images.add_vectors("c", EXTERNAL, "1", ["i2"], X[2:3])
        ids, mat = store.images.vectors("c", EXTERNAL, "1")
        assert ids == ["i0", "i1", "i2"]
        np.testing.assert_array_equal(mat, X)
        assert [a["action"] for a in store.collections.audit_log("c")].count("add_vectors") == 2
    finally:
        store.close()
