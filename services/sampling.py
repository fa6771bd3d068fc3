"""SamplingService: query batches by Ambiguity-Aware Sampling (sampling.proto).

A thin layer over :mod:`reidal.cycle`: one cycle per GetQueryPairs (serialised per
collection by the runtime's lock) unless a stored batch already answers it (the request
id's, the open batch of an unchanged state, or, while another call computes a cycle of
the collection, the newest batch of the same budget and filter: CycleRunner), the same cycle in the background for StartQueryPairs,
stored batches read back by GetQueryBatch, and WatchQueue streaming every new batch. The
store is the source of truth for WatchQueue: the runtime's notifier only wakes it early.
"""

from __future__ import annotations

import grpc

from reidal.cycle import REASON_CODES, CycleRequest, CycleRunner
from reidal.grpc_server import ServiceBinding
from reidal.runtime import Runtime, queue_key
from reidal.services._common import (
    budget_dict,
    filter_from_pb,
    filter_pb,
    operation_pb,
    timestamp,
)
from reidal.store import BatchRecord
from reidal.v1 import common_pb2, sampling_pb2, sampling_pb2_grpc

SERVICE_NAME: str = sampling_pb2.DESCRIPTOR.services_by_name["SamplingService"].full_name

_POOLS = {"U_os": sampling_pb2.POOL_OVERSEGMENTATION,
          "U_us": sampling_pb2.POOL_UNDERSEGMENTATION,
          "uncertainty": sampling_pb2.POOL_CONTINUATION}  # aas-continued's own pairs
_STATS = ("clusters_a", "outliers_a", "clusters_b", "regions", "images_in_regions",
          "pool_oversegmentation", "pool_undersegmentation", "resolved", "seconds",
          "sampler", "aas_pairs", "continuation_pairs", "knn_index", "knn_k", "knn_recall",
          "knn_recall_se", "knn_recall_rows", "knn_target_recall", "knn_nlist", "knn_nprobe")


def clustering_choice_pb(stored: dict) -> sampling_pb2.ClusteringChoice:
    """A batch's stored clustering choice (cycle.run_cycle's stats) as the message."""
    return sampling_pb2.ClusteringChoice(
        mode=stored["mode"], dbscan_eps=stored["eps"], min_samples=stored["min_samples"],
        k1=stored["k1"], k2=stored["k2"], finch_level=stored["finch_level"],
        eps_source=stored["eps_source"], finch_source=stored["finch_source"],
        same_answers=stored.get("n_same", 0), different_answers=stored.get("n_different", 0))


def batch_stats_pb(stats: dict) -> sampling_pb2.BatchStats:
    out = sampling_pb2.BatchStats(**{k: stats[k] for k in _STATS if k in stats})
    if stats.get("clustering"):
        out.clustering.CopyFrom(clustering_choice_pb(stats["clustering"]))
    return out


def batch_pb(runtime: Runtime, collection_id: str, batch: BatchRecord) -> sampling_pb2.QueryBatch:
    pairs = runtime.store.batches.pairs(collection_id, batch.batch_id)
    model = common_pb2.ModelRef(name=batch.model_name, version=batch.model_version)
    code = REASON_CODES.get(batch.reason)
    out = sampling_pb2.QueryBatch(
        batch_id=batch.batch_id, collection_id=collection_id, cycle=batch.cycle,
        pairs=[sampling_pb2.QueryPair(
            pair_id=p.pair_id, image_a=p.image_a, image_b=p.image_b, similarity=p.similarity,
            pool=_POOLS.get(p.pool, sampling_pb2.POOL_UNSPECIFIED), region=p.region,
            probability=p.probability, model=model, answered=answered)
            for p, answered in pairs],
        budget=batch.budget,
        reason=sampling_pb2.BatchReason.Value(f"BATCH_REASON_{code}") if code else 0,
        reason_text=batch.reason, finished=batch.finished, sampled_images=batch.n_items,
        model=model,
        stats=batch_stats_pb(batch.stats),
        answered=sum(answered for _, answered in pairs),
        created_at=timestamp(batch.created_at),
    )
    if batch.filter:
        out.filter.CopyFrom(filter_pb(batch.filter))
    return out


def cycle_request(request: sampling_pb2.GetQueryPairsRequest) -> CycleRequest:
    image_filter = filter_from_pb(request.filter) if request.HasField("filter") else None
    return CycleRequest(
        budget=budget_dict(request.budget) if request.HasField("budget") else None,
        image_filter=None if image_filter is None or image_filter.empty else image_filter,
        skip_pending=request.skip_pending, request_id=request.request_id)


class SamplingServicer(sampling_pb2_grpc.SamplingServiceServicer):
    """SamplingService over a :class:`reidal.runtime.Runtime`."""

    def __init__(self, runtime: Runtime, *, watch_poll_s: float = 2.0) -> None:
        self.runtime = runtime
        self.watch_poll_s = watch_poll_s
        self._cycles = CycleRunner()

    def binding(self) -> ServiceBinding:
        return ServiceBinding(
            name=SERVICE_NAME, servicer=self,
            add_to_server=sampling_pb2_grpc.add_SamplingServiceServicer_to_server,
            readiness=self.runtime.store.ping)

    def _cycle(self, collection_id: str, request: CycleRequest, progress=None, *,
               serve_latest: bool = False) -> BatchRecord:
        batch, created = self._cycles.run(self.runtime.store, collection_id, request,
                                          self.runtime.lock, progress,
                                          serve_latest=serve_latest)
        if created:
            self.runtime.notifier.bump(queue_key(collection_id))
        return batch

    def GetQueryPairs(self, request, context):  # noqa: N802 - gRPC method name
        batch = self._cycle(request.collection_id, cycle_request(request), serve_latest=True)
        return batch_pb(self.runtime, request.collection_id, batch)

    def StartQueryPairs(self, request, context):  # noqa: N802
        cid = request.collection_id
        self.runtime.store.collections.get(cid)  # NotFound now, not in the operation
        cycle = cycle_request(request)  # a malformed filter fails now too
        ops = self.runtime.operations
        assert ops is not None

        def work(progress) -> dict:
            return {"batch_id": self._cycle(cid, cycle, progress).batch_id}

        op = ops.start(cid, "sample", work, total=3, exclusive=False)
        return operation_pb(op)

    def GetQueryBatch(self, request, context):  # noqa: N802
        batch = self.runtime.store.batches.get(request.collection_id, request.batch_id)
        return batch_pb(self.runtime, request.collection_id, batch)

    def WatchQueue(self, request, context):  # noqa: N802
        store, notifier = self.runtime.store, self.runtime.notifier
        cid = request.collection_id
        col = store.collections.get(cid)
        after = request.after_cycle if request.HasField("after_cycle") else col.cycle
        key = queue_key(cid)
        while context.is_active():
            seen = notifier.version(key)
            try:
                store.collections.get(cid)
            except LookupError:
                yield sampling_pb2.QueueEvent(
                    kind=sampling_pb2.QUEUE_EVENT_KIND_COLLECTION_DELETED, collection_id=cid)
                return
            for batch in store.batches.all(cid, after_cycle=after):
                yield sampling_pb2.QueueEvent(
                    kind=sampling_pb2.QUEUE_EVENT_KIND_BATCH_READY, collection_id=cid,
                    batch=batch_pb(self.runtime, cid, batch))
                after = batch.cycle
            if notifier.closed:
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              f"the server is shutting down; watch again with after_cycle={after}")
            notifier.wait(key, seen, self.watch_poll_s)
