"""The Kubernetes topology for real, without a cluster: every Deployment of deploy/k8s (the
laptop overlay as Kustomize renders it, else the base's files as written) runs as a local
process with its container's command, args and environment (tests/_pods.py says how a pod
becomes a process), against a real PostgreSQL and the manifests' own Triton pod
(``reidal triton``, the bundled CPU Triton). The loop goes through the ports a client
would use, one per Service: create and fill a collection on reidal-collections (embedded
through reidal-embedding and Triton), pairs from reidal-sampling, answers and identities
on reidal-constraints, a training job and its promotion on reidal-training (watched from
reidal-collections). Mid-loop the sampling pod, then the embedding pod, is killed
(SIGKILL) and started again: the other services keep serving meanwhile and nothing is
lost (every answer is in PostgreSQL, read back with the store afterwards).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from _deploy_support import K8S, kubectl, render
from _pods import LOOPBACK, Pod, plan_pods
from _services_support import SMALL_CLUSTERING, pictures

#: The Deployments the manifests run, one process each here (the laptop overlay: one replica).
DEPLOYMENTS = ("reidal-triton", "reidal-embedding", "reidal-collections", "reidal-sampling",
               "reidal-constraints", "reidal-training")
#: A training job small enough for a test (TrainingConfig fields).
TINY_TRAINING = dict(epochs=1, iters_per_epoch=2, num_identities=4, num_instances=2,
                     min_samples=2, k1=6, k2=2)


def manifests() -> tuple[dict[str, Any], ...]:
    """The laptop overlay rendered by kubectl's Kustomize when there is one, else the base's
    resource files as written (the overlay changes replicas and requests, not commands)."""
    if kubectl() is not None:
        return render("overlays/laptop")
    base = K8S / "base"
    files = yaml.safe_load((base / "kustomization.yaml").read_text())["resources"]
    return tuple(d for f in files for d in yaml.safe_load_all((base / f).read_text()) if d)


@pytest.fixture(scope="module")
def cluster(postgres, tmp_path_factory) -> Iterator[dict[str, Pod]]:
    objects = manifests()
    assert sorted(o["metadata"]["name"] for o in objects if o["kind"] == "Deployment") == \
        sorted(DEPLOYMENTS)
    with postgres.database() as url:
        pg = url.split("@", 1)[1].split("/", 1)[0]
        database = url.rsplit("/", 1)[1]
        pods = plan_pods(objects, tmp_path_factory.mktemp("cluster"), Path(sys.executable).parent,
                         external={"reidal-postgres:5432": pg}, database=database)
        try:
            for name in DEPLOYMENTS:
                pods[name].start()
            for name in DEPLOYMENTS:
                pods[name].wait_ready()
            yield pods
        finally:
            for pod in pods.values():
                pod.terminate()
            for pod in pods.values():
                pod.stop()


def test_the_manifests_wiring_is_what_runs(cluster):
    """The processes really are apart: each serves only its own service, on its own port,
    and found the others through the Service names the manifests give it."""
    from reidal.health_probe import check

    services = {"reidal-embedding": "reidal.v1.EmbeddingService",
                "reidal-collections": "reidal.v1.CollectionService",
                "reidal-sampling": "reidal.v1.SamplingService",
                "reidal-constraints": "reidal.v1.ConstraintService",
                "reidal-training": "reidal.v1.TrainingService"}
    for name, service in services.items():
        pod = cluster[name]
        assert check(pod.address(), service).ok, name
        for other in set(services.values()) - {service}:
            assert check(pod.address(), other).status == "SERVICE_UNKNOWN", (name, other)
    collections = cluster["reidal-collections"]
    assert collections.env["REIDAL_EMBEDDING_URL"] == cluster["reidal-embedding"].address()
    assert f"--embedding-url={cluster['reidal-embedding'].address()}" in collections.argv
    triton_grpc = cluster["reidal-triton"].address("grpc")
    for name in ("reidal-embedding", "reidal-training"):
        assert f"--triton-url={triton_grpc}" in cluster[name].argv, name
    # training writes into the directory Triton serves (the reidal-models claim)
    assert any(a.startswith("--model-repository=") and a.endswith("claims/reidal-models")
               for a in cluster["reidal-training"].argv)


def test_the_loop_through_the_services_ports_survives_pod_restarts(cluster, postgres):
    from reidal.store import Store
    from reidal_client import ReidalClient
    from reidal_client.types import ClusteringParams

    def client(name: str) -> ReidalClient:
        return ReidalClient(cluster[name].address(), timeout_s=120)  # default retries

    cols, samp, cons, train = (client(f"reidal-{s}") for s in
                               ("collections", "sampling", "constraints", "training"))
    pics = pictures(6, 4)
    truth = {p.image_id: p.identity for p in pics}
    first, later = pics[:18], pics[18:]
    cid = "zebras"

    def stored_form(a: str, b: str) -> tuple[str, str, str, str]:
        """An answer as the store keeps it: the pair sorted, the true label, the annotator."""
        return (*sorted((a, b)), "SAME" if truth[a] == truth[b] else "DIFFERENT", "split")
    try:
        cols.create_collection(cid, clustering=ClusteringParams.from_pb(SMALL_CLUSTERING))
        added = cols.add_images(cid, [(p.image_id, p.png) for p in first])
        assert (added.added, added.embedded) == (18, 18)
        assert added.model.name == "reidal_embedder"

        batch = samp.get_query_pairs(cid, 8)
        assert batch.pairs and batch.cycle == 1
        answers = [(p.pair_id, truth[p.image_a] == truth[p.image_b]) for p in batch.pairs]
        assert cons.submit_answers(cid, answers, annotator_id="split").stored_count == \
            len(answers)
        submitted = [stored_form(p.image_a, p.image_b) for p in batch.pairs]

        # -- the sampling pod dies: constraints and collections keep serving
        cluster["reidal-sampling"].kill()
        more = [(first[0].image_id, first[1].image_id, truth[first[0].image_id] ==
                 truth[first[1].image_id])]
        assert cons.submit_answers(cid, more, annotator_id="split").stored_count == 1
        submitted.append(stored_form(first[0].image_id, first[1].image_id))
        assert len(cons.get_identities(cid)) > 0
        assert len(cols.list_images(cid)) == 18
        cluster["reidal-sampling"].start()
        cluster["reidal-sampling"].wait_ready()
        again = samp.get_query_batch(cid, batch.batch_id)  # the batch outlived its process
        assert [p.pair_id for p in again.pairs] == [p.pair_id for p in batch.pairs]
        assert again.answered == len(batch.pairs)
        second = samp.get_query_pairs(cid, 8)
        assert second.cycle == 2
        answers = [(p.pair_id, truth[p.image_a] == truth[p.image_b]) for p in second.pairs]
        if answers:
            assert cons.submit_answers(cid, answers, annotator_id="split").stored_count == \
                len(answers)
            submitted += [stored_form(p.image_a, p.image_b) for p in second.pairs]

        # -- the embedding pod dies: ingest says UNAVAILABLE, everything else serves
        cluster["reidal-embedding"].kill()
        with pytest.raises(Exception) as refused:
            ReidalClient(cols.address, timeout_s=60, retries=0).add_images(
                cid, [(p.image_id, p.png) for p in later])
        assert getattr(refused.value, "code", None) is not None, refused.value
        assert refused.value.code.name == "UNAVAILABLE", refused.value
        assert samp.get_query_batch(cid, second.batch_id).batch_id == second.batch_id
        assert cons.get_identities(cid).applied_answers > 0
        cluster["reidal-embedding"].start()
        cluster["reidal-embedding"].wait_ready()
        added = cols.add_images(cid, [(p.image_id, p.png) for p in later])
        assert added.received == added.embedded == len(later)
        col = cols.get_collection(cid)
        assert (col.image_count, col.embedded_image_count) == (len(pics), len(pics))

        # -- training on its own pod: a new version into the shared repository, loaded by
        # the Triton pod, the collection re-embedded; the operation watched elsewhere
        job = train.start_training(cid, **TINY_TRAINING)
        done = train.wait_job(job.job_id, timeout_s=300)
        assert done.state == "SUCCEEDED" and done.model.version == "2", done
        op = train.promote_model(cid, done.model.version, wait=False)
        finished = cols.wait_operation(op.operation_id, timeout_s=300)
        assert finished.state == "SUCCEEDED", finished
        col = cols.get_collection(cid)
        assert (col.model.version, col.embedded_image_count) == ("2", len(pics))
        final = cons.get_identities(cid)
        assert final.model.version == "2"
        assert sum(i.size for i in final.identities) == len(pics)
    finally:
        for c in (cols, samp, cons, train):
            c.close()
    # Nothing lost: every answer is in PostgreSQL, whatever process stored it.
    store = Store.open(cluster["reidal-constraints"].env["REIDAL_DATABASE_URL"])
    try:
        stored = store.answers.all(cid, current_only=False)
        assert sorted((a.image_a, a.image_b, a.label, a.annotator) for a in stored) == \
            sorted(submitted)
    finally:
        store.close()
    assert LOOPBACK in cluster["reidal-constraints"].env["REIDAL_DATABASE_URL"]
