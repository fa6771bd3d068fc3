"""What a training run reads from a collection and writes into a model repository.

Shared by the server's training jobs (:mod:`reidal.training_jobs`) and the cluster
launcher (:mod:`reidal.training.launch`, torchrun), so neither imports the other: the
collection's trainable images and answers in, the trained model out as the next version
of a Triton model. No torch here (the model is only handed to the writers).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reidal.collection_state import constraints_from_answers
from reidal.core.constraints import ConstraintSet
from reidal.embedding.images import DEFAULT_LIMITS, ImageError, decode_image
from reidal.embedding.onnx_export import write_onnx_repository
from reidal.embedding.triton_repo import (
    CONFIG_FILE,
    next_version,
    read_config,
    write_model_repository,
)
from reidal.errors import FailedPrecondition
from reidal.store import Store

# ------------------------------------------------------------------------ a collection in


def collection_constraints(store: Store, collection_id: str, image_ids: list[str]
                           ) -> ConstraintSet:
    """The current answers between the training rows (``image_ids``) as a ConstraintSet,
    built as the sampling service builds it."""
    return constraints_from_answers(image_ids, store.answers.all(collection_id)).constraints


def collection_images(store: Store, blobs: Any, collection_id: str,
                      limits: Any = None, draft_size: int | None = None,
                      cancel: threading.Event | None = None
                      ) -> tuple[list[str], list[Any]] | None:
    """Ids and PIL images of the collection's images that are not excluded (the rows
    sampling uses): bytes kept in the blob store, or the file an image's URI names
    (read again now under ``limits``, a server's image roots; None: any path, for an
    operator's own run; a file gone since ingest fails with FailedPrecondition naming it).
    ``draft_size``: the model's larger input side, so JPEGs decode reduced as the
    EmbeddingService decodes them (:func:`reidal.embedding.images.open_image`).
    ``cancel``: checked before each image, so a job on a large collection of big photos
    stops within one decode of a request (None when cancelled)."""
    limits = DEFAULT_LIMITS if limits is None else limits
    sources = store.images.sources(collection_id)
    ids, out = [], []
    for img in store.images.all(collection_id, include_excluded=False):
        if cancel is not None and cancel.is_set():
            return None
        src = sources.get(img.image_id)
        try:
            if src is not None and src.kind == "data":
                pixels = decode_image(blobs.get(src.sha256), None, item_id=img.image_id,
                                      draft_size=draft_size)
            elif img.uri:
                pixels = decode_image(None, img.uri, item_id=img.image_id, limits=limits,
                                      draft_size=draft_size)
            else:
                raise FailedPrecondition(f"image {img.image_id!r} has neither kept bytes "
                                         "nor a URI to train on")
        except ImageError as exc:
            raise FailedPrecondition(f"cannot read image {img.image_id!r} to train on: "
                                     f"{exc}") from None
        ids.append(img.image_id)
        out.append(pixels)
    return ids, out


# ------------------------------------------------------------------------ a version out


def _repository_options(repo: Path, model_name: str) -> dict[str, Any]:
    """max_batch_size / keep_versions of the served config, so a new version keeps it."""
    path = repo / model_name / CONFIG_FILE
    if not path.exists():
        return {}
    cfg = read_config(path)
    out: dict[str, Any] = {}
    if cfg.get("max_batch_size"):
        out["max_batch_size"] = int(cfg["max_batch_size"])
    latest = cfg.get("version_policy", {}).get("latest", {}).get("num_versions")
    if latest:
        out["keep_versions"] = int(latest)
    return out


def repository_format(repo: str | Path, model_name: str) -> str:
    """``"onnx"`` when the model's config serves ONNX (the NGC GPU repository), else
    ``"python"`` (the python backend of the bundled CPU Triton; also a new model)."""
    path = Path(repo) / model_name / CONFIG_FILE
    if not path.exists():
        return "python"
    cfg = read_config(path)
    kind = f"{cfg.get('backend', '')} {cfg.get('platform', '')}"
    return "onnx" if "onnx" in kind else "python"


#: Version numbers export_version tries when other writers keep taking the one it picked.
#: Each lost attempt means another writer completed a version meanwhile, so only a folder
#: that something else keeps filling exhausts it.
EXPORT_ATTEMPTS = 20


def export_version(model: Any, repo: str | Path, model_name: str, *, fmt: str | None = None,
                   spec: Any = None, load: Callable[[str, int], Any] | None = None) -> int:
    """Write ``model`` as the next version of ``model_name`` in the repository, in the format
    the repository serves (``fmt`` to force one), keeping the served config's batch size
    and version policy, and (through the writers' config merge,
    :func:`reidal.embedding.triton_repo.merge_config`) its instance groups, dynamic batching
    and other operator settings; then ``load(model_name)`` (e.g. Triton's model control). ONNX
    versions keep ``model.pt`` + ``model.json`` beside ``model.onnx`` so later training can
    start from them. A ``fmt`` other than the served one is refused (ValueError: the
    model's other versions could no longer be served). ``load(model_name, version)`` then
    has Triton serve the new version. Returns the version number."""
    repo = Path(repo)
    fmt = fmt or repository_format(repo, model_name)
    if fmt not in ("python", "onnx"):
        raise ValueError(f"export format must be 'python' or 'onnx', got {fmt!r}")
    options = _repository_options(repo, model_name)
    for attempt in range(EXPORT_ATTEMPTS):
        # Another process (a replica's job, the cluster launcher) may take the number we
        # picked before our rename: pick the next one and write again, never overwrite.
        version = next_version(repo, model_name)
        try:
            if fmt == "onnx":
                write_onnx_repository(repo, model=model, spec=spec, model_name=model_name,
                                      version=version, overwrite=False, **options)
            else:
                write_model_repository(repo, model_name=model_name, version=version,
                                       model=model, spec=spec, **options)
            break
        except FileExistsError:
            if attempt == EXPORT_ATTEMPTS - 1:
                raise
    if load is not None:
        load(model_name, version)
    return version
