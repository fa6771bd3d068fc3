"""Helpers shared by the service tests: synthetic images, stubs, a ground-truth oracle."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import grpc

from reidal.data.synthetic_images import SyntheticConfig, iter_samples
from reidal.serve import ReidalServer, serve
from reidal.serve_config import ServeConfig
from reidal.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    common_pb2,
    constraints_pb2,
    constraints_pb2_grpc,
    sampling_pb2,
    sampling_pb2_grpc,
)

#: Clustering parameters that let DBSCAN find structure in a few dozen images.
SMALL_CLUSTERING = collections_pb2.ClusteringParams(k1=6, k2=2, min_samples=2, dbscan_eps=0.6)


@dataclass(frozen=True)
class Picture:
    image_id: str
    identity: str
    viewpoint: str
    png: bytes


@cache
def pictures(n_individuals: int = 8, per_individual: int = 5, seed: int = 0,
             image_size: int = 64) -> tuple[Picture, ...]:
    """Seeded synthetic photos (PNG, 64 px by default), ``per_individual`` of each individual."""
    cfg = SyntheticConfig.tiny(n_individuals=n_individuals,
                               images_per_individual=(per_individual, per_individual), seed=seed,
                               image_size=image_size)
    out = []
    for s in iter_samples(cfg):
        buf = io.BytesIO()
        s.image.save(buf, format="PNG")
        out.append(Picture(s.image_id, s.identity, s.viewpoint, buf.getvalue()))
    return tuple(out)


@dataclass
class Stubs:
    channel: grpc.Channel
    collections: collections_pb2_grpc.CollectionServiceStub
    sampling: sampling_pb2_grpc.SamplingServiceStub
    constraints: constraints_pb2_grpc.ConstraintServiceStub

    @classmethod
    def connect(cls, address: str) -> Stubs:
        ch = grpc.insecure_channel(address)
        return cls(ch, collections_pb2_grpc.CollectionServiceStub(ch),
                   sampling_pb2_grpc.SamplingServiceStub(ch),
                   constraints_pb2_grpc.ConstraintServiceStub(ch))

    def close(self) -> None:
        self.channel.close()


def ingest_message(cid: str, pics, *, metadata=None, names=None, defer: bool = False
                   ) -> collections_pb2.AddImagesRequest:
    return collections_pb2.AddImagesRequest(
        collection_id=cid, defer_embedding=defer,
        images=[collections_pb2.IngestImage(
            image=common_pb2.Image(id=p.image_id, data=p.png),
            name=(names or {}).get(p.image_id, ""),
            metadata=(metadata or {}).get(p.image_id, {}))
            for p in pics])


def create_and_fill(stubs: Stubs, cid: str, pics, *, chunk: int = 16, metadata=None, names=None,
                    clustering=SMALL_CLUSTERING, **create) -> collections_pb2.AddImagesResponse:
    stubs.collections.CreateCollection(collections_pb2.CreateCollectionRequest(
        collection_id=cid, clustering=clustering, **create), timeout=30)
    msgs = [ingest_message(cid, pics[s:s + chunk], metadata=metadata, names=names)
            for s in range(0, len(pics), chunk)]
    return stubs.collections.AddImages(iter(msgs), timeout=120)


LABEL = {True: constraints_pb2.ANSWER_LABEL_SAME, False: constraints_pb2.ANSWER_LABEL_DIFFERENT}


def oracle_answers(batch: sampling_pb2.QueryBatch, truth: dict[str, str],
                   annotator: str = "oracle") -> list[constraints_pb2.AnswerInput]:
    """The true answer to every pair of the batch, by pair id."""
    return [constraints_pb2.AnswerInput(
        pair_id=p.pair_id, label=LABEL[truth[p.image_a] == truth[p.image_b]],
        annotator_id=annotator) for p in batch.pairs]


def by_images(a: str, b: str, same: bool | None, annotator: str = "person"
              ) -> constraints_pb2.AnswerInput:
    label = constraints_pb2.ANSWER_LABEL_UNSURE if same is None else LABEL[same]
    return constraints_pb2.AnswerInput(
        images=constraints_pb2.ImagePair(image_a=a, image_b=b), label=label,
        annotator_id=annotator)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """The RpcError a call raises (iterating a streaming response); fails if none."""
    try:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "DESCRIPTOR"):
            list(result)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"{call} did not fail")


def wait_in_flight(service: str, method: str, at_least: float, timeout: float = 20.0) -> None:
    """Block until the server's in-flight gauge shows ``at_least`` calls of the method
    (a streaming call has really started), then a moment more for its first store read."""
    import time

    from prometheus_client import REGISTRY

    deadline = time.monotonic() + timeout
    labels = {"service": service, "method": method}
    while (REGISTRY.get_sample_value("reidal_rpc_in_flight", labels) or 0.0) < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"{service}/{method} never started")
        time.sleep(0.02)
    time.sleep(0.2)


def in_flight(service: str, method: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("reidal_rpc_in_flight",
                                     {"service": service, "method": method}) or 0.0


@contextmanager
def running_server(triton, data_dir: Path, **options) -> Iterator[ReidalServer]:
    """The all-in-one server on a free loopback port, embedding with the test Triton."""
    srv = serve(ServeConfig(data_dir=data_dir, triton_url=triton.grpc_url,
                            health_interval_s=60, **options))
    try:
        yield srv
    finally:
        srv.stop(grace=1)
