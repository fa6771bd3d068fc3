"""`reidal demo` end to end on a small generated collection: real Triton, real gRPC."""

import csv

import numpy as np
import pytest
from _model_support import write_test_model

from reidal.cli import main
from reidal.core.aas import AmbiguityAwareSampler
from reidal.core.clustering import DBSCANJaccard
from reidal.data.wildlife import load_wildlife_csv
from reidal.demo_params import DEMO_K1, DEMO_K2, DEMO_MIN_SAMPLES
from reidal.simulation.loop import ActiveLearningLoop
from reidal.simulation.oracle import SimulatedOracle
from reidal.store import Store


def test_demo_runs_the_whole_loop(tmp_path, capsys):
    out = tmp_path / "demo"
    # any model will do here: the default model at the tests' input size, written where the
    # demo's server would write its own (the 224 px default: tests/test_serve.py)
    write_test_model(out / "server")
    assert main(["demo", "--out", str(out), "--cycles", "2", "--individuals", "8",
                 "--budget", "40"]) == 0
    printed = capsys.readouterr().out
    assert "AddImages through the CollectionService" in printed
    assert "(GetVectors; nothing is embedded again)" in printed
    assert "open-set retrieval of the pretrained model" in printed
    with (out / "cycles.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["cycle"]) for r in rows] == [0, 1, 2]
    asked = [int(r["pairs_asked"]) for r in rows[1:]]
    assert all(0 <= a <= 40 for a in asked)
    assert int(rows[-1]["cumulative_pairs"]) == sum(asked)
    for r in rows:
        for key in ("precision", "recall", "f1", "ari", "mAP", "top1"):
            assert -1.0 <= float(r[key]) <= 1.0
    # each cycle's clustering as the server reported it (BatchStats.clustering)
    for r in rows[1:]:
        assert (r["clustering_mode"], r["eps_source"], r["sampler"]) == ("fixed", "fixed", "aas")
        assert (int(r["k1"]), int(r["k2"]), int(r["min_samples"]), int(r["finch_level"])) == \
            (DEMO_K1, DEMO_K2, DEMO_MIN_SAMPLES, 0)
        assert float(r["eps"]) == pytest.approx(0.6)
    assert f"0.600  {DEMO_K1:>2}   {DEMO_MIN_SAMPLES}   0   fixed" in printed
    png = (out / "cycles.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    # the training step: a new model version, trained on the answers, now embeds the
    # collection (its vectors are stored under that version beside version 1's)
    assert "StartTraining" in printed and "after training: mAP" in printed
    with (out / "training.csv").open() as fh:
        stages = {r["stage"]: r for r in csv.DictReader(fh)}
    assert stages["before"]["model_version"] == "1"
    new_version = stages["after"]["model_version"]
    assert int(new_version) > 1
    for r in stages.values():
        assert 0.0 <= float(r["mAP"]) <= 1.0 and -1.0 <= float(r["f1"]) <= 1.0

    # Everything went through the server: its durable store holds every image and exactly
    # the answers the table counts, each the ground truth of its pair.
    dataset = load_wildlife_csv(out / "collection" / "metadata.csv")
    truth = {r.image_id: r.identity for r in dataset}
    store = Store(out / "server")
    try:
        assert store.collections.counts("demo")["images"] == len(truth)
        ids, X = store.images.vectors("demo", "reidal_embedder", "1")
        assert store.collections.get("demo").model_version == new_version
        trained_ids, X_new = store.images.vectors("demo", "reidal_embedder", new_version)
        assert trained_ids == ids and X_new.shape == X.shape
        assert not np.allclose(X_new, X, atol=1e-4)
        answers = store.answers.all("demo")
        assert len(answers) == sum(asked)
        assert len({(a.image_a, a.image_b) for a in answers}) == len(answers)
        for a in answers:
            assert a.label == ("SAME" if truth[a.image_a] == truth[a.image_b] else "DIFFERENT")
            assert a.annotator == "simulated-annotator" and a.request_id
    finally:
        store.close()

    # Independent reference: the core library's loop on the vectors the server stored, with
    # the same parameters and seeds, asks the same number of pairs per cycle and reaches
    # the same pseudo-label quality as the demo did through gRPC.
    assert ids == list(dataset.image_ids)
    dbscan = DBSCANJaccard(k1=DEMO_K1, k2=DEMO_K2, min_samples=DEMO_MIN_SAMPLES)
    labels = dataset.labels()
    ref = ActiveLearningLoop(AmbiguityAwareSampler(dbscan=dbscan), clustering=dbscan,
                             budget_per_cycle=40, cycles=2, seed=0).run(
        X, SimulatedOracle(labels, seed=0), true_labels=labels)
    assert [r.pairs_asked for r in ref.reports] == asked
    for r, row in zip(ref.reports, rows[1:], strict=True):
        for key in ("precision", "recall", "f1", "ari"):
            assert float(row[key]) == pytest.approx(r.quality[key], abs=1e-9)
    assert float(rows[0]["f1"]) == pytest.approx(ref.initial_quality["f1"], abs=1e-9)
