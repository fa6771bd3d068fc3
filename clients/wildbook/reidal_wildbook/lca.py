"""reidal as the backend of an LCA-style review loop (WildMeOrg/lca).

Wild Me's LCA drives clustering algorithms through one interface (its
``beta_stability`` run loop, whose algorithms include an NP3 + AAS one)::

    requested = algorithm.step(initial_edges)          # verifier edges in
    while not algorithm.is_finished():
        reviews = human_reviewer(requested)             # [(n0, n1, decision)]
        requested = algorithm.step([(n0, n1, 1.0 if d else 0.0, "human") ...])
    clustering, node2cid, G = algorithm.get_clustering()

:class:`ReidalLCABackend` has the same shape, with reidal doing the work over gRPC:
``step`` stores the human decisions it is given (SubmitConstraints) and returns the next
pairs to review (GetQueryPairs: Ambiguity-Aware Sampling); ``get_clustering`` is
GetIdentities (NP3-refined, stable ids). docs/wildbook.md maps the two loops in full.

Edges ``step`` accepts (any mix):

- ``(annot_a, annot_b, decision)``: a review. decision: True / False / None, a reidal
  label word ("same", "different", "unsure", ...), LCA / wbia words ("positive",
  "negative", "incomparable"), or a number (> 0.5 = same, LCA's rule).
- ``(annot_a, annot_b, score, verifier)``: LCA's unified edge. A verifier whose name
  contains "human" (LCA's rule) is a review (score > 0.5 = same); any other verifier's
  edge is ignored and counted: reidal scores pairs with its own embeddings.

Annotation ids are the collection's image ids (ingest the annotations first, e.g. with
:class:`reidal_wildbook.sync.WildbookSync`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from reidal_client import Answer, QueryBatch, ReidalClient, parse_label

log = logging.getLogger("reidal_wildbook.lca")

#: Words of LCA / wbia review states, on top of what reidal_client.parse_label reads.
_LCA_WORDS = {"positive": "SAME", "match": "SAME", "match_state": "SAME",
              "negative": "DIFFERENT", "nomatch": "DIFFERENT", "no_match": "DIFFERENT",
              "incomparable": "UNSURE", "notcomp": "UNSURE", "unreviewed": "UNSURE"}

#: Edge labels in get_clustering's graph, as wbia names review states.
_GRAPH_LABELS = {"SAME": "positive", "DIFFERENT": "negative", "UNSURE": "incomparable"}


def decision_label(decision: Any) -> str:
    """A review decision as "SAME" / "DIFFERENT" / "UNSURE" (module docstring)."""
    if decision is None or isinstance(decision, bool):
        return parse_label(decision)
    if isinstance(decision, int | float):
        return "SAME" if float(decision) > 0.5 else "DIFFERENT"
    word = str(decision).strip().lower()
    if word in _LCA_WORDS:
        return _LCA_WORDS[word]
    return parse_label(word)


class ReidalLCABackend:
    """An LCA-style algorithm object backed by a reidal collection.

    budget: pairs per step (int) or a fraction of all pairs (float); None = the
    collection's default. annotator_id: recorded with every stored decision.
    human_marker: a 4-tuple edge is a review when its verifier name contains it.
    skip_pending: do not re-ask pairs of earlier steps that got no decision (off by
    default: an abandoned pair is asked again rather than lost). max_human_reviews: stop
    (``is_finished``) after this many stored decisions (None: never).
    """

    def __init__(self, client: ReidalClient, collection_id: str, *,
                 budget: int | float | None = None, annotator_id: str = "lca-human",
                 human_marker: str = "human", skip_pending: bool = False,
                 max_human_reviews: int | None = None) -> None:
        if not collection_id:
            raise ValueError("collection_id must not be empty")
        if max_human_reviews is not None and max_human_reviews < 0:
            raise ValueError(f"max_human_reviews must be >= 0, got {max_human_reviews}")
        self.client = client
        self.collection_id = collection_id
        self.budget = budget
        self.annotator_id = annotator_id
        self.human_marker = human_marker
        self.skip_pending = skip_pending
        self.max_human_reviews = max_human_reviews
        self.num_human_reviews = 0
        self.num_ignored_edges = 0
        self.num_steps = 0
        self.last_batch: QueryBatch | None = None
        self._pair_ids: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------------ edges

    def _review(self, edge: Sequence[Any]) -> tuple[str, str, str] | None:
        """(a, b, label) of a review edge, None for a verifier edge."""
        if isinstance(edge, str | bytes) or len(edge) not in (3, 4):
            raise ValueError(f"an edge is (annot_a, annot_b, decision) or (annot_a, annot_b, "
                             f"score, verifier), got {edge!r:.100}")
        a, b = str(edge[0]), str(edge[1])
        if a == b:
            raise ValueError(f"edge {edge!r:.100} pairs an annotation with itself")
        if len(edge) == 4:
            if self.human_marker not in str(edge[3]):
                return None
            return a, b, decision_label(float(edge[2]))
        return a, b, decision_label(edge[2])

    def _submit(self, reviews: list[tuple[str, str, str]]) -> None:
        """Store decisions: by pair id (with the batch) when the last step asked that
        pair, by image pair otherwise."""
        by_pair: list[Answer] = []
        by_images: list[Answer] = []
        for a, b, label in reviews:
            key = (a, b) if a <= b else (b, a)
            pair_id = self._pair_ids.get(key)
            if pair_id is not None:
                by_pair.append(Answer.for_pair(pair_id, label, annotator_id=self.annotator_id))
            else:
                by_images.append(Answer.for_images(a, b, label,
                                                   annotator_id=self.annotator_id))
        if by_pair:
            assert self.last_batch is not None  # pair ids only come from a batch
            self.client.submit_answers(self.collection_id, by_pair,
                                       batch_id=self.last_batch.batch_id)
        if by_images:
            self.client.submit_answers(self.collection_id, by_images)
        self.num_human_reviews += len(reviews)

    # ------------------------------------------------------------------ interface

    def step(self, new_edges: Iterable[Sequence[Any]]) -> list[tuple[str, str, float]]:
        """Store the reviews among ``new_edges``, then return the next pairs to review as
        ``(annot_a, annot_b, similarity)`` (LCA's requested-edge form); [] when finished."""
        reviews = []
        for edge in new_edges:
            review = self._review(edge)
            if review is None:
                self.num_ignored_edges += 1
            else:
                reviews.append(review)
        if reviews:
            self._submit(reviews)
        self.num_steps += 1
        if self._budget_spent():
            self._pair_ids = {}
            return []
        budget = self.budget
        if isinstance(budget, int) and self.max_human_reviews is not None:
            budget = max(min(budget, self.max_human_reviews - self.num_human_reviews), 1)
        batch = self.client.get_query_pairs(self.collection_id, budget,
                                            skip_pending=self.skip_pending)
        self.last_batch = batch
        self._pair_ids = {(p.image_a, p.image_b): p.pair_id for p in batch.pairs}
        log.info("step %d: %d review(s) stored, batch %s cycle %d: %d pair(s) (%s)",
                 self.num_steps, len(reviews), batch.batch_id, batch.cycle, len(batch.pairs),
                 batch.reason)
        return [(p.image_a, p.image_b, float(p.similarity)) for p in batch.pairs]

    def _budget_spent(self) -> bool:
        return self.max_human_reviews is not None and \
            self.num_human_reviews >= self.max_human_reviews

    def is_finished(self) -> bool:
        """The last batch said nothing is left to ask, or the review budget is spent."""
        if self._budget_spent():
            return True
        return self.last_batch is not None and self.last_batch.finished

    def clusters(self) -> dict[str, set[str]]:
        """identity id -> its annotation ids (GetIdentities: NP3 over the current answers)."""
        ids = self.client.get_identities(self.collection_id)
        return {x.identity_id: set(x.image_ids) for x in ids.identities}

    def get_clustering(self) -> tuple[dict[str, set[str]], dict[str, str], Any]:
        """LCA's result triple ``(clustering, node2cid, G)``. G is a networkx Graph of
        every annotation with the current answers as edges (``label`` "positive",
        "negative" or "incomparable", ``annotator``), or None without networkx."""
        clustering = self.clusters()
        node2cid = {n: cid for cid, nodes in clustering.items() for n in nodes}
        try:
            import networkx as nx
        except ImportError:  # pragma: no cover - networkx comes with torch
            return clustering, node2cid, None
        graph = nx.Graph()
        graph.add_nodes_from(node2cid)
        for s in self.client.list_constraints(self.collection_id):
            if s.image_a in node2cid and s.image_b in node2cid:
                graph.add_edge(s.image_a, s.image_b, label=_GRAPH_LABELS.get(s.label, s.label),
                               annotator=s.annotator_id)
        return clustering, node2cid, graph

    def show_stats(self) -> None:
        batch = self.last_batch
        log.info("reidal LCA backend %s: %d step(s), %d review(s) stored, %d verifier "
                 "edge(s) ignored, last batch: %s", self.collection_id, self.num_steps,
                 self.num_human_reviews, self.num_ignored_edges,
                 f"cycle {batch.cycle}, {len(batch.pairs)} pair(s), {batch.reason}"
                 if batch else "none")


__all__ = ["ReidalLCABackend", "decision_label"]
