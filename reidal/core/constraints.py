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
a rebuild from all answers, which drops the older answers it overrules. Answers repeating a
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
        self._reset()

    def _reset(self) -> None:
        self._answers: dict[int, Answer] = {}
        self._applied: set[int] = set()
        self._uf = _UnionFind(self.n_items)
        # ML spanning forest: item -> [(neighbour, answer id)]; only MLs that joined groups.
        # Each tree is also kept rooted (parent, edge to parent, depth; absent = a root) so
        # the path joining two items is found by climbing, in O(path length).
        self._forest: dict[int, list[tuple[int, int]]] = {}
        self._up: dict[int, tuple[int, int]] = {}
        self._depth: dict[int, int] = {}
        # CL between groups: root -> {other root: id of one CL answer joining them}.
        self._cl_adj: dict[int, dict[int, int]] = {}
        self._max_id: int | None = None
        self.contradictions: list[Contradiction] = []
        self._cache: dict[str, np.ndarray] = {}

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_answers(cls, n_items: int, answers: Iterable[Answer]) -> ConstraintSet:
        """Build from answers in any order; the result depends only on the ids."""
        cs = cls(n_items)
        cs._build(answers)
        return cs

    @classmethod
    def from_pairs(cls, n_items: int, ml: object = (), cl: object = ()) -> ConstraintSet:
        """Build from (m, 2) ML and (c, 2) CL index arrays; ids run 0.. over ML, then CL."""
        ml_arr = check_pairs(ml, n_items, name="ml")
        cl_arr = check_pairs(cl, n_items, name="cl")
        answers = [Answer(int(a), int(b), True, k) for k, (a, b) in enumerate(ml_arr.tolist())]
        m = len(answers)
        answers += [
            Answer(int(a), int(b), False, m + k) for k, (a, b) in enumerate(cl_arr.tolist())
        ]
        return cls.from_answers(n_items, answers)

    def _build(self, answers: Iterable[Answer]) -> None:
        checked = [_as_answer(a, self.n_items, check_range=False) for a in answers]
        check_pairs(np.array([(a.i, a.j) for a in checked], dtype=np.int64).reshape(-1, 2),
                    self.n_items, name="answers")
        by_id: dict[int, Answer] = {}
        for a in checked:
            if a.answer_id in by_id:
                raise ValueError(f"duplicate answer_id {a.answer_id}")
            by_id[a.answer_id] = a
        self._reset()
        self._answers = by_id
        for aid in sorted(by_id, reverse=True):
            found = self._apply(by_id[aid])
            if found is not None:
                self.contradictions.append(found)
        self._max_id = max(by_id) if by_id else None

    def add(self, answer: Answer) -> Contradiction | None:
        """Add one answer; return the contradiction it causes, if any.

        If the rebuild drops several older answers, the first one found is returned; all of
        them are in :attr:`contradictions`.
        """
        answer = _as_answer(answer, self.n_items)
        if answer.answer_id in self._answers:
            raise ValueError(f"duplicate answer_id {answer.answer_id}")
        if self._max_id is None or answer.answer_id > self._max_id:
            self._answers[answer.answer_id] = answer
            self._max_id = answer.answer_id
            if self._apply(answer, probe=True) is None:
                return None
        else:
            self._answers[answer.answer_id] = answer
        # The answer overrules older applied ones, or is itself older than the newest:
        # recompute the whole set under the newest-first rule.
        before = {c.dropped_answer_id for c in self.contradictions}
        self._build(list(self._answers.values()))
        new = [c for c in self.contradictions if c.dropped_answer_id not in before]
        own = [c for c in new if c.dropped_answer_id == answer.answer_id]
        return (own or new or [None])[0]

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
                    cl = self._answers[cl_id]
                    c, d = (cl.i, cl.j) if uf.find(cl.i) == ri else (cl.j, cl.i)
                    ids = (cl_id, a.answer_id, *self._forest_path(c, a.i),
                           *self._forest_path(a.j, d))
                    return Contradiction(tuple(sorted(ids)), a.answer_id)
                self._union(ri, rj)
                self._link(a.i, a.j, a.answer_id, small_side_i=self._uf.find(a.i) != ri)
        else:
            if ri == rj:
                if probe:
                    return Contradiction((), a.answer_id)
                ids = (a.answer_id, *self._forest_path(a.i, a.j))
                return Contradiction(tuple(sorted(ids)), a.answer_id)
            self._cl_adj.setdefault(ri, {}).setdefault(rj, a.answer_id)
            self._cl_adj.setdefault(rj, {}).setdefault(ri, a.answer_id)
        self._applied.add(a.answer_id)
        self._cache.clear()
        return None

    def _union(self, ri: int, rj: int) -> None:
        root, gone = self._uf.union_roots(ri, rj)
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
        return len(self._applied)

    @property
    def answers(self) -> tuple[Answer, ...]:
        """Every answer given, applied or not, ordered by ``answer_id``."""
        return tuple(self._answers[k] for k in sorted(self._answers))

    def _applied_pairs(self, same: bool) -> np.ndarray:
        key = "ml" if same else "cl"
        if key not in self._cache:
            rows = [
                (a.i, a.j)
                for k, a in sorted(self._answers.items())
                if a.same == same and k in self._applied
            ]
            arr = np.array(rows, dtype=np.int64).reshape(-1, 2)
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
            edges = np.unique(np.sort(g, axis=1), axis=0).reshape(-1, 2)
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
