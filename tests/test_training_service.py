"""TrainingService over real gRPC with the real Triton: train, export, load, promote, cancel."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
from _services_support import Stubs, create_and_fill, pictures, rpc_error, running_server

from reidal.embedding.triton_repo import model_versions
from reidal.embedding.triton_server import free_ports
from reidal.serve import serve
from reidal.store import Store
from reidal.training_jobs import FAILED, INTERRUPTED, RUNNING
from reidal.v1 import collections_pb2, common_pb2, training_pb2, training_pb2_grpc
from reidal_client.types import TrainingJob

#: A job small enough for a test: one epoch of two steps on batches of 4 x 2 images.
TINY = dict(epochs=1, iters_per_epoch=2, num_identities=4, num_instances=2, min_samples=2,
            k1=6, k2=2)


@pytest.fixture(scope="module", autouse=True)
def _restore_triton_index(triton):
    """Triton's repository index keeps unloaded versions (state UNAVAILABLE) until it
    restarts: restart it once after this module when a test added a version, so later
    tests see the shared server as they would without this module."""
    before = model_versions(triton.repo, triton.model_name)
    touched = []

    yield touched
    if touched or model_versions(triton.repo, triton.model_name) != before:
        triton.server.restart()


@contextmanager
def _repository_kept(triton, touched: list) -> Iterator[None]:
    """Afterwards, put the shared repository back: only the versions it had, Triton
    serving them (``touched`` collects the versions removed)."""
    before = model_versions(triton.repo, triton.model_name)
    yield
    added = [v for v in model_versions(triton.repo, triton.model_name) if v not in before]
    touched.extend(added)
    for v in added:
        shutil.rmtree(triton.repo / triton.model_name / str(v))
    if added:
        triton.server.load_model(triton.model_name)  # unloads the removed versions
        assert _version_ready(triton, "1")
        assert not any(_version_ready(triton, str(v)) for v in added)


@pytest.fixture()
def server(triton, tmp_path, _restore_triton_index):
    with _repository_kept(triton, _restore_triton_index), \
            running_server(triton, tmp_path / "data", model_repository=triton.repo,
                           image_roots=[tmp_path]) as srv:
        stubs = Stubs.connect(srv.address)
        training = training_pb2_grpc.TrainingServiceStub(stubs.channel)
        try:
            yield srv, stubs, training
        finally:
            stubs.close()


def _watch_to_end(training, job_id: str) -> list[training_pb2.TrainingJob]:
    return list(training.WatchJob(training_pb2.GetJobRequest(job_id=job_id), timeout=120))


def _version_ready(triton, version: str) -> bool:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        return client.is_model_ready(triton.model_name, version)
    finally:
        client.close()


def test_train_export_load_promote(server, triton):
    srv, stubs, training = server
    pics = pictures()[:16]
    create_and_fill(stubs, "c", pics)
    col = stubs.collections.GetCollection(collections_pb2.GetCollectionRequest(collection_id="c"))
    old_version = col.model.version if col.HasField("model") else ""
    old_ids, old_vectors = srv.runtime.store.images.vectors("c", triton.model_name, "1")

    job = training.StartTraining(training_pb2.StartTrainingRequest(
        collection_id="c", config=training_pb2.TrainingConfig(**TINY)), timeout=30)
    assert job.state in (training_pb2.JOB_STATE_QUEUED, training_pb2.JOB_STATE_RUNNING)
    updates = _watch_to_end(training, job.job_id)
    final = updates[-1]
    assert final.state == training_pb2.JOB_STATE_SUCCEEDED, final.error_message
    assert final.epoch == 1 and final.epochs == 1 and np.isfinite(final.loss) and final.loss > 0
    assert final.pairs_asked == 0
    assert final.base_model.version == "1"
    new_version = final.model.version
    assert int(new_version) == max(model_versions(triton.repo, triton.model_name))
    assert int(new_version) > 1 and _version_ready(triton, new_version)
    listed = training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(collection_id="c"))
    assert [j.job_id for j in listed.jobs] == [job.job_id]

    op = training.PromoteModel(training_pb2.PromoteModelRequest(
        collection_id="c", model=common_pb2.ModelRef(version=new_version)), timeout=30)
    ops = list(stubs.collections.WatchOperation(
        collections_pb2.GetOperationRequest(operation_id=op.operation_id), timeout=120))
    assert ops[-1].state == collections_pb2.OPERATION_STATE_SUCCEEDED, ops[-1].error_message
    col = stubs.collections.GetCollection(collections_pb2.GetCollectionRequest(collection_id="c"))
    assert old_version == "1" and col.model.version == new_version
    ids, vectors = srv.runtime.store.images.vectors("c", triton.model_name, new_version)
    assert ids == old_ids and vectors.shape == old_vectors.shape
    assert not np.allclose(vectors, old_vectors, atol=1e-4)  # the trained head embeds anew
    # the old vectors were kept
    kept_ids, kept = srv.runtime.store.images.vectors("c", triton.model_name, "1")
    assert kept_ids == old_ids and np.array_equal(kept, old_vectors)


def test_cancel_leaves_served_model_unchanged(server, triton):
    srv, stubs, training = server
    create_and_fill(stubs, "c", pictures()[:16])
    before = model_versions(triton.repo, triton.model_name)
    job = training.StartTraining(training_pb2.StartTrainingRequest(
        collection_id="c", config=training_pb2.TrainingConfig(
            **{**TINY, "epochs": 50, "iters_per_epoch": 400})), timeout=30)
    deadline = time.monotonic() + 60
    while training.GetJob(training_pb2.GetJobRequest(job_id=job.job_id)).state != \
            training_pb2.JOB_STATE_RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # one job per collection at a time
    err = rpc_error(training.StartTraining, training_pb2.StartTrainingRequest(
        collection_id="c", config=training_pb2.TrainingConfig(**TINY)), timeout=30)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and job.job_id in err.details()
    cancelled = training.CancelJob(training_pb2.CancelJobRequest(job_id=job.job_id), timeout=60)
    assert cancelled.state == training_pb2.JOB_STATE_CANCELLED
    assert cancelled.model.version == ""
    assert model_versions(triton.repo, triton.model_name) == before
    col = stubs.collections.GetCollection(collections_pb2.GetCollectionRequest(collection_id="c"))
    assert col.model.version == "1"


def test_cancel_on_another_replica_stops_the_job(triton, postgres_url, tmp_path,
                                                _restore_triton_index):
    """Two servers on one PostgreSQL database (and one data directory, as replicas share
    it): a job runs on A, CancelJob reaches B. B answers at once with the request
    recorded; A stops the job, CANCELLED on both; the served model is unchanged."""
    kwargs = dict(data_dir=tmp_path / "data", database_url=postgres_url,
                  triton_url=triton.grpc_url, model_repository=triton.repo,
                  health_interval_s=60)
    with _repository_kept(triton, _restore_triton_index):
        a = serve(["collections", "training"], **kwargs)
        b = None
        try:
            b = serve(["training"], **kwargs)
            stubs_a = Stubs.connect(a.address)
            train_a = training_pb2_grpc.TrainingServiceStub(stubs_a.channel)
            channel_b = grpc.insecure_channel(b.address)
            train_b = training_pb2_grpc.TrainingServiceStub(channel_b)
            create_and_fill(stubs_a, "c", pictures()[:16])
            before = model_versions(triton.repo, triton.model_name)
            job = train_a.StartTraining(training_pb2.StartTrainingRequest(
                collection_id="c", config=training_pb2.TrainingConfig(
                    **{**TINY, "epochs": 50, "iters_per_epoch": 400})), timeout=30)
            _wait_state(train_b, job.job_id, {training_pb2.JOB_STATE_RUNNING})

            tic = time.monotonic()
            answer = train_b.CancelJob(training_pb2.CancelJobRequest(job_id=job.job_id),
                                       timeout=30)
            assert time.monotonic() - tic < 5  # B does not wait for A's job
            assert answer.cancel_requested
            assert answer.state in (training_pb2.JOB_STATE_RUNNING,
                                    training_pb2.JOB_STATE_CANCELLED)
            final_b = list(train_b.WatchJob(training_pb2.GetJobRequest(job_id=job.job_id),
                                            timeout=60))[-1]
            stopped_s = time.monotonic() - tic
            final_a = train_a.GetJob(training_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
            for final in (final_b, final_a):
                assert final.state == training_pb2.JOB_STATE_CANCELLED, final.error_message
                assert final.cancel_requested and final.model.version == ""
            seen = TrainingJob.from_pb(final_a)  # the Python client carries the flag too
            assert seen.cancel_requested and seen.finished
            assert final_a.epoch < 50 and stopped_s < 20
            assert model_versions(triton.repo, triton.model_name) == before
            col = stubs_a.collections.GetCollection(
                collections_pb2.GetCollectionRequest(collection_id="c"))
            assert col.model.version == "1"
            # a final job: cancelling it again changes nothing
            again = train_b.CancelJob(training_pb2.CancelJobRequest(job_id=job.job_id),
                                      timeout=30)
            assert again == final_b
            channel_b.close()
            stubs_a.close()
        finally:
            a.stop(grace=1)
            if b is not None:
                b.stop(grace=1)


@pytest.mark.parametrize("config, field", [
    (dict(mode="sideways"), "mode"),
    (dict(epochs=0), "epochs"),
    (dict(num_identities=16, num_instances=4), "num_identities"),
    (dict(lr=-1.0), "lr"),
    # beyond the server's bounds (reidal.training_limits; stated in training.proto)
    (dict(iters_per_epoch=4294967295), "iters_per_epoch"),
    (dict(epochs=1000, iters_per_epoch=100_000), "iters_per_epoch"),
    (dict(num_instances=65), "num_instances"),
    (dict(lr=1e6), "lr"),
])
def test_bad_configs_are_invalid_argument(server, config, field):
    srv, stubs, training = server
    create_and_fill(stubs, "c", pictures()[:16])
    err = rpc_error(training.StartTraining, training_pb2.StartTrainingRequest(
        collection_id="c", config=training_pb2.TrainingConfig(**config)), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details()
    assert not training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest()).jobs


#: The largest schedule a client may ask for (reidal.training_limits.MAX_TOTAL_STEPS).
LARGEST = {**TINY, "epochs": 10, "iters_per_epoch": 100_000}


def test_a_large_valid_job_is_cancelled(server, triton):
    """The largest schedule the server accepts still stops on CancelJob: the job ends
    CANCELLED (the call waits for it), having exported nothing."""
    _srv, stubs, training = server
    create_and_fill(stubs, "c", pictures()[:16])
    before = model_versions(triton.repo, triton.model_name)
    job = training.StartTraining(training_pb2.StartTrainingRequest(
        collection_id="c", config=training_pb2.TrainingConfig(**LARGEST)), timeout=30)
    _wait_state(training, job.job_id, {training_pb2.JOB_STATE_RUNNING})
    cancelled = training.CancelJob(training_pb2.CancelJobRequest(job_id=job.job_id), timeout=60)
    assert cancelled.state == training_pb2.JOB_STATE_CANCELLED, cancelled.error_message
    assert cancelled.epoch < cancelled.epochs and cancelled.model.version == ""
    assert model_versions(triton.repo, triton.model_name) == before


def test_sigterm_stops_serve_with_a_job_running(triton, tmp_path, _restore_triton_index):
    """`reidal serve` with a large job running exits on SIGTERM within --grace plus a
    margin; the job is recorded FAILED (interrupted by the stop), the collection kept."""
    grace, margin = 2.0, 45.0  # the margin covers a loaded machine, not a target
    data = tmp_path / "data"
    (port,) = free_ports(1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "reidal.cli", "serve", "--service", "collections", "training",
         "--port", str(port), "--data-dir", str(data), "--triton-url", triton.grpc_url,
         "--model-repository", str(triton.repo), "--grace", str(grace), "--no-http"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with _repository_kept(triton, _restore_triton_index):
            first = proc.stdout.readline()
            assert first.startswith("reidal serving"), first + proc.stderr.read()
            stubs = Stubs.connect(f"127.0.0.1:{port}")
            training = training_pb2_grpc.TrainingServiceStub(stubs.channel)
            create_and_fill(stubs, "c", pictures()[:16])
            job = training.StartTraining(training_pb2.StartTrainingRequest(
                collection_id="c", config=training_pb2.TrainingConfig(**LARGEST)), timeout=30)
            _wait_state(training, job.job_id, {training_pb2.JOB_STATE_RUNNING})
            stubs.close()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace + margin)
            except subprocess.TimeoutExpired:
                pytest.fail(f"reidal serve still running {grace + margin:.0f} s after SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == 0
    store = Store(data)
    try:
        rec = store.jobs.get(job.job_id)
        assert rec.state == FAILED and rec.error_message == "interrupted by a server stop"
        assert len(store.images.all("c")) == 16
    finally:
        store.close()


def test_unknown_collection_and_job(server):
    _srv, _stubs, training = server
    err = rpc_error(training.StartTraining, training_pb2.StartTrainingRequest(
        collection_id="nope", config=training_pb2.TrainingConfig(**TINY)), timeout=30)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = rpc_error(training.GetJob, training_pb2.GetJobRequest(job_id="nope"), timeout=30)
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_restart_marks_interrupted_jobs_failed(tmp_path):
    store = Store(tmp_path)
    try:
        store.collections.create("c", model_name="m")
        jobs = [store.jobs.create("c", TINY, base_model_name="m", base_model_version="1")
                for _ in range(3)]
        running, queued, done = jobs
        store.jobs.update(running.job_id, state=RUNNING)
        store.jobs.update(done.job_id, state="SUCCEEDED", model_version="2")
        assert store.jobs.fail_interrupted(INTERRUPTED) == 2
        for j in (running, queued):
            rec = store.jobs.get(j.job_id)
            assert rec.state == FAILED and rec.error_message == INTERRUPTED
        assert store.jobs.get(done.job_id).state == "SUCCEEDED"
        # a final state is never left
        store.jobs.update(done.job_id, state=RUNNING)
        assert store.jobs.get(done.job_id).state == "SUCCEEDED"
    finally:
        store.close()


def _wait_state(training, job_id: str, states, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while True:
        job = training.GetJob(training_pb2.GetJobRequest(job_id=job_id), timeout=10)
        if job.state in states:
            return job
        assert time.monotonic() < deadline, f"job stuck in {job.state}"
        time.sleep(0.05)


def test_job_survives_a_watcher_leaving(server, triton):
    _srv, stubs, training = server
    create_and_fill(stubs, "c", pictures()[:16])
    job = training.StartTraining(training_pb2.StartTrainingRequest(
        collection_id="c", config=training_pb2.TrainingConfig(**TINY)), timeout=30)
    call = training.WatchJob(training_pb2.GetJobRequest(job_id=job.job_id), timeout=60)
    assert next(call).job_id == job.job_id
    call.cancel()
    final = _wait_state(training, job.job_id, {training_pb2.JOB_STATE_SUCCEEDED,
                                               training_pb2.JOB_STATE_FAILED})
    assert final.state == training_pb2.JOB_STATE_SUCCEEDED, final.error_message


def test_stop_and_restart_fail_the_running_job(triton, tmp_path):
    data = tmp_path / "data"
    with running_server(triton, data, model_repository=triton.repo) as srv:
        stubs = Stubs.connect(srv.address)
        training = training_pb2_grpc.TrainingServiceStub(stubs.channel)
        create_and_fill(stubs, "c", pictures()[:16])
        job = training.StartTraining(training_pb2.StartTrainingRequest(
            collection_id="c", config=training_pb2.TrainingConfig(
                **{**TINY, "epochs": 50, "iters_per_epoch": 400})), timeout=30)
        _wait_state(training, job.job_id, {training_pb2.JOB_STATE_RUNNING})
        stubs.close()
    with running_server(triton, data, model_repository=triton.repo) as srv:
        stubs = Stubs.connect(srv.address)
        training = training_pb2_grpc.TrainingServiceStub(stubs.channel)
        got = training.GetJob(training_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
        stubs.close()
    assert got.state == training_pb2.JOB_STATE_FAILED
    assert "interrupted" in got.error_message and got.model.version == ""


def test_training_needs_the_model_repository(triton, tmp_path):
    with running_server(triton, tmp_path / "data") as srv:
        stubs = Stubs.connect(srv.address)
        training = training_pb2_grpc.TrainingServiceStub(stubs.channel)
        create_and_fill(stubs, "c", pictures()[:16])
        err = rpc_error(training.StartTraining, training_pb2.StartTrainingRequest(
            collection_id="c", config=training_pb2.TrainingConfig(**TINY)), timeout=30)
        stubs.close()
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model repository" in err.details()


def test_job_trains_with_the_collections_answers(server, triton):
    from _services_support import by_images

    from reidal.v1 import constraints_pb2

    _srv, stubs, training = server
    pics = pictures()[:16]
    create_and_fill(stubs, "c", pics)
    ids = [p.image_id for p in pics]
    stubs.constraints.SubmitConstraints(constraints_pb2.SubmitConstraintsRequest(
        collection_id="c", answers=[by_images(ids[0], ids[1], True),
                                    by_images(ids[2], ids[3], False),
                                    by_images(ids[4], ids[5], None)]), timeout=30)
    job = training.StartTraining(training_pb2.StartTrainingRequest(
        collection_id="c", config=training_pb2.TrainingConfig(**TINY)), timeout=30)
    final = _watch_to_end(training, job.job_id)[-1]
    assert final.state == training_pb2.JOB_STATE_SUCCEEDED, final.error_message
    assert final.answers_used == 2 and final.pairs_asked == 0  # UNSURE is no constraint


def test_job_trains_on_images_added_by_uri(server, triton, tmp_path):
    _srv, stubs, training = server
    pics = pictures()[:16]
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in pics:
        (folder / f"{p.image_id}.png").write_bytes(p.png)
    stubs.collections.CreateCollection(collections_pb2.CreateCollectionRequest(
        collection_id="u"), timeout=30)
    stubs.collections.AddImages(iter([collections_pb2.AddImagesRequest(
        collection_id="u", images=[collections_pb2.IngestImage(image=common_pb2.Image(
            id=p.image_id, uri=str(folder / f"{p.image_id}.png"))) for p in pics])]),
        timeout=120)
    job = training.StartTraining(training_pb2.StartTrainingRequest(
        collection_id="u", config=training_pb2.TrainingConfig(**TINY)), timeout=30)
    final = _watch_to_end(training, job.job_id)[-1]
    assert final.state == training_pb2.JOB_STATE_SUCCEEDED, final.error_message
    # a file gone since ingest fails the next job with a message naming the image; the
    # client's wait_job raises it with the recorded code
    from reidal_client import OperationFailed, ReidalClient

    (folder / f"{pics[3].image_id}.png").unlink()
    with ReidalClient(_srv.address) as client:
        job = client.start_training("u", **TINY)
        with pytest.raises(OperationFailed, match=pics[3].image_id) as failed:
            client.wait_job(job.job_id, timeout_s=120)
        assert failed.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_server_job_defaults_follow_the_collection_and_head_schedule():
    from reidal.errors import InvalidArgument
    from reidal.training.config import HEAD_SCHEDULE
    from reidal.training_jobs import build_config

    cfg = build_config({}, 100, {"dbscan_eps": 0.55, "min_samples": 3, "k1": 8, "k2": 2})
    assert (cfg.eps, cfg.min_samples, cfg.k1, cfg.k2) == (0.55, 3, 8, 2)
    assert all(getattr(cfg, k) == v for k, v in HEAD_SCHEDULE.items())
    assert cfg.sampler == "none" and cfg.mode == "head"
    # a collection smaller than the default batch gets fewer identities per batch...
    assert build_config({}, 63).num_identities == 63 // 4
    # ...unless the client chose P itself
    with pytest.raises(InvalidArgument, match="larger than the collection"):
        build_config({"num_identities": 16}, 63)
    # the client's values win over both
    cfg = build_config({"lr": 3e-4, "k1": 12}, 100, {"k1": 8})
    assert cfg.lr == 3e-4 and cfg.k1 == 12
    assert cfg.clustering == "fixed"
    # a calibrated collection: the job calibrates too, keeping what was set explicitly
    cfg = build_config({"min_samples": 3}, 100, {"mode": "calibrated", "k1": 8})
    assert cfg.clustering == "calibrated" and cfg.k1 == 8
    assert set(cfg.clustering_pinned) == {"k1", "min_samples"}


def test_cli_and_client_train_promote_list(server, triton, capsys):
    from reidal.cli import main
    from reidal_client import ReidalClient

    srv, stubs, _training = server
    create_and_fill(stubs, "c", pictures()[:16])
    tiny = [f"--set={k}={v}" for k, v in TINY.items() if k != "epochs"]
    code = main(["train", "start", "c", "--server", srv.address, "--epochs", "1", *tiny,
                 "--promote"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "succeeded" in out and "now uses" in out
    with ReidalClient(srv.address) as client:
        jobs = client.list_training_jobs("c")
        assert len(jobs) == 1 and jobs[0].state == "SUCCEEDED"
        assert jobs[0].config["iters_per_epoch"] == 2 and jobs[0].config["k1"] == 6
        assert client.get_collection("c").model.version == jobs[0].model.version
        with pytest.raises(ValueError, match="unknown training config"):
            client.start_training("c", colour="red")
    assert main(["train", "list", "c", "--server", srv.address]) == 0
    assert jobs[0].job_id in capsys.readouterr().out
    assert main(["train", "start", "nope", "--server", srv.address]) == 1
    assert "nope" in capsys.readouterr().err


def test_partial_mode_job_exports_a_model_triton_serves(server, triton):
    """A partial-mode job fine-tunes the backbone's last stage; the version it exports is
    the whole network, which Triton serves: the promoted vectors are that model's."""
    import io

    import torch
    from PIL import Image

    from reidal.embedding.model import load_model
    from reidal.embedding.preprocess import preprocess

    srv, stubs, training = server
    pics = pictures()[:16]
    create_and_fill(stubs, "c", pics)
    job = training.StartTraining(training_pb2.StartTrainingRequest(
        collection_id="c", config=training_pb2.TrainingConfig(
            mode="partial", trainable_stages=1, augment_views=1, **TINY)), timeout=30)
    final = _watch_to_end(training, job.job_id)[-1]
    assert final.state == training_pb2.JOB_STATE_SUCCEEDED, final.error_message
    assert final.config.mode == "partial" and final.config.trainable_stages == 1
    assert final.config.pair_loss_weight == 1.0  # the partial schedule's default
    version = final.model.version
    assert _version_ready(triton, version)
    exported = load_model(triton.repo / triton.model_name / version)
    base = triton.model.state_dict()
    moved = {k for k, v in exported.state_dict().items() if not torch.equal(v, base[k])}
    assert any(k.startswith("backbone.net._blocks.15.") for k in moved)
    assert not any(k.startswith("backbone.net._blocks.14.") for k in moved)

    op = training.PromoteModel(training_pb2.PromoteModelRequest(
        collection_id="c", model=common_pb2.ModelRef(version=version)), timeout=30)
    ops = list(stubs.collections.WatchOperation(
        collections_pb2.GetOperationRequest(operation_id=op.operation_id), timeout=120))
    assert ops[-1].state == collections_pb2.OPERATION_STATE_SUCCEEDED, ops[-1].error_message
    ids, served = srv.runtime.store.images.vectors("c", triton.model_name, version)
    by_id = {p.image_id: p for p in pics}
    batch = preprocess([Image.open(io.BytesIO(by_id[i].png)) for i in ids], triton.spec)
    want = triton.reference(batch, exported)
    np.testing.assert_allclose(served, want, atol=1e-4)
    _, before = srv.runtime.store.images.vectors("c", triton.model_name, "1")
    assert not np.allclose(served, before, atol=1e-3)


def test_full_mode_is_refused_by_the_server(server):
    _srv, stubs, training = server
    create_and_fill(stubs, "c", pictures()[:16])
    err = rpc_error(training.StartTraining, training_pb2.StartTrainingRequest(
        collection_id="c", config=training_pb2.TrainingConfig(mode="full", **TINY)), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "torchrun" in err.details()
