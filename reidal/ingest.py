"""Images into a collection: check, deduplicate by id, embed, keep the bytes, store.

:func:`ingest` handles one batch of images all or nothing: the images, where their pixels
are, and their vectors are written in one store transaction after the embedding service
answered, so a failure (a bad image, Triton down) stores nothing of the batch. Ingest is
idempotent per image id: an id already present is not added or embedded again, and when its
new content differs from the stored one it is reported, not replaced.

:func:`ingest_stream` (AddImages) gathers consecutive messages of a stream into such
batches of up to ``Runtime.ingest_batch`` images, so the embedder runs full batches and
the store commits once per batch whatever size the client's messages are, and stores one
batch while it embeds the next.

:func:`embed_missing` is the long form (EmbedCollection): every image lacking a vector of a
model version is embedded in chunks, with progress, and the collection then switches to
that version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from reidal.blobs import sha256_hex
from reidal.collection_state import check_id
from reidal.embedding.embedder import BadImages, Embedded, Embedder, ImageItem
from reidal.embedding.images import ImageLimits, check_uri
from reidal.errors import FailedPrecondition, InvalidArgument, RemoteError
from reidal.limits import MAX_METADATA_ENTRIES, MAX_METADATA_TEXT, MAX_NAME_LENGTH
from reidal.metrics import counter, histogram
from reidal.runtime import Progress, Runtime
from reidal.store import ImageRecord, ImageSource
from reidal.stream_batches import BatchLimits, gather

#: Most images per ingest call (one AddImages message); the embedding service's limit.
MAX_IMAGES_PER_CALL = 1024

_BATCH_IMAGES = histogram(
    "reidal_ingest_batch_images",
    "Images per embedding call of an ingest (an AddImages batch gathers several messages)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
_STORED = counter("reidal_ingest_images",
                  "Images added by ingest, counted as each batch commits (progress of streams)")


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


def _embed_items(items: Sequence[IngestItem]) -> list[ImageItem]:
    return [ImageItem(it.image_id, data=it.data, uri=it.uri) for it in items]


def ingest(runtime: Runtime, collection_id: str, items: Sequence[IngestItem], *,
           defer_embedding: bool = False, deadline: float | None = None,
           is_active: Callable[[], bool] | None = None) -> IngestOutcome:
    """Add one batch of images (see the module docstring)."""
    planned = _plan(runtime, collection_id, items, defer_embedding)
    return _store(runtime, planned, _embed(runtime, planned, deadline, is_active))


@dataclass(frozen=True)
class _Planned:
    """One batch checked against the store: what is new, changed, and to be embedded."""

    collection_id: str
    items: Sequence[IngestItem]
    present: set[str]
    sources: dict[str, ImageSource]
    changed: list[str]
    to_embed: list[IngestItem]
    model_name: str
    model_version: str


def _plan(runtime: Runtime, collection_id: str, items: Sequence[IngestItem],
          defer_embedding: bool) -> _Planned:
    store = runtime.store
    col = store.collections.get(collection_id)
    check_items(items, runtime.image_limits)
    ids = [it.image_id for it in items]
    present = store.images.present(collection_id, ids)
    known = store.images.sources(collection_id, present)
    sources = {it.image_id: it.source() for it in items}
    changed = [i for i in ids if i in known and known[i].sha256 != sources[i].sha256]
    to_embed: list[IngestItem] = []
    if not defer_embedding:
        have = (store.images.vector_ids(collection_id, col.model_name, col.model_version, ids)
                if col.model_version else set())
        to_embed = [it for it in items if it.image_id not in have
                    and (it.image_id not in present or it.image_id not in changed)]
    return _Planned(collection_id, items, present, sources, changed, to_embed,
                    col.model_name, col.model_version)


def _embed(runtime: Runtime, planned: _Planned, deadline: float | None,
           is_active: Callable[[], bool] | None) -> Embedded | None:
    """The embedder's answer for the batch's images to embed (None when none is)."""
    if not planned.to_embed:
        return None
    embedder = runtime.require_embedder()
    _BATCH_IMAGES.observe(len(planned.to_embed))
    return embedder.embed(_embed_items(planned.to_embed), planned.model_name,
                          planned.model_version, deadline=deadline, is_active=is_active)


def _store(runtime: Runtime, planned: _Planned, embedded: Embedded | None) -> IngestOutcome:
    """Keep the new images' bytes, then store images, sources and vectors in one
    transaction."""
    items = planned.items
    records = [ImageRecord(it.image_id, it.uri or "", it.name, dict(it.metadata))
               for it in items if it.image_id not in planned.present]
    with runtime.blob_lock:  # no blob GC between writing a blob and referencing it
        runtime.blobs.put_many([it.data for it in items
                                if it.data is not None and it.image_id not in planned.present])
        added, _ = runtime.store.images.ingest(
            planned.collection_id, records, planned.sources,
            model_name=embedded.model_name if embedded else "",
            model_version=embedded.model_version if embedded else "",
            vector_ids=embedded.ids if embedded else (),
            vectors=embedded.vectors if embedded else None,
        )
    _STORED.inc(added)
    out = IngestOutcome(received=len(items), changed_ids=list(planned.changed), added=added,
                        already_present=len(items) - added,
                        embedded=len(embedded.ids) if embedded else 0)
    if embedded:
        out.model_name, out.model_version = embedded.model_name, embedded.model_version
    return out


# ------------------------------------------------------------------ streams


@dataclass(frozen=True)
class IngestMessage:
    """One message of an ingest stream: its position in the stream (errors name it), the
    collection, its images, and whether they are stored without embedding."""

    index: int
    collection_id: str
    items: Sequence[IngestItem]
    defer_embedding: bool = False


class StreamFailure(Exception):
    """An ingest stream failed at ``where`` ("message 3", "messages 2 to 5") because of
    ``cause``; every message before ``where`` is stored, nothing from ``where`` on."""

    def __init__(self, where: str, cause: BaseException) -> None:
        super().__init__(f"{where}: {cause}")
        self.where = where
        self.cause = cause


def ingest_stream(runtime: Runtime, messages: Iterable[IngestMessage], *,
                  deadline: float | None = None,
                  is_active: Callable[[], bool] | None = None) -> IngestOutcome:
    """Ingest a stream of messages in batches that span messages (AddImages).

    Consecutive messages are gathered up to ``runtime.ingest_batch`` images, or for at most
    ``runtime.ingest_wait_s`` (:mod:`reidal.stream_batches`; messages with a repeated id or
    another ``defer_embedding`` start a new batch), so the embedder gets full batches
    whatever size the client's messages are. Each batch is embedded in one call and stored
    in one transaction; the store of one batch runs while the next one is embedded.

    The guarantees of :func:`ingest` per message stay: each message is checked on arrival
    (a bad one fails the stream after everything before it is stored); when the embedder
    rejects images of a batch of several messages, the batch is ingested again message by
    message, so the messages before the one holding the bad image are stored and the error
    names that message and every bad image in it. Any other failure (Triton down, deadline)
    stores nothing of its batch and names the batch's messages. Raises
    :class:`StreamFailure`; an exception of ``messages`` itself (a malformed stream) is
    raised as it is, after the messages before it were stored.
    """
    limits: BatchLimits[IngestMessage] = BatchLimits(
        max_items=runtime.ingest_batch, max_wait_s=runtime.ingest_wait_s,
        size=lambda m: len(m.items), fits=_may_join)
    total = IngestOutcome()
    storing: futures.Future[IngestOutcome] | None = None
    stored_ids: set[str] = set()

    def settle() -> None:  # wait for the batch being stored; its outcome in order
        nonlocal storing
        if storing is not None:
            done, storing = storing, None
            total.merge(done.result())

    pool = futures.ThreadPoolExecutor(1, thread_name_prefix="reidal-ingest-store")
    try:
        with closing(gather((_checked(runtime, m) for m in messages), limits)) as batches:
            for batch in batches:
                items = [it for m in batch for it in m.items]
                ids = {it.image_id for it in items}
                if not stored_ids.isdisjoint(ids):
                    settle()  # its lookups must see the batch before stored
                where = _where(batch)
                try:
                    planned = _plan(runtime, batch[0].collection_id, items,
                                    batch[0].defer_embedding)
                    embedded = _embed(runtime, planned, deadline, is_active)
                except Exception as exc:
                    settle()
                    if len(batch) == 1 or not _bad_input(exc):
                        raise StreamFailure(where, exc) from exc
                    for m in batch:  # find the message of the bad image; store the rest
                        try:
                            total.merge(ingest(runtime, m.collection_id, m.items,
                                               defer_embedding=m.defer_embedding,
                                               deadline=deadline, is_active=is_active))
                        except Exception as one:
                            raise StreamFailure(f"message {m.index}", one) from one
                    continue
                settle()
                storing = pool.submit(_store_or_fail, runtime, planned, embedded, where)
                stored_ids = ids
            settle()
    finally:
        pool.shutdown(wait=True)  # a batch being stored is committed before we return
    return total


def _checked(runtime: Runtime, message: IngestMessage) -> IngestMessage:
    try:
        check_items(message.items, runtime.image_limits)
    except Exception as exc:
        raise StreamFailure(f"message {message.index}", exc) from exc
    return message


def _may_join(batch: Sequence[IngestMessage], message: IngestMessage) -> bool:
    """A message joins a batch of the same collection and ``defer_embedding`` none of whose
    ids it repeats (a repeated id is ingested after the first one is stored: already
    present)."""
    if (message.defer_embedding, message.collection_id) != (batch[0].defer_embedding,
                                                            batch[0].collection_id):
        return False
    ids = {it.image_id for m in batch for it in m.items}
    return not any(it.image_id in ids for it in message.items)


def _where(batch: Sequence[IngestMessage]) -> str:
    first, last = batch[0].index, batch[-1].index
    return f"message {first}" if first == last else f"messages {first} to {last}"


def _store_or_fail(runtime: Runtime, planned: _Planned, embedded: Embedded | None,
                   where: str) -> IngestOutcome:
    try:
        return _store(runtime, planned, embedded)
    except Exception as exc:
        raise StreamFailure(where, exc) from exc


def _bad_input(exc: Exception) -> bool:
    """Whether the embedder refused the images themselves (in-process: BadImages and the
    other InvalidArgument; a remote embedding service: INVALID_ARGUMENT)."""
    return isinstance(exc, InvalidArgument) or _remote_invalid(exc)


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
    images = store.images.all(collection_id)
    excluded = store.images.excluded(collection_id)
    have = store.images.vector_ids(collection_id, model_name, version)
    todo = [img for img in images if img.image_id not in have]
    sources = store.images.sources(collection_id)
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
            store.images.put_vectors(collection_id, model_name, version, result.ids, result.vectors)
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
    store.collections.set_model(collection_id, model_name, version, actor="EmbedCollection")
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


def _embed_good(embedder: Embedder, items: list[IngestItem], model_name: str, version: str
                ) -> tuple[Embedded | None, list[tuple[str, str]]]:
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


def _rejected(exc: Exception, embedder: Embedder, items: list[IngestItem], model_name: str,
              version: str) -> list[tuple[str, str]]:
    """The (id, reason) of each bad image a failed embedding call names: from the
    in-process embedder's BadImages, or, from a remote embedding service's
    INVALID_ARGUMENT (which names them only in words), by embedding each image alone."""
    if isinstance(exc, BadImages):
        return [(p.item_id, p.reason) for p in exc.problems]
    if not _remote_invalid(exc):
        return []
    found = []
    for it in items:
        try:
            embedder.embed(_embed_items([it]), model_name, version)
        except RemoteError as one:
            if not _remote_invalid(one):
                raise
            found.append((it.image_id, one.detail))
    return found


def _remote_invalid(exc: BaseException) -> bool:
    """A remote embedding service refused the images of a call (INVALID_ARGUMENT)."""
    return isinstance(exc, RemoteError) and exc.code == InvalidArgument.code
