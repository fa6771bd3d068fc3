"""Calibrated clustering, AAS continued and AAS's U_os similarity in the server's cycle,
over real gRPC.

A real server (collections, sampling, constraints; real SQLite) on loopback, driven by the
Python client. The vectors are the caller's own (PutVectors), so no Triton is needed: a
dozen tight, noisy clusters. Checked: a calibrated collection's batches report the values
chosen from the data (not the fixed defaults) and re-chosen once answers arrive; values the
user set are kept; ``aas-continued`` asks exactly AAS's pairs, then fills the budget;
``os_similarity`` is stored (default the paper's "jaccard") and changes the server's U_os
pool; bad values are INVALID_ARGUMENT naming them.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
from _services_support import pictures

from reidal.serve import serve
from reidal.simulation.synthetic import make_reid_embeddings
from reidal_client import ClusteringParams, InvalidArgument, ReidalClient, SamplingParams

MODEL = "caller-vectors"
N_ID, PER_ID = 12, 5


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    srv = serve(["collections", "sampling", "constraints"],
                data_dir=tmp_path_factory.mktemp("calibrated"),
                triton_url=f"127.0.0.1:{_closed_port()}", start_triton=False,
                health_interval_s=60)
    try:
        with ReidalClient(srv.address, timeout_s=60) as c:
            yield c
    finally:
        srv.stop(grace=1)


def _truth() -> dict[str, str]:
    return {p.image_id: p.identity for p in pictures(N_ID, PER_ID)}


def _vectors(ids: list[str], truth: dict[str, str], dim: int = 16) -> np.ndarray:
    """One noisy cluster per identity, close enough that the fixed DBSCAN merges some."""
    rng = np.random.default_rng(3)
    centres = {name: rng.normal(size=dim) for name in sorted(set(truth.values()))}
    return np.stack([centres[truth[i]] + 0.45 * rng.normal(size=dim)
                     for i in ids]).astype(np.float32)


def _collection(client: ReidalClient, cid: str, **create) -> list[str]:
    pics = pictures(N_ID, PER_ID)
    ids = [p.image_id for p in pics]
    client.create_collection(cid, model=MODEL, **create)
    client.add_images(cid, [(p.image_id, p.png) for p in pics], defer_embedding=True)
    client.put_vectors(cid, ids, _vectors(ids, _truth()), model=MODEL)
    return ids


def _answer_ten_of_each(client: ReidalClient, cid: str, ids: list[str]) -> None:
    """10 SAME and 10 DIFFERENT answers, straight from the truth (the calibration's floor)."""
    truth = _truth()
    by_id: dict[str, list[str]] = {}
    for i in ids:
        by_id.setdefault(truth[i], []).append(i)
    groups = list(by_id.values())
    same = [(g[0], g[k]) for g in groups for k in (1, 2)][:10]
    diff = [(groups[k][0], groups[k + 1][0]) for k in range(10)]
    client.submit_answers(cid, [(a, b, "SAME") for a, b in same]
                          + [(a, b, "DIFFERENT") for a, b in diff], annotator_id="test")


def test_calibrated_values_differ_from_fixed_and_move_with_the_answers(client):
    ids = _collection(client, "cal", clustering=ClusteringParams(mode="calibrated"))
    _collection(client, "fix")
    col = client.get_collection("cal")
    # only the mode is stored: every value is chosen per cycle
    assert col.clustering == ClusteringParams(mode="calibrated")
    assert client.get_collection("fix").clustering.mode == "fixed"

    fixed = client.get_query_pairs("fix", budget=10).clustering
    assert fixed is not None and fixed.mode == "fixed" and fixed.eps_source == "fixed"
    assert (fixed.dbscan_eps, fixed.k1, fixed.k2, fixed.min_samples) == \
        (pytest.approx(0.6), 30, 6, 4)

    first = client.get_query_pairs("cal", budget=10).clustering
    assert first is not None and first.mode == "calibrated"
    assert first.eps_source == "rho" and first.finch_source == "default"
    assert (first.k1, first.min_samples) != (fixed.k1, fixed.min_samples)
    assert first.dbscan_eps != pytest.approx(fixed.dbscan_eps)
    assert (first.same_answers, first.different_answers) == (0, 0)

    _answer_ten_of_each(client, "cal", ids)
    second = client.get_query_pairs("cal", budget=10).clustering
    assert second.eps_source == "answers" and second.finch_source == "answers"
    assert (second.same_answers, second.different_answers) == (10, 10)
    assert second.dbscan_eps != pytest.approx(first.dbscan_eps)
    assert second.k1 == first.k1  # the collection's size did not change


def test_values_the_user_sets_win_over_the_calibration(client):
    ids = _collection(client, "pinned", clustering=ClusteringParams(
        mode="calibrated", dbscan_eps=0.55, k1=7, finch_level=1))
    col = client.get_collection("pinned")
    assert col.clustering == ClusteringParams(mode="calibrated", dbscan_eps=0.55, k1=7,
                                              finch_level=1)
    _answer_ten_of_each(client, "pinned", ids)
    chosen = client.get_query_pairs("pinned", budget=10).clustering
    assert (chosen.eps_source, chosen.finch_source) == ("user", "user")
    assert (chosen.dbscan_eps, chosen.k1, chosen.finch_level) == (pytest.approx(0.55), 7, 1)
    assert (chosen.k2, chosen.min_samples) == (2, 2)  # chosen from k1 = 7
    assert (chosen.same_answers, chosen.different_answers) == (10, 10)


def test_aas_continued_asks_aas_pairs_then_fills_the_allowance(client):
    small = ClusteringParams(k1=6, k2=2, min_samples=2)
    _collection(client, "plain", clustering=small)
    _collection(client, "cont", clustering=small, sampling=SamplingParams(sampler="aas-continued"))
    assert client.get_collection("plain").sampling.sampler == "aas"
    assert client.get_collection("cont").sampling.sampler == "aas-continued"
    budget = 80
    plain = client.get_query_pairs("plain", budget=budget)
    cont = client.get_query_pairs("cont", budget=budget)
    assert 0 < len(plain) < budget, "AAS must run dry for the continuation to matter"
    assert plain.stats["sampler"] == "aas" and plain.stats.get("continuation_pairs", 0) == 0
    assert len(cont) == budget and cont.reason == "BUDGET_FILLED"
    head = [(p.image_a, p.image_b, p.pool) for p in cont.pairs[:len(plain)]]
    assert head == [(p.image_a, p.image_b, p.pool) for p in plain.pairs]  # AAS, exactly
    tail = cont.pairs[len(plain):]
    assert {p.pool for p in tail} == {"continuation"}
    assert (cont.stats["aas_pairs"], cont.stats["continuation_pairs"]) == \
        (len(plain), budget - len(plain))
    asked = {(p.image_a, p.image_b) for p in cont.pairs}
    assert len(asked) == budget  # no pair twice


def test_os_similarity_is_stored_and_used_by_the_server_sampler(client):
    """The same caller vectors in two collections, one at the default similarity (the
    paper's Jaccard, under which these vectors' region medoids share no k-reciprocal
    neighbours: U_os is empty) and one at "cosine" (U_os pairs medoids by embedding cosine,
    each at least s_min apart). GetCollection echoes what is stored."""
    pics = pictures(16, 5)
    ids = [p.image_id for p in pics]
    X = make_reid_embeddings(16, images_per_identity=5, dim=32, seed=1).X
    batches = {}
    for cid, sampling in (("os-paper", None),
                          ("os-cosine", SamplingParams(os_similarity="cosine"))):
        client.create_collection(cid, model=MODEL, sampling=sampling,
                                 clustering=ClusteringParams(k1=6, k2=2, min_samples=2))
        client.add_images(cid, [(p.image_id, p.png) for p in pics], defer_embedding=True)
        client.put_vectors(cid, ids, X, model=MODEL)
        batches[cid] = client.get_query_pairs(cid, budget=500)
    assert client.get_collection("os-paper").sampling.os_similarity == "jaccard"
    assert client.get_collection("os-cosine").sampling.os_similarity == "cosine"
    paper, cosine = batches["os-paper"], batches["os-cosine"]
    assert {p.pool for p in paper.pairs} == {"U_us"}
    os_pairs = [(p.image_a, p.image_b) for p in cosine.pairs if p.pool == "U_os"]
    assert os_pairs, "cosine must find the U_os pairs Jaccard cannot"
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    row = {i: k for k, i in enumerate(ids)}
    assert all(unit[row[a]] @ unit[row[b]] >= 0.3 - 1e-5 for a, b in os_pairs)  # s_min
    assert sorted((p.image_a, p.image_b) for p in cosine.pairs if p.pool == "U_us") == \
        sorted((p.image_a, p.image_b) for p in paper.pairs)  # U_us does not depend on it


@pytest.mark.parametrize(("clustering", "sampling", "message"), [
    (ClusteringParams(mode="adaptive"), None, "mode must be one of .*got 'adaptive'"),
    (ClusteringParams(mode="calibrated", dbscan_eps=1.5), None, "eps"),
    (ClusteringParams(finch_level=9), None, "finch_level"),
    (None, SamplingParams(sampler="nis"), "sampler must be one of .*got 'nis'"),
    (None, SamplingParams(os_similarity="dot"),
     "os_similarity must be one of 'jaccard', 'cosine', got 'dot'"),
])
def test_bad_modes_and_samplers_are_invalid_argument(client, clustering, sampling, message):
    with pytest.raises(InvalidArgument, match=message):
        client.create_collection("bad", clustering=clustering, sampling=sampling)


def test_cli_creates_a_calibrated_collection_and_prints_the_chosen_values(client, capsys):
    from reidal.cli import main

    server = ("--server", client.address)
    assert main(["collection", "create", "clicol", "--model", MODEL, "--clustering",
                 "calibrated", "--k1", "7", "--sampler", "aas-continued", *server]) == 0
    out = capsys.readouterr().out
    assert "calibrated: k1=7 (the rest chosen every cycle)" in out
    assert "aas-continued: mixture_eps=0.6" in out
    pics = pictures(N_ID, PER_ID)
    ids = [p.image_id for p in pics]
    client.add_images("clicol", [(p.image_id, p.png) for p in pics], defer_embedding=True)
    client.put_vectors("clicol", ids, _vectors(ids, _truth()), model=MODEL)
    assert main(["pairs", "clicol", "--budget", "30", *server]) == 0
    out = capsys.readouterr().out
    assert "30 pair(s)" in out and "continuation" in out
    assert "clustering calibrated: eps=0.2 (rho) k1=7 k2=2 min_samples=2 finch_level=0 " \
           "(default); sampler aas-continued" in out


def test_cli_choices_match_the_server():
    from reidal import cli, collection_state
    from reidal.cli import common
    from reidal.core import params

    assert cli.CLUSTERING_MODES == collection_state.CLUSTERING_MODES
    assert cli.SAMPLERS == collection_state.SAMPLERS
    assert common.OS_SIMILARITIES == params.OS_SIMILARITIES


def test_the_choice_is_stored_with_the_batch_in_postgresql(postgres_url, tmp_path):
    srv = serve(["collections", "sampling", "constraints"], data_dir=tmp_path,
                database_url=postgres_url, triton_url=f"127.0.0.1:{_closed_port()}",
                start_triton=False, health_interval_s=60)
    try:
        with ReidalClient(srv.address, timeout_s=60) as c:
            _collection(c, "pg", clustering=ClusteringParams(mode="calibrated", k2=3),
                        sampling=SamplingParams(sampler="aas-continued"))
            batch = c.get_query_pairs("pg", budget=40)
            again = c.get_query_batch("pg", batch.batch_id)
    finally:
        srv.stop(grace=1)
    assert batch.clustering is not None and batch.clustering.k2 == 3
    assert again.clustering == batch.clustering
    assert again.stats == batch.stats and again.stats["sampler"] == "aas-continued"
    assert {p.pool for p in again.pairs} >= {"continuation"}


def test_the_review_page_explains_a_continuation_pair():
    from reidal.web.api import why_asked
    from reidal_client import ModelRef, QueryPair

    pair = QueryPair("p", "a", "b", 0.4, "continuation", -1, 1.0, ModelRef(), False)
    assert "threshold" in why_asked(pair)
    assert why_asked(pair) != why_asked(QueryPair("p", "a", "b", 0.4, "", -1, 1.0, ModelRef(),
                                                  False))


def test_a_batch_reports_its_knn_graph_and_recall(client):
    """BatchStats carries how the cycle's kNN graph was searched and the recall it
    reached: these 60 images are below the exact-search threshold, so exact search
    (recall 1, no sample rows) with the collection's k1, kept with the stored batch."""
    from reidal.core.neighbors import KNN_EXACT_BELOW

    _collection(client, "knn", clustering=ClusteringParams(k1=6, k2=2, min_samples=2))
    batch = client.get_query_pairs("knn", budget=10)
    assert N_ID * PER_ID < KNN_EXACT_BELOW
    assert (batch.stats["knn_index"], batch.stats["knn_k"], batch.stats["knn_recall"]) == \
        ("flat", 6, 1.0)
    assert batch.stats.get("knn_recall_rows", 0) == 0 and "knn_nprobe" not in batch.stats
    again = client.get_query_pairs("knn", budget=10)  # unchanged: the stored open batch
    assert again.batch_id == batch.batch_id and again.stats == batch.stats
