"""A collection's state as the algorithms see it: rows, vectors, constraints, parameters.

The store speaks in the caller's string ids; the core speaks in row indices 0..n-1. This
module is the one place that translates: it picks the rows (images not excluded, optionally
filtered by metadata), gathers their vectors of the collection's model version, and turns
the current answers into a :class:`~reidal.core.constraints.ConstraintSet` over those rows.
No gRPC here; the services call it.

Answers -> constraints: SAME = must-link, DIFFERENT = cannot-link, UNSURE = never a
constraint, but that pair is never asked again (it goes to ``exclude_pairs``). The current
answer of a pair is its newest non-deleted one (the store's supersession). An answer whose
image is outside the rows (excluded, or filtered out) takes no part. Contradictions among
current answers are settled by ConstraintSet's rule, the newer answer wins: the answer id
given to the core is the store's sequence number, which grows with time.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time
from typing import Any

import numpy as np

from reidal.core import samplers
from reidal.core.aas import AmbiguityAwareSampler
from reidal.core.calibration import ClusteringCalibrator, ClusteringChoice
from reidal.core.clustering import DBSCANJaccard
from reidal.core.constraints import ConstraintSet, Contradiction
from reidal.core.params import (
    CHOICE_NAMES,
    SAMPLING,
    ClusteringParams,
    SamplingParams,
    check_group,
    params_from_dict,
    params_to_dict,
)
from reidal.core.params import (
    CLUSTERING_MODES as CLUSTERING_MODES,  # re-exported: the modes a collection takes
)
from reidal.core.sampling import Sampler
from reidal.core.validation import OneOf, check_params, resolve_budget
from reidal.errors import FailedPrecondition, InvalidArgument, NotFound
from reidal.limits import MAX_ID_LENGTH
from reidal.store import Collection, ImageRecord, Store, StoredAnswer

#: The samplers a collection may run (SamplingParams.sampler): those whose pools the API
#: names (reidal.core.samplers.SERVED).
SAMPLERS = samplers.SERVED


def check_id(value: str, what: str) -> str:
    """A caller id: non-empty, at most MAX_ID_LENGTH characters, no control characters."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} must be a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(f"{what} {value[:40]!r}... is longer than {MAX_ID_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidArgument(f"{what} {value!r} contains control characters")
    return value


# --------------------------------------------------------------------------- parameters


def _budget_dict(budget: Mapping[str, Any] | None) -> dict[str, Any]:
    if not budget:
        return {}
    if set(budget) - {"count", "fraction"} or len(budget) != 1:
        raise InvalidArgument(f"a budget is either a count or a fraction, got {dict(budget)}")
    return dict(budget)


def collection_params(params: Mapping[str, Any]) -> tuple[ClusteringParams, SamplingParams]:
    """The typed parameters of a collection's stored ``params`` (``{"clustering": {...},
    "sampling": {...}}``), defaults (reidal.core.params) filled in for the keys a collection
    did not store (it predates them, or its clustering is calibrated). InvalidArgument
    names an unknown key."""
    try:
        return (params_from_dict(ClusteringParams, params.get("clustering"), "clustering"),
                params_from_dict(SamplingParams, params.get("sampling"), "sampling"))
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def effective_params(clustering: Mapping[str, Any] | None = None,
                     sampling: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Defaults filled in and every value checked by building the objects that use it.

    Returns ``{"clustering": {...}, "sampling": {...}}``, the form stored with the
    collection. Unknown keys and out-of-range values raise InvalidArgument naming them.
    In clustering mode "calibrated" the stored clustering holds the mode and only the
    values given (the user's overrides, kept by every cycle's calibration); the others are
    chosen per cycle (:func:`clustering_choice`).
    """
    given = {what: {k: v for k, v in (values or {}).items() if v is not None and v != ""}
             for what, values in (("clustering", clustering), ("sampling", sampling))}
    c, s = collection_params(given)
    s = replace(s, default_budget=_budget_dict(s.default_budget) or SAMPLING.default_budget)
    params = {"clustering": params_to_dict(c), "sampling": params_to_dict(s)}
    try:
        check_group(c)
        check_group(s)
        check_params({"sampler": s.sampler}, {"sampler": OneOf(SAMPLERS)})
        samplers.make_sampler(c, s)
        if c.mode == "calibrated":
            calibrator(given)
        budget_value(s.default_budget, 2)
    except ValueError as exc:
        raise InvalidArgument(f"bad collection parameter: {exc}") from None
    if c.mode == "calibrated":
        params["clustering"] = {"mode": "calibrated", **{
            k: v for k, v in given["clustering"].items() if k in CHOICE_NAMES}}
    return params


def calibrator(params: Mapping[str, Any]) -> ClusteringCalibrator:
    """The per-cycle calibration of a collection in mode "calibrated": its stored values
    (the user's overrides) are fixed, everything else is chosen from the data."""
    stored = params.get("clustering", {})
    return ClusteringCalibrator(fixed={name: stored[key] for key, name in
                                       CHOICE_NAMES.items() if key in stored})


def clustering_choice(params: Mapping[str, Any], X: np.ndarray,
                      constraints: ConstraintSet | None) -> tuple[str, ClusteringChoice]:
    """(mode, the clustering parameters a computation over ``X`` uses now).

    Mode "fixed": the collection's values (sources "fixed"). Mode "calibrated": chosen
    from ``X`` and the answers so far (:class:`ClusteringCalibrator`), so every cycle (and
    every identity export) re-calibrates from the answers stored until then. The
    calibration reads the neighbour graph of the collection's sampler (:func:`make_aas`),
    which the sampler built with the choice then finds in the cache: one graph a cycle.
    """
    c = collection_params(params)[0]
    if c.mode == "calibrated":
        return "calibrated", calibrator(params).choose(X, constraints, graph=make_aas(params))
    return "fixed", ClusteringChoice(
        eps=float(c.dbscan_eps), k1=int(c.k1), k2=int(c.k2), min_samples=int(c.min_samples),
        finch_level=int(c.finch_level), eps_source="fixed", finch_source="fixed")


def _typed(params: Mapping[str, Any], choice: ClusteringChoice | None
           ) -> tuple[ClusteringParams, SamplingParams]:
    """The collection's typed parameters, the clustering replaced by ``choice`` if given."""
    c, s = collection_params(params)
    if choice is not None:
        c = replace(c, **{key: getattr(choice, name) for key, name in CHOICE_NAMES.items()})
    return c, s


def make_dbscan(params: Mapping[str, Any],
                choice: ClusteringChoice | None = None) -> DBSCANJaccard:
    """The density clustering of a collection's (stored) parameters, defaults filled in,
    or of ``choice`` (:func:`clustering_choice`) when given."""
    return samplers.density_clustering(_typed(params, choice)[0])


def make_aas(params: Mapping[str, Any],
             choice: ClusteringChoice | None = None) -> AmbiguityAwareSampler:
    """The paper's AAS of a collection's (stored) parameters, whatever sampler it runs (its
    neighbour graph and clusterings are the collection's identities too), clustering with
    ``choice`` when given."""
    return samplers.ambiguity_aware(*_typed(params, choice))


def make_sampler(params: Mapping[str, Any], choice: ClusteringChoice | None = None) -> Sampler:
    """The sampler of a collection (SamplingParams.sampler, the reidal.core.samplers
    registry), clustering with ``choice`` when given."""
    return samplers.make_sampler(*_typed(params, choice))


def sampling_param(params: Mapping[str, Any], name: str) -> Any:
    """One sampling parameter of a collection's (stored) parameters, default filled in."""
    return getattr(collection_params(params)[1], name)


def budget_value(budget: Mapping[str, Any] | None, n: int) -> int:
    """A budget dict (``{"count": k}`` or ``{"fraction": f}``) as a pair count for n images."""
    b = _budget_dict(budget)
    try:
        if "count" in b:
            count = b["count"]
            if isinstance(count, float) and not count.is_integer():
                raise ValueError(f"a budget count must be a whole number, got {count}")
            return resolve_budget(int(count), n)
        if "fraction" in b:
            return resolve_budget(float(b["fraction"]), n)
    except ValueError as exc:
        raise InvalidArgument(f"bad budget: {exc}") from None
    raise InvalidArgument("a budget needs a count or a fraction")


# --------------------------------------------------------------------------- filters


def _parse_instant(text: str, *, end_of_day: bool, what: str) -> datetime:
    """ISO 8601 date or date-time as an aware UTC datetime (naive = UTC)."""
    try:
        if len(text) == 10:  # a date only: the whole day
            d = date.fromisoformat(text)
            moment = datetime.combine(d, time.max if end_of_day else time.min)
        else:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument(f"{what} {text!r} is not an ISO 8601 date or date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class ImageFilter:
    """A subset of a collection's images by metadata (see ImageFilter in collections.proto)."""

    metadata: Mapping[str, str] = field(default_factory=dict)
    date_key: str = ""
    date_from: str = ""
    date_to: str = ""
    image_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.date_from:
            lo = _parse_instant(self.date_from, end_of_day=False, what="filter date_from")
        if self.date_to:
            hi = _parse_instant(self.date_to, end_of_day=True, what="filter date_to")
        if self.date_from and self.date_to and lo > hi:
            raise InvalidArgument(
                f"filter date_from {self.date_from!r} is after date_to {self.date_to!r}")
        if any(not k for k in self.metadata):
            raise InvalidArgument("filter metadata keys must be non-empty")

    @property
    def empty(self) -> bool:
        return not (self.metadata or self.date_from or self.date_to or self.image_ids)

    def to_dict(self) -> dict[str, Any]:
        """The non-empty fields (what a batch stores and echoes)."""
        out: dict[str, Any] = {}
        if self.metadata:
            out["metadata"] = dict(sorted(self.metadata.items()))
        for name in ("date_key", "date_from", "date_to"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.image_ids:
            out["image_ids"] = list(self.image_ids)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageFilter:
        return cls(metadata=dict(data.get("metadata", {})), date_key=data.get("date_key", ""),
                   date_from=data.get("date_from", ""), date_to=data.get("date_to", ""),
                   image_ids=tuple(data.get("image_ids", ())))

    def mask(self, images: Sequence[ImageRecord], *, all_images: bool = True) -> np.ndarray:
        """Bool per image: kept by the filter.

        With ``all_images`` (``images`` is the whole collection) an ``image_ids`` entry that
        is not among them raises NotFound; pass False when masking one page of images.
        """
        keep = np.ones(len(images), dtype=bool)
        if self.image_ids:
            wanted = set(self.image_ids)
            missing = sorted(wanted - {img.image_id for img in images}) if all_images else []
            if missing:
                raise NotFound(f"filter names image(s) not in the collection: {missing[:20]}")
            keep &= np.array([img.image_id in wanted for img in images], dtype=bool)
        for key, value in self.metadata.items():
            keep &= np.array([img.metadata.get(key) == value for img in images], dtype=bool)
        if self.date_from or self.date_to:
            lo = _parse_instant(self.date_from, end_of_day=False, what="date_from") \
                if self.date_from else None
            hi = _parse_instant(self.date_to, end_of_day=True, what="date_to") \
                if self.date_to else None
            key = self.date_key or "date"
            keep &= np.array([_in_range(img.metadata.get(key), lo, hi) for img in images],
                             dtype=bool)
        return keep


def _in_range(text: str | None, lo: datetime | None, hi: datetime | None) -> bool:
    if not text:
        return False
    try:
        moment = _parse_instant(text, end_of_day=False, what="date")
    except InvalidArgument:
        return False
    return (lo is None or moment >= lo) and (hi is None or moment <= hi)


# --------------------------------------------------------------------------- answers


@dataclass
class AnswerConstraints:
    """Current answers over a set of rows, as the core wants them."""

    constraints: ConstraintSet
    unsure_pairs: np.ndarray  # int64 (m, 2) rows answered UNSURE
    used: dict[int, StoredAnswer]  # seq -> answer, every answer whose two images are rows
    ignored: int  # current answers with an image outside the rows

    def contradictions(self) -> list[Contradiction]:
        return list(self.constraints.contradictions)


def rows_of(row_ids: Sequence[str], ids: Sequence[str]) -> np.ndarray:
    """Row index of each id in ``row_ids`` (-1 when absent): one sort and a binary search."""
    if not len(ids) or not len(row_ids):
        return np.full(len(ids), -1, dtype=np.int64)
    table = np.asarray(row_ids, dtype=object)
    order = np.argsort(table, kind="stable")
    sorted_ids = table[order]
    query = np.asarray(ids, dtype=object)
    pos = np.minimum(np.searchsorted(sorted_ids, query), len(table) - 1)
    return np.where(sorted_ids[pos] == query, order[pos], -1).astype(np.int64)


def constraints_from_answers(row_ids: Sequence[str],
                             answers: Iterable[StoredAnswer]) -> AnswerConstraints:
    """SAME / DIFFERENT answers between rows as a ConstraintSet (answer id = seq); UNSURE
    pairs as exclude pairs. ``answers`` must be current ones (``store.answers.all()``)."""
    current = [a for a in answers if a.superseded_by is None and not a.deleted]
    a_rows = rows_of(row_ids, [a.image_a for a in current])
    b_rows = rows_of(row_ids, [a.image_b for a in current])
    inside = (a_rows >= 0) & (b_rows >= 0)
    label = np.array([a.label for a in current], dtype=object)
    seq = np.array([a.seq for a in current], dtype=np.int64)
    used = {current[k].seq: current[k] for k in np.flatnonzero(inside).tolist()}
    unsure = inside & (label == "UNSURE")
    core = inside & ~unsure
    cs = ConstraintSet.from_arrays(len(row_ids), a_rows[core], b_rows[core],
                                   label[core] == "SAME", seq[core])
    pairs = np.sort(np.stack([a_rows[unsure], b_rows[unsure]], axis=1), axis=1)
    return AnswerConstraints(cs, pairs.reshape(-1, 2).astype(np.int64), used,
                             int((~inside).sum()))


# --------------------------------------------------------------------------- state key


def state_key(store: Store, collection_id: str, request: Mapping[str, Any]) -> str:
    """A digest of everything a computation over the collection reads, with ``request``
    (what the caller asked): the collection (and its re-creation), its model version and
    parameters, its images (newest position: an added image raises it), its answers
    (newest seq, and the epoch that deletions of answers or images, exclusions, restores
    and replaced vectors move). Equal keys: the same inputs, so
    the same result (a cached one may be served). A few indexed lookups, no answer read.
    NotFound when the collection does not exist.
    """
    return keyed_collection(store, collection_id, request)[0]


def keyed_collection(store: Store, collection_id: str,
                     request: Mapping[str, Any]) -> tuple[str, Collection]:
    """(:func:`state_key`, the collection record it read): for a caller that also reports
    something the key leaves out on purpose (the cycle number, which every cycle moves
    without changing what a computation reads), without a second lookup."""
    col = store.collections.get(collection_id)
    version = store.answers.log_version(collection_id)
    payload = [col.created_at, col.model_name, col.model_version, col.params,
               store.images.newest(collection_id), version.epoch, version.max_seq, request]
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32], col


# --------------------------------------------------------------------------- a view


@dataclass
class CollectionView:
    """The rows of one computation (sampling cycle or identity export) and their data."""

    collection: Collection
    images: list[ImageRecord]  # the rows, in ingest order
    X: np.ndarray  # float32 (n, d), row k = images[k]
    answers: AnswerConstraints

    @property
    def image_ids(self) -> list[str]:
        return [img.image_id for img in self.images]

    @property
    def n(self) -> int:
        return len(self.images)


class RowsCache:
    """The rows of a collection's last few image states, per store: its images that are
    not excluded (ingest order) and their vectors of the collection's model version.

    Reading them costs a Python step per image (~10-15 ms at n = 2,000, most of a
    sampling cycle's or an identity computation's own time once the neighbour graph is
    cached), and every answer starts one or the other; the rows change far less often.
    They depend on the collection (its re-creation), its model version, its images
    (newest position: an added image raises it) and the answers epoch, which every
    exclusion, restore, image deletion and replaced vector moves
    (``store.images.add_vectors``): that is the key, read with two index lookups.
    Vectors are otherwise only ever added for images that lack one of the version
    (ingest, EmbedCollection), and only rows that all have their vector are kept, so a
    kept entry is never stale. The vectors are read-only (shared by every
    view of the state); bounded to ``maxsize`` entries and thread-safe.
    """

    def __init__(self, maxsize: int = 2) -> None:
        self.maxsize = int(maxsize)
        self._entries: OrderedDict[tuple[Any, ...], tuple[list[ImageRecord], np.ndarray]]
        self._entries = OrderedDict()
        self._lock = threading.Lock()

    def rows(self, store: Store, col: Collection
             ) -> tuple[list[ImageRecord], np.ndarray, np.ndarray]:
        """(images, vectors, bool per image: it has no vector of the model version) of
        ``col``'s rows; a missing vector's row of ``vectors`` is zeros."""
        cid = col.id
        key = (store.owner, cid, col.created_at, col.model_name, col.model_version,
               store.images.newest(cid), store.answers.log_version(cid).epoch)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
        if hit is not None:
            return list(hit[0]), hit[1], np.zeros(len(hit[0]), dtype=bool)
        images, X, missing = _read_rows(store, col)
        if missing.any():
            return images, X, missing
        X.flags.writeable = False
        with self._lock:
            self._entries[key] = (images, X)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return list(images), X, missing


def _read_rows(store: Store, col: Collection
               ) -> tuple[list[ImageRecord], np.ndarray, np.ndarray]:
    images = store.images.all(col.id, include_excluded=False)
    if not col.model_version:
        return images, np.empty((len(images), 0), dtype=np.float32), \
            np.ones(len(images), dtype=bool)
    vec_ids, mat = store.images.vectors(col.id, col.model_name, col.model_version)
    rows = rows_of(vec_ids, [img.image_id for img in images])
    missing = rows < 0
    X = np.zeros((len(images), mat.shape[1] if mat.size else 0), dtype=np.float32)
    X[~missing] = mat[rows[~missing]]
    return images, X, missing


#: The rows of this process's views (sampling cycles and identities share them).
_ROWS = RowsCache()


def load_view(store: Store, collection_id: str,
              image_filter: ImageFilter | None = None) -> CollectionView:
    """Rows = images not excluded (and kept by the filter), with vectors and constraints.

    FailedPrecondition when a row has no vector of the collection's model version: vectors
    of two versions are never mixed, and sampling part of the images silently would hide
    the rest from the annotator. The rows of an unchanged image state come from
    :class:`RowsCache`; the answers are read every time. ``X`` is read-only.
    """
    col = store.collections.get(collection_id)
    images, X, missing = _ROWS.rows(store, col)
    if image_filter is not None and not image_filter.empty:
        keep = image_filter.mask(images)
        images = [img for img, k in zip(images, keep.tolist(), strict=True) if k]
        X, missing = X[keep], missing[keep]
    ids = [img.image_id for img in images]
    if not col.model_version and ids:
        raise FailedPrecondition(
            f"collection {collection_id!r} has no embedded image yet: add images with "
            "embedding, or run EmbedCollection")
    if missing.any():
        lacking = [ids[k] for k in np.flatnonzero(missing).tolist()]
        raise FailedPrecondition(
            f"{len(lacking)} of {len(ids)} image(s) of collection {collection_id!r} have no "
            f"vector of model {col.model_name} version {col.model_version} yet (e.g. "
            f"{lacking[:5]}): run EmbedCollection, or wait for the one running")
    if not col.model_version:
        X = np.empty((0, 0), dtype=np.float32)
    answers = constraints_from_answers(ids, store.answers.all(collection_id))
    return CollectionView(col, images, X, answers)


def pair_rows_of(row_ids: Sequence[str], pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """(m, 2) row pairs of id pairs whose both ids are rows (others dropped)."""
    if not pairs:
        return np.empty((0, 2), dtype=np.int64)
    a = rows_of(row_ids, [p[0] for p in pairs])
    b = rows_of(row_ids, [p[1] for p in pairs])
    keep = (a >= 0) & (b >= 0) & (a != b)
    out = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)[keep]
    return out.astype(np.int64)
