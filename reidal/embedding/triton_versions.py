"""Which versions of a model Triton has loaded: reidal decides, per version, not Triton's
version policy.

Collections pin model versions (a training job's version is promoted for its own
collection only), so the versions that must answer are the pinned ones, not the newest
``keep_versions`` of the config's ``latest`` policy, which a training job's new version
would shift past an older pinned one. With explicit model control a load request may carry
the model's config; :func:`load_versions` sends the config with a ``specific`` version
policy naming the versions wanted. Measured on the bundled Triton 2.51 (python backend):
the versions that stay loaded are not reloaded (their stub processes keep running), a new
one loads in about 10 s on 2 CPU cores, and a version that is not in the repository is
skipped silently, so callers check readiness afterwards (:func:`ready_versions`).

The config a load carries is Triton's current one, or the repository's file when the
caller has the repository (a training job, which may just have written it). A load with
no config (Triton's start, another tool's plain load) falls back to the file's policy:
pinned versions it leaves out are loaded again when a request needs them
(:meth:`reidal.embedding.triton_client.TritonEmbedder.embed`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from reidal.embedding.triton_repo import CONFIG_FILE, read_config


def ready_versions(client: Any, name: str, *, timeout_s: float | None = None) -> set[str]:
    """The versions of ``name`` Triton reports READY (``client``: a tritonclient.grpc
    InferenceServerClient)."""
    index = client.get_model_repository_index(as_json=True, client_timeout=timeout_s)
    return {str(e.get("version")) for e in index.get("models", [])
            if e.get("name") == name and e.get("state") == "READY" and e.get("version")}


def load_versions(client: Any, name: str, versions: Collection[str], *,
                  keep_ready: bool, repository: str | Path | None = None,
                  timeout_s: float | None = None) -> set[str]:
    """Ask Triton to serve ``versions`` of model ``name`` (plus every version ready now when
    ``keep_ready``; otherwise the others are unloaded) and return the versions ready after.
    A version not in Triton's repository is not loaded (check the result). A model with no
    version loaded is first loaded by its config's own policy (its config is read from
    Triton). Raises tritonclient's InferenceServerException when Triton refuses."""
    from tritonclient.utils import InferenceServerException

    wanted = {str(v) for v in versions if str(v)}
    bad = sorted(v for v in wanted if not v.isdigit())
    if bad:
        raise ValueError(f"model versions must be decimal numbers, got {bad}")
    path = Path(repository) / name / CONFIG_FILE if repository is not None else None
    if path is not None and path.exists():
        config = read_config(path)
    else:
        try:
            config = client.get_model_config(name, as_json=True,
                                             client_timeout=timeout_s)["config"]
        except InferenceServerException:  # nothing loaded: Triton has no config to give
            client.load_model(name, client_timeout=timeout_s)
            config = client.get_model_config(name, as_json=True,
                                             client_timeout=timeout_s)["config"]
    if keep_ready:
        wanted |= ready_versions(client, name, timeout_s=timeout_s)
    if not wanted:
        raise ValueError(f"no version of {name!r} to load")
    config = {**config, "version_policy": {"specific": {
        "versions": sorted(int(v) for v in wanted)}}}
    client.load_model(name, config=json.dumps(config), client_timeout=timeout_s)
    return ready_versions(client, name, timeout_s=timeout_s)


def triton_loader(grpc_url: str, repository: str | Path | None = None,
                  timeout_s: float = 300.0) -> Callable[..., set[str]]:
    """``load(name, versions, keep_ready=False)``: :func:`load_versions` through Triton at
    ``grpc_url`` (the config from ``repository`` when given)."""

    def load(name: str, versions: Collection[str], keep_ready: bool = False) -> set[str]:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(grpc_url)
        try:
            return load_versions(client, name, versions, keep_ready=keep_ready,
                                 repository=repository, timeout_s=timeout_s)
        finally:
            client.close()

    return load


__all__ = ["load_versions", "ready_versions", "triton_loader"]
