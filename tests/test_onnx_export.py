"""ONNX export for the GPU Triton: same vectors as torch (onnxruntime on CPU), valid repository."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from reidal.embedding.model import build_default_model, save_model
from reidal.embedding.onnx_export import main
from reidal.embedding.preprocess import preprocess
from reidal.embedding.spec import default_spec
from reidal.embedding.triton_repo import parse_config, spec_from_config

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
    # The committed GPU config is exactly what the export command writes (no drift).
    assert text == DEPLOY_CONFIG.read_text()
    cfg = parse_config(text)
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
