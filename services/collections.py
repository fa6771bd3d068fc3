"""CollectionService (collections.proto): collections, ingest, image read-back, operations.

A thin layer over :mod:`reidal.ingest`, :mod:`reidal.collection_state` and the store:
translate messages, call, translate back. Failures are domain errors naming their status
codes (embedding failures too: Triton's, and a separate embedding service's,
:mod:`reidal.errors`); the server's interceptor answers with them, and
:func:`reidal.grpc_server.abort_with` where the message says which message of the stream
failed.

Embedding goes through a :class:`reidal.embedding.embedder.Embedder`: the in-process
:class:`~reidal.embedding.embedder.ImageEmbedder` when Triton is reachable from this
process, else :class:`reidal.services.embedding_client.RemoteEmbedder`, a client of a
separate embedding service.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc

from reidal import errors
from reidal.blobs import sha256_hex
from reidal.collection_state import check_id, effective_params
from reidal.embedding.images import ImageError, read_uri
from reidal.grpc_server import ServiceBinding, abort_with
from reidal.ingest import (
    IngestItem,
    IngestMessage,
    StreamFailure,
    embed_missing,
    ingest_stream,
    resolve_model,
)
from reidal.request_checks import page_size, parse_page_token
from reidal.runtime import Runtime, queue_key
from reidal.services._common import (  # noqa: F401 - older imports name them here
    budget_dict,
    budget_pb,
    deadline_at,
    filter_from_pb,
    filter_pb,
    operation_pb,
    seconds_of,
    timestamp,
)
from reidal.services.embedding_client import RemoteEmbedder  # noqa: F401 - older imports
from reidal.store import Collection, ImageRecord, ImageRow, Store
from reidal.v1 import collections_pb2, collections_pb2_grpc, common_pb2
from reidal.vectors import add_vectors, read_vectors, vectors_per_message

log = logging.getLogger("reidal.collections")

SERVICE_NAME: str = collections_pb2.DESCRIPTOR.services_by_name["CollectionService"].full_name


# ------------------------------------------------------------------------ conversions


def _params_from_pb(msg: Any) -> dict[str, Any]:
    """The fields a client set in a ClusteringParams / SamplingParams message: optional
    scalars and messages when present, strings when not empty (empty = the default)."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        if f.has_presence and not msg.HasField(f.name):
            continue
        value = getattr(msg, f.name)
        if f.message_type is not None:
            value = budget_dict(value)
        if value is not None and value != "":
            out[f.name] = value
    return out


def _params_pb(cls: type[Any], values: dict[str, Any]) -> Any:
    """A ClusteringParams / SamplingParams message of the effective values it has fields for."""
    names = cls.DESCRIPTOR.fields_by_name
    return cls(**{k: budget_pb(v) if k == "default_budget" else v
                  for k, v in values.items() if k in names})


def params_from_request(request: collections_pb2.CreateCollectionRequest) -> dict[str, Any]:
    return effective_params(_params_from_pb(request.clustering),
                            _params_from_pb(request.sampling))


def collection_pb(runtime: Runtime, col: Collection) -> collections_pb2.Collection:
    counts = runtime.store.collections.counts(col.id)
    params = effective_params(col.params.get("clustering"), col.params.get("sampling"))
    c, s = params["clustering"], params["sampling"]
    n = counts["images"] - counts["excluded"]
    total = n * (n - 1) // 2
    return collections_pb2.Collection(
        collection_id=col.id,
        species=col.species,
        model=common_pb2.ModelRef(name=col.model_name, version=col.model_version),
        clustering=_params_pb(collections_pb2.ClusteringParams, c),
        sampling=_params_pb(collections_pb2.SamplingParams, s),
        image_count=counts["images"],
        excluded_image_count=counts["excluded"],
        embedded_image_count=counts["embedded"],
        answer_count=counts["answers"],
        cycle=col.cycle,
        pairs_asked=counts["pairs_asked"],
        total_pairs=total,
        budget_used=counts["pairs_asked"] / total if total else 0.0,
        created_at=timestamp(col.created_at),
    )


def _items(msg: collections_pb2.AddImagesRequest) -> list[IngestItem]:
    out = []
    for img in msg.images:
        source = img.image.WhichOneof("source")
        out.append(IngestItem(
            img.image.id,
            data=img.image.data if source == "data" else None,
            uri=img.image.uri if source == "uri" else None,
            name=img.name, metadata=dict(img.metadata)))
    return out


class _StreamHead:
    """The collection an AddImages stream names: taken from its first message, which must
    name it; every later message names the same one or none."""

    def __init__(self) -> None:
        self.collection_id = ""

    def messages(self, store: Store, requests: Iterable[collections_pb2.AddImagesRequest]
                 ) -> Iterator[IngestMessage]:
        for k, msg in enumerate(requests):
            if not self.collection_id:
                if not msg.collection_id:
                    raise errors.InvalidArgument("the first message must name the collection")
                store.collections.get(msg.collection_id)
                self.collection_id = msg.collection_id
            elif msg.collection_id and msg.collection_id != self.collection_id:
                raise errors.InvalidArgument(
                    f"message {k} names collection {msg.collection_id!r} but the stream "
                    f"started with {self.collection_id!r}")
            if msg.images:
                yield IngestMessage(k, self.collection_id, _items(msg), msg.defer_embedding)


# ------------------------------------------------------------------------ servicer


class CollectionsServicer(collections_pb2_grpc.CollectionServiceServicer):
    """CollectionService over a :class:`reidal.runtime.Runtime`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def binding(self) -> ServiceBinding:
        return ServiceBinding(
            name=SERVICE_NAME, servicer=self,
            add_to_server=collections_pb2_grpc.add_CollectionServiceServicer_to_server,
            readiness=self.runtime.store.ping)

    @property
    def store(self) -> Store:
        return self.runtime.store

    def CreateCollection(self, request, context):  # noqa: N802 - gRPC method name
        cid = check_id(request.collection_id, "collection id")
        params = params_from_request(request)
        model_name = request.model.name
        if not model_name:
            embedder = self.runtime.embedder
            model_name = embedder.default_model if embedder is not None else ""
        col = self.store.collections.create(cid, species=request.species, model_name=model_name,
                                            model_version=request.model.version, params=params)
        return collection_pb(self.runtime, col)

    def GetCollection(self, request, context):  # noqa: N802
        return collection_pb(self.runtime, self.store.collections.get(request.collection_id))

    def ListCollections(self, request, context):  # noqa: N802
        return collections_pb2.ListCollectionsResponse(
            collections=[collection_pb(self.runtime, c) for c in self.store.collections.all()])

    def DeleteCollection(self, request, context):  # noqa: N802
        self.store.collections.delete(request.collection_id, actor=request.actor)
        self.runtime.notifier.bump(queue_key(request.collection_id))
        self.runtime.gc_blobs()
        return collections_pb2.DeleteCollectionResponse(collection_id=request.collection_id)

    def AddImages(self, request_iterator, context):  # noqa: N802
        stream = _StreamHead()
        try:
            total = ingest_stream(self.runtime, stream.messages(self.store, request_iterator),
                                  deadline=deadline_at(context), is_active=context.is_active)
        except StreamFailure as failed:
            abort_with(context, failed.cause, prefix=f"{failed.where}: ")
        if total.received == 0:
            raise errors.InvalidArgument("the stream carried no images")
        return collections_pb2.AddImagesResponse(
            collection_id=stream.collection_id, received=total.received, added=total.added,
            already_present=total.already_present, embedded=total.embedded,
            changed_ids=total.changed_ids,
            model=common_pb2.ModelRef(name=total.model_name, version=total.model_version))

    def ListImages(self, request, context):  # noqa: N802
        col = self.store.collections.get(request.collection_id)
        size = page_size(request.page_size)
        after = parse_page_token(request.page_token)
        after = -1 if after is None else after
        image_filter = filter_from_pb(request.filter)
        missing = sorted(set(image_filter.image_ids)
                         - self.store.images.present(col.id, image_filter.image_ids))
        if missing:
            raise errors.NotFound(f"filter names image(s) not in collection {col.id!r}: "
                                  f"{missing[:20]}")
        embedded = self.store.images.vector_ids(col.id, col.model_name, col.model_version)
        out: list[collections_pb2.ImageInfo] = []
        next_token = ""
        while len(out) < size:
            rows = self.store.images.page(col.id, after_seq=after, limit=1000)
            if not rows:
                break
            keep = image_filter.mask(_records(rows), all_images=False)
            for row, ok in zip(rows, keep.tolist(), strict=True):
                after = row.seq
                if ok:
                    out.append(_image_pb(row, row.image_id in embedded))
                    if len(out) == size:
                        break
        if len(out) == size and self.store.images.page(col.id, after_seq=after, limit=1):
            next_token = str(after)
        return collections_pb2.ListImagesResponse(images=out, next_page_token=next_token)

    def EmbedCollection(self, request, context):  # noqa: N802
        col = self.store.collections.get(request.collection_id)
        name = request.model.name or col.model_name
        # empty version: the collection's own (a pin is never moved by an empty request)
        pinned = col.model_version if name == col.model_name else ""
        name, version = resolve_model(self.runtime, name, request.model.version or pinned)
        runtime = self.runtime
        ops = runtime.operations
        assert ops is not None
        op = ops.start(col.id, "embed_collection",
                       lambda progress: embed_missing(runtime, col.id, name, version, progress))
        runtime.store.operations.update(op.operation_id, result={"model_name": name,
                                                               "model_version": version})
        return operation_pb(runtime.store.operations.get(op.operation_id))

    def GetOperation(self, request, context):  # noqa: N802
        return operation_pb(self.store.operations.get(request.operation_id))

    def WatchOperation(self, request, context):  # noqa: N802
        ops = self.runtime.operations
        assert ops is not None
        last = None
        for record in ops.watch(request.operation_id, context.is_active):
            last = record
            yield operation_pb(record)
        if last is not None and not last.final and self.runtime.notifier.closed:
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          "the server is shutting down; watch the operation again after it "
                          "restarts")

    def GetImage(self, request, context):  # noqa: N802
        cid, iid = request.collection_id, request.image_id
        self.store.collections.get(cid)
        data, sha = self._image_bytes(cid, iid, context, request.if_none_match)
        if data is None or sha == request.if_none_match:
            return collections_pb2.ImageContent(image_id=iid, sha256=sha, not_modified=True)
        return collections_pb2.ImageContent(image_id=iid, data=data, mime_type=mime_type(data),
                                            sha256=sha)

    def DeleteImage(self, request, context):  # noqa: N802
        retired = self.store.images.delete(request.collection_id, request.image_id,
                                           actor=request.actor)
        self.runtime.notifier.bump(queue_key(request.collection_id))  # its pairs left
        self.runtime.gc_blobs()
        return collections_pb2.DeleteImageResponse(image_id=request.image_id,
                                                   answers_retired=retired)

    def GetVectors(self, request, context):  # noqa: N802
        found = read_vectors(self.store, request.collection_id, list(request.image_ids),
                             model_name=request.model.name,
                             model_version=request.model.version)
        model = common_pb2.ModelRef(name=found.model_name, version=found.model_version)
        if not found.image_ids:
            yield collections_pb2.GetVectorsResponse(model=model)
            return
        per_message = vectors_per_message(found.vectors.shape[1])
        for start in range(0, len(found.image_ids), per_message):
            rows = range(start, min(start + per_message, len(found.image_ids)))
            yield collections_pb2.GetVectorsResponse(model=model, vectors=[
                collections_pb2.ImageVector(image_id=found.image_ids[k],
                                            vector=found.vectors[k].tolist()) for k in rows])

    def PutVectors(self, request, context):  # noqa: N802
        name, version = add_vectors(
            self.store, request.collection_id, request.model.name,
            [v.image_id for v in request.vectors], [list(v.vector) for v in request.vectors],
            model_version=request.model.version, actor=request.actor)
        return collections_pb2.PutVectorsResponse(
            collection_id=request.collection_id, stored=len(request.vectors),
            model=common_pb2.ModelRef(name=name, version=version))

    def _image_bytes(self, cid: str, iid: str, context: grpc.ServicerContext,
                     if_none_match: str = "") -> tuple[bytes | None, str]:
        """The encoded file of one image and its SHA-256: the kept blob for an image sent
        as bytes, else its URI read again under the server's image limits (the rules it
        was accepted under at ingest: only inside the image roots). A kept blob whose digest is ``if_none_match`` is not
        read: (None, digest)."""
        if not iid:
            raise errors.NotFound(f"image {iid!r} is not in collection {cid!r}")
        record = self.store.images.get(cid, iid)  # NotFound when it is not one
        source = self.store.images.sources(cid, [iid]).get(iid)
        if source is not None and source.kind == "data":
            if if_none_match and if_none_match == source.sha256:
                return None, source.sha256
            try:
                return self.runtime.blobs.get(source.sha256), source.sha256
            except FileNotFoundError as exc:
                context.abort(grpc.StatusCode.DATA_LOSS,
                              f"the stored bytes of image {iid!r} are missing: {exc}")
        uri = record.uri
        if not uri:
            raise errors.FailedPrecondition(f"image {iid!r} has neither kept bytes nor a uri")
        try:
            data = read_uri(uri, item_id=iid, limits=self.runtime.image_limits)
        except ImageError as exc:
            raise errors.FailedPrecondition(f"cannot read image {iid!r} again from its uri: "
                                            f"{exc.reason}") from None
        return data, sha256_hex(data)


#: File signatures of the formats reidal accepts, and their MIME types.
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"WEBP", 8, "image/webp"),
)


def mime_type(data: bytes) -> str:
    """MIME type from the file signature, so an image is labelled without decoding it (a
    deferred image was never checked); application/octet-stream when none matches."""
    for magic, offset, mime in _SIGNATURES:
        if data[offset:offset + len(magic)] == magic and (offset == 0 or data[:4] == b"RIFF"):
            return mime
    return "application/octet-stream"


def _records(rows: Sequence[ImageRow]) -> list[ImageRecord]:
    return [ImageRecord(r.image_id, r.uri, r.name, r.metadata) for r in rows]


def _image_pb(row: ImageRow, embedded: bool) -> collections_pb2.ImageInfo:
    return collections_pb2.ImageInfo(
        image_id=row.image_id, name=row.name, metadata=row.metadata, uri=row.uri,
        excluded=row.excluded_reason is not None, excluded_reason=row.excluded_reason or "",
        embedded=embedded, added_at=timestamp(row.added_at))
