"""A local Triton for laptops and CI: the default model repository plus the bundled server.

`reidal serve`, `reidal demo` and the benchmarks all need "a Triton serving the default
model in this data directory"; this is the one place that knows how to make it.
"""

from __future__ import annotations

from pathlib import Path

from reidal.embedding.spec import DEFAULT_MODEL_NAME, default_spec
from reidal.embedding.triton_repo import model_versions, write_model_repository
from reidal.embedding.triton_server import TritonServer


def ensure_default_repository(repo_dir: str | Path, *, model_name: str | None = None) -> Path:
    """Write version 1 of the default model into ``repo_dir`` unless a version exists."""
    from reidal.embedding.model import build_default_model

    spec = default_spec(model_name or DEFAULT_MODEL_NAME)
    repo = Path(repo_dir)
    if not model_versions(repo, spec.name):
        model = build_default_model(seed=0, input_size=spec.input_size)
        write_model_repository(repo, model_name=spec.name, version=1, model=model, spec=spec)
    return repo


def start_local_triton(data_dir: str | Path, *, model_name: str | None = None) -> TritonServer:
    """Start the bundled Triton on free loopback ports, serving the default model.

    The repository lives in ``<data_dir>/model_repository`` and the server's logs and
    workspace in ``<data_dir>/triton``; the caller stops the returned server.
    """
    data = Path(data_dir)
    spec = default_spec(model_name or DEFAULT_MODEL_NAME)
    repo = ensure_default_repository(data / "model_repository", model_name=spec.name)
    server = TritonServer(repo, models=[spec.name], workdir=data / "triton")
    server.start()
    return server
