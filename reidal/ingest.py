"""Images into a collection: check, deduplicate by id, embed, keep the bytes, store.

One call handles one batch of images (one AddImages message) all or nothing: the images,
where their pixels are, and their vectors are written in one store transaction after the
embedding service answered, so a failure (a bad image, Triton down) stores nothing of the
batch. Ingest is idempotent per image id: an id already present is not added or embedded
again, and when its new content differs from the stored one it is reported, not replaced.

:func:`embed_missing` is the long form (EmbedCollection): every image lacking a vector of a
model version is embedded in chunks, with progress, and the collection then switches to
that version.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reidal.blobs import sha256_hex
from reidal.collection_state import check_id
from reidal.embedding.images import ImageLimits, check_uri
from reidal.errors import FailedPrecondition, InvalidArgument
from reidal.limits import MAX_METADATA_ENTRIES, MAX_METADATA_TEXT, MAX_NAME_LENGTH
from reidal.runtime import Progress, Runtime
from reidal.store import ImageRecord, ImageSource

#: Most images per ingest call (one AddImages message); the embedding service's limit.
MAX_IMAGES_PER_CALL = 1024


@dataclass(frozen=True)
class IngestItem:
    """One image to ingest: the caller's id, exactly one of bytes or a URI, name, metadata."""

    image_id: str
    data: bytes | None = None
    uri: str | None = None
    name: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)

    def source(self) -> ImageSource:
        if self.data is not None:
            return ImageSource("data", sha256_hex(self.data), len(self.data))
        return ImageSource("uri", sha256_hex(("uri:" + (self.uri or "")).encode()), 0)


@dataclass
class IngestOutcome:
    """What one or more ingest calls did (counts add up over a stream)."""

    received: int = 0
    added: int = 0
    already_present: int = 0
    embedded: int = 0
    changed_ids: list[str] = field(default_factory=list)
    model_name: str = ""
    model_version: str = ""

    def merge(self, other: IngestOutcome) -> None:
        self.received += other.received
        self.added += other.added
        self.already_present += other.already_present
        self.embedded += other.embedded
        self.changed_ids.extend(other.changed_ids)
        if other.model_version:
            self.model_name, self.model_version = other.model_name, other.model_version


def check_items(items: Sequence[IngestItem], limits: ImageLimits | None = None) -> None:
    """Ids valid and unique within the call, exactly one source each, metadata bounded;
    with ``limits``, every URI one the server may read (inside its image roots), so a URI
    stored without embedding (defer_embedding) is refused now, never read later."""
    if not items:
        raise InvalidArgument("the request has no images")
    if len(items) > MAX_IMAGES_PER_CALL:
        raise InvalidArgument(
            f"the request has {len(items)} images, at most {MAX_IMAGES_PER_CALL} are allowed per "
            "message: split the stream into more messages")
    seen: set[str] = set()
    for k, item in enumerate(items):
        check_id(item.image_id, f"image id at position {k}")
        if item.image_id in seen:
            raise InvalidArgument(f"image id {item.image_id!r} appears more than once in one "
                                  f"message (again at position {k})")
        seen.add(item.image_id)
        if (item.data is None) == (item.uri is None):
            raise InvalidArgument(f"image {item.image_id!r} must set exactly one of data or uri")
        if item.data is not None and not item.data:
            raise InvalidArgument(f"image {item.image_id!r} has empty data")
        if item.uri is not None and limits is not None:
            check_uri(item.uri, item_id=item.image_id, limits=limits)
        if len(item.name) > MAX_NAME_LENGTH:
            raise InvalidArgument(f"image {item.image_id!r}: name is longer than "
                                  f"{MAX_NAME_LENGTH} characters")
        if len(item.metadata) > MAX_METADATA_ENTRIES:
            raise InvalidArgument(f"image {item.image_id!r} has {len(item.metadata)} metadata "
                                  f"entries, at most {MAX_METADATA_ENTRIES} are allowed")
        for key, value in item.metadata.items():
            if not key or len(key) > MAX_METADATA_TEXT or len(value) > MAX_METADATA_TEXT:
                raise InvalidArgument(
                    f"image {item.image_id!r}: metadata keys must be non-empty and keys and "
                    f"values at most {MAX_METADATA_TEXT} characters (key {key[:40]!r})")


def _embed_items(items: Sequence[IngestItem]) -> list[Any]:
    from reidal.services.embedding import ImageItem

    return [ImageItem(it.image_id, data=it.data, uri=it.uri) for it in items]


def ingest(runtime: Runtime, collection_id: str, items: Sequence[IngestItem], *,
           defer_embedding: bool = False, deadline: float | None = None,
           is_active: Callable[[], bool] | None = None) -> IngestOutcome:
    """Add one batch of images (see the module docstring)."""
    store = runtime.store
    col = store.get_collection(collection_id)
    check_items(items, runtime.image_limits)
    ids = [it.image_id for it in items]
    present = store.present_image_ids(collection_id, ids)
    known = store.image_sources(collection_id, present)
    sources = {it.image_id: it.source() for it in items}
    changed = [i for i in ids if i in known and known[i].sha256 != sources[i].sha256]
    out = IngestOutcome(received=len(items), changed_ids=changed)

    to_embed: list[IngestItem] = []
    if not defer_embedding:
        have = (store.vector_ids(collection_id, col.model_name, col.model_version)
                if col.model_version else set())
        to_embed = [it for it in items if it.image_id not in have
                    and (it.image_id not in present or it.image_id not in changed)]
    embedded = None
    if to_embed:
        embedder = runtime.require_embedder()
        embedded = embedder.embed(_embed_items(to_embed), col.model_name, col.model_version,
                                  deadline=deadline, is_active=is_active)
    records = [ImageRecord(it.image_id, it.uri or "", it.name, dict(it.metadata))
               for it in items if it.image_id not in present]
    with runtime.blob_lock:  # no blob GC between writing a blob and referencing it
        for it in items:
            if it.data is not None and it.image_id not in present:
                runtime.blobs.put(it.data)
        added, already = store.ingest(
            collection_id, records, sources,
            model_name=embedded.model_name if embedded else "",
            model_version=embedded.model_version if embedded else "",
            vector_ids=embedded.ids if embedded else (),
            vectors=embedded.vectors if embedded else None,
        )
    out.added = added
    out.already_present = len(items) - added
    out.embedded = len(embedded.ids) if embedded else 0
    if embedded:
        out.model_name, out.model_version = embedded.model_name, embedded.model_version
    return out


def resolve_model(runtime: Runtime, model_name: str, version: str) -> tuple[str, str]:
    """The model name and concrete version Triton serves for a (possibly empty) request."""
    embedder = runtime.require_embedder()
    info = embedder.model(model_name, version)
    if not info.version:
        raise FailedPrecondition(f"model {model_name!r} has no version loaded in Triton")
    return info.name, info.version


def embed_missing(runtime: Runtime, collection_id: str, model_name: str, version: str,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Embed every image (excluded ones too) lacking a vector of the model version, then
    switch the collection to it. Returns the result stored with the operation.

    An image that cannot be embedded (undecodable bytes kept by a deferred ingest, a URI
    no longer readable) does not stop the others: every other vector is stored. A bad
    excluded image is then only listed (``skipped_image_ids``); a bad image that is not
    excluded fails the operation (InvalidArgument naming each one) without switching, so
    the caller excludes or deletes it and runs EmbedCollection again, which embeds only
    what still lacks a vector."""
    store = runtime.store
    embedder = runtime.require_embedder()
    images = store.images(collection_id)
    excluded = store.excluded_images(collection_id)
    have = store.vector_ids(collection_id, model_name, version)
    todo = [img for img in images if img.image_id not in have]
    sources = store.image_sources(collection_id)
    if progress is not None:
        progress.update(total=len(todo), done=0, stage="embedding")
    bad: list[tuple[str, str]] = []
    for start in range(0, len(todo), runtime.embed_chunk):
        items = []
        for img in todo[start:start + runtime.embed_chunk]:
            item = _stored_item(runtime, img, sources.get(img.image_id))
            if isinstance(item, str):
                bad.append((img.image_id, item))
            else:
                items.append(item)
        result, rejected = _embed_good(embedder, items, model_name, version)
        bad.extend(rejected)
        if result is not None:
            if result.model_version != version:
                raise FailedPrecondition(
                    f"Triton answered with model {model_name} version {result.model_version} "
                    f"instead of {version}")
            store.put_vectors(collection_id, model_name, version, result.ids, result.vectors)
        if progress is not None:
            progress.update(done=min(start + runtime.embed_chunk, len(todo)))
    blocking = [(i, why) for i, why in bad if i not in excluded]
    if blocking:
        listed = "; ".join(f"{i!r}: {why}" for i, why in blocking[:MAX_LISTED_BAD])
        more = f"; and {len(blocking) - MAX_LISTED_BAD} more" if len(blocking) > MAX_LISTED_BAD else ""
        raise InvalidArgument(
            f"{len(blocking)} image(s) cannot be embedded ({listed}{more}); the other "
            f"{len(todo) - len(bad)} vector(s) are stored. Exclude (ExcludeImage) or delete "
            "(DeleteImage) these images and run EmbedCollection again")
    store.set_model(collection_id, model_name, version, actor="EmbedCollection")
    if progress is not None:
        progress.update(stage="done")
    return {"model_name": model_name, "model_version": version,
            "embedded": len(todo) - len(bad), "skipped_image_ids": [i for i, _ in bad]}


#: How many unembeddable images an EmbedCollection failure names.
MAX_LISTED_BAD = 20


def _stored_item(runtime: Runtime, img: ImageRecord, src: ImageSource | None
                 ) -> IngestItem | str:
    """What to embed a stored image from (its kept bytes, else its URI), or why not."""
    if src is not None and src.kind == "data":
        try:
            return IngestItem(img.image_id, data=runtime.blobs.get(src.sha256))
        except FileNotFoundError:
            return "its kept bytes are missing from the data directory"
    if img.uri:
        return IngestItem(img.image_id, uri=img.uri)
    return "it has neither kept bytes nor a uri to embed from"


def _embed_good(embedder: Any, items: list[IngestItem], model_name: str, version: str
                ) -> tuple[Any, list[tuple[str, str]]]:
    """Embed ``items`` leaving out the ones the embedder rejects as bad images:
    (result or None when none is left, [(id, reason)] of the rejected)."""
    rejected: list[tuple[str, str]] = []
    while items:
        try:
            return embedder.embed(_embed_items(items), model_name, version), rejected
        except Exception as exc:
            found = _rejected(exc, embedder, items, model_name, version)
            if not found:
                raise
        rejected.extend(found)
        gone = {i for i, _ in found}
        items = [it for it in items if it.image_id not in gone]
    return None, rejected


def _rejected(exc: Exception, embedder: Any, items: list[IngestItem], model_name: str,
              version: str) -> list[tuple[str, str]]:
    """The (id, reason) of each bad image a failed embedding call names: from the
    in-process servicer's BadImages, or, from a remote embedding service's
    INVALID_ARGUMENT (which names them only in words), by embedding each image alone."""
    import grpc

    from reidal.services.embedding import BadImages

    if isinstance(exc, BadImages):
        return [(p.item_id, p.reason) for p in exc.problems]
    if not (isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call)
            and exc.code() == grpc.StatusCode.INVALID_ARGUMENT):
        return []
    found = []
    for it in items:
        try:
            embedder.embed(_embed_items([it]), model_name, version)
        except grpc.RpcError as one:
            if isinstance(one, grpc.Call) and one.code() == grpc.StatusCode.INVALID_ARGUMENT:
                found.append((it.image_id, one.details()))
            else:
                raise
    return found
