"""One sampling cycle of a collection: AAS on its current state, stored as a query batch.

The clustering AAS uses is the collection's fixed parameters or, in mode "calibrated",
chosen now from the vectors and the answers so far (collection_state.clustering_choice);
the sampler is the paper's AAS or ``aas-continued``. The batch's stats record both.

The rows are the images not excluded (and kept by the filter), the vectors those of the
collection's model version, the constraints its current answers (collection_state).
UNSURE pairs are never asked again; with ``skip_pending`` neither are pairs of earlier
batches still waiting for an answer. The batch and its pairs are stored in one transaction
that this workflow opens (:meth:`~reidal.store.batches.Batches.transaction`: the request id's
batch if it has one, else the next cycle number, the batch and its pairs), which also moves
the collection's cycle counter, so a batch id is resolvable as soon as a client sees it. Cycle c draws with seed ``sampling.seed + c``: a cycle is reproducible.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from reidal.collection_state import (
    ImageFilter,
    budget_value,
    clustering_choice,
    load_view,
    make_sampler,
    pair_rows_of,
    sampling_param,
    state_key,
)
from reidal.core.aas import REASON_AGREE
from reidal.core.sampling import REASON_ALL_RESOLVED, REASON_FULL, REASON_SMALL_POOL
from reidal.errors import InvalidArgument
from reidal.logs import log_kv
from reidal.metrics import counter, histogram
from reidal.runtime import Progress
from reidal.store import BatchDraft, BatchRecord, PairRecord, Store

log = logging.getLogger("reidal.sampling")

REASON_NO_CANDIDATES = "the regions of uncertainty hold no candidate pair"

#: Sampler reason sentence -> BatchReason name (sampling.proto).
REASON_CODES: dict[str, str] = {
    REASON_FULL: "BUDGET_FILLED",
    REASON_SMALL_POOL: "POOL_SMALLER_THAN_BUDGET",
    REASON_AGREE: "NO_DISAGREEMENT",
    REASON_ALL_RESOLVED: "ALL_RESOLVED",
    REASON_NO_CANDIDATES: "NO_CANDIDATES",
}
_FINISHED = {REASON_AGREE, REASON_ALL_RESOLVED, REASON_NO_CANDIDATES}

_PAIRS = counter("reidal_pairs_asked", "Pairs put into query batches, per AAS pool", ("pool",))
_CYCLE_SECONDS = histogram("reidal_cycle_seconds",
                           "Wall time of one sampling cycle (load, cluster, sample, store)")


def new_batch_id(cycle: int) -> str:
    """``c<cycle>-<random>``: readable, and unique even across a deleted and re-created
    collection of the same id (stale pair ids then resolve to nothing)."""
    return f"c{cycle}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class CycleRequest:
    budget: dict[str, Any] | None = None  # {"count": k} or {"fraction": f}; None = default
    image_filter: ImageFilter | None = None
    skip_pending: bool = False
    request_id: str = ""


STAGES = ("loading vectors and answers", "clustering and sampling", "storing the batch")


def pairs_state_key(store: Store, collection_id: str, request: CycleRequest) -> str:
    """The state key (:func:`~reidal.collection_state.state_key`) of a cycle for
    ``request``: the collection's state and the budget and filter asked."""
    return state_key(store, collection_id, {
        "kind": "pairs", "budget": request.budget,
        "filter": request.image_filter.to_dict() if request.image_filter else {}})


def request_key(request: CycleRequest) -> str:
    """What a cycle was asked (budget and filter), as stored with its batch."""
    return json.dumps({"budget": request.budget, "filter": request.image_filter.to_dict()
                       if request.image_filter else {}}, sort_keys=True, default=str)


def _answer_with(store: Store, collection_id: str, request: CycleRequest,
                 batch: BatchRecord) -> BatchRecord:
    """``batch`` as the answer to ``request``, recorded for its request id (a retry gets it)."""
    if request.request_id:
        return store.batches.record_request(collection_id, request.request_id, batch.batch_id)
    return batch


def open_batch(store: Store, collection_id: str, request: CycleRequest) -> BatchRecord | None:
    """The stored batch that answers ``request`` without a new cycle, if any.

    The batch of the request id when it was used already; otherwise (unless
    ``skip_pending``, which asks for pairs beyond the batches out) the collection's newest
    batch when it was drawn from the state this request would sample (same
    :func:`pairs_state_key`: no answer, image, exclusion, model or parameter changed, same
    budget and filter). That batch is recorded for the request id, so a retry gets it too.
    """
    if request.request_id:
        earlier = store.batches.by_request(collection_id, request.request_id)
        if earlier is not None:
            return earlier
    if request.skip_pending:
        return None
    newest = store.batches.newest(collection_id)
    if newest is None or newest.stats.get("state_key") != pairs_state_key(
            store, collection_id, request):
        return None
    return _answer_with(store, collection_id, request, newest)


def latest_batch(store: Store, collection_id: str, request: CycleRequest) -> BatchRecord | None:
    """The collection's newest batch when it was drawn for the same budget and filter
    (whatever the state since; not for ``skip_pending``), recorded for the request id."""
    if request.skip_pending:
        return None
    newest = store.batches.newest(collection_id)
    if newest is None or newest.stats.get("request_key") != request_key(request):
        return None
    return _answer_with(store, collection_id, request, newest)


class CycleRunner:
    """GetQueryPairs that does not queue behind a cycle of a newer state.

    A call that :func:`open_batch` answers gets that batch at once. Otherwise, when
    another call of this process is already running (or waiting for) a cycle of the same
    collection, a call with ``serve_latest`` gets the newest batch drawn for the same
    budget and filter (:func:`latest_batch`: the last computed state; its pairs' answered
    flags show what was answered since) instead of waiting; without one it waits for the
    collection's lock and runs its own cycle (which may then find the other call's batch).
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._active: dict[str, int] = {}

    def run(self, store: Store, collection_id: str, request: CycleRequest,
            lock: Callable[[str], AbstractContextManager[None]],
            progress: Progress | None = None, *,
            serve_latest: bool = False) -> tuple[BatchRecord, bool]:
        """``(batch, created)``; ``lock(collection_id)`` serialises the cycles."""
        ready = open_batch(store, collection_id, request)
        if ready is not None:
            return ready, False
        with self._guard:
            busy = self._active.get(collection_id, 0) > 0
            self._active[collection_id] = self._active.get(collection_id, 0) + 1
        try:
            if busy and serve_latest:
                latest = latest_batch(store, collection_id, request)
                if latest is not None:
                    return latest, False
            with lock(collection_id):
                return run_cycle(store, collection_id, request, progress)
        finally:
            with self._guard:
                self._active[collection_id] -= 1
                if not self._active[collection_id]:
                    del self._active[collection_id]


def knn_stats(report: dict[str, Any] | None) -> dict[str, Any]:
    """The kNN graph's report (KNNReport.as_stats, the sampler's ``stats["knn"]``) as the
    batch's flat ``knn_*`` stats (BatchStats in sampling.proto); {} without one."""
    if not report:
        return {}
    params = report.get("params") or {}
    return {"knn_index": report["index"], "knn_k": report["k"],
            "knn_recall": report["recall"], "knn_recall_se": report["recall_se"],
            "knn_recall_rows": report["n_queries"],
            "knn_target_recall": report["target_recall"] or 0.0,
            "knn_nlist": int(params.get("nlist", 0)), "knn_nprobe": int(params.get("nprobe", 0))}


def run_cycle(store: Store, collection_id: str, request: CycleRequest,
              progress: Progress | None = None) -> tuple[BatchRecord, bool]:
    """Run one cycle and store its batch; returns ``(batch, created)``.

    When :func:`open_batch` finds a stored batch for the request, it comes back
    (``created`` False) and nothing runs. The caller serialises cycles of one collection.
    """
    earlier = open_batch(store, collection_id, request)
    if earlier is not None:
        return earlier, False
    key = None if request.skip_pending else pairs_state_key(store, collection_id, request)
    tic = time.perf_counter()

    def stage(k: int) -> None:
        if progress is not None:
            progress.update(done=k, total=len(STAGES), stage=STAGES[k] if k < len(STAGES)
                            else "done")

    stage(0)
    view = load_view(store, collection_id, request.image_filter)
    if view.n < 2:
        raise InvalidArgument(
            f"only {view.n} image(s) of collection {collection_id!r} are left to sample from "
            "after exclusion and filtering; a pair needs 2")
    params = view.collection.params
    budget = budget_value(request.budget or sampling_param(params, "default_budget"), view.n)
    exclude = view.answers.unsure_pairs
    pending = 0
    if request.skip_pending:
        pend = pair_rows_of(view.image_ids, store.batches.pending_pairs(collection_id))
        pending = len(pend)
        exclude = np.concatenate([exclude, pend]) if pending else exclude
    cycle = view.collection.cycle + 1

    stage(1)
    mode, choice = clustering_choice(params, view.X, view.answers.constraints)
    sampler = make_sampler(params, choice)
    result = sampler.sample(view.X, view.answers.constraints, budget,
                            seed=int(sampling_param(params, "seed")) + cycle,
                            exclude_pairs=exclude)
    ids = view.image_ids
    pairs = [
        PairRecord("", *sorted((ids[p.i], ids[p.j])), p.pool, p.region, p.probability,
                   p.similarity)
        for p in result.pairs
    ]
    finished = not pairs and result.reason in _FINISHED and not (
        request.skip_pending and pending and result.reason == REASON_ALL_RESOLVED)
    st = result.stats
    seconds = time.perf_counter() - tic
    stats = {
        "clusters_a": st.get("n_clusters_a", 0), "outliers_a": st.get("n_outliers_a", 0),
        "clusters_b": st.get("n_clusters_b", 0), "regions": st.get("n_regions", 0),
        "images_in_regions": st.get("n_items_in_regions", 0),
        "pool_oversegmentation": st.get("U_os", 0), "pool_undersegmentation": st.get("U_us", 0),
        "resolved": st.get("U_os_resolved", 0) + st.get("U_us_resolved", 0),
        "seconds": seconds, "pending_skipped": pending,
        "clustering": {"mode": mode, **choice.to_dict()},
        "sampler": sampling_param(params, "sampler"),
        "aas_pairs": st.get("aas_pairs", len(pairs)),
        "continuation_pairs": st.get("continuation_pairs", 0),
        **knn_stats(st.get("knn")),
    }
    if key is not None:
        stats["state_key"] = key
        stats["request_key"] = request_key(request)

    stage(2)
    draft = BatchDraft(
        pairs, budget=budget, reason=result.reason, finished=finished,
        model_name=view.collection.model_name, model_version=view.collection.model_version,
        filter=request.image_filter.to_dict() if request.image_filter else {},
        n_items=view.n, stats=stats, request_id=request.request_id)
    with store.batches.transaction(collection_id) as tx:  # one unit of work: replay or store
        earlier = tx.batch_of_request(request.request_id)
        created = earlier is None
        if earlier is None:
            number = tx.next_cycle()  # the seed's cycle, unless another process stored one
            batch = tx.insert(new_batch_id(number), number, draft)
        else:
            batch = earlier
    if created:
        for p in pairs:
            _PAIRS.labels(p.pool).inc()
        _CYCLE_SECONDS.observe(time.perf_counter() - tic)
        log_kv(log, logging.INFO, "cycle", collection=collection_id, cycle=batch.cycle,
               batch=batch.batch_id, images=view.n, pairs=len(pairs), budget=budget,
               reason=result.reason, finished=finished, ms=round(seconds * 1000.0, 1))
    stage(3)
    return batch, created
