"""reidal.serve: services alone or together, metrics, graceful stop, the bundled Triton."""

from __future__ import annotations

import argparse
import dataclasses
import io
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from _model_support import default_model_vectors
from _services_support import (
    Stubs,
    by_images,
    create_and_fill,
    in_flight,
    ingest_message,
    oracle_answers,
    pictures,
    wait_in_flight,
)
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from reidal.cli import build_parser
from reidal.embedding.preprocess import preprocess
from reidal.embedding.spec import DEFAULT_INPUT_SIZE
from reidal.serve import SERVICES, resolve_services, serve
from reidal.serve_config import ServeConfig
from reidal.store import ImageRecord, Store
from reidal.v1 import (
    collections_pb2,
    constraints_pb2,
    embedding_pb2,
    embedding_pb2_grpc,
    sampling_pb2,
)

C, S, K = collections_pb2, sampling_pb2, constraints_pb2
E, E_grpc = embedding_pb2, embedding_pb2_grpc


def _listed_services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        [answer] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), timeout=10)
        return {s.name for s in answer.list_services_response.service if s.name.startswith("reidal")}


def test_service_names_and_bad_combinations(tmp_path):
    assert resolve_services("all") == list(SERVICES)
    assert resolve_services(["constraints", "sampling"]) == ["sampling", "constraints"]
    with pytest.raises(ValueError, match="unknown service.*'nope'"):
        resolve_services(["nope"])
    with pytest.raises(ValueError, match="data_dir"):
        serve(["sampling"])
    with pytest.raises(ValueError, match="triton_url, embedding_url or start_triton"):
        serve(["collections"], data_dir=tmp_path, start_triton=False)
    with pytest.raises(ValueError, match="not embedding_url"):
        serve(["embedding"], embedding_url="127.0.0.1:1")


def test_serve_flags_and_environment_map_onto_one_config(tmp_path):
    """`reidal serve`'s flags, the REIDAL_* variables and the library's defaults meet in one
    ServeConfig: a bare `reidal serve` keeps the library's tuning defaults, each flag lands
    on its field, the environment fills what no flag gives, and serve() takes the config."""
    parser = build_parser()
    bare, library = ServeConfig.from_args(parser.parse_args(["serve"]), environ={}), ServeConfig()
    for name in ("max_workers", "max_message_mb", "decode_budget_mb", "decode_wait_s",
                 "model_name", "metrics_port", "database_url", "embedding_token"):
        assert getattr(bare, name) == getattr(library, name), name
    assert (bare.address, bare.data_dir, bare.http_port, bare.start_triton) == \
        ("127.0.0.1:50051", "reidal-data", 8080, True)
    args = parser.parse_args([
        "serve", "--service", "collections", "sampling", "constraints", "--host", "0.0.0.0",
        "--port", "0", "--workers", "4", "--embedding-url", "emb:50051", "--model", "m",
        "--metrics-port", "9090", "--image-roots", "/a,/b", "--max-message-mb", "8",
        "--database-url", "postgresql://r@db/x", "--no-http"])
    c = ServeConfig.from_args(args, environ={"REIDAL_EMBEDDING_TOKEN": " tok "})
    assert (c.services, c.address, c.max_workers, c.embedding_url, c.start_triton) == \
        (("collections", "sampling", "constraints"), "0.0.0.0:0", 4, "emb:50051", False)
    assert (c.model_name, c.metrics_port, c.image_roots, c.max_message_mb) == \
        ("m", 9090, ["/a", "/b"], 8.0)
    assert (c.database_url, c.http_port, c.embedding_token) == ("postgresql://r@db/x", None, "tok")
    env = ServeConfig.from_env({"REIDAL_DATABASE_URL": "postgresql://e/x",
                                "REIDAL_IMAGE_ROOTS": "/r,,/s", "REIDAL_EMBEDDING_TOKEN": ""},
                               data_dir=tmp_path)
    assert (env.database_url, env.image_roots, env.embedding_token, env.data_dir) == \
        ("postgresql://e/x", ["/r", "/s"], None, tmp_path)
    assert env.replace(data_dir=None).data_dir is None and env.data_dir == tmp_path
    with pytest.raises(ValueError, match="data_dir"):
        serve(ServeConfig(services=("sampling",)))
    with pytest.raises(ValueError, match="data_dir"):
        serve(ServeConfig(services=("sampling",), data_dir=tmp_path), data_dir=None)
    with pytest.raises(TypeError, match="no_such_option"):
        serve(["sampling"], data_dir=tmp_path, no_such_option=1)


def _serve_parser() -> argparse.ArgumentParser:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices["serve"]


def test_every_serve_config_field_has_a_flag_and_every_flag_a_field():
    """ServeConfig is the one declaration of `reidal serve`'s settings: each field has
    its flag(s) or says why it has none (a Python object, a secret, a derived value), each
    flag of `reidal serve` belongs to exactly one field, and `reidal serve --help` lists
    every flag with its help. A setting added beside ServeConfig (a hand-written
    add_argument) or a field added without a flag fails here."""
    fields = dataclasses.fields(ServeConfig)
    declared: dict[str, str] = {}
    for f in fields:
        flags, reason = f.metadata.get("flags"), f.metadata.get("no_flag")
        assert flags or reason, f"ServeConfig.{f.name} has no flag and no reason for none"
        for flag in flags or ():
            assert flag.help.strip(), f"{flag.name} of ServeConfig.{f.name} has no help"
            assert flag.name not in declared, f"{flag.name} declared twice"
            declared[flag.name] = f.name
    parser = _serve_parser()
    options = {o for a in parser._actions for o in a.option_strings} - {"-h", "--help"}
    assert options == set(declared), (
        f"flags without a field: {sorted(options - set(declared))}; "
        f"fields' flags not on `reidal serve`: {sorted(set(declared) - options)}")
    text = parser.format_help()
    for action in parser._actions:
        assert action.help and action.help.strip(), action.option_strings
        assert all(o in text for o in action.option_strings)
    # every field the command line can set is set by it: a flag per field, read back
    args = parser.parse_args(["--max-concurrent-rpcs", "7", "--health-interval-s", "9",
                              "--embed-batch-size", "5", "--operation-workers", "3",
                              "--triton-startup-timeout-s", "11", "--grace", "2",
                              "--log-level", "WARNING", "--log-json", "--tls-cert", "c.pem"])
    c = ServeConfig.from_args(args, environ={})
    assert (c.max_concurrent_rpcs, c.health_interval_s, c.embed_batch_size,
            c.operation_workers, c.triton_startup_timeout_s, c.grace_s) == (7, 9.0, 5, 3,
                                                                            11.0, 2.0)
    assert (c.log_level, c.log_json, c.tls_cert) == ("WARNING", True, "c.pem")


def test_each_service_alone_on_one_data_directory(triton, tmp_path):
    """Four processes' worth of servers, one service each: collections embeds through the
    separate embedding server, the others share its data directory."""
    kw = dict(data_dir=tmp_path, health_interval_s=60)
    embedding = serve(["embedding"], triton_url=triton.grpc_url, health_interval_s=60)
    servers = [embedding, serve(["collections"], embedding_url=embedding.address, **kw),
               serve(["sampling"], **kw), serve(["constraints"], **kw)]
    try:
        assert [_listed_services(s.address) for s in servers] == [
            {"reidal.v1.EmbeddingService"}, {"reidal.v1.CollectionService"},
            {"reidal.v1.SamplingService"}, {"reidal.v1.ConstraintService"}]
        col, samp, cons = (Stubs.connect(s.address) for s in servers[1:])
        pics = pictures()[:16]
        truth = {p.image_id: p.identity for p in pics}
        create_and_fill(col, "shared", pics)
        batch = samp.sampling.GetQueryPairs(S.GetQueryPairsRequest(
            collection_id="shared", budget=C.Budget(count=4)))
        out = cons.constraints.SubmitConstraints(K.SubmitConstraintsRequest(
            collection_id="shared", batch_id=batch.batch_id, answers=oracle_answers(batch, truth)))
        assert out.stored_count == len(batch.pairs)
        got = col.collections.GetCollection(C.GetCollectionRequest(collection_id="shared"))
        assert (got.image_count, got.cycle, got.answer_count) == (16, 1, len(batch.pairs))
        assert (got.model.name, got.model.version) == (triton.model_name, "1")
        # Vectors through the remote embedding service are the served model's.
        ids, X = servers[1].runtime.store.images.vectors("shared", triton.model_name, "1")
        ref = triton.reference(preprocess([Image.open(io.BytesIO(p.png)).convert("RGB")
                                           for p in pics[:4]], triton.spec))
        assert ids == [p.image_id for p in pics]
        np.testing.assert_allclose(X[:4], ref, atol=1e-4)
        err = None
        try:
            col.sampling.GetQueryPairs(S.GetQueryPairsRequest(collection_id="shared"))
        except grpc.RpcError as exc:
            err = exc
        assert err is not None and err.code() == grpc.StatusCode.UNIMPLEMENTED
        for s in (col, samp, cons):
            s.close()
    finally:
        for s in servers:
            s.stop(grace=1)


def test_metrics_endpoint_and_graceful_stop_with_open_watchers(tmp_path):
    store = Store(tmp_path)  # a collection made by an earlier process
    store.collections.create("w")
    store.images.add("w", [ImageRecord(f"i{k}") for k in range(3)])
    store.operations.create("op-interrupted", "w", "sample")
    store.close()
    srv = serve(["sampling", "constraints"], data_dir=tmp_path, metrics_port=0,
                metrics_addr="127.0.0.1", health_interval_s=60)
    s = Stubs.connect(srv.address)
    try:
        s.constraints.SubmitConstraints(K.SubmitConstraintsRequest(
            collection_id="w", answers=[by_images("i0", "i1", True)]))
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics",
                                    timeout=10) as resp:
            text = resp.read().decode()
        for name in ("reidal_rpc_total", "reidal_answers_stored_total", "reidal_pairs_asked",
                     "reidal_cycle_seconds"):
            assert name in text, name
        # The operation that was running when the earlier process died is failed, not lost.
        record = srv.runtime.store.operations.get("op-interrupted")
        assert (record.state, record.error_code) == ("FAILED", "ABORTED")

        errors: list[grpc.RpcError] = []

        def watch() -> None:
            try:
                list(s.sampling.WatchQueue(S.WatchQueueRequest(collection_id="w"), timeout=60))
            except grpc.RpcError as exc:
                errors.append(exc)

        watching = in_flight("reidal.v1.SamplingService", "WatchQueue")
        watcher = threading.Thread(target=watch)
        watcher.start()
        wait_in_flight("reidal.v1.SamplingService", "WatchQueue", watching + 1)
        tic = time.perf_counter()
        srv.stop(grace=20)
        watcher.join(timeout=30)
        assert time.perf_counter() - tic < 10, "an open WatchQueue held the stop for its grace"
        assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE
        assert "after_cycle=0" in errors[0].details()
    finally:
        s.close()
        srv.stop(grace=1)


@pytest.mark.slow
def test_start_triton_writes_the_model_repository_and_stops_it(tmp_path):
    """A new data directory gets the default model, 224 px, served by the real Triton; the
    vectors are those of the torch model at that size."""
    srv = serve(["embedding", "collections"], data_dir=tmp_path, health_interval_s=60)
    triton = srv._started.triton
    pics = pictures()[:4]
    try:
        assert (tmp_path / "model_repository" / "reidal_embedder" / "config.pbtxt").exists()
        assert triton is not None and triton.running and srv.triton_url == triton.grpc_url
        s = Stubs.connect(srv.address)
        info = E_grpc.EmbeddingServiceStub(s.channel).GetModel(E.GetModelRequest(), timeout=120)
        assert (info.name, info.input_height, info.input_width) == (
            "reidal_embedder", *DEFAULT_INPUT_SIZE)
        s.collections.CreateCollection(C.CreateCollectionRequest(collection_id="t"))
        added = s.collections.AddImages(iter([ingest_message("t", pics)]), timeout=120)
        assert (added.embedded, added.model.name, added.model.version) == (
            4, "reidal_embedder", "1")
        got = [list(v.vector) for r in s.collections.GetVectors(
            C.GetVectorsRequest(collection_id="t"), timeout=60) for v in r.vectors]
        s.close()
    finally:
        srv.stop(grace=1)
    assert not triton.running
    np.testing.assert_allclose(np.array(got, np.float32), default_model_vectors(
        [p.png for p in pics], DEFAULT_INPUT_SIZE), atol=1e-4, rtol=0)
