"""Security over real loopback gRPC: TLS, mutual TLS, access tokens per collection and role,
the annotator recorded with answers, tokens kept out of the logs, message size limits.

Certificates are made at test time with the openssl command line (a throwaway CA, a server
certificate for 127.0.0.1 / localhost, client certificates, and a second CA nobody trusts);
no key is committed. No Triton: the embedding backend is a closed port, images are ingested
with defer_embedding and their vectors written to the store, which is all sampling needs.
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from _services_support import SMALL_CLUSTERING, ingest_message, pictures
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from reidal.auth import (
    METHOD_ROLES,
    TokenTable,
    add_entry,
    create_token,
    hash_token,
    load_tokens,
    parse_tokens,
)
from reidal.cli import main as cli_main
from reidal.logs import JsonFormatter
from reidal.serve import serve
from reidal.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    common_pb2,
    constraints_pb2,
    constraints_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
    sampling_pb2,
    sampling_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from reidal_client import PermissionDenied, ReidalClient, Unauthenticated

C, S, K, T, E = collections_pb2, sampling_pb2, constraints_pb2, training_pb2, embedding_pb2
OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
CLOSED_PORT = "127.0.0.1:1"  # the embedding backend: nothing listens, nothing is embedded

# ------------------------------------------------------------------------- certificates


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _make_ca(d: Path, name: str) -> None:
    _openssl(d, "req", "-x509", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _make_leaf(d: Path, name: str, ca: str, usage: str, serial: int) -> None:
    _openssl(d, "req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}")
    (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\n"
                                   f"extendedKeyUsage={usage}\n"
                                   "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
             f"{ca}.key", "-set_serial", str(serial), "-days", "2", "-out", f"{name}.pem",
             "-extfile", f"{name}.ext")


@dataclass(frozen=True)
class Pki:
    d: Path

    def pem(self, name: str) -> Path:
        return self.d / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.d / f"{name}.key"

    def read(self, name: str) -> bytes:
        return self.pem(name).read_bytes()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "rogue-ca")
    _make_leaf(d, "server", "ca", "serverAuth", 1)
    _make_leaf(d, "client", "ca", "clientAuth", 2)
    _make_leaf(d, "rogue-client", "rogue-ca", "clientAuth", 3)
    return Pki(d)


# ------------------------------------------------------------------------------ server

#: name -> (collections, role, annotator)
TOKENS = {
    "ops": ("*", "admin", ""),
    "a-admin": (["A", "C"], "admin", ""),
    "team-a": (["A"], "annotator", ""),
    "alice": (["A"], "annotator", "alice"),
    "reader-a": (["A"], "reader", ""),
}


@dataclass
class World:
    server: object
    tokens: dict[str, str]
    tokens_path: Path
    channel: grpc.Channel
    logs: io.StringIO
    pki: Pki
    truth: dict[str, str]
    job_a: str
    job_b: str

    @property
    def address(self) -> str:
        return f"localhost:{self.server.port}"

    @property
    def store(self):
        return self.server.runtime.store


def _tls_channel(address: str, pki: Pki, ca: str = "ca", **client: Path) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.read(ca),
        private_key=client["key"].read_bytes() if client else None,
        certificate_chain=client["cert"].read_bytes() if client else None)
    return grpc.secure_channel(address, creds)


def _md(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return None if token is None else (("authorization", f"Bearer {token}"),)


def code_of(method, request, token: str | None = None, *, raw_md=None) -> grpc.StatusCode:
    """The status of one call (the first message of a streaming response)."""
    try:
        out = method(request, metadata=raw_md if raw_md is not None else _md(token), timeout=10)
        if not hasattr(out, "DESCRIPTOR"):
            next(iter(out))
    except grpc.RpcError as exc:
        return exc.code()
    return OK


def _vectors(ids: list[str], truth: dict[str, str], seed: int) -> np.ndarray:
    """One noisy cluster per individual."""
    rng = np.random.default_rng(seed)
    names = sorted(set(truth.values()))
    centres = rng.normal(size=(len(names), 16))
    X = np.stack([centres[names.index(truth[i])] for i in ids])
    X += 0.6 * rng.normal(size=X.shape)  # loose enough for AAS to find ambiguous pairs
    return X / np.linalg.norm(X, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def world(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    d = tmp_path_factory.mktemp("secure-server")
    tokens, entries = {}, []
    for name, (cols, role, annotator) in TOKENS.items():
        tokens[name], entry = create_token(name, cols, role, annotator)
        entries.append(entry.to_json())
    tokens_path = d / "tokens.json"
    tokens_path.write_text(json.dumps({"tokens": entries}))

    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setFormatter(JsonFormatter())
    reidal_log = logging.getLogger("reidal")
    old_level = reidal_log.level
    reidal_log.setLevel(logging.DEBUG)
    reidal_log.addHandler(handler)

    server = serve(["embedding", "collections", "sampling", "constraints", "training"],
                   data_dir=d / "data", triton_url=CLOSED_PORT, model_name="m",
                   health_interval_s=60, tls_cert=pki.pem("server"), tls_key=pki.key("server"),
                   auth_tokens=tokens_path)
    channel = _tls_channel(f"localhost:{server.port}", pki)
    try:
        col = collections_pb2_grpc.CollectionServiceStub(channel)
        ops = _md(tokens["ops"])
        pics = pictures()[:16]
        truth = {p.image_id: p.identity for p in pics}
        for cid in ("A", "B"):
            col.CreateCollection(C.CreateCollectionRequest(
                collection_id=cid, clustering=SMALL_CLUSTERING), metadata=ops, timeout=10)
            col.AddImages(iter([ingest_message(cid, pics, defer=True)]), metadata=ops, timeout=30)
            ids = list(truth)
            server.runtime.store.collections.set_model(cid, "m", "1")
            server.runtime.store.images.put_vectors(cid, "m", "1", ids, _vectors(ids, truth, 0))
        store = server.runtime.store
        job_a = store.jobs.create("A", {}, base_model_name="m",
                                  base_model_version="1").job_id
        job_b = store.jobs.create("B", {}, base_model_name="m",
                                  base_model_version="1").job_id
        yield World(server, tokens, tokens_path, channel, logs, pki, truth, job_a, job_b)
    finally:
        channel.close()
        server.stop(grace=0)
        reidal_log.removeHandler(handler)
        reidal_log.setLevel(old_level)


@dataclass
class Stubs:
    col: collections_pb2_grpc.CollectionServiceStub
    samp: sampling_pb2_grpc.SamplingServiceStub
    cons: constraints_pb2_grpc.ConstraintServiceStub
    train: training_pb2_grpc.TrainingServiceStub
    emb: embedding_pb2_grpc.EmbeddingServiceStub


@pytest.fixture(scope="module")
def stubs(world: World) -> Stubs:
    ch = world.channel
    return Stubs(collections_pb2_grpc.CollectionServiceStub(ch),
                 sampling_pb2_grpc.SamplingServiceStub(ch),
                 constraints_pb2_grpc.ConstraintServiceStub(ch),
                 training_pb2_grpc.TrainingServiceStub(ch),
                 embedding_pb2_grpc.EmbeddingServiceStub(ch))


def _pair_answer(a: str, b: str, annotator: str = "") -> K.AnswerInput:
    return K.AnswerInput(images=K.ImagePair(image_a=a, image_b=b),
                         label=K.ANSWER_LABEL_SAME, annotator_id=annotator)


# ------------------------------------------------------------------------ tokens file


def test_tokens_file_holds_hashes_and_is_checked(tmp_path):
    token, entry = create_token("bob", ["A"], "reader")
    assert token.startswith("reidal_") and len(token) > 40
    assert entry.sha256 == hash_token(token) and token not in json.dumps(entry.to_json())
    assert TokenTable([entry]).lookup(token) == entry
    assert TokenTable([entry]).lookup(token + "x") is None
    other, _ = create_token("bob", ["A"], "reader")
    assert other != token  # random, not derived from the name

    good = entry.to_json()
    bad = {
        "plain token": {**good, "token": token},
        "sha256": {**good, "sha256": "abc"},
        "role": {**good, "role": "root"},
        "collections": {**good, "collections": []},
        "unknown key": {**good, "expires": "never"},
    }
    for problem, raw in bad.items():
        with pytest.raises(ValueError, match=problem.split()[-1]):
            parse_tokens([raw])
    with pytest.raises(ValueError, match="duplicate name"):
        parse_tokens([good, {**good, "sha256": hash_token("other")}])
    with pytest.raises(ValueError, match="duplicate sha256"):
        parse_tokens([good, {**good, "name": "bob2"}])
    with pytest.raises(ValueError, match="does not exist"):
        load_tokens(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="tokens file"):
        serve(["sampling"], data_dir=tmp_path, auth_tokens=tmp_path / "missing.json")
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        serve(["sampling"], data_dir=tmp_path, tls_cert=tmp_path / "x.pem")


def test_every_rpc_has_a_role():
    """A new RPC must be classified on purpose (unlisted methods need admin)."""
    from reidal.v1 import (
        collections_pb2 as c,
    )
    from reidal.v1 import (
        constraints_pb2 as k,
    )
    from reidal.v1 import (
        embedding_pb2 as e,
    )
    from reidal.v1 import (
        sampling_pb2 as s,
    )
    from reidal.v1 import (
        training_pb2 as t,
    )

    methods = {f"/{svc.full_name}/{m.name}" for mod in (c, k, e, s, t)
               for svc in mod.DESCRIPTOR.services_by_name.values() for m in svc.methods}
    assert len(methods) >= 29
    assert methods <= set(METHOD_ROLES), sorted(methods - set(METHOD_ROLES))


def test_token_create_cli(tmp_path, capsys):
    assert cli_main(["token", "create", "--name", "kiosk", "--collections", "A,B",
                     "--role", "reader"]) == 0
    token, line = capsys.readouterr().out.strip().splitlines()
    entry = json.loads(line)
    assert entry == {"name": "kiosk", "sha256": hash_token(token), "role": "reader",
                     "collections": ["A", "B"]}
    path = tmp_path / "tokens.json"
    assert cli_main(["token", "create", "--name", "ops", "--collections", "*", "--role",
                     "admin", "--tokens-file", str(path)]) == 0
    assert cli_main(["token", "create", "--name", "al", "--collections", "A",
                     "--annotator", "alice", "--tokens-file", str(path)]) == 0
    out = capsys.readouterr().out.split()
    assert len(out) == 2 and all(t not in path.read_text() for t in out)
    loaded = load_tokens(path)
    assert [(e.name, e.role, e.collections, e.annotator) for e in loaded] == [
        ("ops", "admin", None, ""), ("al", "annotator", frozenset({"A"}), "alice")]
    assert [TokenTable(loaded).lookup(t).name for t in out] == ["ops", "al"]
    assert cli_main(["token", "create", "--name", "al", "--collections", "A",
                     "--tokens-file", str(path)]) == 1  # duplicate name refused


# ---------------------------------------------------------------------------- TLS


def test_tls_plaintext_and_untrusted_clients_fail(world: World):
    def health(ch: grpc.Channel) -> grpc.StatusCode:
        return code_of(health_pb2_grpc.HealthStub(ch).Check, health_pb2.HealthCheckRequest())

    assert health(world.channel) == OK  # open without a token, over TLS
    with grpc.insecure_channel(world.address) as plain:
        assert health(plain) == grpc.StatusCode.UNAVAILABLE
    with _tls_channel(world.address, world.pki, ca="rogue-ca") as untrusting:
        assert health(untrusting) == grpc.StatusCode.UNAVAILABLE
    # Reflection stays open too (grpcurl discovery).
    refl = reflection_pb2_grpc.ServerReflectionStub(world.channel)
    [answer] = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]), timeout=10)
    assert "reidal.v1.CollectionService" in {
        s.name for s in answer.list_services_response.service}


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki: Pki, tmp_path):
    server = serve(["sampling"], data_dir=tmp_path, health_interval_s=60,
                   tls_cert=pki.pem("server"), tls_key=pki.key("server"),
                   tls_client_ca=pki.pem("ca"))
    address = f"127.0.0.1:{server.port}"
    request = S.GetQueryBatchRequest(collection_id="nope", batch_id="x")
    try:
        cases = {
            "no client cert": {},
            "rogue client cert": dict(cert=pki.pem("rogue-client"), key=pki.key("rogue-client")),
            "client cert": dict(cert=pki.pem("client"), key=pki.key("client")),
        }
        got = {}
        for name, client in cases.items():
            with _tls_channel(address, pki, **client) as ch:
                got[name] = code_of(sampling_pb2_grpc.SamplingServiceStub(ch).GetQueryBatch,
                                    request)
        assert got == {"no client cert": grpc.StatusCode.UNAVAILABLE,
                       "rogue client cert": grpc.StatusCode.UNAVAILABLE,
                       "client cert": grpc.StatusCode.NOT_FOUND}  # through to the handler
        with ReidalClient(address, tls_ca=pki.pem("ca"), tls_cert=pki.pem("client"),
                          tls_key=pki.key("client"), retries=0) as client:
            assert client.health() == "SERVING"
    finally:
        server.stop(grace=0)


# -------------------------------------------------------------------------- tokens


def test_missing_malformed_and_unknown_tokens_are_unauthenticated(world: World, stubs: Stubs):
    req = C.GetCollectionRequest(collection_id="A")
    revoked, _ = create_token("gone", ["A"], "admin")
    assert code_of(stubs.col.GetCollection, req) == UNAUTH
    assert code_of(stubs.col.GetCollection, req, revoked) == UNAUTH
    assert code_of(stubs.col.GetCollection, req, world.tokens["ops"] + "x") == UNAUTH
    assert code_of(stubs.col.GetCollection, req,
                   raw_md=(("authorization", f"Basic {world.tokens['ops']}"),)) == UNAUTH
    assert code_of(stubs.col.GetCollection, req, raw_md=(("authorization", "Bearer "),)) == UNAUTH
    assert code_of(stubs.col.GetCollection, req, world.tokens["team-a"]) == OK
    # Streaming requests and the embedding service too.
    assert code_of(stubs.col.AddImages, iter([ingest_message("A", pictures()[:1])])) == UNAUTH
    assert code_of(stubs.emb.ListModels, E.ListModelsRequest()) == UNAUTH
    # The embedding service takes any valid token (it then fails on the closed Triton port).
    assert code_of(stubs.emb.ListModels, E.ListModelsRequest(),
                   world.tokens["reader-a"]) not in (UNAUTH, DENIED)


def test_collections_reaches_a_separate_embedding_service_with_tls_and_token(world: World):
    """The channel a collections service opens to ``--embedding-url`` carries both."""
    from reidal.errors import RemoteError
    from reidal.services.embedding_client import RemoteEmbedder
    from reidal.tls import channel_credentials

    def code(**kw) -> tuple[grpc.StatusCode, str]:
        embedder = RemoteEmbedder(world.address, "m", timeout_s=10, **kw)
        try:
            embedder.model()
        except RemoteError as exc:  # the embedding service's status, code and words kept
            return grpc.StatusCode[exc.code], exc.detail
        finally:
            embedder.close()
        return OK, ""

    creds = channel_credentials(world.pki.pem("ca"))
    no_tls = code(token=world.tokens["reader-a"])
    assert no_tls[0] == grpc.StatusCode.UNAVAILABLE and "Triton" not in no_tls[1]
    assert code(credentials=creds)[0] == UNAUTH
    # Both: through to the embedding service, which then cannot reach its Triton.
    reached = code(credentials=creds, token=world.tokens["reader-a"])
    assert reached[0] == grpc.StatusCode.UNAVAILABLE and "Triton at" in reached[1], reached


def test_cli_client_commands_over_tls_with_a_token(world: World, tmp_path, monkeypatch, capsys):
    server = ["--server", world.address, "--tls-ca", str(world.pki.pem("ca")), "--retries", "0"]
    monkeypatch.setenv("REIDAL_TOKEN", world.tokens["team-a"])
    assert cli_main(["collection", "list", *server]) == 0
    listed = capsys.readouterr().out
    assert "A" in listed.split() and "B" not in listed.split()
    assert cli_main(["collection", "show", "B", *server]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    monkeypatch.delenv("REIDAL_TOKEN")
    assert cli_main(["collection", "show", "A", *server]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    token_file = tmp_path / "token"
    token_file.write_text(world.tokens["ops"] + "\n")
    assert cli_main(["collection", "show", "B", *server, "--token-file", str(token_file)]) == 0


def _calls_on(cid: str, w: World) -> dict[str, tuple]:
    """Every collection-scoped call, as (stub method name, request)."""
    img = list(w.truth)
    return {
        "GetCollection": ("col", C.GetCollectionRequest(collection_id=cid)),
        "ListImages": ("col", C.ListImagesRequest(collection_id=cid)),
        "AddImages": ("col", iter([ingest_message(cid, pictures()[16:17], defer=True)])),
        "EmbedCollection": ("col", C.EmbedCollectionRequest(collection_id=cid)),
        "DeleteCollection": ("col", C.DeleteCollectionRequest(collection_id=cid)),
        "DeleteImage": ("col", C.DeleteImageRequest(collection_id=cid, image_id=img[5])),
        "GetQueryPairs": ("samp", S.GetQueryPairsRequest(collection_id=cid,
                                                         budget=C.Budget(count=3))),
        "StartQueryPairs": ("samp", S.GetQueryPairsRequest(collection_id=cid,
                                                           budget=C.Budget(count=3))),
        "GetQueryBatch": ("samp", S.GetQueryBatchRequest(collection_id=cid, batch_id="x")),
        "WatchQueue": ("samp", S.WatchQueueRequest(collection_id=cid)),
        "SubmitConstraints": ("cons", K.SubmitConstraintsRequest(
            collection_id=cid, answers=[_pair_answer(img[0], img[1])])),
        "ListConstraints": ("cons", K.ListConstraintsRequest(collection_id=cid)),
        "DeleteConstraint": ("cons", K.DeleteConstraintRequest(collection_id=cid,
                                                               answer_id="1")),
        "ExcludeImage": ("cons", K.ExcludeImageRequest(collection_id=cid, image_id=img[2])),
        "RestoreImage": ("cons", K.RestoreImageRequest(collection_id=cid, image_id=img[2])),
        "GetIdentities": ("cons", K.GetIdentitiesRequest(collection_id=cid)),
        "StartTraining": ("train", T.StartTrainingRequest(collection_id=cid)),
        "ListTrainingJobs": ("train", T.ListTrainingJobsRequest(collection_id=cid)),
        "PromoteModel": ("train", T.PromoteModelRequest(
            collection_id=cid, model=common_pb2.ModelRef(name="m", version="1"))),
    }


def test_a_token_for_A_can_neither_read_nor_write_B(world: World, stubs: Stubs):
    store = world.store
    before = (store.collections.counts("B"), store.images.excluded("B"), len(store.images.all("B")),
              len(store.batches.all("B")), len(store.operations.all("B")),
              len(store.jobs.all("B")))
    # a-admin may call every method, but only on A and C.
    got = {name: code_of(getattr(getattr(stubs, svc), name), req, world.tokens["a-admin"])
           for name, (svc, req) in _calls_on("B", world).items()}
    assert got == dict.fromkeys(got, DENIED)
    after = (store.collections.counts("B"), store.images.excluded("B"), len(store.images.all("B")),
             len(store.batches.all("B")), len(store.operations.all("B")),
             len(store.jobs.all("B")))
    assert after == before  # nothing about B changed
    # The same token works on A (reads and the annotation loop; writes are checked below).
    ok = {"GetCollection", "ListImages", "GetQueryPairs", "SubmitConstraints",
          "ListConstraints", "GetIdentities", "ListTrainingJobs", "ExcludeImage",
          "RestoreImage"}
    calls = _calls_on("A", world)
    got_a = {name: code_of(getattr(getattr(stubs, calls[name][0]), name), calls[name][1],
                           world.tokens["a-admin"]) for name in sorted(ok)}
    assert got_a == dict.fromkeys(got_a, OK)
    # An AddImages stream that switches collection is refused at the message naming B.
    msgs = [C.AddImagesRequest(collection_id="A"),
            ingest_message("B", pictures()[18:19], defer=True)]
    assert code_of(stubs.col.AddImages, iter(msgs), world.tokens["a-admin"]) == DENIED
    assert len(store.images.all("B")) == before[2]


def test_operations_and_jobs_of_B_are_out_of_reach(world: World, stubs: Stubs):
    ops, team = world.tokens["ops"], world.tokens["team-a"]
    op = world.store.operations.create("op-of-b", "B", "embed_collection")
    get_op = C.GetOperationRequest(operation_id=op.operation_id)
    assert code_of(stubs.col.GetOperation, get_op, ops) == OK
    assert code_of(stubs.col.GetOperation, get_op, team) == DENIED
    assert code_of(stubs.col.WatchOperation, get_op, team) == DENIED
    assert code_of(stubs.col.GetOperation, C.GetOperationRequest(operation_id="nope"),
                   team) == grpc.StatusCode.NOT_FOUND  # unknown: same answer for everyone
    assert code_of(stubs.train.GetJob, T.GetJobRequest(job_id=world.job_b), team) == DENIED
    assert code_of(stubs.train.GetJob, T.GetJobRequest(job_id=world.job_a), team) == OK
    # Refused before the handler runs (a cancel must not happen and then be hidden).
    with pytest.raises(grpc.RpcError) as denied:
        stubs.train.CancelJob(T.CancelJobRequest(job_id=world.job_b),
                              metadata=_md(world.tokens["a-admin"]), timeout=10)
    assert denied.value.code() == DENIED
    assert denied.value.details() == (f"token 'a-admin' may not use collection 'B' "
                                      f"(it owns job_id {world.job_b!r})")
    assert world.store.jobs.get(world.job_b).state.upper() == "QUEUED"
    # Lists hold only the token's collections.
    listed = stubs.train.ListTrainingJobs(T.ListTrainingJobsRequest(), metadata=_md(team),
                                          timeout=10)
    assert [j.job_id for j in listed.jobs] == [world.job_a]
    every = stubs.train.ListTrainingJobs(T.ListTrainingJobsRequest(), metadata=_md(ops),
                                         timeout=10)
    assert {world.job_a, world.job_b} <= {j.job_id for j in every.jobs}
    mine = stubs.col.ListCollections(C.ListCollectionsRequest(), metadata=_md(team), timeout=10)
    assert [c.collection_id for c in mine.collections] == ["A"]
    allc = stubs.col.ListCollections(C.ListCollectionsRequest(), metadata=_md(ops), timeout=10)
    assert {"A", "B"} <= {c.collection_id for c in allc.collections}


def test_roles(world: World, stubs: Stubs):
    t = world.tokens
    img = list(world.truth)
    submit = K.SubmitConstraintsRequest(collection_id="A",
                                        answers=[_pair_answer(img[3], img[4])])
    assert code_of(stubs.cons.SubmitConstraints, submit, t["reader-a"]) == DENIED
    assert code_of(stubs.samp.GetQueryPairs, S.GetQueryPairsRequest(
        collection_id="A", budget=C.Budget(count=2)), t["reader-a"]) == DENIED
    assert code_of(stubs.col.GetCollection, C.GetCollectionRequest(collection_id="A"),
                   t["reader-a"]) == OK
    for name in ("DeleteCollection", "DeleteImage", "AddImages", "EmbedCollection",
                 "StartTraining"):
        svc, req = _calls_on("A", world)[name]
        assert code_of(getattr(getattr(stubs, svc), name), req, t["team-a"]) == DENIED, name
    assert world.store.collections.get("A").id == "A"
    # An admin of A and C creates and deletes C, but not D.
    new = lambda cid: C.CreateCollectionRequest(collection_id=cid)  # noqa: E731
    assert code_of(stubs.col.CreateCollection, new("C"), t["a-admin"]) == OK
    assert code_of(stubs.col.CreateCollection, new("D"), t["a-admin"]) == DENIED
    assert code_of(stubs.col.DeleteCollection, C.DeleteCollectionRequest(collection_id="C"),
                   t["a-admin"]) == OK


def test_annotator_recorded_with_every_answer(world: World, stubs: Stubs):
    t = world.tokens
    img = list(world.truth)

    def submit(token: str, a: int, b: int, annotator: str = "") -> grpc.StatusCode:
        return code_of(stubs.cons.SubmitConstraints, K.SubmitConstraintsRequest(
            collection_id="A", answers=[_pair_answer(img[a], img[b], annotator)]), token)

    assert submit(t["alice"], 5, 6) == OK  # filled with the token's pinned annotator
    assert submit(t["alice"], 5, 7, "alice") == OK
    assert submit(t["alice"], 5, 8, "bob") == DENIED  # may not answer as someone else
    assert submit(t["team-a"], 6, 7) == OK  # unpinned: the token's name
    assert submit(t["team-a"], 6, 8, "carol") == OK  # unpinned: the given name stands
    stored = {(a.image_a, a.image_b): a.annotator for a in world.store.answers.all("A")}

    def who(a: int, b: int) -> str | None:
        return stored.get(tuple(sorted((img[a], img[b]))))

    assert [who(5, 6), who(5, 7), who(5, 8), who(6, 7), who(6, 8)] == [
        "alice", "alice", None, "team-a", "carol"]
    # The actor of an audited action is recorded the same way.
    assert code_of(stubs.cons.ExcludeImage, K.ExcludeImageRequest(
        collection_id="A", image_id=img[9]), t["alice"]) == OK
    assert code_of(stubs.cons.RestoreImage, K.RestoreImageRequest(
        collection_id="A", image_id=img[9], actor="mallory"), t["alice"]) == DENIED
    audit = json.dumps(world.store.collections.audit_log("A"), default=str)
    assert "alice" in audit and "mallory" not in audit


def test_typed_client_over_tls_with_a_token(world: World):
    with ReidalClient(world.address, tls_ca=world.pki.pem("ca"), token=world.tokens["team-a"],
                      retries=0) as client:
        assert client.get_collection("A").collection_id == "A"
        assert [c.collection_id for c in client.list_collections()] == ["A"]
        batch = client.get_query_pairs("A", 4)
        assert 0 < len(batch.pairs) <= 4
        same = [world.truth[p.image_a] == world.truth[p.image_b] for p in batch.pairs]
        result = client.submit_answers("A", [(p.pair_id, "same" if s else "different")
                                             for p, s in zip(batch.pairs, same, strict=True)],
                                       batch_id=batch.batch_id)
        assert result.stored_count == len(batch.pairs)
        with pytest.raises(PermissionDenied, match="collection 'B'"):
            client.get_collection("B")
    with ReidalClient(world.address, tls_ca=world.pki.pem("ca"), retries=0) as anonymous:
        with pytest.raises(Unauthenticated):
            anonymous.get_collection("A")
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        ReidalClient(world.address, tls_ca=world.pki.pem("ca"), tls_cert=world.pki.pem("client"))


def test_tokens_file_reloads_without_restart(world: World, stubs: Stubs):
    req = C.GetCollectionRequest(collection_id="A")
    token, entry = create_token("late", ["A"], "reader")
    assert code_of(stubs.col.GetCollection, req, token) == UNAUTH
    add_entry(world.tokens_path, entry)
    assert code_of(stubs.col.GetCollection, req, token) == OK
    # A file that no longer parses keeps the tokens in force; removing the entry revokes.
    good = world.tokens_path.read_text()
    world.tokens_path.write_text("{not json")
    assert code_of(stubs.col.GetCollection, req, token) == OK
    doc = json.loads(good)
    doc["tokens"] = [e for e in doc["tokens"] if e["name"] != "late"]
    world.tokens_path.write_text(json.dumps(doc))
    assert code_of(stubs.col.GetCollection, req, token) == UNAUTH
    assert code_of(stubs.col.GetCollection, req, world.tokens["team-a"]) == OK
    # Deleting the file revokes every token (fail closed); putting it back restores them.
    kept = world.tokens_path.read_text()
    world.tokens_path.unlink()
    try:
        assert code_of(stubs.col.GetCollection, req, world.tokens["team-a"]) == UNAUTH
    finally:
        world.tokens_path.write_text(kept)
    assert code_of(stubs.col.GetCollection, req, world.tokens["team-a"]) == OK


def test_logs_never_hold_a_token(world: World, stubs: Stubs):
    req = C.GetCollectionRequest(collection_id="B")
    assert code_of(stubs.col.GetCollection, req, world.tokens["team-a"]) == DENIED
    assert code_of(stubs.col.GetCollection, req, world.tokens["ops"] + "wrong") == UNAUTH
    assert code_of(stubs.col.GetCollection, req, world.tokens["ops"]) == OK
    lines = [json.loads(line) for line in world.logs.getvalue().splitlines()]
    rpcs = [r for r in lines if r.get("event") == "rpc"]
    assert {"OK", "PERMISSION_DENIED", "UNAUTHENTICATED"} <= {r["code"] for r in rpcs}
    text = world.logs.getvalue()
    for token in world.tokens.values():
        assert token not in text
        assert token[len("reidal_"):][:12] not in text
    assert re.search(r"Bearer (?!<token>)", text) is None
    assert re.search(r"reidal_[A-Za-z0-9_-]{20}", text) is None


# ---------------------------------------------------------------------- size limits


def test_message_size_limit_applies_both_ways(tmp_path):
    limit_mb = 0.25
    server = serve(["collections", "constraints"], data_dir=tmp_path, triton_url=CLOSED_PORT,
                   model_name="m", health_interval_s=60, max_message_mb=limit_mb)
    try:
        with grpc.insecure_channel(server.address) as ch:
            col = collections_pb2_grpc.CollectionServiceStub(ch)
            col.CreateCollection(C.CreateCollectionRequest(collection_id="big"), timeout=10)
            limit = int(limit_mb * 1024 * 1024)
            huge = C.AddImagesRequest(collection_id="big", defer_embedding=True, images=[
                C.IngestImage(image=common_pb2.Image(id="x", data=b"\0" * (limit + 1)))])
            assert code_of(col.AddImages, iter([huge])) == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Each request fits, the answer listing them all does not.
            png = pictures()[0].png
            meta = {f"k{j}": "v" * 1000 for j in range(40)}  # ~40 KB per image
            msgs = [C.AddImagesRequest(collection_id="big", defer_embedding=True, images=[
                C.IngestImage(image=common_pb2.Image(id=f"i{k}", data=png), metadata=meta)])
                for k in range(8)]
            assert all(m.ByteSize() < limit for m in msgs)
            assert col.AddImages(iter(msgs), timeout=30).added == 8
            assert code_of(col.ListImages, C.ListImagesRequest(collection_id="big", page_size=2)) \
                == OK
            assert code_of(col.ListImages, C.ListImagesRequest(collection_id="big", page_size=8)) \
                == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.stop(grace=0)
