"""EmbeddingService: images (bytes or URIs) -> L2-normalised vectors from a Triton model.

A thin layer over :class:`reidal.embedding.embedder.ImageEmbedder`, which does the work
(decoding, preprocessing, the decode memory budget, Triton) and is also the in-process
embedder of the collection service: translate the request, call, translate back. Failures
are domain errors that name their status codes (:mod:`reidal.errors`); the server's
interceptor answers with them, or :func:`reidal.grpc_server.abort_with` where the message
says which request of a stream failed. The published contract is in
protos/reidal/v1/embedding.proto.
"""

from __future__ import annotations

import grpc

from reidal.embedding.embedder import (  # noqa: F401 - also importable from here
    MAX_IMAGES_PER_REQUEST,
    MAX_LISTED_ERRORS,
    BadImages,
    Embedded,
    ImageEmbedder,
    ImageItem,
)
from reidal.embedding.triton_client import ModelInfo
from reidal.errors import Cancelled, DeadlineExceeded  # noqa: F401 - also importable from here
from reidal.grpc_server import ServiceBinding, abort_with
from reidal.services._common import deadline_at
from reidal.v1 import embedding_pb2, embedding_pb2_grpc

SERVICE_NAME: str = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    """The EmbeddingService over one :class:`ImageEmbedder` (its Triton, models, limits)."""

    def __init__(self, embedder: ImageEmbedder) -> None:
        self.embedder = embedder

    def binding(self) -> ServiceBinding:
        """How :func:`reidal.grpc_server.build_server` serves this servicer: its health
        follows the embedder's Triton, and stopping the server closes the embedder."""
        return ServiceBinding(
            name=SERVICE_NAME,
            servicer=self,
            add_to_server=embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server,
            readiness=self.embedder.is_ready,
            close=self.embedder.close,
        )

    def Embed(self, request, context):  # noqa: N802 - gRPC method name
        return self._respond(request, context)

    def EmbedStream(self, request_iterator, context):  # noqa: N802
        for index, request in enumerate(request_iterator):
            try:
                response = self._respond(request, context)
            except Exception as exc:
                abort_with(context, exc, prefix=f"request {index}: ")
            yield response

    def ListModels(self, request, context):  # noqa: N802
        return embedding_pb2.ListModelsResponse(
            models=[self._info_pb(i) for i in self.embedder.models()],
            default_model=self.embedder.default_model)

    def GetModel(self, request, context):  # noqa: N802
        return self._info_pb(self.embedder.model(request.model.name, request.model.version))

    def _respond(self, request: embedding_pb2.EmbedRequest,
                 context: grpc.ServicerContext) -> embedding_pb2.EmbedResponse:
        items = [
            ImageItem(img.id,
                      data=img.data if img.WhichOneof("source") == "data" else None,
                      uri=img.uri if img.WhichOneof("source") == "uri" else None)
            for img in request.images
        ]
        out = self.embedder.embed(items, request.model.name, request.model.version,
                                  deadline=deadline_at(context), is_active=context.is_active)
        response = embedding_pb2.EmbedResponse(
            model_name=out.model_name, model_version=out.model_version,
            dim=int(out.vectors.shape[1]))
        response.embeddings.extend(
            embedding_pb2.Embedding(id=i, vector=v) for i, v in zip(out.ids, out.vectors,
                                                                    strict=True))
        return response

    def _info_pb(self, info: ModelInfo) -> embedding_pb2.ModelInfo:
        height, width = info.input_size or (0, 0)
        return embedding_pb2.ModelInfo(
            name=info.name, version=info.version, state=info.state, ready=info.ready,
            dim=info.dim or 0, input_height=height, input_width=width,
            max_batch_size=info.max_batch_size or 0,
            is_default=info.name == self.embedder.default_model)
