"""Stored vectors out (GetVectors) and vectors computed elsewhere in (PutVectors).

Why: a client that already holds the images' vectors (the demo after AddImages, a platform
with MiewID or MegaDescriptor embeddings) should never have them embedded again. Read-back
returns what sampling reads; external vectors are checked (one length, finite, non-zero),
L2-normalised as Triton's are, and stored under the model that made them, so the one-model
rule of a collection (:meth:`reidal.store.images.Images.add_vectors`) holds for them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reidal.collection_state import check_id
from reidal.errors import InvalidArgument, NotFound
from reidal.limits import MAX_VECTOR_BYTES_PER_MESSAGE, MAX_VECTOR_DIM, MAX_VECTORS_PER_CALL
from reidal.store import Store

#: Version recorded for external vectors when the caller names none and the collection
#: pins no version of that model.
EXTERNAL_DEFAULT_VERSION = "1"


@dataclass(frozen=True)
class StoredVectors:
    """Vectors of one model version, rows in ingest order of ``image_ids``."""

    model_name: str
    model_version: str
    image_ids: list[str]
    vectors: np.ndarray


def read_vectors(store: Store, collection_id: str, image_ids: Sequence[str] = (), *,
                 model_name: str = "", model_version: str = "") -> StoredVectors:
    """The stored vectors of a collection (of ``image_ids`` only when given; an image with
    no vector of the version is left out). Empty name/version: the collection's own."""
    col = store.collections.get(collection_id)
    name = model_name or col.model_name
    version = model_version or (col.model_version if name == col.model_name else "")
    if len(image_ids) > MAX_VECTORS_PER_CALL:
        raise InvalidArgument(f"image_ids names {len(image_ids)} images, at most "
                              f"{MAX_VECTORS_PER_CALL} are allowed")
    if image_ids:
        missing = sorted(set(image_ids) - store.images.present(collection_id, image_ids))
        if missing:
            raise NotFound(f"image(s) not in collection {collection_id!r}: {missing[:20]}")
    ids, mat = store.images.vectors(collection_id, name, version) if version else ([], None)
    if mat is None or not ids:
        return StoredVectors(name, version, [], np.empty((0, 0), dtype=np.float32))
    if image_ids:
        wanted = set(image_ids)
        keep = [k for k, iid in enumerate(ids) if iid in wanted]
        ids, mat = [ids[k] for k in keep], mat[keep]
    return StoredVectors(name, version, ids, mat)


def vectors_per_message(dim: int) -> int:
    """How many vectors of ``dim`` components one GetVectors message carries: at most
    MAX_VECTORS_PER_CALL and MAX_VECTOR_BYTES_PER_MESSAGE of float32s, at least one."""
    return max(1, min(MAX_VECTORS_PER_CALL, MAX_VECTOR_BYTES_PER_MESSAGE // (4 * max(dim, 1))))


def check_vectors(image_ids: Sequence[str], vectors: Sequence[Sequence[float]] | np.ndarray
                  ) -> np.ndarray:
    """The vectors as one float32 matrix, L2-normalised; InvalidArgument naming the first
    problem (count, ids, lengths, NaN/inf, all-zero)."""
    n = len(image_ids)
    if n == 0:
        raise InvalidArgument("no vectors given")
    if n > MAX_VECTORS_PER_CALL:
        raise InvalidArgument(f"{n} vectors in one request, at most {MAX_VECTORS_PER_CALL}")
    for k, iid in enumerate(image_ids):
        check_id(iid, f"vectors[{k}].image_id")
    if len(set(image_ids)) != n:
        seen: set[str] = set()
        dup = next(i for i in image_ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise InvalidArgument(f"image id {dup[:40]!r} is repeated in the request")
    lengths = {len(v) for v in vectors}
    if len(lengths) != 1:
        raise InvalidArgument(f"vectors have different lengths {sorted(lengths)[:10]}: one "
                              "model's vectors all have one length")
    dim = lengths.pop()
    if not 1 <= dim <= MAX_VECTOR_DIM:
        raise InvalidArgument(f"vectors have {dim} components, 1 to {MAX_VECTOR_DIM} allowed")
    mat = np.asarray(vectors, dtype=np.float64).reshape(n, dim)
    finite = np.isfinite(mat).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise InvalidArgument(f"vectors[{bad}] ({image_ids[bad][:40]!r}) has a NaN or "
                              "infinite component")
    norms = np.linalg.norm(mat, axis=1)
    if not (norms > 0).all():
        bad = int(np.flatnonzero(norms <= 0)[0])
        raise InvalidArgument(f"vectors[{bad}] ({image_ids[bad][:40]!r}) is all zeros")
    # normalised in float64: a float32 component near its range squares to inf
    return (mat / norms[:, None]).astype(np.float32)


def add_vectors(store: Store, collection_id: str, model_name: str, image_ids: Sequence[str],
                vectors: Sequence[Sequence[float]] | np.ndarray, *, model_version: str = "",
                actor: str = "") -> tuple[str, str]:
    """Store external vectors of images already in the collection under ``model_name``
    (all or nothing); returns the (name, version) recorded."""
    if not model_name:
        raise InvalidArgument("model.name must name the model that computed the vectors")
    mat = check_vectors(image_ids, vectors)
    if not model_version:
        col = store.collections.get(collection_id)
        model_version = (col.model_version if col.model_name == model_name and col.model_version
                         else EXTERNAL_DEFAULT_VERSION)
    store.images.add_vectors(collection_id, model_name, model_version, list(image_ids), mat,
                             actor=actor)
    return model_name, model_version
