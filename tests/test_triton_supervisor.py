"""The bundled Triton is supervised: killed with SIGKILL, it comes back without a reidal
restart (reidal.triton_supervisor), with no zombie left and health following it."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import psutil
import pytest
from _services_support import pictures
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reidal.embedding.triton_repo import write_model_repository
from reidal.serve import serve
from reidal.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc

EMBEDDING = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _embed(stub: embedding_pb2_grpc.EmbeddingServiceStub, model: str = "",
           version: str = "") -> embedding_pb2.EmbedResponse:
    return stub.Embed(embedding_pb2.EmbedRequest(
        images=[common_pb2.Image(id=p.image_id, data=p.png) for p in pictures()[:2]],
        model=common_pb2.ModelRef(name=model, version=version)), timeout=30)


def _watch_health(channel: grpc.Channel, seen: list[int]) -> grpc.Future:
    call = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=EMBEDDING))

    def follow() -> None:
        try:
            for answer in call:
                seen.append(answer.status)
        except grpc.RpcError:
            pass  # cancelled at the end of the test

    threading.Thread(target=follow, daemon=True).start()
    return call


def _is_zombie(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_killed_triton_is_restarted_and_health_follows(tmp_path):
    srv = serve(["embedding"], data_dir=tmp_path, health_interval_s=0.3)
    triton = srv._started.triton
    channel = grpc.insecure_channel(srv.address)
    seen: list[int] = []
    watch = None
    try:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        before = _embed(stub)
        # a second model loaded after the start (as training loads new versions): the
        # restart must load it again, not only the model the server was started with
        write_model_repository(triton.model_repository, model_name="other")
        triton.load_model("other")
        assert _embed(stub, "other").model_name == "other"
        watch = _watch_health(channel, seen)

        old = psutil.Process(triton.pid)
        stubs = old.children(recursive=True)  # the python-backend stubs
        os.kill(old.pid, signal.SIGKILL)

        deadline = time.monotonic() + 240  # generous: a restart on a loaded machine
        while True:
            try:
                after = _embed(stub)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                assert time.monotonic() < deadline, "embedding did not come back"
                time.sleep(0.5)
        assert triton.pid != old.pid and triton.running
        assert not _is_zombie(old), "the killed Triton was left a zombie"
        assert not [p for p in stubs if p.is_running() and not _is_zombie(p)]
        assert (after.model_name, after.model_version) == (before.model_name,
                                                          before.model_version)
        assert list(after.embeddings[0].vector) == pytest.approx(
            list(before.embeddings[0].vector), abs=1e-5)
        assert _embed(stub, "other", "1").model_name == "other"  # loaded again, ready
        while not seen or seen[-1] != SERVING:
            assert time.monotonic() < deadline, f"health stayed {seen}"
            time.sleep(0.1)
        # health left SERVING while Triton was down, and came back
        assert seen[0] == SERVING and NOT_SERVING in seen, seen
    finally:
        if watch is not None:
            watch.cancel()
        channel.close()
        srv.stop(grace=1)
    assert not triton.running
    time.sleep(2)  # a stopped Triton stays stopped: the supervisor does not restart it
    assert not triton.running and triton.pid is None
