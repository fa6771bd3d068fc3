"""A client of an EmbeddingService in another process, with the in-process embedder's API.

The collection service of a process that does not run the embedding service itself
(``--embedding-url``) embeds through :class:`RemoteEmbedder`: the same calls as
:class:`reidal.embedding.embedder.ImageEmbedder`, so ingest does not know which one it
has. A status the remote service answers with becomes a domain error carrying that code
(:class:`reidal.errors.RemoteError`): it reaches the caller, or an operation's record,
with the code the embedding service chose, and nothing inward handles gRPC errors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import grpc
import numpy as np

from reidal.channels import default_channel_options
from reidal.embedding.embedder import Embedded, ImageItem
from reidal.embedding.triton_client import ModelInfo
from reidal.errors import RemoteError
from reidal.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc


@contextmanager
def remote_errors() -> Iterator[None]:
    """Turn a status of the embedding service into a :class:`RemoteError` with its code."""
    try:
        yield
    except grpc.RpcError as exc:
        if not isinstance(exc, grpc.Call):
            raise
        detail = exc.details() or ""
        raise RemoteError(exc.code().name, f"embedding service: {detail}", detail) from None


class RemoteEmbedder:
    """A client of an EmbeddingService in another process, with the in-process API.

    credentials: TLS channel credentials (:func:`reidal.tls.channel_credentials`; None:
    plaintext). token: the access token sent with every call when that service checks them.
    """

    def __init__(self, address: str, default_model: str = "", *, timeout_s: float = 120.0,
                 max_message_mb: float = 64, credentials: grpc.ChannelCredentials | None = None,
                 token: str | None = None) -> None:
        self.address = address
        # The client's options: message limits, and a reconnect within about a second of
        # a restarted embedding pod being back (gRPC's own backoff grows to 120 s, and
        # every ingest would fail UNAVAILABLE meanwhile).
        options = list(default_channel_options(max_message_mb).items())
        self._channel = (grpc.secure_channel(address, credentials, options=options)
                         if credentials is not None
                         else grpc.insecure_channel(address, options=options))
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._stub = embedding_pb2_grpc.EmbeddingServiceStub(self._channel)
        self._timeout = timeout_s
        self._default = default_model

    @property
    def default_model(self) -> str:
        if not self._default:
            with remote_errors():
                self._default = self._stub.ListModels(embedding_pb2.ListModelsRequest(),
                                                      timeout=self._timeout,
                                                      metadata=self._metadata).default_model
        return self._default

    def embed(self, items: Sequence[ImageItem], model: str = "", version: str = "", *,
              deadline: float | None = None,
              is_active: Callable[[], bool] | None = None) -> Embedded:
        timeout = self._timeout if deadline is None else max(deadline - time.monotonic(), 0.0)
        request = embedding_pb2.EmbedRequest(
            model=common_pb2.ModelRef(name=model, version=version),
            images=[common_pb2.Image(id=i.id, data=i.data) if i.data is not None
                    else common_pb2.Image(id=i.id, uri=i.uri) for i in items])
        with remote_errors():
            resp = self._stub.Embed(request, timeout=timeout, metadata=self._metadata)
        vectors = np.array([list(e.vector) for e in resp.embeddings], dtype=np.float32)
        return Embedded([e.id for e in resp.embeddings], vectors.reshape(len(items), -1),
                        resp.model_name, resp.model_version)

    def model(self, name: str = "", version: str = "") -> ModelInfo:
        with remote_errors():
            info = self._stub.GetModel(embedding_pb2.GetModelRequest(
                model=common_pb2.ModelRef(name=name, version=version)), timeout=self._timeout,
                metadata=self._metadata)
        return ModelInfo(info.name, info.version, info.state, info.ready, info.dim or None)

    def is_ready(self) -> bool:
        try:
            self.model()
            return True
        except RemoteError:
            return False

    def close(self) -> None:
        self._channel.close()
