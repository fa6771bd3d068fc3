"""Pairwise answers as a constraint set: must-link groups, cannot-links, implied answers.

An annotator's "same individual" answer is a must-link (ML), "different" a cannot-link (CL);
"unsure" answers never reach this module. ML is transitive, so items fall into ML groups
(connected components of the ML graph), and a CL between two items separates their whole
groups. That closure is what lets the sampler skip pairs whose answer is already implied and
what NP3 refines clusterings against.

Contradictions and the rule that settles them
---------------------------------------------
People make mistakes: a chain of "same" answers can join the two ends of a "different"
answer. Such a set cannot all hold, and method.md forbids both a crash and a silent drop.
The rule is **the newer answer wins**:

* answers are applied newest first (descending ``answer_id``);
* an answer that contradicts the newer answers already applied - a CL whose ends are in one
  ML group, or an ML joining two groups that a CL separates - is *not applied*;
* it is reported as a :class:`Contradiction` naming the minimal set of answers involved: the
  CL plus the ML answers on the path joining the CL's ends in the ML spanning forest (after
  adding the offending ML, when the offender is an ML). Removing any one of them breaks the
  contradiction, so that is what a person should be shown to resolve it;
* the dropped answer stays in :attr:`ConstraintSet.answers`: nothing is forgotten.

Processing newest first makes the applied set a pure function of the answers given, so
:meth:`ConstraintSet.add` of an answer newer than all before can apply it incrementally,
while an answer that contradicts older applied ones (or one older than the newest) triggers
a rebuild, which drops the older answers it overrules; so does
:meth:`ConstraintSet.remove` of an applied answer (a union-find cannot split a group) and a
relabel (:meth:`ConstraintSet.replace`). That rebuild is local: only the connected
components of the ML answers that hold the answer's items, with the CLs touching them,
are computed again (:meth:`ConstraintSet._rebuild_around` says why that is exact).
A full rebuild (construction, :meth:`ConstraintSet.rebuild`) is vectorised: the answers are kept as arrays, ML groups are connected
components (scipy), and only the answers of a part of the answer graph that holds a
contradiction are applied one by one. Answers repeating a
pair are all kept and all treated as constraints; superseding an answer is the service
layer's job (it passes only current answers here).

With :meth:`ConstraintSet.from_pairs` the ids are assigned ML first, then CL, so a CL
overrules the ML chain it contradicts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from reidal.core.validation import check_pairs


@dataclass(frozen=True)
class Answer:
    """One pairwise answer; ``answer_id`` orders answers in time (larger = newer)."""

    i: int
    j: int
    same: bool
    answer_id: int


@dataclass(frozen=True)
class Contradiction:
    """A minimal set of answers that cannot all hold, and the one not applied."""

    answer_ids: tuple[int, ...]
    dropped_answer_id: int


class _UnionFind:
    """Union-find over items with path compression and union by size."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)
        self.size = np.ones(n, dtype=np.int64)

    def grow(self, n: int) -> None:
        """Add singleton items up to ``n``."""
        old = len(self.parent)
        if n > old:
            self.parent = np.concatenate([self.parent, np.arange(old, n, dtype=np.int64)])
            self.size = np.concatenate([self.size, np.ones(n - old, dtype=np.int64)])

    def set_components(self, comp: np.ndarray, keep: np.ndarray) -> None:
        """Start from the partition ``comp`` (component label per item) restricted to the
        items where ``keep`` holds (the others stay singletons), in one vectorised step:
        each component's smallest item is its root."""
        n = len(self.parent)
        items = np.arange(n, dtype=np.int64)
        first = np.full(int(comp.max()) + 1 if n else 0, n, dtype=np.int64)
        np.minimum.at(first, comp[keep], items[keep])
        self.parent = np.where(keep, first[comp], items)
        self.size = np.ones(n, dtype=np.int64)
        counts = np.bincount(self.parent, minlength=n)
        roots = self.parent == items
        self.size[roots] = counts[roots]

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while (p := int(parent[root])) != root:
            root = p
        while (p := int(parent[x])) != root:  # path compression
            parent[x] = root
            x = p
        return root

    def union_roots(self, ra: int, rb: int) -> tuple[int, int]:
        """Join two distinct roots; return (new root, absorbed root)."""
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return ra, rb

    def roots(self) -> np.ndarray:
        """Root of every item, by vectorised pointer jumping (also compresses fully)."""
        parent = self.parent
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent.copy()
            parent[:] = grand


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` items under the edges (a, b)."""
    if not len(a):
        return np.arange(n, dtype=np.int64)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n)).tocsr()
    return connected_components(graph, directed=False)[1].astype(np.int64)


class _CLAdjacency:
    """CLs between ML groups: root -> {other root: id of one CL joining them (the newest)}.

    Built from arrays in numpy (one sort of int64 keys); a root's dict is made the first
    time that root is looked up, so a set loaded with a million CLs answers its first
    probe at once instead of building a million dict entries. Mutated like a dict of
    dicts by the union-find's merges.
    """

    def __init__(self, ra: np.ndarray, rb: np.ndarray, ids: np.ndarray, n: int) -> None:
        a = np.concatenate([ra, rb]).astype(np.int64)
        b = np.concatenate([rb, ra]).astype(np.int64)
        k = np.concatenate([ids, ids]).astype(np.int64)
        key = a * (np.int64(n) + 1) + b
        order = np.argsort(key)  # equal keys keep the largest id below: no stable sort
        key, k = key[order], k[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else order
        self._keys = key[starts]
        self._ids = np.maximum.reduceat(k, starts) if len(key) else k
        self._a = self._keys // (np.int64(n) + 1)
        self._b = self._keys % (np.int64(n) + 1)
        self._d: dict[int, dict[int, int]] = {}
        self._seen: set[int] = set()

    @classmethod
    def empty(cls) -> _CLAdjacency:
        z = np.empty(0, dtype=np.int64)
        return cls(z, z, z, 0)

    def _load(self, r: int) -> None:
        if r in self._seen:
            return
        self._seen.add(r)
        lo, hi = np.searchsorted(self._a, [r, r + 1]).tolist()
        if hi > lo:
            self._d[r] = dict(zip(self._b[lo:hi].tolist(), self._ids[lo:hi].tolist(),
                                  strict=True))

    def get(self, r: int, default: dict[int, int] | None = None) -> dict[int, int] | None:
        self._load(r)
        return self._d.get(r, default)

    def setdefault(self, r: int, default: dict[int, int]) -> dict[int, int]:
        self._load(r)
        return self._d.setdefault(r, default)

    def pop(self, r: int, default: dict[int, int] | None = None) -> dict[int, int] | None:
        self._load(r)
        return self._d.pop(r, default)

    def __getitem__(self, r: int) -> dict[int, int]:
        self._load(r)
        return self._d[r]

    def discard_roots(self, roots: Iterable[int]) -> None:
        """Forget every CL entry of ``roots``, both directions (before their groups are
        computed again, :meth:`ConstraintSet._rebuild_around`)."""
        gone = set(roots)
        for r in gone:
            for other in self.pop(r) or ():
                if other not in gone:
                    self[other].pop(r, None)


class _AnswerTable:
    """The answers of a set as parallel arrays (id, i, j, same), appendable, with removal.

    Arrays rather than one object per answer, so a set of a million answers is built, and
    its ML / CL pairs listed, in vectorised steps. While the ids are stored in increasing
    order (always, when answers arrive in time order) an id is found by binary search;
    otherwise an id -> position map is built the first time one is looked up.
    """

    def __init__(self, ids: np.ndarray, i: np.ndarray, j: np.ndarray, same: np.ndarray) -> None:
        order = np.argsort(ids, kind="stable")
        self._ids, self._i, self._j, self._same = ids[order], i[order], j[order], same[order]
        self._live = np.ones(len(ids), dtype=bool)
        self._m = len(ids)
        self._sorted = True
        self._pos: dict[int, int] | None = None
        self._index: tuple[int, np.ndarray, np.ndarray] | None = None  # see touching()
        self.n_live = len(ids)

    @classmethod
    def empty(cls) -> _AnswerTable:
        z = np.empty(0, dtype=np.int64)
        return cls(z, z.copy(), z.copy(), np.empty(0, dtype=bool))

    def _find(self, answer_id: int) -> int:
        """Position of a present answer, -1 when absent."""
        if self._sorted:
            k = int(np.searchsorted(self._ids[:self._m], answer_id))
            ok = k < self._m and self._ids[k] == answer_id and self._live[k]
            return k if ok else -1
        if self._pos is None:
            live = np.flatnonzero(self._live[:self._m])
            self._pos = dict(zip(self._ids[live].tolist(), live.tolist(), strict=True))
        return self._pos.get(answer_id, -1)

    def __contains__(self, answer_id: int) -> bool:
        return self._find(answer_id) >= 0

    def get(self, answer_id: int) -> Answer:
        k = self._find(answer_id)
        if k < 0:
            raise KeyError(f"no answer with id {answer_id}")
        return Answer(int(self._i[k]), int(self._j[k]), bool(self._same[k]), answer_id)

    def append(self, a: Answer) -> None:
        """Add an answer whose id is not present (the caller checked)."""
        if self._m == len(self._ids):  # capacity doubling: amortised O(1) per answer
            cap = max(16, 2 * self._m)
            self._ids, self._i, self._j, self._same, self._live = (
                np.resize(arr, cap) for arr in (self._ids, self._i, self._j, self._same,
                                                self._live))
        k = self._m
        if self._sorted and k and a.answer_id < self._ids[k - 1]:
            self._sorted = False
            self._pos = None
        self._ids[k], self._i[k], self._j[k], self._same[k] = a.answer_id, a.i, a.j, a.same
        self._live[k] = True
        self._m += 1
        if self._pos is not None:
            self._pos[a.answer_id] = k
        self.n_live += 1

    def remove(self, answer_id: int) -> Answer:
        a = self.get(answer_id)
        self._live[self._find(answer_id)] = False
        if self._pos is not None:
            del self._pos[answer_id]
        self.n_live -= 1
        return a

    def max_id(self) -> int | None:
        """The largest id present (None: none is)."""
        live = self._live[:self._m]
        return int(self._ids[:self._m][live].max()) if live.any() else None

    def at(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids, i, j, same) of the answers at positions ``pos``."""
        return self._ids[pos], self._i[pos], self._j[pos], self._same[pos]

    def touching(self, items: np.ndarray) -> np.ndarray:
        """Sorted positions of the present answers with an end in ``items`` (sorted,
        unique): a CSR index over item -> positions, built in numpy on first use and again
        once more than ``max(4096, m / 16)`` answers came after it; those newer ones are
        scanned (vectorised). So a lookup costs about the answers it returns."""
        m = self._m
        if self._index is None or m - self._index[0] > max(4096, m // 16):
            ends = np.concatenate([self._i[:m], self._j[:m]])
            order = np.argsort(ends, kind="stable")
            ptr = np.searchsorted(ends[order], np.arange(int(ends.max(initial=-1)) + 2))
            self._index = (m, ptr, order % max(m, 1))
        covered, ptr, pos = self._index
        inside = items[items < len(ptr) - 1]
        starts, stops = ptr[inside], ptr[inside + 1]
        lens = stops - starts
        total = int(lens.sum())
        gather = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(total)
        tail = np.arange(covered, m)
        tail = tail[np.isin(self._i[covered:m], items) | np.isin(self._j[covered:m], items)]
        found = np.union1d(pos[gather], tail)
        return found[self._live[found]]

    def live(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids, i, j, same) of the answers present, in id order."""
        live = np.flatnonzero(self._live[:self._m])
        if not self._sorted:
            live = live[np.argsort(self._ids[live], kind="stable")]
        return self._ids[live], self._i[live], self._j[live], self._same[live]


def _as_answer(answer: Answer, n_items: int, check_range: bool = True) -> Answer:
    if not isinstance(answer, Answer):
        raise ValueError(f"expected an Answer, got {type(answer).__name__}")
    try:
        i, j, aid = int(answer.i), int(answer.j), int(answer.answer_id)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"answer {answer!r} must hold integer indices and id") from exc
    if not isinstance(answer.same, (bool, np.bool_)):
        raise ValueError(f"answer {answer!r}: `same` must be a bool")
    if check_range:
        check_pairs(np.array([[i, j]], dtype=np.int64), n_items, name=f"answer {aid}")
    return Answer(i, j, bool(answer.same), aid)


class ConstraintSet:
    """ML / CL answers on ``n_items`` items with their transitive closure.

    See the module docstring for how contradictory answers are settled.
    """

    def __init__(self, n_items: int) -> None:
        if isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer)):
            raise ValueError(f"n_items must be an int, got {type(n_items).__name__}")
        if n_items < 0:
            raise ValueError(f"n_items must be >= 0, got {n_items}")
        self.n_items = int(n_items)
        self._table = _AnswerTable.empty()
        #: How many times the set was computed from all its answers (a rebuild); an
        #: incremental :meth:`add` leaves it unchanged.
        self.rebuilds = 0
        #: How many times a part of it was (:meth:`_rebuild_around`: a contradicting,
        #: removed or relabelled answer).
        self.local_rebuilds = 0
        self._reset()

    def _reset(self) -> None:
        self._dropped: set[int] = set()
        # roots of the groups that hold an end of a dropped answer: an answer touching one
        # may change which answers a rebuild names for that contradiction, so it is not
        # applied incrementally (a superset is safe: it only costs a local rebuild)
        self._dirty_roots: set[int] = set()
        self._uf = _UnionFind(self.n_items)
        # ML spanning forest: item -> [(neighbour, answer id)]; only MLs that joined groups.
        # Each tree is also kept rooted (parent, edge to parent, depth; absent = a root) so
        # the path joining two items is found by climbing, in O(path length). Only a
        # rebuild that meets a contradiction reads it (to name the answers involved).
        self._forest: dict[int, list[tuple[int, int]]] = {}
        self._up: dict[int, tuple[int, int]] = {}
        self._depth: dict[int, int] = {}
        # CL between groups: root -> {other root: id of one CL answer joining them}; None
        # until first needed (derived from the applied CLs then).
        self._cl_adj_d: _CLAdjacency | None = _CLAdjacency.empty()
        self._max_id: int | None = None
        self.contradictions: list[Contradiction] = []
        self._cache: dict[str, np.ndarray] = {}

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_answers(cls, n_items: int, answers: Iterable[Answer]) -> ConstraintSet:
        """Build from answers in any order; the result depends only on the ids."""
        checked = [_as_answer(a, n_items, check_range=False) for a in answers]
        return cls.from_arrays(
            n_items, np.array([a.i for a in checked], dtype=np.int64),
            np.array([a.j for a in checked], dtype=np.int64),
            np.array([a.same for a in checked], dtype=bool),
            np.array([a.answer_id for a in checked], dtype=np.int64))

    @classmethod
    def from_arrays(cls, n_items: int, i: object, j: object, same: object,
                    answer_ids: object) -> ConstraintSet:
        """Build from parallel arrays (answer k: items ``i[k]``, ``j[k]``, ML when
        ``same[k]``, id ``answer_ids[k]``) in vectorised steps: only answers in a part of
        the answer graph that holds a contradiction are applied one by one."""
        cs = cls(n_items)
        pairs = check_pairs(np.stack([np.asarray(i, dtype=np.int64).ravel(),
                                      np.asarray(j, dtype=np.int64).ravel()], axis=1)
                            if np.size(i) else np.empty((0, 2), dtype=np.int64),
                            cs.n_items, name="answers")
        ids = np.asarray(answer_ids, dtype=np.int64).ravel()
        same_arr = np.asarray(same).ravel()
        if same_arr.dtype != bool:
            raise ValueError("`same` must be booleans")
        if not (len(ids) == len(same_arr) == len(pairs)):
            raise ValueError(f"i, j, same and answer_ids differ in length "
                             f"({len(pairs)}, {len(same_arr)}, {len(ids)})")
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"duplicate answer_id {int(uniq[counts > 1][0])}")
        cs._table = _AnswerTable(ids.copy(), pairs[:, 0].copy(), pairs[:, 1].copy(),
                                 same_arr.astype(bool))
        cs._build()
        return cs

    @classmethod
    def from_pairs(cls, n_items: int, ml: object = (), cl: object = ()) -> ConstraintSet:
        """Build from (m, 2) ML and (c, 2) CL index arrays; ids run 0.. over ML, then CL."""
        ml_arr = check_pairs(ml, n_items, name="ml")
        cl_arr = check_pairs(cl, n_items, name="cl")
        both = np.concatenate([ml_arr, cl_arr]).reshape(-1, 2)
        same = np.arange(len(both)) < len(ml_arr)
        return cls.from_arrays(n_items, both[:, 0], both[:, 1], same,
                               np.arange(len(both), dtype=np.int64))

    def _build(self) -> None:
        """Apply every answer under the newest-first rule.

        Answers in different connected components of the answer graph (ML and CL edges)
        never interact, so components without a CL inside one ML group (no contradiction
        possible: every answer applies) are set in one vectorised step, and only the
        answers of the other components are applied one by one, newest first.
        """
        self._reset()
        self.rebuilds += 1
        ids, i, j, same = self._table.live()
        if not len(ids):
            return
        self._max_id = int(ids[-1])
        n = self.n_items
        ml_comp = _components(n, i[same], j[same])
        cl = ~same
        inside = ml_comp[i[cl]] == ml_comp[j[cl]]
        if not inside.any():
            self._uf.set_components(ml_comp, np.ones(n, dtype=bool))
            self._cl_adj_d = None
            return
        comp = _components(n, i, j)
        dirty_comp = np.zeros(n, dtype=bool)
        dirty_comp[comp[i[cl][inside]]] = True
        dirty_item = dirty_comp[comp]
        dirty = dirty_item[i]
        self._uf.set_components(ml_comp, ~dirty_item)
        clean_cl = cl & ~dirty
        self._cl_adj_d = self._cl_adjacency(i[clean_cl], j[clean_cl], ids[clean_cl])
        ends: list[int] = []
        for k in np.flatnonzero(dirty)[::-1].tolist():  # one step per answer, newest first
            found = self._apply(Answer(int(i[k]), int(j[k]), bool(same[k]), int(ids[k])))
            if found is not None:
                self.contradictions.append(found)
                self._dropped.add(found.dropped_answer_id)
                ends += (int(i[k]), int(j[k]))
        self._dirty_roots = set(self._roots_of(np.array(ends, dtype=np.int64)).tolist())

    def _rebuild_around(self, items: Iterable[int]) -> None:
        """Recompute the part of the set that the answers on ``items`` can affect, as
        :meth:`_build` would, without the rest.

        Why that part suffices: ML groups only ever join items linked by ML answers, so
        every group lies inside one connected component K of the graph of all present ML
        answers (applied or dropped). An answer is dropped only for a CL whose ends are in
        one group, or an ML joining two groups that a CL separates: in both cases the CL
        has both ends in the ML's K. So what is applied inside K, and each contradiction
        found there, depends only on the answers with both ends in K (replayed newest
        first, as :meth:`_build` replays them), and a CL between two components is always
        applied. The components holding ``items`` are found from an item index of the
        answers (:meth:`_AnswerTable.touching`), rebuilt as a set of their own (vectorised
        like any build), and spliced in: their union-find entries, their contradictions,
        and the CL entries of their groups, those to other groups included. The cost is
        that of the answers touching those components, not of the whole set (all of it
        when one component holds everything).
        """
        k_items = self._ml_component(np.unique(np.fromiter(items, dtype=np.int64)))
        adj = self._cl_adj  # built from the applied CLs when a build left it for later
        old_roots = np.unique(self._roots_of(k_items)).tolist()
        adj.discard_roots(old_roots)
        self._dirty_roots.difference_update(old_roots)
        ids, i, j, same = self._table.at(self._table.touching(k_items))
        inside = np.isin(i, k_items) & np.isin(j, k_items)
        sub = ConstraintSet.from_arrays(len(k_items), np.searchsorted(k_items, i[inside]),
                                        np.searchsorted(k_items, j[inside]), same[inside],
                                        ids[inside])
        roots = sub._uf.roots()
        self._uf.parent[k_items] = k_items[roots]
        self._dirty_roots.update(k_items[sorted(sub._dirty_roots)].tolist())
        self._uf.size[k_items] = np.bincount(roots, minlength=len(k_items))
        # the CLs of the new groups: applied ones inside, and every one leaving K
        s_ids, s_i, s_j, s_same = sub._applied_arrays()
        cl_ids = np.concatenate([s_ids[~s_same], ids[~inside]])
        ra = self._roots_of(np.concatenate([k_items[s_i[~s_same]], i[~inside]]))
        rb = self._roots_of(np.concatenate([k_items[s_j[~s_same]], j[~inside]]))
        for a, b, k in zip(ra.tolist(), rb.tolist(), cl_ids.tolist(), strict=True):
            adj.setdefault(a, {}).setdefault(b, k)
            adj.setdefault(b, {}).setdefault(a, k)
        dropped = np.fromiter(self._dropped, dtype=np.int64, count=len(self._dropped))
        stale = set(dropped[np.isin(dropped, ids[inside])].tolist())
        self._dropped = (self._dropped - stale) | sub._dropped
        self.contradictions = sorted(
            [c for c in self.contradictions if c.dropped_answer_id not in stale]
            + sub.contradictions, key=lambda c: -c.dropped_answer_id)
        self._cache.clear()
        self.local_rebuilds += 1

    def _ml_component(self, seeds: np.ndarray) -> np.ndarray:
        """Sorted items of the components of the present ML answers that hold ``seeds``
        (breadth first, one vectorised step per level)."""
        seen = frontier = seeds[seeds < self.n_items]
        while len(frontier):
            _, i, j, same = self._table.at(self._table.touching(frontier))
            ends = np.unique(np.concatenate([i[same], j[same]]))
            frontier = ends[~np.isin(ends, seen)]
            seen = np.union1d(seen, frontier)
        return seen

    def _roots_of(self, items: np.ndarray) -> np.ndarray:
        """Union-find root of each of ``items`` (vectorised pointer jumping, no writes)."""
        parent = self._uf.parent
        r = parent[items]
        while True:
            up = parent[r]
            if np.array_equal(up, r):
                return r
            r = up

    def _cl_adjacency(self, ci: np.ndarray, cj: np.ndarray, cids: np.ndarray) -> _CLAdjacency:
        """root -> {other root: a CL id (the newest)} for the CLs (ci, cj) under the current
        groups (see :class:`_CLAdjacency`)."""
        roots = self._uf.roots()
        return _CLAdjacency(roots[ci], roots[cj], cids, self.n_items)

    @property
    def _cl_adj(self) -> _CLAdjacency:
        if self._cl_adj_d is None:
            ids, i, j, same = self._applied_arrays()
            cl = ~same
            self._cl_adj_d = self._cl_adjacency(i[cl], j[cl], ids[cl])
        return self._cl_adj_d

    def add(self, answer: Answer) -> Contradiction | None:
        """Add one answer; return the contradiction it causes, if any.

        An answer newer than all before that contradicts nothing applied, and touches no
        group holding an end of a dropped answer, is applied incrementally; any other
        answer makes its part of the set rebuild (:meth:`_rebuild_around`). If the rebuild drops
        several older answers, the first one found is returned; all of them are in
        :attr:`contradictions`.
        """
        answer = _as_answer(answer, self.n_items)
        newest = self._max_id is None or answer.answer_id > self._max_id
        if not newest and answer.answer_id in self._table:
            raise ValueError(f"duplicate answer_id {answer.answer_id}")
        self._table.append(answer)
        if newest:
            self._max_id = answer.answer_id
            clean = not self._dirty_roots.intersection(
                (self._uf.find(answer.i), self._uf.find(answer.j)))
            if clean and self._apply(answer, probe=True) is None:
                return None
        # The answer overrules older applied ones, or is itself older than the newest:
        # recompute its part of the set under the newest-first rule.
        return self._settle((answer.i, answer.j), answer.answer_id)

    def _settle(self, items: Iterable[int], answer_id: int) -> Contradiction | None:
        """Rebuild around ``items`` after answer ``answer_id`` came in; the contradiction
        it takes part in that the rebuild found new (its own first), if any."""
        before = {c.dropped_answer_id for c in self.contradictions}
        self._rebuild_around(items)
        new = [c for c in self.contradictions if c.dropped_answer_id not in before]
        own = [c for c in new if c.dropped_answer_id == answer_id]
        return (own or new or [None])[0]

    def remove(self, answer_id: int) -> None:
        """Take an answer out (it was superseded or deleted). Removing an answer that is
        not applied changes nothing else; removing an applied one rebuilds its part of
        the set (:meth:`_rebuild_around`)."""
        gone = self._take_out(int(answer_id))
        if gone is not None:
            self._rebuild_around((gone.i, gone.j))

    def _take_out(self, answer_id: int) -> Answer | None:
        """Remove an answer from the table; returns it when it was applied (the groups
        around it must be computed again), None when it was not (nothing else changes:
        a dropped answer is named only by its own contradiction)."""
        if answer_id not in self._table:
            raise KeyError(f"no answer with id {answer_id}")
        gone = self._table.remove(answer_id)
        self._cache.clear()
        if answer_id == self._max_id:
            self._max_id = self._table.max_id()
        if answer_id not in self._dropped:
            return gone
        self._dropped.discard(answer_id)
        self.contradictions = [c for c in self.contradictions if c.dropped_answer_id != answer_id]
        return None

    def __contains__(self, answer_id: object) -> bool:
        """Whether an answer with this id is in the set (applied or not)."""
        return isinstance(answer_id, (int, np.integer)) and int(answer_id) in self._table

    def answer(self, answer_id: int) -> Answer:
        """The answer with this id (KeyError when absent)."""
        return self._table.get(int(answer_id))

    def replace(self, old_id: int, answer: Answer) -> Contradiction | None:
        """Supersede answer ``old_id`` by ``answer`` (a newer answer on the same pair).

        When both say the same of the same pair, the old one is applied and its group
        holds no end of a dropped answer (so no contradiction names an answer of that
        group, and none would after a rebuild, which would apply the new answer first),
        the groups do not change: the new answer takes its place without a rebuild.
        Anything else (a relabel) rebuilds the part of the set around the pair
        (:meth:`_rebuild_around`).
        """
        answer = _as_answer(answer, self.n_items)
        old_id = int(old_id)
        old = self._table.get(old_id)
        if ({old.i, old.j} == {answer.i, answer.j} and old.same == answer.same
                and self._max_id is not None and answer.answer_id > self._max_id
                and old_id not in self._dropped
                and not self._dirty_roots.intersection((self._uf.find(old.i),
                                                        self._uf.find(old.j)))):
            self._table.remove(old_id)
            self._table.append(answer)
            self._max_id = answer.answer_id
            self._cache.clear()
            return None
        if answer.answer_id in self._table:
            raise ValueError(f"duplicate answer_id {answer.answer_id}")
        self._take_out(old_id)
        self._table.append(answer)
        self._max_id = max(answer.answer_id, self._max_id if self._max_id is not None else -1)
        return self._settle((old.i, old.j, answer.i, answer.j), answer.answer_id)

    def warm(self) -> None:
        """Build now what the first incremental :meth:`add` would build (the CL adjacency
        of the groups), so a caller that loads once and then adds pays it at load."""
        _ = self._cl_adj

    def rebuild(self) -> None:
        """Recompute from all answers (what :meth:`from_answers` would give)."""
        self._build()

    def grow(self, n_items: int) -> None:
        """Add unconstrained items up to ``n_items`` (answers may then name them)."""
        if n_items > self.n_items:
            self._uf.grow(int(n_items))
            self.n_items = int(n_items)
            self._cache.clear()

    def group_of(self, item: int) -> int:
        """The root item of ``item``'s ML group (changes as groups merge)."""
        return self._uf.find(int(item))

    # ----------------------------------------------------------------- core update
    def _apply(self, a: Answer, probe: bool = False) -> Contradiction | None:
        """Apply ``a`` unless it contradicts what is applied; return the contradiction.

        With ``probe`` a contradicting answer is left unrecorded (the caller rebuilds).
        """
        uf = self._uf
        ri, rj = uf.find(a.i), uf.find(a.j)
        if a.same:
            if ri != rj:
                cl_id = self._cl_adj.get(ri, {}).get(rj)
                if cl_id is not None:
                    if probe:
                        return Contradiction((), a.answer_id)
                    cl = self._table.get(cl_id)
                    c, d = (cl.i, cl.j) if uf.find(cl.i) == ri else (cl.j, cl.i)
                    ids = (cl_id, a.answer_id, *self._forest_path(c, a.i),
                           *self._forest_path(a.j, d))
                    return Contradiction(tuple(sorted(ids)), a.answer_id)
                self._union(ri, rj)
                if not probe:  # only the rebuild that builds it reads the forest
                    self._link(a.i, a.j, a.answer_id, small_side_i=self._uf.find(a.i) != ri)
        else:
            if ri == rj:
                if probe:
                    return Contradiction((), a.answer_id)
                ids = (a.answer_id, *self._forest_path(a.i, a.j))
                return Contradiction(tuple(sorted(ids)), a.answer_id)
            adj = self._cl_adj
            adj.setdefault(ri, {}).setdefault(rj, a.answer_id)
            adj.setdefault(rj, {}).setdefault(ri, a.answer_id)
        self._cache.clear()
        return None

    def _union(self, ri: int, rj: int) -> None:
        root, gone = self._uf.union_roots(ri, rj)
        if gone in self._dirty_roots:
            self._dirty_roots.discard(gone)
            self._dirty_roots.add(root)
        moved = self._cl_adj.pop(gone, None)
        if not moved:
            return
        mine = self._cl_adj.setdefault(root, {})
        for other, cl_id in moved.items():
            theirs = self._cl_adj[other]
            del theirs[gone]
            theirs.setdefault(root, cl_id)
            mine.setdefault(other, cl_id)

    def _link(self, i: int, j: int, answer_id: int, small_side_i: bool) -> None:
        """Add forest edge i-j; the smaller tree is re-rooted below the larger one."""
        x, y = (i, j) if small_side_i else (j, i)
        self._up[x] = (y, answer_id)
        self._depth[x] = self._depth.get(y, 0) + 1
        queue = deque([x])  # re-root the small tree at x: its parents point towards x
        while queue:
            u = queue.popleft()
            parent = self._up[u][0]
            for w, aid in self._forest.get(u, ()):
                if w != parent:
                    self._up[w] = (u, aid)
                    self._depth[w] = self._depth[u] + 1
                    queue.append(w)
        self._forest.setdefault(i, []).append((j, answer_id))
        self._forest.setdefault(j, []).append((i, answer_id))

    def _forest_path(self, u: int, v: int) -> list[int]:
        """Answer ids of the forest edges on the (unique) path joining u and v."""
        depth, up = self._depth, self._up
        ids = []
        du, dv = depth.get(u, 0), depth.get(v, 0)
        while du > dv:
            u, aid = up[u]
            ids.append(aid)
            du -= 1
        while dv > du:
            v, aid = up[v]
            ids.append(aid)
            dv -= 1
        while u != v:
            u, aid = up[u]
            ids.append(aid)
            v, aid = up[v]
            ids.append(aid)
        return ids

    # ----------------------------------------------------------------- queries
    def __len__(self) -> int:
        return self._table.n_live - len(self._dropped)

    @property
    def answers(self) -> tuple[Answer, ...]:
        """Every answer given, applied or not, ordered by ``answer_id``."""
        ids, i, j, same = self._table.live()
        return tuple(Answer(a, b, s, k) for k, a, b, s in zip(
            ids.tolist(), i.tolist(), j.tolist(), same.tolist(), strict=True))

    def answer_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids, i, j, same) of every answer given, applied or not, by id: what
        :meth:`from_arrays` takes to build this set again."""
        return self._table.live()

    def _applied_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids, i, j, same) of the applied answers, by id."""
        ids, i, j, same = self._table.live()
        if self._dropped:
            keep = ~np.isin(ids, np.fromiter(self._dropped, dtype=np.int64))
            ids, i, j, same = ids[keep], i[keep], j[keep], same[keep]
        return ids, i, j, same

    def _applied_pairs(self, same: bool) -> np.ndarray:
        key = "ml" if same else "cl"
        if key not in self._cache:
            _, i, j, s = self._applied_arrays()
            mask = s == same
            arr = np.stack([i[mask], j[mask]], axis=1).reshape(-1, 2)
            arr.setflags(write=False)
            self._cache[key] = arr
        return self._cache[key]

    def ml_pairs(self) -> np.ndarray:
        """(m, 2) applied must-link pairs, by answer id."""
        return self._applied_pairs(True)

    def cl_pairs(self) -> np.ndarray:
        """(c, 2) applied cannot-link pairs, by answer id."""
        return self._applied_pairs(False)

    def ml_groups(self) -> np.ndarray:
        """(n,) compact ML-group id per item; unconstrained items are singleton groups.

        Ids are canonical: groups are numbered by their smallest item, so they depend only
        on the partition, not on the order answers were applied in.
        """
        if "groups" not in self._cache:
            _, first, inverse = np.unique(self._uf.roots(), return_index=True,
                                          return_inverse=True)
            rank = np.empty(len(first), dtype=np.int64)
            rank[np.argsort(first)] = np.arange(len(first))
            groups = rank[inverse]
            groups.setflags(write=False)
            self._cache["groups"] = groups
        return self._cache["groups"]

    def cl_group_edges(self) -> np.ndarray:
        """(e, 2) unique pairs (lo, hi) of ML-group ids joined by at least one CL."""
        if "cl_edges" not in self._cache:
            cl = self.cl_pairs()
            g = self.ml_groups()[cl] if cl.size else np.empty((0, 2), dtype=np.int64)
            lo, hi = np.minimum(g[:, 0], g[:, 1]), np.maximum(g[:, 0], g[:, 1])
            width = np.int64(self.n_items) + 1
            keys = np.unique(lo * width + hi)  # one 1-d sort, not a row-wise unique
            edges = np.stack([keys // width, keys % width], axis=1).reshape(-1, 2)
            edges.setflags(write=False)
            self._cache["cl_edges"] = edges
        return self._cache["cl_edges"]

    def implied(self, i: int, j: int) -> bool | None:
        """True: same ML group; False: groups joined by a CL; None: not implied."""
        check_pairs(np.array([[i, j]]), self.n_items, name="pair")
        ri, rj = self._uf.find(int(i)), self._uf.find(int(j))
        if ri == rj:
            return True
        if rj in self._cl_adj.get(ri, {}):
            return False
        return None

    def implied_many(self, pairs: object) -> np.ndarray:
        """int8 (m,): 1 implied same, 0 implied different, -1 unknown, for each pair."""
        arr = check_pairs(pairs, self.n_items)
        out = np.full(len(arr), -1, dtype=np.int8)
        if not len(arr):
            return out
        g = self.ml_groups()[arr]
        out[g[:, 0] == g[:, 1]] = 1
        edges = self.cl_group_edges()
        if len(edges):
            n_groups = np.int64(self.ml_groups().max()) + 1
            keys = np.unique(edges[:, 0] * n_groups + edges[:, 1])
            lo, hi = g.min(axis=1), g.max(axis=1)
            q = lo * n_groups + hi
            pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
            out[keys[pos] == q] = 0
        return out
