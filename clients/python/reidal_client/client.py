"""ReidalClient: the reidal gRPC API as typed Python calls, with deadlines and retries.

What every call gets:

- A deadline: ``timeout_s`` of the client (30 s), or the call's own ``timeout_s``. A
  retried call gets a fresh deadline per attempt.
- Retries with exponential backoff (``backoff_s``, doubled per attempt up to
  ``max_backoff_s``, with jitter) on UNAVAILABLE only: the server or its Triton is down or
  restarting. Only calls that are safe to repeat are retried: reads, AddImages (idempotent
  per image id), ExcludeImage / RestoreImage (set a state), and calls that carry a request
  id (SubmitConstraints, GetQueryPairs and StartQueryPairs: this client always sends one,
  a fresh UUID unless the caller passes its own, so a retry after a lost response returns
  the first result instead of storing answers twice or running a second cycle).
  CreateCollection and DeleteCollection are retried too: when a retry finds the collection
  already there (resp. already gone) the earlier attempt did it, and the call returns as if
  it had succeeded. Other calls (EmbedCollection, DeleteConstraint) are never retried.
- Errors as :mod:`reidal_client.errors` exceptions carrying the gRPC code and the server's
  message; never a raw ``grpc.RpcError``.

The channel reconnects quickly (its reconnect backoff is capped near ``max_backoff_s``), so
a retry after a server restart finds the new server instead of waiting out gRPC's default
backoff of up to two minutes.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from reidal.channels import default_channel_options
from reidal.tls import channel_credentials
from reidal.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    common_pb2,
    constraints_pb2,
    constraints_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
    sampling_pb2,
    sampling_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from reidal_client.errors import (
    DeadlineExceeded,
    ReidalClientError,
    from_rpc_error,
    operation_failed,
    status_code,
)
from reidal_client.types import (
    IDENTITY_CSV_FIELDS,
    AddImagesResult,
    Answer,
    ClusteringParams,
    Collection,
    Embeddings,
    Identities,
    ImageContent,
    ImageExclusion,
    ImageFilter,
    ImageInfo,
    ImageInput,
    ModelRef,
    Operation,
    QueryBatch,
    QueueEvent,
    SamplingParams,
    StoredAnswer,
    SubmitResult,
    TrainingJob,
    budget_pb,
    parse_label,
    training_config_pb,
)

log = logging.getLogger("reidal_client")

T = TypeVar("T")

#: Address used when none is given (``reidal serve``'s default port).
DEFAULT_ADDRESS = "127.0.0.1:50051"
#: Hosts a token may be sent to without TLS and without a warning.
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})
#: Images per AddImages message (the server gathers messages into embedding batches).
DEFAULT_INGEST_BATCH = 32
#: AddImages messages per call: the server embeds one batch while it stores the previous
#: one and receives the next, within a call; progress is reported after each call.
DEFAULT_MESSAGES_PER_CALL = 4

RetryCallback = Callable[[str, int, float, ReidalClientError], None]
ProgressCallback = Callable[[int, int | None], None]


def _with_bearer(metadata: tuple[tuple[str, str], ...], token: str
                 ) -> tuple[tuple[str, str], ...]:
    """``metadata`` with its authorization pair (if any) replaced by ``Bearer <token>``.
    ValueError (never naming the token) for an empty one, or one a gRPC header value cannot
    carry (printable ASCII only), which would otherwise fail every call as INTERNAL."""
    if not isinstance(token, str) or not token.strip():
        raise ValueError("token is empty")
    token = token.strip()
    if not all(" " <= ch <= "~" for ch in token):
        raise ValueError("token has characters a gRPC header cannot carry "
                         "(only printable ASCII)")
    return tuple(m for m in metadata if m[0] != "authorization") + (
        ("authorization", f"Bearer {token}"),)


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class ReidalClient:
    """A connection to a reidal server (any of its services on one address).

    address: ``host:port``. timeout_s: deadline of each call (per attempt). retries: how
    many times a retryable call is repeated after UNAVAILABLE (0: never). backoff_s: the
    first wait, doubled per retry up to max_backoff_s. channel_options: gRPC channel
    arguments, merged over :func:`default_channel_options`. credentials: TLS channel
    credentials (None: plaintext). tls_ca / tls_cert / tls_key: build them instead from PEM
    files (or bytes): the CA that signed the server's certificate, and this client's
    certificate and key for servers that require mutual TLS; ``tls=True`` alone trusts the
    system roots. token: an access token, sent as ``authorization: Bearer <token>`` with
    every call (never logged, not in ``repr``). metadata: sent with every call.
    interceptors: gRPC client interceptors. on_retry(method, attempt, delay_s, error):
    called before each retry's wait (logging it too). Use as a context manager, or
    :meth:`close` it.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout_s: float = 30.0,
        retries: int = 5,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        channel_options: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        interceptors: Sequence[Any] = (),
        on_retry: RetryCallback | None = None,
        tls: bool = False,
        tls_ca: str | Path | bytes | None = None,
        tls_cert: str | Path | bytes | None = None,
        tls_key: str | Path | bytes | None = None,
        token: str | None = None,
    ) -> None:
        if not address or ":" not in address:
            raise ValueError(f"address must be host:port, got {address!r}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if backoff_s < 0 or max_backoff_s < backoff_s:
            raise ValueError(f"need 0 <= backoff_s <= max_backoff_s, got {backoff_s}, "
                             f"{max_backoff_s}")
        self.address = address
        self.timeout_s = timeout_s
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        if credentials is not None and (tls or tls_ca or tls_cert or tls_key):
            raise ValueError("pass credentials or tls / tls_ca / tls_cert / tls_key, not both")
        if credentials is None and (tls or tls_ca or tls_cert or tls_key):
            credentials = channel_credentials(tls_ca, tls_cert, tls_key)
        self.metadata = tuple(metadata)
        if token is not None:
            self.metadata = _with_bearer(self.metadata, token)
            if credentials is None and address.rsplit(":", 1)[0] not in _LOOPBACK:
                log.warning("sending an access token to %s without TLS: anyone on the "
                            "network path can read it", address)
        self.on_retry = on_retry
        options = default_channel_options(max_reconnect_backoff_s=max_backoff_s)
        options.update(dict(channel_options or {}))
        opts = list(options.items())
        self._channel = (grpc.secure_channel(address, credentials, options=opts)
                         if credentials is not None
                         else grpc.insecure_channel(address, options=opts))
        channel = grpc.intercept_channel(self._channel, *interceptors) if interceptors \
            else self._channel
        self._collections = collections_pb2_grpc.CollectionServiceStub(channel)
        self._sampling = sampling_pb2_grpc.SamplingServiceStub(channel)
        self._constraints = constraints_pb2_grpc.ConstraintServiceStub(channel)
        self._embedding = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        self._training = training_pb2_grpc.TrainingServiceStub(channel)
        from grpc_health.v1 import health_pb2_grpc

        self._health = health_pb2_grpc.HealthStub(channel)

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        if getattr(self, "_owns_channel", True):
            self._channel.close()

    def with_token(self, token: str) -> ReidalClient:
        """This client acting with another access token, over the same channel (cheap: a
        server relaying many people's calls keeps one connection). Closing the view does
        not close the channel; closing the original does."""
        import copy

        metadata = _with_bearer(self.metadata, token)
        view = copy.copy(self)
        view._owns_channel = False
        view.metadata = metadata
        return view

    def __enter__(self) -> ReidalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ReidalClient({self.address!r}, timeout_s={self.timeout_s}, retries={self.retries})"

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with up to 20 % jitter (so clients do not retry in step)."""
        base = min(self.backoff_s * (2.0 ** (attempt - 1)), self.max_backoff_s)
        return base * (1.0 - 0.2 * random.random())

    def _retry_wait(self, method: str, attempt: int, error: ReidalClientError) -> None:
        delay = self._delay(attempt)
        log.info("retrying %s after UNAVAILABLE (attempt %d of %d) in %.2f s: %s", method,
                 attempt + 1, self.retries + 1, delay, error.message)
        if self.on_retry is not None:
            self.on_retry(method, attempt, delay, error)
        time.sleep(delay)

    def _call(self, method: str, fn: Callable[..., T], request: Any, *, retry: bool,
              timeout_s: float | None = None, stream: bool = False,
              done_on_retry: Mapping[grpc.StatusCode, Callable[[], T]] | None = None) -> T:
        """One call with a deadline, retried on UNAVAILABLE when ``retry``.

        ``stream``: ``request`` is a list of messages sent as a client stream (re-sent
        whole on a retry). ``done_on_retry``: status codes that, on a retry, mean an
        earlier attempt already did the work, and what to return then.
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        attempt = 0
        while True:
            attempt += 1
            try:
                payload = iter(request) if stream else request
                return fn(payload, timeout=timeout, metadata=self.metadata or None)
            except grpc.RpcError as exc:
                code = status_code(exc)
                if attempt > 1 and done_on_retry and code in done_on_retry:
                    return done_on_retry[code]()
                error = from_rpc_error(exc, method, attempt)
                if retry and code == grpc.StatusCode.UNAVAILABLE and attempt <= self.retries:
                    self._retry_wait(method, attempt, error)
                    continue
                raise error from None

    def _stream(self, method: str, open_call: Callable[[], Any]) -> Iterator[Any]:
        """Iterate a server stream, errors translated; the call is cancelled when the
        consumer stops early."""
        call = None
        try:
            call = open_call()
            yield from call
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, method) from None
        finally:
            if call is not None:
                call.cancel()

    # ------------------------------------------------------------------ health

    def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """grpc.health.v1 status of ``service`` ("" = the whole server): "SERVING",
        "NOT_SERVING", ... Raises NotFound for a service the server does not run."""
        return self._health_status(service, timeout_s, retry=True)

    def _health_status(self, service: str, timeout_s: float | None, *, retry: bool) -> str:
        from grpc_health.v1 import health_pb2

        resp = self._call("Health.Check", self._health.Check,
                          health_pb2.HealthCheckRequest(service=service), retry=retry,
                          timeout_s=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_until_serving(self, timeout_s: float = 60.0, service: str = "") -> None:
        """Block until the server reports SERVING (e.g. after starting it); Unavailable or
        DeadlineExceeded when it does not within ``timeout_s``."""
        end = time.monotonic() + timeout_s
        last: ReidalClientError | None = None
        while time.monotonic() < end:
            try:
                left = max(min(5.0, end - time.monotonic()), 0.01)
                if self._health_status(service, left, retry=False) == "SERVING":
                    return
            except ReidalClientError as exc:
                last = exc
            time.sleep(0.1)
        if last is not None:
            raise last
        raise DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"{self.address} did not report SERVING within {timeout_s} s",
                               method="Health.Check")

    # ------------------------------------------------------------------ collections

    def create_collection(self, collection_id: str, *, species: str = "",
                          model: ModelRef | str | None = None,
                          clustering: ClusteringParams | None = None,
                          sampling: SamplingParams | None = None,
                          timeout_s: float | None = None) -> Collection:
        """Create an empty collection (AlreadyExists when the id is taken)."""
        ref = model if isinstance(model, ModelRef) else ModelRef.parse(model)
        request = collections_pb2.CreateCollectionRequest(
            collection_id=collection_id, species=species, model=ref.to_pb(),
            clustering=(clustering or ClusteringParams()).to_pb(),
            sampling=(sampling or SamplingParams()).to_pb())
        msg = self._call("CollectionService.CreateCollection",
                         self._collections.CreateCollection, request, retry=True,
                         timeout_s=timeout_s, done_on_retry={
                             grpc.StatusCode.ALREADY_EXISTS:
                                 lambda: self._get_collection_pb(collection_id)})
        return Collection.from_pb(msg)

    def _get_collection_pb(self, collection_id: str,
                           timeout_s: float | None = None) -> collections_pb2.Collection:
        return self._call("CollectionService.GetCollection", self._collections.GetCollection,
                          collections_pb2.GetCollectionRequest(collection_id=collection_id),
                          retry=True, timeout_s=timeout_s)

    def get_collection(self, collection_id: str, *, timeout_s: float | None = None
                       ) -> Collection:
        return Collection.from_pb(self._get_collection_pb(collection_id, timeout_s))

    def list_collections(self, *, timeout_s: float | None = None) -> list[Collection]:
        resp = self._call("CollectionService.ListCollections",
                          self._collections.ListCollections,
                          collections_pb2.ListCollectionsRequest(), retry=True,
                          timeout_s=timeout_s)
        return [Collection.from_pb(c) for c in resp.collections]

    def delete_collection(self, collection_id: str, *, actor: str = "",
                          timeout_s: float | None = None) -> None:
        """Delete a collection and everything in it (NotFound when absent)."""
        self._call("CollectionService.DeleteCollection", self._collections.DeleteCollection,
                   collections_pb2.DeleteCollectionRequest(collection_id=collection_id,
                                                           actor=actor),
                   retry=True, timeout_s=timeout_s,
                   done_on_retry={grpc.StatusCode.NOT_FOUND: lambda: None})

    def delete_image(self, collection_id: str, image_id: str, *, actor: str = "",
                     timeout_s: float | None = None) -> int:
        """Delete one image (e.g. one that cannot be embedded); returns how many answers
        about it were retired with it (kept in the history, never applied again). NotFound
        when the collection or image is absent."""
        response = self._call(
            "CollectionService.DeleteImage", self._collections.DeleteImage,
            collections_pb2.DeleteImageRequest(collection_id=collection_id, image_id=image_id,
                                               actor=actor),
            retry=True, timeout_s=timeout_s,
            done_on_retry={grpc.StatusCode.NOT_FOUND: lambda: None})  # an earlier try did it
        return int(response.answers_retired) if response is not None else 0

    def add_images(self, collection_id: str, images: Iterable[ImageInput | Sequence[Any]], *,
                   batch_size: int = DEFAULT_INGEST_BATCH,
                   messages_per_call: int = DEFAULT_MESSAGES_PER_CALL,
                   defer_embedding: bool = False, total: int | None = None,
                   progress: ProgressCallback | None = None,
                   timeout_s: float | None = None) -> AddImagesResult:
        """Ingest images: ``ImageInput`` or ``(id, path|bytes|uri[, metadata])`` items.

        Images go in AddImages calls of ``messages_per_call`` streamed messages of
        ``batch_size`` images each; files are read lazily, one call's worth at a time.
        ``progress(done, total)`` runs after each call with the images stored so far
        (``total``: as given, or ``len(images)`` when it has one). A call is retried whole
        on UNAVAILABLE, which is safe: AddImages is idempotent per image id.
        """
        if not 1 <= batch_size <= 1024:
            raise ValueError(f"batch_size must be in [1, 1024], got {batch_size}")
        if messages_per_call < 1:
            raise ValueError(f"messages_per_call must be >= 1, got {messages_per_call}")
        if total is None and hasattr(images, "__len__"):
            total = len(images)  # type: ignore[arg-type]
        result = AddImagesResult(collection_id)
        done = 0
        for group in _chunks(_chunks(images, batch_size), messages_per_call):
            messages = [collections_pb2.AddImagesRequest(
                collection_id=collection_id, defer_embedding=defer_embedding,
                images=[ImageInput.coerce(item).to_pb() for item in chunk])
                for chunk in group]
            resp = self._call("CollectionService.AddImages", self._collections.AddImages,
                              messages, retry=True, stream=True, timeout_s=timeout_s)
            result = result + AddImagesResult.from_pb(resp)
            done += sum(len(chunk) for chunk in group)
            if progress is not None:
                progress(done, total)
        if done == 0:
            raise ValueError("add_images got no images")
        return result

    def list_images(self, collection_id: str, *,
                    filter: ImageFilter | Mapping[str, str] | None = None,  # noqa: A002
                    page_size: int = 1000, timeout_s: float | None = None) -> list[ImageInfo]:
        """Every image of the collection (optionally filtered), in ingest order."""
        f = ImageFilter.coerce(filter)
        out: list[ImageInfo] = []
        token = ""
        while True:
            request = collections_pb2.ListImagesRequest(
                collection_id=collection_id, page_size=page_size, page_token=token)
            if f is not None:
                request.filter.CopyFrom(f.to_pb())
            page = self._call("CollectionService.ListImages", self._collections.ListImages,
                              request, retry=True, timeout_s=timeout_s)
            out.extend(ImageInfo.from_pb(i) for i in page.images)
            token = page.next_page_token
            if not token:
                return out

    def get_image(self, collection_id: str, image_id: str, *, if_none_match: str = "",
                  timeout_s: float | None = None) -> ImageContent:
        """The encoded file of one image as ingested, with its MIME type (NotFound for an
        unknown collection or image). ``if_none_match``: the sha256 of a copy already held;
        when still current the answer has ``not_modified`` set and no data."""
        return ImageContent.from_pb(self._call(
            "CollectionService.GetImage", self._collections.GetImage,
            collections_pb2.GetImageRequest(collection_id=collection_id, image_id=image_id,
                                            if_none_match=if_none_match),
            retry=True, timeout_s=timeout_s))

    def get_vectors(self, collection_id: str, image_ids: Sequence[str] = (), *,
                    model: ModelRef | str | None = None,
                    timeout_s: float | None = None) -> Embeddings:
        """The vectors the server stored (GetVectors), in ingest order: every image's, or
        those of ``image_ids`` (at most 1024); images without a vector are left out.
        Default model: the collection's. Read them instead of embedding stored images again."""
        import numpy as np

        ref = model if isinstance(model, ModelRef) else ModelRef.parse(model)
        request = collections_pb2.GetVectorsRequest(collection_id=collection_id,
                                                    image_ids=list(image_ids),
                                                    model=ref.to_pb())
        ids: list[str] = []
        rows: list[Any] = []
        for msg in self._stream("CollectionService.GetVectors",
                                lambda: self._collections.GetVectors(
                                    request, timeout=timeout_s or self.timeout_s,
                                    metadata=self.metadata or None)):
            ref = ModelRef(msg.model.name, msg.model.version)
            ids.extend(v.image_id for v in msg.vectors)
            rows.extend(list(v.vector) for v in msg.vectors)
        vectors = np.array(rows, dtype=np.float32).reshape(len(ids), -1 if ids else 0)
        return Embeddings(tuple(ids), vectors, ref)

    def put_vectors(self, collection_id: str, image_ids: Sequence[str], vectors: Any, *,
                    model: ModelRef | str, actor: str = "", batch_size: int = 1024,
                    timeout_s: float | None = None) -> ModelRef:
        """Store vectors computed elsewhere (MiewID, MegaDescriptor, ...) for images already
        in the collection (PutVectors, ``batch_size`` <= 1024 a call; each call all or
        nothing, safe to repeat). ``model`` names the model that made them ("miewid" or
        "miewid:2"); the server normalises them. Returns the model version recorded."""
        ref = model if isinstance(model, ModelRef) else ModelRef.parse(model)
        if not 1 <= batch_size <= 1024:
            raise ValueError(f"batch_size must be in [1, 1024], got {batch_size}")
        if len(image_ids) != len(vectors):
            raise ValueError(f"{len(image_ids)} image ids but {len(vectors)} vectors")
        for start in range(0, len(image_ids), batch_size):
            request = collections_pb2.PutVectorsRequest(
                collection_id=collection_id, model=ref.to_pb(), actor=actor,
                vectors=[collections_pb2.ImageVector(image_id=iid, vector=list(map(float, vec)))
                         for iid, vec in zip(image_ids[start:start + batch_size],
                                             vectors[start:start + batch_size], strict=True)])
            resp = self._call("CollectionService.PutVectors", self._collections.PutVectors,
                              request, retry=True, timeout_s=timeout_s)
            ref = ModelRef(resp.model.name, resp.model.version)  # later calls: same version
        return ref

    def embed_collection(self, collection_id: str, *, model: ModelRef | str | None = None,
                         wait: bool = True, timeout_s: float | None = None,
                         progress: Callable[[Operation], None] | None = None) -> Operation:
        """Embed the images that lack a vector (``defer_embedding`` ingest, or a new model
        version); with ``wait`` block until done (OperationFailed if it fails)."""
        ref = model if isinstance(model, ModelRef) else ModelRef.parse(model)
        msg = self._call("CollectionService.EmbedCollection",
                         self._collections.EmbedCollection,
                         collections_pb2.EmbedCollectionRequest(collection_id=collection_id,
                                                                model=ref.to_pb()),
                         retry=False, timeout_s=timeout_s)
        op = Operation.from_pb(msg)
        return self.wait_operation(op.operation_id, progress=progress) if wait else op

    def get_operation(self, operation_id: str, *, timeout_s: float | None = None) -> Operation:
        return Operation.from_pb(self._call(
            "CollectionService.GetOperation", self._collections.GetOperation,
            collections_pb2.GetOperationRequest(operation_id=operation_id), retry=True,
            timeout_s=timeout_s))

    def watch_operation(self, operation_id: str, *, timeout_s: float | None = None
                        ) -> Iterator[Operation]:
        """The operation's states as they change, ending with the final one."""
        request = collections_pb2.GetOperationRequest(operation_id=operation_id)
        for msg in self._stream("CollectionService.WatchOperation",
                                lambda: self._collections.WatchOperation(
                                    request, timeout=timeout_s,
                                    metadata=self.metadata or None)):
            yield Operation.from_pb(msg)

    def wait_operation(self, operation_id: str, *, timeout_s: float | None = None,
                       progress: Callable[[Operation], None] | None = None) -> Operation:
        """Block until the operation is final; return it when it SUCCEEDED, raise
        OperationFailed (with its recorded code) when it FAILED. A watch cut by a server
        restart (UNAVAILABLE) is resumed with the usual retries."""
        return self._wait_final("CollectionService.WatchOperation", self.watch_operation,
                                self.get_operation, operation_id, timeout_s, progress)

    def _wait_final(self, method: str, watch: Callable[..., Iterator[Any]],
                    get: Callable[[str], Any], item_id: str, timeout_s: float | None,
                    progress: Callable[[Any], None] | None) -> Any:
        """Follow ``watch(item_id)`` (an Operation or a TrainingJob) until its state is
        final: return it, or raise OperationFailed when it FAILED. A stream cut by
        UNAVAILABLE is reopened with the usual retries; one that ends early is completed
        with ``get(item_id)``."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        attempt = 0
        while True:
            left = None if end is None else max(end - time.monotonic(), 0.001)
            last = None
            try:
                for last in watch(item_id, timeout_s=left):
                    attempt = 0
                    if progress is not None:
                        progress(last)
                    if last.finished:
                        break
            except ReidalClientError as exc:
                if exc.code != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
                    raise
                attempt += 1
                self._retry_wait(method, attempt, exc)
                continue
            if last is None or not last.finished:  # the stream ended without a final state
                last = get(item_id)
            if last.state == "FAILED":
                raise operation_failed(last.error_code, last.error_message, item_id)
            if last.finished:
                return last

    # ------------------------------------------------------------------ sampling

    def _pairs_request(self, collection_id: str, budget: int | float | None,
                       filter: ImageFilter | Mapping[str, str] | None,  # noqa: A002
                       skip_pending: bool, request_id: str | None
                       ) -> sampling_pb2.GetQueryPairsRequest:
        request = sampling_pb2.GetQueryPairsRequest(
            collection_id=collection_id, skip_pending=skip_pending,
            request_id=request_id or str(uuid.uuid4()))
        b = budget_pb(budget)
        if b is not None:
            request.budget.CopyFrom(b)
        f = ImageFilter.coerce(filter)
        if f is not None:
            request.filter.CopyFrom(f.to_pb())
        return request

    def get_query_pairs(self, collection_id: str, budget: int | float | None = None, *,
                        filter: ImageFilter | Mapping[str, str] | None = None,  # noqa: A002
                        skip_pending: bool = False, request_id: str | None = None,
                        timeout_s: float | None = None) -> QueryBatch:
        """Run one sampling cycle and return its pairs.

        budget: an int (pairs) or a float (fraction of all pairs, e.g. 0.0002); None = the
        collection's default. filter: an ImageFilter, or a mapping of metadata values.
        request_id: the idempotency key (a fresh UUID when None), so a retry after a lost
        response returns the same batch instead of running a second cycle.
        """
        request = self._pairs_request(collection_id, budget, filter, skip_pending, request_id)
        return QueryBatch.from_pb(self._call(
            "SamplingService.GetQueryPairs", self._sampling.GetQueryPairs, request,
            retry=True, timeout_s=timeout_s))

    def start_query_pairs(self, collection_id: str, budget: int | float | None = None, *,
                          filter: ImageFilter | Mapping[str, str] | None = None,  # noqa: A002
                          skip_pending: bool = False, request_id: str | None = None,
                          timeout_s: float | None = None) -> Operation:
        """The same cycle in the background: an Operation whose ``batch_id`` names the
        batch once it succeeded (:meth:`wait_operation`, then :meth:`get_query_batch`)."""
        request = self._pairs_request(collection_id, budget, filter, skip_pending, request_id)
        return Operation.from_pb(self._call(
            "SamplingService.StartQueryPairs", self._sampling.StartQueryPairs, request,
            retry=True, timeout_s=timeout_s))

    def get_query_batch(self, collection_id: str, batch_id: str, *,
                        timeout_s: float | None = None) -> QueryBatch:
        return QueryBatch.from_pb(self._call(
            "SamplingService.GetQueryBatch", self._sampling.GetQueryBatch,
            sampling_pb2.GetQueryBatchRequest(collection_id=collection_id, batch_id=batch_id),
            retry=True, timeout_s=timeout_s))

    def watch_queue(self, collection_id: str, *, after_cycle: int | None = None,
                    reconnect: bool = True, timeout_s: float | None = None
                    ) -> Iterator[QueueEvent]:
        """Every new batch of the collection as it is created, for as long as you iterate.

        after_cycle: also send the stored batches above this cycle first (None: only
        batches from now on). With ``reconnect``, a stream cut by UNAVAILABLE (a server
        restart) is reopened with the usual backoff, resuming after the last cycle seen, so
        no batch is missed or repeated. Ends after a COLLECTION_DELETED event. timeout_s:
        a deadline for the whole watch (None: none; a watch is meant to stay open).
        """
        after = after_cycle if after_cycle is not None else \
            self.get_collection(collection_id).cycle
        end = None if timeout_s is None else time.monotonic() + timeout_s
        failures = 0
        while True:
            request = sampling_pb2.WatchQueueRequest(collection_id=collection_id,
                                                     after_cycle=after)
            left = None if end is None else max(end - time.monotonic(), 0.001)
            try:
                for msg in self._stream("SamplingService.WatchQueue",
                                        lambda r=request, t=left: self._sampling.WatchQueue(
                                            r, timeout=t, metadata=self.metadata or None)):
                    failures = 0
                    event = QueueEvent.from_pb(msg)
                    if event.batch is not None:
                        after = max(after, event.batch.cycle)
                    yield event
                    if event.kind == "COLLECTION_DELETED":
                        return
                return
            except ReidalClientError as exc:
                if not reconnect or exc.code != grpc.StatusCode.UNAVAILABLE or \
                        failures >= self.retries:
                    raise
                failures += 1
                self._retry_wait("SamplingService.WatchQueue", failures, exc)

    # ------------------------------------------------------------------ constraints

    def submit_answers(self, collection_id: str, answers: Iterable[Answer | Sequence[Any]], *,
                       batch_id: str = "", request_id: str | None = None,
                       annotator_id: str = "", timeout_s: float | None = None) -> SubmitResult:
        """Store answers durably, all or nothing.

        answers: :class:`Answer` objects, ``(pair_id, label)`` or ``(image_a, image_b,
        label)``; labels as :func:`parse_label` reads them (True / False / None, "same",
        "d", ...). annotator_id: used for answers that name none. request_id: the
        idempotency key; a fresh UUID when None (returned in ``SubmitResult.request_id``),
        so the automatic retry after a lost response stores nothing twice. Pass your own to
        make a resubmission from another process idempotent too.
        """
        items = []
        for a in answers:
            ans = Answer.coerce(a)
            msg = ans.to_pb()
            if not ans.annotator_id and annotator_id:
                msg.annotator_id = annotator_id
            items.append(msg)
        if not items:
            raise ValueError("submit_answers got no answers")
        rid = request_id or str(uuid.uuid4())
        resp = self._call("ConstraintService.SubmitConstraints",
                          self._constraints.SubmitConstraints,
                          constraints_pb2.SubmitConstraintsRequest(
                              collection_id=collection_id, batch_id=batch_id, answers=items,
                              request_id=rid),
                          retry=True, timeout_s=timeout_s)
        return SubmitResult.from_pb(resp, rid)

    def list_constraints(self, collection_id: str, *, image_id: str = "",
                         annotator_id: str = "", label: str | bool | None = "",
                         batch_id: str = "", include_history: bool = False,
                         page_size: int = 1000, timeout_s: float | None = None
                         ) -> list[StoredAnswer]:
        """Stored answers, newest first (every page); current ones unless include_history.
        label: "" = any, else as :func:`parse_label` reads it."""
        label_value = 0 if label == "" else constraints_pb2.AnswerLabel.Value(
            f"ANSWER_LABEL_{parse_label(label)}")
        out: list[StoredAnswer] = []
        token = ""
        while True:
            page = self._call("ConstraintService.ListConstraints",
                              self._constraints.ListConstraints,
                              constraints_pb2.ListConstraintsRequest(
                                  collection_id=collection_id, image_id=image_id,
                                  annotator_id=annotator_id, label=label_value,
                                  batch_id=batch_id, include_history=include_history,
                                  page_size=page_size, page_token=token),
                              retry=True, timeout_s=timeout_s)
            out.extend(StoredAnswer.from_pb(c) for c in page.constraints)
            token = page.next_page_token
            if not token:
                return out

    def delete_constraint(self, collection_id: str, answer_id: str, *, actor: str = "",
                          reason: str = "", timeout_s: float | None = None
                          ) -> tuple[StoredAnswer, StoredAnswer | None]:
        """Soft-delete one answer; returns it (now DELETED) and the answer that became
        current again on that pair, if any. Not retried (a retry could not tell "already
        deleted by me" from "never existed")."""
        resp = self._call("ConstraintService.DeleteConstraint",
                          self._constraints.DeleteConstraint,
                          constraints_pb2.DeleteConstraintRequest(
                              collection_id=collection_id, answer_id=answer_id, actor=actor,
                              reason=reason),
                          retry=False, timeout_s=timeout_s)
        restored = StoredAnswer.from_pb(resp.restored) if resp.HasField("restored") else None
        return StoredAnswer.from_pb(resp.deleted), restored

    def exclude_image(self, collection_id: str, image_id: str, *, reason: str = "",
                      actor: str = "", timeout_s: float | None = None) -> ImageExclusion:
        """Take a bad image out of sampling and identities (its answers are kept)."""
        return ImageExclusion.from_pb(self._call(
            "ConstraintService.ExcludeImage", self._constraints.ExcludeImage,
            constraints_pb2.ExcludeImageRequest(collection_id=collection_id, image_id=image_id,
                                                reason=reason, actor=actor),
            retry=True, timeout_s=timeout_s))

    def restore_image(self, collection_id: str, image_id: str, *, actor: str = "",
                      timeout_s: float | None = None) -> ImageExclusion:
        return ImageExclusion.from_pb(self._call(
            "ConstraintService.RestoreImage", self._constraints.RestoreImage,
            constraints_pb2.RestoreImageRequest(collection_id=collection_id, image_id=image_id,
                                                actor=actor),
            retry=True, timeout_s=timeout_s))

    def get_identities(self, collection_id: str, *, timeout_s: float | None = None
                       ) -> Identities:
        """The identity of every image not excluded (stable ids; see constraints.proto)."""
        return Identities.from_pb(self._call(
            "ConstraintService.GetIdentities", self._constraints.GetIdentities,
            constraints_pb2.GetIdentitiesRequest(collection_id=collection_id), retry=True,
            timeout_s=timeout_s))

    def export_identities_csv(self, collection_id: str, path: Any, *,
                              timeout_s: float | None = None) -> Identities:
        """Write one row per image (IDENTITY_CSV_FIELDS) to ``path``; returns what was
        written. Excluded images come last, with an empty identity_id."""
        import csv
        from pathlib import Path

        identities = self.get_identities(collection_id, timeout_s=timeout_s)
        with Path(path).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=IDENTITY_CSV_FIELDS)
            writer.writeheader()
            writer.writerows(identities.rows())
        return identities

    # ------------------------------------------------------------------ embedding

    def embed(self, images: Iterable[ImageInput | Sequence[Any]], *,
              model: ModelRef | str | None = None, batch_size: int = 64,
              timeout_s: float | None = None) -> Embeddings:
        """Vectors of images through the EmbeddingService (nothing is stored).

        Sent in Embed calls of ``batch_size`` images; every call after the first asks
        for the model version the first one used, so all vectors share one embedding
        space. Returns them in input order as a float32 (n, dim) array.
        """
        import numpy as np

        ref = model if isinstance(model, ModelRef) else ModelRef.parse(model)
        ids: list[str] = []
        parts: list[np.ndarray] = []
        for chunk in _chunks(images, batch_size):
            pics = []
            for item in chunk:
                img = ImageInput.coerce(item).to_pb().image
                pics.append(common_pb2.Image(id=img.id, data=img.data) if img.data
                            else common_pb2.Image(id=img.id, uri=img.uri))
            resp = self._call("EmbeddingService.Embed", self._embedding.Embed,
                              embedding_pb2.EmbedRequest(model=ref.to_pb(), images=pics),
                              retry=True, timeout_s=timeout_s)
            ref = ModelRef(resp.model_name, resp.model_version)
            ids.extend(e.id for e in resp.embeddings)
            parts.append(np.array([list(e.vector) for e in resp.embeddings], dtype=np.float32)
                         .reshape(len(resp.embeddings), resp.dim or -1))
        if not ids:
            raise ValueError("embed got no images")
        return Embeddings(tuple(ids), np.concatenate(parts), ref)

    # ------------------------------------------------------------------ training
    def start_training(self, collection_id: str, *, timeout_s: float | None = None,
                       **config: Any) -> TrainingJob:
        """Start a training job on the collection's images and answers (keyword values:
        TrainingConfig fields, e.g. ``epochs=10``; unset ones keep the server's defaults).
        Not retried: a retry could start a second job (the server refuses two at once)."""
        msg = self._call("TrainingService.StartTraining", self._training.StartTraining,
                         training_pb2.StartTrainingRequest(
                             collection_id=collection_id, config=training_config_pb(config)),
                         retry=False, timeout_s=timeout_s)
        return TrainingJob.from_pb(msg)

    def get_job(self, job_id: str, *, timeout_s: float | None = None) -> TrainingJob:
        return TrainingJob.from_pb(self._call(
            "TrainingService.GetJob", self._training.GetJob,
            training_pb2.GetJobRequest(job_id=job_id), retry=True, timeout_s=timeout_s))

    def list_training_jobs(self, collection_id: str = "", *,
                           timeout_s: float | None = None) -> list[TrainingJob]:
        msg = self._call("TrainingService.ListTrainingJobs", self._training.ListTrainingJobs,
                         training_pb2.ListTrainingJobsRequest(collection_id=collection_id),
                         retry=True, timeout_s=timeout_s)
        return [TrainingJob.from_pb(j) for j in msg.jobs]

    def cancel_job(self, job_id: str, *, timeout_s: float | None = None) -> TrainingJob:
        """Cancel (idempotent: a finished job is returned as it is)."""
        return TrainingJob.from_pb(self._call(
            "TrainingService.CancelJob", self._training.CancelJob,
            training_pb2.CancelJobRequest(job_id=job_id), retry=True, timeout_s=timeout_s))

    def watch_job(self, job_id: str, *, timeout_s: float | None = None
                  ) -> Iterator[TrainingJob]:
        """The job's states as they change (epoch by epoch), ending with the final one."""
        request = training_pb2.GetJobRequest(job_id=job_id)
        for msg in self._stream("TrainingService.WatchJob",
                                lambda: self._training.WatchJob(
                                    request, timeout=timeout_s,
                                    metadata=self.metadata or None)):
            yield TrainingJob.from_pb(msg)

    def wait_job(self, job_id: str, *, timeout_s: float | None = None,
                 progress: Callable[[TrainingJob], None] | None = None) -> TrainingJob:
        """Block until the job is final and return it (SUCCEEDED or CANCELLED); a FAILED job
        raises OperationFailed with its recorded code. A watch cut by a restart is resumed."""
        return self._wait_final("TrainingService.WatchJob", self.watch_job, self.get_job,
                                job_id, timeout_s, progress)

    def promote_model(self, collection_id: str, version: str, *, model: str = "",
                      wait: bool = True, timeout_s: float | None = None,
                      progress: Callable[[Operation], None] | None = None) -> Operation:
        """Re-embed the collection with a model version (e.g. a training job's); the old
        vectors are kept until the new ones are complete. With ``wait`` block until done."""
        msg = self._call("TrainingService.PromoteModel", self._training.PromoteModel,
                         training_pb2.PromoteModelRequest(
                             collection_id=collection_id,
                             model=common_pb2.ModelRef(name=model, version=version)),
                         retry=False, timeout_s=timeout_s)
        op = Operation.from_pb(msg)
        return self.wait_operation(op.operation_id, progress=progress) if wait else op


__all__ = ["DEFAULT_ADDRESS", "DEFAULT_INGEST_BATCH", "ReidalClient", "default_channel_options"]
