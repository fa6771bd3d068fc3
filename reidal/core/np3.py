"""NP3: make any clustering agree with the pairwise answers, changing it as little as it can.

Non-Parametric, Plug-and-Play refinement (method.md, step 2). It takes the labels of any
clustering (label -1 = outlier, each outlier its own singleton cluster) and the applied
answers of a :class:`~reidal.core.constraints.ConstraintSet`, and returns labels under which
every must-link (ML) pair shares a label >= 0 and no cannot-link (CL) pair does:

1. merge: clusters joined by an ML pair become one (union-find over cluster ids);
2. every merged cluster that holds a CL pair is *impure*. Inside it, ML groups (transitive
   closure of the ML pairs) are the nodes of a conflict graph whose edges are the CL pairs;
   its connected components are the CL groups;
3. the CL group with the highest chromatic number (ties: most items) is coloured, exactly
   by backtracking up to ``exact_coloring_max_nodes`` nodes, with DSATUR beyond; its colours
   are the sub-clusters;
4. every other CL group is coloured on its own, then its colour classes are matched
   one-to-one to the sub-clusters by the Hungarian method; the cost of a class for a
   sub-cluster is the size-weighted Euclidean distance, in X, of the class's ML-group
   centroids to the sub-cluster's centroid. One-to-one matching keeps the group's CL edges
   apart, and an ML group never splits, so every constraint holds. (A class left over would
   open a new sub-cluster, but the group coloured in step 3 is the one whose colouring uses
   the most colours, so every other group fits.) OURS: the sub-cluster centroids used here
   are those of the colour classes of step 3, fixed while matching, so the result does not
   depend on the order CL groups are visited in. That lets the common small cases run
   vectorised across all impure clusters: a two-node CL group (one CL edge) takes the best
   pair of distinct sub-clusters (Hungarian on two rows), and an ML group with no CL edge
   inside the cluster (a one-node CL group) the nearest sub-cluster;
5. items with no constraint inside the cluster join the nearest sub-cluster centroid, now
   taken over all the constrained items placed in it.

Label ids, chosen so unchanged items keep their label: clusters not touched keep theirs; a
merged cluster keeps the id of its largest non-outlier part (ties: smallest id); outliers only
joined to each other by ML get a fresh id; a split cluster's id stays with the sub-cluster
holding most items that carried it, the other sub-clusters get fresh ids above every id in
use. A labelling that already satisfies every constraint is returned unchanged.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components

from reidal.core.constraints import ConstraintSet
from reidal.core.params import ParamsMixin
from reidal.core.validation import Interval, check_embeddings, check_labels


@dataclass(frozen=True)
class NP3Result:
    """Refined labels and what the refinement did."""

    labels: np.ndarray
    n_changed: int
    n_impure_clusters: int
    n_violations_before: int
    n_violations_after: int


def _violations(labels: np.ndarray, ml: np.ndarray, cl: np.ndarray) -> int:
    a, b = labels[ml[:, 0]], labels[ml[:, 1]]
    ml_bad = (a != b) | (a < 0)
    a, b = labels[cl[:, 0]], labels[cl[:, 1]]
    cl_bad = (a == b) & (a >= 0)
    return int(ml_bad.sum() + cl_bad.sum())


def count_violations(labels: object, constraints: ConstraintSet) -> int:
    """Number of applied constraints that ``labels`` breaks (-1 items are singletons)."""
    labels = _check_labels_for(labels, constraints)
    return _violations(labels, constraints.ml_pairs(), constraints.cl_pairs())


def _check_labels_for(labels: object, constraints: ConstraintSet) -> np.ndarray:
    if not isinstance(constraints, ConstraintSet):
        raise ValueError(f"constraints must be a ConstraintSet, got {type(constraints).__name__}")
    arr = np.asarray(labels)
    if arr.ndim == 1 and len(arr) != constraints.n_items:
        raise ValueError(
            f"constraints cover {constraints.n_items} items but labels has {len(arr)} entries"
        )
    return check_labels(labels, constraints.n_items)


# --------------------------------------------------------------------------- colouring
def _adjacency(n_nodes: int, edges: object) -> list[set[int]]:
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if e.size and (e.min() < 0 or e.max() >= n_nodes or (e[:, 0] == e[:, 1]).any()):
        raise ValueError(f"edges must join distinct nodes in [0, {n_nodes})")
    adj: list[set[int]] = [set() for _ in range(n_nodes)]
    for a, b in e.tolist():
        adj[a].add(b)
        adj[b].add(a)
    return adj


def dsatur_coloring(n_nodes: int, edges: object) -> np.ndarray:
    """Greedy DSATUR colouring (Brelaz 1979): colours 0..k-1 per node, adjacent differ.

    Always colours next the node seeing the most distinct colours among its neighbours
    (ties: higher degree, then lower index); exact on bipartite graphs, near-optimal
    elsewhere, O((V + E) log V).
    """
    adj = _adjacency(n_nodes, edges)
    colour = [-1] * n_nodes
    seen: list[set[int]] = [set() for _ in range(n_nodes)]
    heap = [(0, -len(adj[v]), v) for v in range(n_nodes)]
    heapq.heapify(heap)
    while heap:
        neg_sat, _, v = heapq.heappop(heap)
        if colour[v] >= 0 or -neg_sat != len(seen[v]):
            continue  # stale entry
        c = 0
        while c in seen[v]:
            c += 1
        colour[v] = c
        for u in adj[v]:
            if colour[u] < 0 and c not in seen[u]:
                seen[u].add(c)
                heapq.heappush(heap, (-len(seen[u]), -len(adj[u]), u))
    return np.asarray(colour, dtype=np.int64)


def exact_coloring(n_nodes: int, edges: object) -> np.ndarray:
    """Colouring with the fewest colours, by backtracking (exponential: small graphs only).

    Tries k = lower bound .. DSATUR's count - 1 colours in turn; DSATUR's own colouring is
    returned when no smaller k works. Nodes are tried in DSATUR order, and a node may open at
    most one colour beyond those already used (colour symmetry pruning).
    """
    adj = _adjacency(n_nodes, edges)
    best = dsatur_coloring(n_nodes, edges)
    k_best = int(best.max()) + 1 if n_nodes else 0
    lower = 2 if any(adj) else min(1, n_nodes)
    order = np.argsort(best, kind="stable").tolist()
    order.sort(key=lambda v: -len(adj[v]))
    nbrs = [sorted(adj[v]) for v in range(n_nodes)]

    def attempt(k: int) -> list[int] | None:
        colour = [-1] * n_nodes

        def place(pos: int, used: int) -> bool:
            if pos == n_nodes:
                return True
            v = order[pos]
            taken = {colour[u] for u in nbrs[v]}
            for c in range(min(k, used + 1)):
                if c not in taken:
                    colour[v] = c
                    if place(pos + 1, max(used, c + 1)):
                        return True
            colour[v] = -1
            return False

        return colour if place(0, 0) else None

    for k in range(lower, k_best):
        found = attempt(k)
        if found is not None:
            return np.asarray(found, dtype=np.int64)
    return best


# --------------------------------------------------------------------------- NP3
class NP3(ParamsMixin):
    """NP3 constrained refinement; see the module docstring for the steps and id rules.

    ``exact_coloring_max_nodes`` (OURS, default 10): conflict graphs with at most this many
    ML groups are coloured exactly, larger ones with DSATUR.
    """

    _constraints = {"exact_coloring_max_nodes": Interval(0, None, integer=True)}

    def __init__(self, exact_coloring_max_nodes: int = 10) -> None:
        self.exact_coloring_max_nodes = exact_coloring_max_nodes
        self._check_params()

    def _colour(self, n_nodes: int, edges: np.ndarray) -> np.ndarray:
        if n_nodes == 1 or not len(edges):
            return np.zeros(n_nodes, dtype=np.int64)
        if n_nodes <= self.exact_coloring_max_nodes:
            return exact_coloring(n_nodes, edges)
        return dsatur_coloring(n_nodes, edges)

    def __call__(self, labels: object, X: object, constraints: ConstraintSet) -> NP3Result:
        labels = _check_labels_for(labels, constraints)
        n = constraints.n_items
        X = check_embeddings(X, normalised=False, min_rows=0)
        if X.shape[0] != n:
            raise ValueError(f"X has {X.shape[0]} rows but labels has {n} entries")
        ml, cl = constraints.ml_pairs(), constraints.cl_pairs()
        before = _violations(labels, ml, cl)
        if before == 0:
            return NP3Result(labels.copy(), 0, 0, 0, 0)

        # Step 1: clusters (outliers as singletons) merged along ML pairs.
        is_out = labels < 0
        part_label, cid = np.unique(labels, return_inverse=True)  # -1 first if present
        cid = cid.astype(np.int64)
        n_out = int(is_out.sum())
        if n_out:  # give every outlier its own cluster id after the real clusters
            part_label = np.concatenate([part_label[1:], np.full(n_out, -1, dtype=np.int64)])
            cid = cid - 1
            cid[is_out] = len(part_label) - n_out + np.arange(n_out)
        n_parts = len(part_label)
        graph = coo_matrix(
            (np.ones(len(ml), dtype=np.int8), (cid[ml[:, 0]], cid[ml[:, 1]])),
            shape=(n_parts, n_parts),
        )
        _, comp = connected_components(graph, directed=False)
        part_size = np.bincount(cid, minlength=n_parts)
        order = np.lexsort((part_label, -part_size, part_label < 0, comp))
        first = order[np.r_[True, comp[order][1:] != comp[order][:-1]]]
        comp_label = np.empty(comp.max() + 1, dtype=np.int64)
        comp_label[comp[first]] = part_label[first]
        next_id = int(labels.max()) + 1
        parts_per_comp = np.bincount(comp)
        needs_fresh = np.flatnonzero((comp_label < 0) & (parts_per_comp > 1))
        comp_label[needs_fresh] = next_id + np.arange(len(needs_fresh))
        next_id += len(needs_fresh)
        merged = comp[cid]  # merged-cluster index per item
        out = comp_label[merged]

        # Steps 2..5, for all impure clusters at once.
        cl_in = cl[merged[cl[:, 0]] == merged[cl[:, 1]]]
        impure = np.unique(merged[cl_in[:, 0]])
        if len(impure):
            cluster_of = np.full(len(comp_label), -1, dtype=np.int64)
            cluster_of[impure] = np.arange(len(impure))
            items = np.flatnonzero(cluster_of[merged] >= 0)
            item_cluster = cluster_of[merged[items]]
            sub, owner = self._split(items, item_cluster, len(impure), cl_in,
                                     constraints.ml_groups(), X)
            # A split cluster's id stays with the sub-cluster holding most items that carried
            # it (ties: the larger, then the first); the others get fresh ids.
            n_sub = len(owner)
            kept_label = comp_label[impure]
            carried = np.bincount(sub, minlength=n_sub,
                                  weights=labels[items] == kept_label[item_cluster])
            size = np.bincount(sub, minlength=n_sub)
            order = np.lexsort((np.arange(n_sub), -size, -carried, owner))
            keep = order[np.r_[True, owner[order][1:] != owner[order][:-1]]]
            sub_label = np.full(n_sub, -1, dtype=np.int64)
            sub_label[keep] = kept_label[owner[keep]]
            fresh = np.flatnonzero(sub_label < 0)
            sub_label[fresh] = next_id + np.arange(len(fresh))
            out[items] = sub_label[sub]

        after = _violations(out, ml, cl)
        if after:  # pragma: no cover - a bug, never a silent wrong answer
            raise RuntimeError(f"NP3 left {after} constraint(s) violated")
        return NP3Result(
            labels=out,
            n_changed=int((out != labels).sum()),
            n_impure_clusters=len(impure),
            n_violations_before=before,
            n_violations_after=after,
        )

    def _split(
        self,
        items: np.ndarray,
        item_cluster: np.ndarray,
        n_clusters: int,
        cl_in: np.ndarray,
        groups: np.ndarray,
        X: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Steps 2..5 for every impure cluster together.

        ``items`` are the members of the impure clusters, ``item_cluster`` their cluster
        (0..n_clusters-1), ``cl_in`` the CL pairs inside them. Returns each item's
        sub-cluster (a global index) and each sub-cluster's cluster. Vectorised across
        clusters; only CL groups of three or more ML groups are handled one at a time.
        """
        # Nodes: ML groups of 2+ items or touching an inner CL. ML groups never cross merged
        # clusters (step 1 joined every ML pair), so each node lies in one impure cluster.
        group_size = np.bincount(groups)
        g = groups[items]
        cl_groups = groups[cl_in]
        node_group = np.unique(np.concatenate([g[group_size[g] > 1], cl_groups.ravel()]))
        n_nodes = len(node_group)
        node_of = np.minimum(np.searchsorted(node_group, g), n_nodes - 1)
        rows = np.flatnonzero(node_group[node_of] == g)  # items that belong to a node
        free = np.setdiff1d(np.arange(len(items)), rows, assume_unique=True)
        node_of = node_of[rows]
        node_cluster = np.empty(n_nodes, dtype=np.int64)
        node_cluster[node_of] = item_cluster[rows]
        node_sum = _sum_rows(X[items[rows]], node_of, n_nodes)
        node_cnt = np.bincount(node_of, minlength=n_nodes).astype(np.float64)
        node_mu = node_sum / node_cnt[:, None]

        # Step 2: conflict graph over nodes; CL groups are its connected components.
        e = np.unique(np.sort(np.searchsorted(node_group, cl_groups), axis=1), axis=0)
        n_comp, comp = connected_components(
            coo_matrix((np.ones(len(e), dtype=np.int8), (e[:, 0], e[:, 1])),
                       shape=(n_nodes, n_nodes)),
            directed=False,
        )
        comp_size = np.bincount(comp, minlength=n_comp)
        comp_order = np.argsort(comp, kind="stable")  # nodes ascending within a component
        comp_start = np.r_[0, np.cumsum(comp_size)]
        comp_cluster = node_cluster[comp_order[comp_start[:-1]]]
        edge_comp = comp[e[:, 0]]
        edge_order = np.argsort(edge_comp, kind="stable")
        edge_start = np.r_[0, np.cumsum(np.bincount(edge_comp, minlength=n_comp))]
        # Colour every CL group on its own: one node needs 1 colour, two nodes (one CL) 2.
        node_colour = np.zeros(n_nodes, dtype=np.int64)
        node_colour[comp_order[comp_start[:-1][comp_size == 2] + 1]] = 1
        n_colours = np.minimum(comp_size, 2)
        for t in np.flatnonzero(comp_size > 2).tolist():
            nodes = comp_order[comp_start[t]:comp_start[t + 1]]
            local = np.searchsorted(nodes, e[edge_order[edge_start[t]:edge_start[t + 1]]])
            node_colour[nodes] = self._colour(len(nodes), local)
            n_colours[t] = int(node_colour[nodes].max()) + 1
        weight = np.bincount(comp, weights=node_cnt, minlength=n_comp)
        # Per cluster: highest chromatic number first, then most items, then lowest index.
        sequence = np.lexsort((np.arange(n_comp), -weight, -n_colours, comp_cluster))
        is_first = np.r_[True, comp_cluster[sequence][1:] != comp_cluster[sequence][:-1]]
        founder = sequence[is_first]  # one per cluster, in cluster order

        # Step 3: the founder's colours are the cluster's sub-clusters. Their
        # centroids are the colour classes' and stay fixed, so the matching below does
        # not depend on the order CL groups are visited in.
        node_sub = np.full(n_nodes, -1, dtype=np.int64)
        sub_start = np.r_[0, np.cumsum(n_colours[founder])]
        is_founder = np.zeros(n_comp, dtype=bool)
        is_founder[founder] = True
        fn = np.flatnonzero(is_founder[comp])
        node_sub[fn] = sub_start[node_cluster[fn]] + node_colour[fn]
        centroids = _sum_rows(node_sum[fn], node_sub[fn], sub_start[-1]) / np.bincount(
            node_sub[fn], weights=node_cnt[fn], minlength=sub_start[-1])[:, None]
        owner = np.repeat(np.arange(n_clusters), n_colours[founder])

        # Step 4a: CL groups of 3+ nodes, colour classes matched to sub-clusters (Hungarian).
        # The founder is the group whose colouring uses the most colours, so every other
        # group's classes fit in the sub-clusters already there: none need opening.
        for t in sequence[~is_first][comp_size[sequence[~is_first]] > 2].tolist():
            nodes = comp_order[comp_start[t]:comp_start[t + 1]]
            colours = node_colour[nodes]
            c = int(comp_cluster[t])
            subs = np.arange(sub_start[c], sub_start[c + 1])
            dist = _euclidean(node_mu[nodes], centroids[subs]) * node_cnt[nodes][:, None]
            _, target = linear_sum_assignment(_sum_rows(dist, colours, int(n_colours[t])))
            node_sub[nodes] = subs[target[colours]]
        table = _sub_table(sub_start)

        # Step 4b: two-node CL groups (one CL edge) take the best pair of distinct
        # sub-clusters, which is what the Hungarian method returns for two rows.
        pairs = np.flatnonzero((comp_size == 2) & ~is_founder)
        if len(pairs):
            a = comp_order[comp_start[pairs]]
            b = comp_order[comp_start[pairs] + 1]
            d = _padded_distances(node_mu[np.r_[a, b]], table[node_cluster[np.r_[a, b]]],
                                  centroids) * node_cnt[np.r_[a, b]][:, None]
            ca, cb = _best_distinct_pair(d[:len(a)], d[len(a):])
            node_sub[a] = table[node_cluster[a], ca]
            node_sub[b] = table[node_cluster[b], cb]
        # Step 4c: one-node CL groups (ML groups free of CL edges) join the nearest centroid.
        single = comp_order[comp_start[:-1][comp_size == 1]]
        if len(single):
            d = _padded_distances(node_mu[single], table[node_cluster[single]], centroids)
            node_sub[single] = table[node_cluster[single], d.argmin(axis=1)]

        # Step 5: unconstrained items join the nearest centroid of the final sub-clusters.
        sub = np.empty(len(items), dtype=np.int64)
        sub[rows] = node_sub[node_of]
        if len(free):
            n_sub = len(centroids)
            final = _sum_rows(node_sum, node_sub, n_sub) / np.bincount(
                node_sub, weights=node_cnt, minlength=n_sub)[:, None]
            d = _padded_distances(X[items[free]], table[item_cluster[free]], final)
            sub[free] = table[item_cluster[free], d.argmin(axis=1)]
        return sub, owner


def _sub_table(sub_start: np.ndarray) -> np.ndarray:
    """(clusters, most sub-clusters) table of each cluster's sub-cluster ids, -1 padded."""
    width = np.diff(sub_start)
    col = np.arange(int(width.max()))
    return np.where(col[None, :] < width[:, None], sub_start[:-1, None] + col[None, :], -1)


def _padded_distances(A: np.ndarray, subs: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Distance of each row of A to the centroids its row of ``subs`` names (-1: inf).

    One pass per column of ``subs``, each over the rows that have that many sub-clusters,
    so the work is the sum of the clusters' sub-cluster counts, not rows x max.
    """
    out = np.full(subs.shape, np.inf)
    C = centroids.astype(A.dtype, copy=False)
    for s in range(subs.shape[1]):
        has = subs[:, s] >= 0
        if has.all():  # every cluster has >= 2 sub-clusters: skip copying A
            diff = A - C[subs[:, s]]
            out[:, s] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        else:
            r = np.flatnonzero(has)
            diff = A[r] - C[subs[r, s]]
            out[r, s] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def _sum_rows(values: np.ndarray, index: np.ndarray, n_out: int | None = None) -> np.ndarray:
    """Row sums of ``values`` grouped by ``index`` (float64), via a sparse indicator."""
    n_out = int(index.max()) + 1 if n_out is None else n_out
    if n_out * len(index) <= 65536:  # small: a dense one-hot product beats building CSR
        onehot = (index[None, :] == np.arange(n_out)[:, None]).astype(np.float64)
        return onehot @ np.asarray(values, dtype=np.float64)
    indicator = csr_matrix(
        (np.ones(len(index)), (index, np.arange(len(index)))), shape=(n_out, len(index))
    )
    return np.asarray(indicator @ np.asarray(values, dtype=np.float64))


def _best_distinct_pair(ca: np.ndarray, cb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, columns (p, q), p != q, minimising ca[p] + cb[q] (needs >= 2 columns)."""
    rows = np.arange(len(ca))
    pa, pb = ca.argmin(axis=1), cb.argmin(axis=1)
    clash = pa == pb
    ca2, cb2 = ca.copy(), cb.copy()
    ca2[rows, pa] = np.inf
    cb2[rows, pb] = np.inf
    qa, qb = ca2.argmin(axis=1), cb2.argmin(axis=1)  # second-best columns
    # On a clash one side keeps its best column and the other takes its second best.
    keep_a = ca[rows, pa] + cb[rows, qb] <= ca[rows, qa] + cb[rows, pb]
    out_a = np.where(clash & ~keep_a, qa, pa)
    out_b = np.where(clash & keep_a, qb, pb)
    return out_a, out_b


def _euclidean(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """(a, b) Euclidean distances, from the Gram expansion, in A's float precision."""
    B = np.asarray(B, dtype=A.dtype)
    sq = (A * A).sum(1)[:, None] - 2.0 * (A @ B.T) + (B * B).sum(1)[None, :]
    return np.sqrt(np.maximum(sq, 0.0))
