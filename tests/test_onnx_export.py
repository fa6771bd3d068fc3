"""ONNX export for the GPU Triton: same vectors as torch (onnxruntime on CPU), valid repository."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from reidal.embedding.model import build_default_model, save_model
from reidal.embedding.onnx_export import main
from reidal.embedding.preprocess import preprocess
from reidal.embedding.spec import default_spec
from reidal.embedding.triton_repo import P_DEFAULT_VERSION, parse_config, spec_from_config

DEPLOY_CONFIG = (
    Path(__file__).resolve().parents[1]
    / "deploy/triton/model_repository/reidal_embedder/config.pbtxt"
)


def test_cli_export_matches_torch_and_the_committed_config(tmp_path, sample_images):
    import onnxruntime as ort

    spec = default_spec()
    model = build_default_model(seed=3)  # a "trained" model: not the default head
    save_model(model, tmp_path / "saved", spec)
    out = tmp_path / "repo"
    assert main(["--out", str(out), "--model-dir", str(tmp_path / "saved"), "--version", "4"]) == 0

    onnx_path = out / "reidal_embedder" / "4" / "model.onnx"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for n in (5, 1):  # the batch axis is dynamic
        batch = preprocess(sample_images[:n], spec)
        got = session.run(["embeddings"], {"images": batch})[0]
        with torch.inference_mode():
            want = model(torch.from_numpy(batch)).numpy()
        assert got.shape == (n, 256)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    text = (out / "reidal_embedder" / "config.pbtxt").read_text()
    # The committed GPU config is exactly what the export command writes (no drift), but
    # for the default version, the first one written into the folder: 1 there, 4 here.
    assert text.replace('string_value: "4"', 'string_value: "1"') == DEPLOY_CONFIG.read_text()
    cfg = parse_config(text)
    assert cfg["parameters"][P_DEFAULT_VERSION] == {"string_value": "4"}
    assert cfg["backend"] == "onnxruntime"
    assert cfg["default_model_filename"] == "model.onnx"
    assert cfg["max_batch_size"] == 64
    assert cfg["instance_group"] == [{"count": 1, "kind": "KIND_GPU"}]
    assert "dynamic_batching" in cfg
    assert spec_from_config(cfg) == spec  # a client discovers the preprocessing on GPU too


def test_an_onnx_export_never_replaces_a_python_backend_model(tmp_path):
    """Writing ONNX into the CPU (python-backend) repository would leave Triton unable to
    serve the model's python versions: refused, nothing changed."""
    import pytest

    from reidal.embedding.onnx_export import write_onnx_repository
    from reidal.embedding.triton_repo import CONFIG_FILE, write_model_repository

    write_model_repository(tmp_path, model_name="m")
    before = (tmp_path / "m" / CONFIG_FILE).read_text()
    with pytest.raises(ValueError):
        write_onnx_repository(tmp_path, model_name="m", version=2, verify=False)
    assert (tmp_path / "m" / CONFIG_FILE).read_text() == before
    assert not (tmp_path / "m" / "2").exists()


# An operator's hand-tuned config of the served ONNX model: two instance groups (2 on GPUs
# 0 and 1, 2 on CPU), their own dynamic batching and parameter, a stale preprocessing value
# and a batch size / version policy that the next export sets.
OPERATOR_EDITS = """
# tuned for the two-GPU node
instance_group [ { count: 2 kind: KIND_GPU gpus: [ 0, 1 ] }, { count: 2 kind: KIND_CPU } ]
dynamic_batching { preferred_batch_size: [ 8, 32 ] max_queue_delay_microseconds: 2000 }
parameters { key: "operator_note" value { string_value: "keep me" } }
parameters { key: "preprocess_mean" value { string_value: "0.1,0.2,0.3" } }
max_batch_size: 48
version_policy { all { } }
"""


def _operator_config(model_dir: Path) -> str:
    """The exported config with OPERATOR_EDITS in place of its own values of those fields."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    edits = text_format.Parse(OPERATOR_EDITS, mc.ModelConfig())
    for field in ("instance_group", "dynamic_batching", "max_batch_size", "version_policy"):
        cfg.ClearField(field)
    cfg.MergeFrom(edits)
    return "# the operator's own comment\n" + text_format.MessageToString(cfg)


def test_a_new_version_keeps_the_operators_instance_groups_and_batching(tmp_path):
    from reidal.embedding.onnx_export import (
        GPU_PREFERRED_BATCH_SIZES,
        GPU_QUEUE_DELAY_US,
        write_onnx_repository,
    )
    from reidal.embedding.triton_repo import CONFIG_FILE
    from reidal.training_jobs import export_version

    spec = replace(default_spec("m"), input_size=(16, 16))
    # A small module keeps the five exports fast (ONNX only: reidal cannot rebuild it).
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 8))
    model_dir = write_onnx_repository(tmp_path, model=model, spec=spec, model_name="m",
                                      verify=False)
    first = parse_config((model_dir / CONFIG_FILE).read_text())
    # A first export into an empty folder: the GPU defaults.
    assert first["instance_group"] == [{"count": 1, "kind": "KIND_GPU"}]
    assert first["dynamic_batching"] == {
        "preferred_batch_size": list(GPU_PREFERRED_BATCH_SIZES),
        "max_queue_delay_microseconds": str(GPU_QUEUE_DELAY_US),  # uint64: a JSON string
    }
    assert first["version_policy"] == {"latest": {"num_versions": 2}}

    (model_dir / CONFIG_FILE).write_text(_operator_config(model_dir))
    edited = parse_config((model_dir / CONFIG_FILE).read_text())
    operator_groups = [
        {"count": 2, "kind": "KIND_GPU", "gpus": [0, 1]}, {"count": 2, "kind": "KIND_CPU"},
    ]
    assert edited["instance_group"] == operator_groups  # the edit itself took

    # The next version, written the way training writes it.
    assert export_version(model, tmp_path, "m", spec=spec) == 2
    cfg = parse_config((model_dir / CONFIG_FILE).read_text())
    assert (model_dir / "2" / "model.onnx").is_file()
    assert cfg["instance_group"] == operator_groups
    assert cfg["dynamic_batching"] == {"preferred_batch_size": [8, 32],
                                       "max_queue_delay_microseconds": "2000"}
    assert cfg["parameters"]["operator_note"] == {"string_value": "keep me"}
    # Owned: the preprocessing a client must follow comes back from the model's spec;
    # max_batch_size 48 was kept by training (it passes the served one); the version policy
    # becomes reidal's "latest" one (the old version answers while re-embedding).
    assert cfg["parameters"]["preprocess_mean"] == first["parameters"]["preprocess_mean"]
    assert spec_from_config(cfg) == spec
    assert cfg["max_batch_size"] == 48
    assert cfg["version_policy"] == {"latest": {"num_versions": 2}}
    for field in ("backend", "default_model_filename", "input", "output", "name"):
        assert cfg[field] == first[field]

    # A re-export with a smaller batch: preferred sizes above it go (Triton refuses them),
    # the rest of the operator's batching stays.
    write_onnx_repository(tmp_path, model=model, spec=spec, model_name="m", version=3,
                          max_batch_size=16, keep_versions=3, verify=False)
    cfg = parse_config((model_dir / CONFIG_FILE).read_text())
    assert cfg["max_batch_size"] == 16 and cfg["version_policy"]["latest"]["num_versions"] == 3
    assert cfg["dynamic_batching"] == {"preferred_batch_size": [8],
                                       "max_queue_delay_microseconds": "2000"}
    assert cfg["instance_group"] == operator_groups

    # Nothing owned changes: the file is left byte for byte (comments and all), so Triton
    # does not reload the served versions.
    text = (model_dir / CONFIG_FILE).read_text()
    (model_dir / CONFIG_FILE).write_text("# operator again\n" + text)
    write_onnx_repository(tmp_path, model=model, spec=spec, model_name="m", version=4,
                          max_batch_size=16, keep_versions=3, verify=False)
    assert (model_dir / CONFIG_FILE).read_text() == "# operator again\n" + text

    # Instance settings given explicitly (--instances / --kind) replace the group.
    write_onnx_repository(tmp_path, model=model, spec=spec, model_name="m", version=5,
                          max_batch_size=16, keep_versions=3, instance_count=3, verify=False)
    cfg = parse_config((model_dir / CONFIG_FILE).read_text())
    assert cfg["instance_group"] == [{"count": 3, "kind": "KIND_GPU"}]
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == "2000"


def test_concurrent_exports_each_get_their_own_version(tmp_path):
    """Writers that pick the same next version (two replicas' jobs, the cluster launcher
    beside a server) each end with a version of their own: the later rename is refused,
    never replaces the other's files, and export_version takes the next number."""
    import threading

    from reidal.embedding.triton_repo import model_versions, staged_version
    from reidal.training_jobs import export_version

    # The mechanism: a version renamed into place while ours was staged is not replaced.
    model_dir = tmp_path / "solo"
    with pytest.raises(FileExistsError, match="another writer"):
        with staged_version(model_dir, 1, overwrite=False) as mine:
            (mine / "who").write_text("mine")
            with staged_version(model_dir, 1, overwrite=False) as theirs:
                (theirs / "who").write_text("theirs")
    assert (model_dir / "1" / "who").read_text() == "theirs"

    # Writers in threads of one process (torch's ONNX exporter is not thread-safe, so the
    # python-backend format; the server itself serialises its own exports): each picks the
    # next number from the folder, as two processes do.
    model = build_default_model()
    export_version(model, tmp_path, "m")  # version 1 and the config
    got: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def export_some() -> None:
        start.wait()
        try:
            for _ in range(4):
                got.append(export_version(model, tmp_path, "m"))
        except BaseException as exc:  # pragma: no cover - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=export_some) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(got) == list(range(2, 14))  # twelve exports, twelve distinct versions
    assert model_versions(tmp_path, "m") == list(range(1, 14))
