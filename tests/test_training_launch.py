"""`python -m reidal.training`: head mode in process, full mode data-parallel under torchrun;
runs that ask questions through `python -m reidal.benchmark.train` (its simulated annotator)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from reidal.benchmark.train import main as questions_main
from reidal.embedding.spec import DEFAULT_INPUT_SIZE
from reidal.training.launch import main

SMALL = ["--k1", "5", "--k2", "2", "--min-samples", "2", "--num-identities", "4",
         "--device", "cpu", "--epochs", "2", "--epochs-per-cycle", "1", "--iters-per-epoch", "2"]


def test_head_run_writes_model_reports_and_a_repository_version(tmp_path, capsys):
    from reidal.embedding.model import load_model
    from reidal.embedding.triton_repo import model_versions, write_model_repository

    repo = tmp_path / "repo"
    write_model_repository(repo, model_name="m")
    out = tmp_path / "run"
    assert questions_main(["--dataset", "synthetic:6", "--out", str(out), "--sampler", "aas",
                           "--evaluate", "--model-repository", str(repo), "--model-name", "m", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "epoch 2/2" in printed and "mAP" in printed
    report = json.loads((out / "reports.json").read_text())
    assert report["world_size"] == 1 and len(report["reports"]) == 2
    assert report["pairs_asked"] > 0 and 0.0 <= report["final_retrieval"]["mAP"] <= 1.0
    assert report["repository_version"] == 2 and model_versions(repo, "m") == [1, 2]
    trained = load_model(out / "model")
    exported = load_model(repo / "m" / "2")  # the python-backend version folder
    for a, b in zip(trained.parameters(), exported.parameters(), strict=True):
        assert np.array_equal(a.detach().numpy(), b.detach().numpy())


def test_partial_run_fine_tunes_the_last_stage(tmp_path):
    import torch

    from reidal.embedding.model import build_default_model, load_model

    out = tmp_path / "run"
    assert main(["--dataset", "synthetic:6", "--out", str(out), "--mode", "partial",
                 "--image-size", "64", "--trainable-stages", "1", "--augment-views", "1",
                 *SMALL]) == 0
    report = json.loads((out / "reports.json").read_text())
    cfg = report["config"]
    assert cfg["mode"] == "partial" and cfg["iters_per_epoch"] == 2  # the flag wins
    assert cfg["pair_loss_weight"] == 1.0  # PARTIAL_SCHEDULE's, not given
    trained = load_model(out / "model").state_dict()
    base = build_default_model(input_size=(64, 64)).state_dict()
    moved = {k for k in base if not torch.equal(base[k], trained[k])}
    assert any(k.startswith("backbone.net._blocks.15.") for k in moved)
    assert not any(k.startswith("backbone.net._blocks.14.") for k in moved)


def test_questions_need_identities(tmp_path, capsys):
    from reidal.data.synthetic_images import SyntheticConfig, iter_samples

    rows = ["image_id,identity,path"]
    for k, s in enumerate(iter_samples(SyntheticConfig.tiny())):
        path = tmp_path / f"{k}.png"
        s.image.save(path)
        rows.append(f"{k},,{path}")
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    code = questions_main(["--dataset", str(tmp_path / "meta.csv"), "--out",
                           str(tmp_path / "o"), "--sampler", "aas", *SMALL])
    assert code == 2 and "some training images have none" in capsys.readouterr().err


def test_the_production_entry_point_asks_no_simulated_annotator(tmp_path, capsys):
    """`python -m reidal.training` has no annotator of its own (it imports no simulation
    helper): a run that asks questions is refused, naming the entry point that has one."""
    code = main(["--dataset", "synthetic:6", "--out", str(tmp_path / "o"), "--sampler",
                 "random", *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and "python -m reidal.benchmark.train" in err and "--sampler none" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.timeout(300)
def test_full_mode_under_torchrun_two_processes_agree(tmp_path):
    """Two gloo processes (the multi-GPU path on CPU): DDP keeps the parameters identical
    and the replicated hybrid memories stay identical; rank 0 writes the outputs."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", "-m", "reidal.benchmark.train", "--dataset", "synthetic:6", "--mode", "full",
         "--image-size", "64", "--num-workers", "0", "--sampler", "aas", "--out", str(out),
         *SMALL], capture_output=True, text=True, timeout=280, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / "ranks" / f"{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["model_digest"] == ranks[1]["model_digest"]
    assert ranks[0]["memory_digest"] == ranks[1]["memory_digest"]
    report = json.loads((out / "reports.json").read_text())
    assert report["world_size"] == 2 and report["config"]["mode"] == "full"
    assert report["train_images_per_s"] > 0 and report["pairs_asked"] > 0
    assert proc.stdout.count("epoch 2/2") == 1  # only rank 0 reports


def test_collection_run_trains_on_stored_answers_and_records_the_version(tmp_path, capsys):
    """--collection: the store's images and answers, from the collection's model version in
    an ONNX (NGC) repository, exported in the repository's format (ONNX, torch files beside
    it) and recorded as a finished training job."""
    from reidal.data.synthetic_images import SyntheticConfig, iter_samples
    from reidal.embedding.model import load_model
    from reidal.embedding.onnx_export import write_onnx_repository
    from reidal.store import AnswerIn, ImageRecord, Store
    from reidal.training_jobs import repository_format

    repo = tmp_path / "repo"
    write_onnx_repository(repo, model_name="m")
    assert repository_format(repo, "m") == "onnx" and (repo / "m" / "1" / "model.json").is_file()
    data = tmp_path / "data"
    samples = list(iter_samples(SyntheticConfig.tiny(image_size=128)))
    store = Store(data)
    try:
        store.collections.create("z", model_name="m", model_version="1")
        records = []
        for s in samples:
            path = tmp_path / f"{s.image_id}.png"
            s.image.save(path)
            records.append(ImageRecord(s.image_id, uri=str(path)))
        store.images.add("z", records)
        by_id = {s.image_id: s.identity for s in samples}
        ids = sorted(by_id)
        same = [(a, b) for a in ids for b in ids if a < b and by_id[a] == by_id[b]][:6]
        store.answers.submit("z", [AnswerIn(a, b, "SAME", annotator="p") for a, b in same])
    finally:
        store.close()
    out = tmp_path / "run"
    assert main(["--collection", "z", "--data-dir", str(data), "--model-repository", str(repo),
                 "--out", str(out), *SMALL]) == 0, capsys.readouterr()
    assert (repo / "m" / "2" / "model.onnx").is_file() and repository_format(repo, "m") == "onnx"
    trained = load_model(repo / "m" / "2")  # a later job can start from it
    assert trained.arch["input_size"] == list(DEFAULT_INPUT_SIZE)  # the repository's model's
    store = Store(data)
    try:
        jobs = store.jobs.all("z")
    finally:
        store.close()
    assert len(jobs) == 1 and jobs[0].state == "SUCCEEDED"
    assert (jobs[0].base_model_version, jobs[0].model_version) == ("1", "2")
    assert jobs[0].progress["answers_used"] == len(same)
    # a version without torch files cannot be trained from: a clear error, nothing written
    (repo / "m" / "2" / "model.json").unlink()
    assert main(["--collection", "z", "--data-dir", str(data), "--model-repository", str(repo),
                 "--model", "m:2", "--out", str(tmp_path / "bad"), *SMALL]) == 2
    assert "no torch model" in capsys.readouterr().err
