"""One Wildbook -> reidal -> Wildbook round: pull annotations, ingest them, turn what
Wildbook already knows into answers, and push the refined identities back as proposals.

What Wildbook knows becomes answers by the annotator ``"wildbook"`` (OURS):

- annotations of one named individual are the same animal: a SAME answer chain that
  spans them (k - 1 answers for k annotations, not all k(k-1)/2 pairs: NP3's must-link
  closure implies the rest). Answers already stored (by anyone) count towards the
  spanning, so a re-run adds only the links new annotations need;
- with ``link_encounters`` (default), annotations of one unnamed encounter are chained
  the same way: Wildbook's data model has one animal per encounter;
- with ``different_between_names`` (default off), one DIFFERENT answer per pair of named
  individuals: k(k-1)/2 answers for k individuals, so only up to
  ``max_named_for_different`` individuals. Off by default because two Wildbook
  individuals can be one animal not yet merged.

The sync owns the answers of its annotator: one whose two annotations no longer share
an individual (or encounter) in the pull is deleted (soft, audited), so renaming or
re-assigning in Wildbook is followed. Answers of other annotators are never touched, a
pair someone else already answered is never answered over, and answers on annotations
outside the pull (another species) are left alone.

Proposals: one per unnamed encounter whose annotations reidal put in one identity: the
individual the identity's named annotations carry, or a new individual when it holds
none. An identity holding several individuals, or an encounter split over several
identities, is a conflict and proposes nothing. Encounters that carry an individual
are never proposed for (and are re-read just before pushing, so a name given meanwhile
wins): the adapter proposes, it never assigns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from reidal_client import (
    AddImagesResult,
    Answer,
    ClusteringParams,
    Identities,
    ImageInput,
    NotFound,
    ReidalClient,
    StoredAnswer,
)
from reidal_wildbook.api import WildbookAnnotation, WildbookClient, WildbookError
from reidal_wildbook.images import crop_to_box

#: Annotator id of the answers the sync derives from Wildbook (OURS).
DEFAULT_ANNOTATOR = "wildbook"
#: Actor recorded when the sync deletes one of its stale answers.
ACTOR = "reidal-wildbook"
#: Most answers per SubmitConstraints (the server's limit).
MAX_ANSWERS_PER_CALL = 10000
#: Most proposals per POST (OURS: keeps one request small).
PROPOSALS_PER_REQUEST = 200
#: Encounters between two progress lines of the pull.
PULL_PROGRESS_EVERY = 100

Stage = Callable[[str], None]


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def group_key(ann: WildbookAnnotation, link_encounters: bool = True) -> str | None:
    """The must-link group of an annotation: its individual when named, else (with
    ``link_encounters``) its encounter, else None."""
    if ann.individual_id is not None:
        return f"individual:{ann.individual_id}"
    return f"encounter:{ann.encounter_id}" if link_encounters else None


def unique_annotations(annotations: Sequence[WildbookAnnotation]) -> list[WildbookAnnotation]:
    """Annotations in pull order, each id once; ValueError when one id comes with two
    different records (two encounters claiming one annotation)."""
    seen: dict[str, WildbookAnnotation] = {}
    for ann in annotations:
        prev = seen.setdefault(ann.annotation_id, ann)
        if prev != ann:
            raise ValueError(f"annotation {ann.annotation_id} is listed twice with different "
                             f"data (encounters {prev.encounter_id} and {ann.encounter_id})")
    return list(seen.values())


# ------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class AnswerPlan:
    """What to change in the answers: ``add`` new ones, delete the stale ``remove`` ones
    (always the sync's own). ``skipped``: links not added because someone else already
    answered that pair otherwise. ``note``: why DIFFERENT answers were not planned."""

    add: tuple[Answer, ...]
    remove: tuple[StoredAnswer, ...]
    skipped: int = 0
    note: str = ""

    @property
    def same(self) -> int:
        return sum(a.label == "SAME" for a in self.add)

    @property
    def different(self) -> int:
        return sum(a.label == "DIFFERENT" for a in self.add)


def _components(nodes: Sequence[str], edges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Connected-component label of every node under ``edges`` (scipy, no Python union
    over pairs)."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    index = {n: k for k, n in enumerate(nodes)}
    n = len(nodes)
    if edges:
        rows = np.fromiter((index[a] for a, _ in edges), dtype=np.int64, count=len(edges))
        cols = np.fromiter((index[b] for _, b in edges), dtype=np.int64, count=len(edges))
    else:
        rows = cols = np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return dict(zip(nodes, labels.tolist(), strict=True))


def plan_answers(annotations: Sequence[WildbookAnnotation], current: Sequence[StoredAnswer], *,
                 annotator_id: str = DEFAULT_ANNOTATOR, link_encounters: bool = True,
                 different_between_names: bool = False, max_named_for_different: int = 100
                 ) -> AnswerPlan:
    """The answers that make the collection hold what Wildbook knows (module docstring).

    ``current``: the collection's current answers (every annotator), as
    ``ReidalClient.list_constraints`` returns them.
    """
    import numpy as np

    if max_named_for_different < 0:
        raise ValueError(f"max_named_for_different must be >= 0, got {max_named_for_different}")
    anns = unique_annotations(annotations)
    pulled = {a.annotation_id: a for a in anns}
    group = {a.annotation_id: group_key(a, link_encounters) for a in anns}
    individual = {a.annotation_id: a.individual_id for a in anns}

    # The sync's own answers that Wildbook no longer supports.
    remove: list[StoredAnswer] = []
    kept_individual_pairs: set[tuple[str, str]] = set()
    for s in current:
        if s.annotator_id != annotator_id or s.image_a not in pulled or s.image_b not in pulled:
            continue
        ga, gb = group[s.image_a], group[s.image_b]
        ia, ib = individual[s.image_a], individual[s.image_b]
        if s.label == "SAME":
            stale = ga is None or ga != gb
        elif s.label == "DIFFERENT":
            key = _pair(ia, ib) if ia is not None and ib is not None else None
            stale = (not different_between_names or key is None or ia == ib
                     or key in kept_individual_pairs)
            if not stale:
                kept_individual_pairs.add(key)  # type: ignore[arg-type]
        else:
            stale = True  # the sync never writes UNSURE
        if stale:
            remove.append(s)
    removed = {s.answer_id for s in remove}
    live = [s for s in current if s.answer_id not in removed]
    answered = {_pair(s.image_a, s.image_b) for s in live}

    # SAME: chain the components that the answers already present leave in each group.
    members: dict[str, list[str]] = {}
    for a in anns:
        if group[a.annotation_id] is not None:
            members.setdefault(group[a.annotation_id], []).append(a.annotation_id)
    members = {g: sorted(ids) for g, ids in members.items() if len(ids) > 1}
    nodes = sorted(i for ids in members.values() for i in ids)
    edges = [(s.image_a, s.image_b) for s in live if s.label == "SAME"
             and s.image_a in pulled and s.image_b in pulled
             and group[s.image_a] is not None and group[s.image_a] == group[s.image_b]]
    label = _components(nodes, edges) if nodes else {}
    add: list[Answer] = []
    skipped = 0
    for key in sorted(members):
        ids = members[key]
        labels = np.array([label[i] for i in ids])
        _, first = np.unique(labels, return_index=True)
        reps = [ids[k] for k in sorted(first.tolist())]
        kind, _, value = key.partition(":")
        note = f"Wildbook {kind} {value}"
        for a, b in zip(reps, reps[1:], strict=False):
            if _pair(a, b) in answered:
                skipped += 1
                continue
            add.append(Answer.for_images(a, b, "SAME", annotator_id=annotator_id, note=note))

    # DIFFERENT between named individuals (optional, k(k-1)/2 answers).
    note = ""
    if different_between_names:
        reps_by_ind: dict[str, str] = {}
        for a in sorted(anns, key=lambda x: x.annotation_id):
            if a.individual_id is not None:
                reps_by_ind.setdefault(a.individual_id, a.annotation_id)
        names = sorted(reps_by_ind)
        if len(names) > max_named_for_different:
            note = (f"{len(names)} named individuals is more than max_named_for_different="
                    f"{max_named_for_different}: no DIFFERENT answers between names "
                    f"({len(names) * (len(names) - 1) // 2} would be needed)")
        else:
            covered = {_pair(individual[s.image_a], individual[s.image_b]) for s in live
                       if s.label == "DIFFERENT" and individual.get(s.image_a) is not None
                       and individual.get(s.image_b) is not None}
            rows, cols = np.triu_indices(len(names), 1)
            for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
                x, y = names[i], names[j]
                a, b = reps_by_ind[x], reps_by_ind[y]
                if (x, y) in covered:
                    continue
                if _pair(a, b) in answered:
                    skipped += 1
                    continue
                add.append(Answer.for_images(
                    a, b, "DIFFERENT", annotator_id=annotator_id,
                    note=f"Wildbook individuals {x} and {y}"))
    return AnswerPlan(tuple(add), tuple(remove), skipped, note)


# ------------------------------------------------------------------------ proposals


@dataclass(frozen=True)
class Proposal:
    """A proposed individual for one unassigned encounter.

    ``individual_id`` None means "a new individual": every proposal with the same
    ``identity_id`` is the same new animal. ``matched_annotation_ids``: the named
    annotations of ``individual_id`` in the identity (the evidence).
    """

    encounter_id: str
    annotation_ids: tuple[str, ...]
    individual_id: str | None
    individual_name: str | None
    identity_id: str
    cluster_annotation_ids: tuple[str, ...]
    matched_annotation_ids: tuple[str, ...]
    same_answers: int

    @property
    def new_individual(self) -> bool:
        return self.individual_id is None

    def proposal_id(self, collection_id: str) -> str:
        """Deterministic, so a re-sent proposal can be recognised by the receiver."""
        target = self.individual_id if self.individual_id is not None else \
            f"new:{self.identity_id}"
        text = f"{collection_id}\n{self.encounter_id}\n{target}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def to_json(self, collection_id: str) -> dict[str, Any]:
        return {
            "proposalId": self.proposal_id(collection_id),
            "encounterId": self.encounter_id,
            "annotationIds": list(self.annotation_ids),
            "individualId": self.individual_id,
            "individualDisplayName": self.individual_name,
            "newIndividual": self.new_individual,
            "reidalIdentityId": self.identity_id,
            "clusterAnnotationIds": list(self.cluster_annotation_ids),
            "matchedAnnotationIds": list(self.matched_annotation_ids),
            "sameAnswers": self.same_answers,
        }


def build_proposals(annotations: Sequence[WildbookAnnotation], identities: Identities
                    ) -> tuple[list[Proposal], list[str]]:
    """Proposals for the unassigned encounters, and the conflicts (in words) that
    prevented one (module docstring)."""
    anns = unique_annotations(annotations)
    by_id = {a.annotation_id: a for a in anns}
    identity_of = {i: x for x in identities.identities for i in x.image_ids}
    names: dict[str, str] = {}
    for a in anns:
        if a.individual_id is not None and a.individual_name:
            names.setdefault(a.individual_id, a.individual_name)
    unnamed: dict[str, list[str]] = {}
    for a in anns:
        if a.individual_id is None:
            unnamed.setdefault(a.encounter_id, []).append(a.annotation_id)
    proposals: list[Proposal] = []
    conflicts: list[str] = []
    for enc_id in sorted(unnamed):
        ids = sorted(unnamed[enc_id])
        held = {identity_of[i].identity_id: identity_of[i] for i in ids if i in identity_of}
        if not held:
            continue  # not ingested, or excluded
        if len(held) > 1:
            conflicts.append(f"encounter {enc_id}: its annotations are in {len(held)} "
                             f"identities ({', '.join(sorted(held))})")
            continue
        ident = next(iter(held.values()))
        named = [by_id[i] for i in ident.image_ids if i in by_id and by_id[i].named]
        individuals = sorted({a.individual_id for a in named})  # type: ignore[type-var]
        if len(individuals) > 1:
            conflicts.append(f"encounter {enc_id}: identity {ident.identity_id} holds "
                             f"{len(individuals)} individuals ({', '.join(individuals)})")
            continue
        target = individuals[0] if individuals else None
        proposals.append(Proposal(
            encounter_id=enc_id, annotation_ids=tuple(ids), individual_id=target,
            individual_name=names.get(target) if target is not None else None,
            identity_id=ident.identity_id, cluster_annotation_ids=tuple(ident.image_ids),
            matched_annotation_ids=tuple(sorted(a.annotation_id for a in named)),
            same_answers=ident.same_answers))
    return proposals, conflicts


# ----------------------------------------------------------------------------- sync


@dataclass
class SyncReport:
    """What one :meth:`WildbookSync.run` did."""

    annotations: int = 0
    encounters: int = 0
    named_annotations: int = 0
    individuals: int = 0
    images_added: int = 0
    images_present: int = 0
    images_skipped: int = 0
    same_added: int = 0
    different_added: int = 0
    answers_removed: int = 0
    links_skipped: int = 0
    contradictions: int = 0
    identities: int = 0
    proposals: int = 0
    new_individual_proposals: int = 0
    named_meanwhile: int = 0
    conflicts: list[str] = field(default_factory=list)
    sent: int = 0
    accepted: int | None = None
    rejected: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class WildbookSync:
    """Wildbook <-> reidal for one collection.

    species: the Wildbook taxonomy to pull (None: every encounter) and the species of a
    collection created here. clustering: parameters of a collection created here (None:
    the server's defaults). crop: cut box annotations out of their photo (images.py).
    skip_broken_images: an image that cannot be downloaded or decoded is reported and
    left out instead of failing the sync. stage(text): progress lines; ingest_progress:
    ``progress(done, total)`` of the ingest (e.g. reidal_client.progress.TextProgress).
    """

    def __init__(self, wildbook: WildbookClient, reidal: ReidalClient, collection_id: str, *,
                 species: str | None = None, clustering: ClusteringParams | None = None,
                 annotator_id: str = DEFAULT_ANNOTATOR, link_encounters: bool = True,
                 different_between_names: bool = False, max_named_for_different: int = 100,
                 crop: bool = True, skip_broken_images: bool = False,
                 stage: Stage | None = None,
                 ingest_progress: Callable[[int, int | None], None] | None = None) -> None:
        if not collection_id:
            raise ValueError("collection_id must not be empty")
        if not annotator_id:
            raise ValueError("annotator_id must not be empty")
        self.wildbook = wildbook
        self.reidal = reidal
        self.collection_id = collection_id
        self.species = species or None
        self.clustering = clustering
        self.annotator_id = annotator_id
        self.link_encounters = link_encounters
        self.different_between_names = different_between_names
        self.max_named_for_different = max_named_for_different
        self.crop = crop
        self.skip_broken_images = skip_broken_images
        self.stage = stage or (lambda _text: None)
        self.ingest_progress = ingest_progress

    # ------------------------------------------------------------------ steps

    def ensure_collection(self) -> bool:
        """Create the collection when it does not exist; True when created."""
        try:
            self.reidal.get_collection(self.collection_id)
            return False
        except NotFound:
            self.reidal.create_collection(self.collection_id, species=self.species or "",
                                          clustering=self.clustering)
            return True

    def pull(self) -> list[WildbookAnnotation]:
        """Every annotation of the species, each once; a progress line every
        PULL_PROGRESS_EVERY encounters (a first pull of a large Wildbook takes a while)."""
        def progress(done: int, _total: int | None) -> None:
            if done % PULL_PROGRESS_EVERY == 0:
                self.stage(f"  {done} encounters read")

        return unique_annotations(self.wildbook.annotations(self.species, progress=progress))

    def _inputs(self, annotations: Sequence[WildbookAnnotation],
                report: SyncReport) -> Iterator[ImageInput]:
        for a in annotations:
            try:
                data = self.wildbook.fetch_image(a.image_url)
                if self.crop:
                    data = crop_to_box(data, a.bbox)
            except (WildbookError, ValueError) as exc:
                if not self.skip_broken_images:
                    raise WildbookError(f"annotation {a.annotation_id}: {exc}",
                                        url=a.image_url,
                                        status=getattr(exc, "status", None)) from None
                report.images_skipped += 1
                report.notes.append(f"image of annotation {a.annotation_id} left out: {exc}")
                continue
            yield ImageInput(a.annotation_id, data=data, name=a.individual_id or "",
                             metadata=dict(a.metadata))

    def ingest(self, annotations: Sequence[WildbookAnnotation],
               report: SyncReport | None = None) -> AddImagesResult | None:
        """Download and add the annotations the collection does not hold yet."""
        report = report if report is not None else SyncReport()
        present = {i.image_id for i in self.reidal.list_images(self.collection_id)}
        todo = [a for a in annotations if a.annotation_id not in present]
        report.images_present += len(annotations) - len(todo)
        if not todo:
            return None
        try:
            result = self.reidal.add_images(self.collection_id, self._inputs(todo, report),
                                            total=len(todo), progress=self.ingest_progress)
        except ValueError as exc:
            if "no images" not in str(exc):  # every image was skipped as broken
                raise
            return None
        report.images_added += result.added
        report.images_present += result.already_present
        return result

    def sync_answers(self, annotations: Sequence[WildbookAnnotation],
                     report: SyncReport | None = None) -> AnswerPlan:
        """Delete the sync's stale answers and submit the missing ones."""
        report = report if report is not None else SyncReport()
        current = self.reidal.list_constraints(self.collection_id)
        present = {i.image_id for i in self.reidal.list_images(self.collection_id)}
        plan = plan_answers([a for a in annotations if a.annotation_id in present], current,
                            annotator_id=self.annotator_id,
                            link_encounters=self.link_encounters,
                            different_between_names=self.different_between_names,
                            max_named_for_different=self.max_named_for_different)
        for stale in plan.remove:
            self.reidal.delete_constraint(self.collection_id, stale.answer_id, actor=ACTOR,
                                          reason="no longer supported by the Wildbook names")
        for start in range(0, len(plan.add), MAX_ANSWERS_PER_CALL):
            result = self.reidal.submit_answers(
                self.collection_id, plan.add[start:start + MAX_ANSWERS_PER_CALL])
            report.contradictions += len(result.contradictions)
        report.same_added += plan.same
        report.different_added += plan.different
        report.answers_removed += len(plan.remove)
        report.links_skipped += plan.skipped
        if plan.note:
            report.notes.append(plan.note)
        return plan

    def push(self, proposals: Sequence[Proposal], report: SyncReport | None = None, *,
             recheck: bool = True) -> list[Proposal]:
        """POST the proposals; with ``recheck``, each encounter is read again first and
        one that carries an individual by now is dropped. Returns what was sent."""
        report = report if report is not None else SyncReport()
        send = []
        for p in proposals:
            if recheck and self.wildbook.get_encounter(p.encounter_id).get("individualId"):
                report.named_meanwhile += 1
                continue
            send.append(p)
        accepted = 0
        for start in range(0, len(send), PROPOSALS_PER_REQUEST):
            chunk = send[start:start + PROPOSALS_PER_REQUEST]
            answer = self.wildbook.post_proposals({
                "source": "reidal", "collectionId": self.collection_id,
                "proposals": [p.to_json(self.collection_id) for p in chunk]})
            accepted += int(answer.get("accepted", len(chunk)))
            report.rejected.extend(answer.get("rejected") or [])
        report.sent += len(send)
        report.accepted = accepted if send else report.accepted
        return send

    # ------------------------------------------------------------------ all of it

    def run(self, *, push: bool = True) -> SyncReport:
        """ensure_collection, pull, ingest, sync_answers, GetIdentities, proposals, push."""
        report = SyncReport()
        if self.ensure_collection():
            self.stage(f"created collection {self.collection_id!r}")
        self.stage(f"pulling annotations from {self.wildbook.base_url}"
                   + (f" (species {self.species})" if self.species else ""))
        anns = self.pull()
        report.annotations = len(anns)
        report.encounters = len({a.encounter_id for a in anns})
        report.named_annotations = sum(a.named for a in anns)
        report.individuals = len({a.individual_id for a in anns if a.named})
        self.stage(f"{report.annotations} annotations in {report.encounters} encounters; "
                   f"{report.named_annotations} named, of {report.individuals} individuals")
        if not anns:
            report.notes.append("Wildbook returned no annotations: nothing to do")
            return report
        self.ingest(anns, report)
        self.stage(f"images: {report.images_added} added, {report.images_present} already "
                   f"present" + (f", {report.images_skipped} left out (broken)"
                                 if report.images_skipped else ""))
        self.sync_answers(anns, report)
        self.stage(f"answers from Wildbook: +{report.same_added} SAME, "
                   f"+{report.different_added} DIFFERENT, -{report.answers_removed} stale"
                   + (f", {report.links_skipped} pair(s) already answered otherwise"
                      if report.links_skipped else ""))
        identities = self.reidal.get_identities(self.collection_id)
        report.identities = len(identities)
        report.contradictions = len(identities.contradictions)
        images = sum(x.size for x in identities.identities)
        self.stage(f"identities: {len(identities)} over {images} images, "
                   f"{identities.applied_answers} answers applied, "
                   f"{report.contradictions} contradiction(s)")
        proposals, conflicts = build_proposals(anns, identities)
        report.proposals = len(proposals)
        report.new_individual_proposals = sum(p.new_individual for p in proposals)
        report.conflicts = conflicts
        self.stage(f"proposals: {len(proposals)} unassigned encounter(s) "
                   f"({report.new_individual_proposals} new individual(s)), "
                   f"{len(conflicts)} conflict(s)")
        if push and proposals:
            self.push(proposals, report)
            self.stage(f"pushed {report.sent} proposal(s)"
                       + (f", {report.named_meanwhile} skipped (named meanwhile)"
                          if report.named_meanwhile else "")
                       + (f"; Wildbook accepted {report.accepted}"
                          if report.accepted is not None else "")
                       + (f", rejected {len(report.rejected)}" if report.rejected else ""))
        return report


__all__ = ["ACTOR", "DEFAULT_ANNOTATOR", "AnswerPlan", "Proposal", "SyncReport",
           "WildbookSync", "build_proposals", "group_key", "plan_answers",
           "unique_annotations"]
