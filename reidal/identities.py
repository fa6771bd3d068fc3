"""Identities: the answers' view of who is who, with ids that stay put.

The assignment is the density clustering of the current vectors (DBSCAN on the Jaccard
distance, the collection's parameters; in clustering mode "calibrated" those the next
sampling cycle would choose from the same answers) refined by NP3 so that every applied answer holds;
a DBSCAN outlier that no answer joins to others is an identity of its own.

Stable ids (:func:`stable_identity_ids`), the rule:

1. an identity keeps its id while its members do not change;
2. more generally a new cluster takes the id of the previous identity that has the
   majority (more than half) of its members in it - a previous identity can give its
   majority to at most one cluster, so no id is used twice; when a cluster holds the
   majority of several previous identities (a merge) it takes the one it shares most
   images with (ties: the smaller id), and the others retire;
3. every other cluster gets a fresh id ``id-NNNNNN`` from a per-collection counter, in
   order of first member; ids are never reused.

"Previous" means the assignment saved by the last export, restricted to the images
considered now (an excluded image leaves its identity without changing its id).
"""

from __future__ import annotations

import json
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace

import numpy as np

from reidal.collection_state import (
    CollectionView,
    clustering_choice,
    keyed_collection,
    load_view,
    make_aas,
    make_dbscan,
)
from reidal.core.constraints import Contradiction
from reidal.core.np3 import NP3
from reidal.errors import NotFound
from reidal.store import Store

ID_PREFIX = "id-"
COUNTER_NAME = "identity"


def _compact(labels: np.ndarray) -> np.ndarray:
    """Labels 0..K-1, every -1 its own cluster."""
    lab = np.asarray(labels, dtype=np.int64).copy()
    out = lab < 0
    if out.any():
        base = int(lab.max()) + 1 if (~out).any() else 0
        lab[out] = base + np.arange(int(out.sum()), dtype=np.int64)
    return np.unique(lab, return_inverse=True)[1].astype(np.int64).ravel()


def stable_identity_ids(image_ids: Sequence[str], labels: np.ndarray,
                        previous: Mapping[str, str], next_number: int,
                        prefix: str = ID_PREFIX) -> tuple[list[str], int]:
    """Identity id of every image (see the module docstring) and the next free number."""
    n = len(image_ids)
    if np.asarray(labels).shape != (n,):
        raise ValueError(f"labels must have one entry per image ({n}), got shape "
                         f"{np.asarray(labels).shape}")
    if n == 0:
        return [], next_number
    new = _compact(labels)
    n_new = int(new.max()) + 1
    prev = np.array([previous.get(i, "") for i in image_ids], dtype=object)
    has_prev = prev != ""
    chosen = np.full(n_new, "", dtype=object)
    if has_prev.any():
        old_names, old = np.unique(prev[has_prev].astype(str), return_inverse=True)
        old = old.ravel()
        n_old = len(old_names)
        old_size = np.bincount(old, minlength=n_old)
        keys, overlap = np.unique(new[has_prev] * n_old + old, return_counts=True)
        c, o = keys // n_old, keys % n_old
        majority = 2 * overlap > old_size[o]
        c, o, overlap = c[majority], o[majority], overlap[majority]
        # Per new cluster: the largest overlap, ties to the smaller id (np.unique sorted them).
        order = np.lexsort((o, -overlap, c))
        first = order[np.r_[True, c[order][1:] != c[order][:-1]]] if len(order) else order
        chosen[c[first]] = old_names[o[first]]
    first_row = np.full(n_new, n, dtype=np.int64)
    np.minimum.at(first_row, new, np.arange(n, dtype=np.int64))
    fresh = np.flatnonzero(chosen == "")
    fresh = fresh[np.argsort(first_row[fresh], kind="stable")]
    for k, cluster in enumerate(fresh.tolist()):  # one step per new identity
        chosen[cluster] = f"{prefix}{next_number + k:06d}"
    return [str(x) for x in chosen[new]], next_number + len(fresh)


@dataclass(frozen=True)
class IdentitySummary:
    identity_id: str
    image_ids: tuple[str, ...]
    same_answers: int
    different_answers: int
    names: tuple[str, ...]  # most frequent first

    @property
    def size(self) -> int:
        return len(self.image_ids)

    @property
    def new_individual(self) -> bool:
        return not self.names

    @property
    def name_conflict(self) -> bool:
        return len(self.names) > 1


def summarize(image_ids: Sequence[str], identity_of: Sequence[str], names: Sequence[str],
              ml_rows: np.ndarray, cl_rows: np.ndarray) -> list[IdentitySummary]:
    """Per identity: members (input order), supporting answers, platform names.

    same_answers: applied must-links inside the identity; different_answers: applied
    cannot-links with one end in it. Sorted largest first, ties by id.
    """
    ids = np.asarray(identity_of, dtype=object)
    uniq, code = np.unique(ids.astype(str), return_inverse=True)
    code = code.ravel()
    k = len(uniq)
    ml = np.asarray(ml_rows, dtype=np.int64).reshape(-1, 2)
    cl = np.asarray(cl_rows, dtype=np.int64).reshape(-1, 2)
    inside = code[ml[:, 0]] == code[ml[:, 1]]
    same = np.bincount(code[ml[inside, 0]], minlength=k)
    across = code[cl[:, 0]] != code[cl[:, 1]]
    diff = np.bincount(code[cl[across]].ravel(), minlength=k)
    members: list[list[str]] = [[] for _ in range(k)]
    named: list[Counter[str]] = [Counter() for _ in range(k)]
    for row, c in enumerate(code.tolist()):  # one step per image
        members[c].append(image_ids[row])
        if names[row]:
            named[c][names[row]] += 1
    out = [
        IdentitySummary(
            str(uniq[c]), tuple(members[c]), int(same[c]), int(diff[c]),
            tuple(name for name, _ in sorted(named[c].items(), key=lambda kv: (-kv[1], kv[0]))),
        )
        for c in range(k)
    ]
    out.sort(key=lambda s: (-s.size, s.identity_id))
    return out


class ClusteringCache:
    """DBSCAN labels of the last few (vectors, clustering) pairs identities ran on.

    After an answer only NP3's input changes: the rows (:class:`RowsCache` hands every view
    of an unchanged image state the same read-only vectors), the parameters and, in mode
    "fixed", the clustering choice stay, and so do the DBSCAN labels (~15 ms at n = 2,000,
    most of a recomputation). Keyed by the vectors' identity (an entry holds them, so the
    identity cannot be reused while it lives; writable vectors are never keyed) and by
    everything else DBSCAN reads. Bounded to ``maxsize`` entries and thread-safe.
    """

    def __init__(self, maxsize: int = 2) -> None:
        self.maxsize = int(maxsize)
        self._entries: OrderedDict[tuple[int, str], tuple[np.ndarray, np.ndarray]]
        self._entries = OrderedDict()
        self._lock = threading.Lock()

    def labels(self, X: np.ndarray, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """``compute()`` (a copy of it), or a copy of what it gave for these vectors and key."""
        if X.flags.writeable:
            return compute()
        entry = (id(X), key)
        with self._lock:
            hit = self._entries.get(entry)
            if hit is not None and hit[0] is X:
                self._entries.move_to_end(entry)
                return hit[1].copy()
        labels = np.asarray(compute(), dtype=np.int64)
        with self._lock:
            self._entries[entry] = (X, labels.copy())
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return labels


#: The clusterings of this process's identity computations.
_CLUSTERINGS = ClusteringCache()


def refined_labels(view: CollectionView) -> np.ndarray:
    """DBSCAN labels of the view's vectors, made consistent with its answers by NP3.

    The Jaccard graph is the sampler's (:meth:`AmbiguityAwareSampler.neighbour_graph`,
    cached per vectors): identities after a cycle cost DBSCAN + NP3 only, and use the
    same neighbours (the same kNN index) as the questions did. The DBSCAN labels of
    unchanged vectors and clustering come from :class:`ClusteringCache`: after an answer,
    NP3 only.
    """
    if view.n < 2:
        return np.full(view.n, -1, dtype=np.int64)
    params = view.collection.params
    cs = view.answers.constraints
    _, choice = clustering_choice(params, view.X, cs)

    def dbscan() -> np.ndarray:
        _, D, _ = make_aas(params, choice).neighbour_graph(view.X)
        return np.asarray(make_dbscan(params, choice)(view.X, distance=D), dtype=np.int64)

    key = json.dumps([params, choice.to_dict()], sort_keys=True, default=str)
    labels = _CLUSTERINGS.labels(view.X, key, dbscan)
    if len(cs.ml_pairs()) or len(cs.cl_pairs()):
        labels = NP3()(labels, view.X, cs).labels
    return labels


@dataclass
class IdentitiesResult:
    identities: list[IdentitySummary]
    excluded_ids: list[str]
    model_name: str
    model_version: str
    cycle: int
    applied_answers: int
    contradictions: list[Contradiction] = field(default_factory=list)  # answer id = seq


def compute_identities(store: Store, collection_id: str) -> IdentitiesResult:
    """Compute, name stably, save and summarise the identities of a collection.

    The caller serialises calls per collection (the saved assignment is read, then
    replaced).
    """
    view = load_view(store, collection_id)
    labels = refined_labels(view)
    previous = store.collections.identities(collection_id)
    start = store.collections.counter(collection_id, COUNTER_NAME, default=1)
    ids = view.image_ids
    identity_of, next_number = stable_identity_ids(ids, labels, previous, start)
    assignment = dict(zip(ids, identity_of, strict=True))
    if assignment != previous or next_number != start:  # else the saved rows are these
        store.collections.save_identities(collection_id, assignment,
                                          counter_name=COUNTER_NAME, counter_value=next_number)
    cs = view.answers.constraints
    summaries = summarize(ids, identity_of, [img.name for img in view.images],
                          cs.ml_pairs(), cs.cl_pairs())
    excluded = sorted(store.images.excluded(collection_id))
    return IdentitiesResult(
        summaries, excluded, view.collection.model_name, view.collection.model_version,
        view.collection.cycle, len(cs),
        list(cs.contradictions),
    )


class LatestIdentities:
    """GetIdentities that does not queue behind the computation of a newer state.

    Per collection this process keeps the last computed result with its state key
    (:func:`~reidal.collection_state.state_key`). A call whose key equals it gets it at
    once. Otherwise one call at a time computes (under ``lock(collection_id)``, the
    runtime's per-collection identities lock, which sampling cycles do not take) while the
    other calls get the last computed result at once; only when there is none yet do they
    wait for that computation. So a result may lag answers committed while another call was
    computing; its ``applied_answers`` and ``cycle`` say which state it is. A call that
    starts after a change committed (a client's submit, then its GetIdentities) finds a
    new key, so unless another call is computing it computes: the change shows in it.

    The cycle number is no input of the computation (a sampling cycle changes no answer,
    image or parameter), so a new cycle re-labels the kept result with the current number
    instead of computing again. The kept result is then replaced by the re-labelled one:
    every call of one state gets the same object, which a caller may key derived data by
    (the servicer keeps the response message it built for it).
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._latest: dict[str, tuple[str, IdentitiesResult]] = {}
        self._running: dict[str, threading.Event] = {}

    def get(self, store: Store, collection_id: str,
            lock: Callable[[str], AbstractContextManager[None]]) -> IdentitiesResult:
        try:
            key, col = keyed_collection(store, collection_id, {"kind": "identities"})
        except NotFound:
            with self._guard:  # a deleted collection's result is not kept
                self._latest.pop(collection_id, None)
            raise
        while True:
            with self._guard:
                latest = self._latest.get(collection_id)
                if latest is not None and latest[0] == key:
                    return self._at_cycle(collection_id, latest, col.cycle)
                running = self._running.get(collection_id)
                if running is None:
                    done = self._running[collection_id] = threading.Event()
            if running is not None:
                if latest is not None:
                    return latest[1]  # the last computed state, while a newer one is computed
                running.wait()
                continue
            try:
                with lock(collection_id):
                    key, _ = keyed_collection(store, collection_id, {"kind": "identities"})
                    result = compute_identities(store, collection_id)
                with self._guard:
                    self._latest[collection_id] = (key, result)
                return result
            finally:
                with self._guard:
                    del self._running[collection_id]
                done.set()

    def _at_cycle(self, collection_id: str, latest: tuple[str, IdentitiesResult],
                  cycle: int) -> IdentitiesResult:
        """The kept result labelled with ``cycle`` (kept in its place); under the guard."""
        key, result = latest
        if result.cycle != cycle:
            result = replace(result, cycle=cycle)
            self._latest[collection_id] = (key, result)
        return result
