"""ConstraintService: answers, exclusions and identities (constraints.proto).

A thin layer over :mod:`reidal.answers`, :mod:`reidal.identities` and the store. Enum
values are checked here (a proto3 enum field accepts any number on the wire, so an unknown
value is refused by name and number, never stored).
"""

from __future__ import annotations

import threading

from reidal import errors
from reidal.answers import (
    TAGS,
    AnswerSubmission,
    answer_id,
    explain,
    parse_answer_id,
    submit,
)
from reidal.core.constraints import Contradiction
from reidal.grpc_server import ServiceBinding
from reidal.identities import IdentitiesResult, LatestIdentities
from reidal.request_checks import page_size, parse_page_token
from reidal.runtime import Runtime
from reidal.services._common import seconds_of, timestamp
from reidal.store import StoredAnswer
from reidal.v1 import common_pb2, constraints_pb2, constraints_pb2_grpc

SERVICE_NAME: str = constraints_pb2.DESCRIPTOR.services_by_name["ConstraintService"].full_name

_LABEL_OF = {constraints_pb2.ANSWER_LABEL_SAME: "SAME",
             constraints_pb2.ANSWER_LABEL_DIFFERENT: "DIFFERENT",
             constraints_pb2.ANSWER_LABEL_UNSURE: "UNSURE"}
_LABEL_PB = {v: k for k, v in _LABEL_OF.items()}
_TAG_OF = {constraints_pb2.AnswerTag.Value(f"ANSWER_TAG_{t.upper()}"): t for t in TAGS}
_TAG_PB = {v: k for k, v in _TAG_OF.items()}


def _label(value: int, where: str) -> str:
    if value not in _LABEL_OF:
        name = constraints_pb2.AnswerLabel.Name(value) if value in \
            constraints_pb2.AnswerLabel.values() else "unknown"
        raise errors.InvalidArgument(
            f"{where}: label {value} ({name}) is not SAME, DIFFERENT or UNSURE")
    return _LABEL_OF[value]


def submission(k: int, msg: constraints_pb2.AnswerInput) -> AnswerSubmission:
    target = msg.WhichOneof("target")
    if target is None:
        raise errors.InvalidArgument(f"answer {k} names no pair: set pair_id or images")
    if target == "pair_id" and not msg.pair_id:
        raise errors.InvalidArgument(f"answer {k} has an empty pair_id")
    tags = []
    for value in msg.tags:
        if value not in _TAG_OF:
            raise errors.InvalidArgument(
                f"answer {k}: tag {value} is not one of {sorted(_TAG_PB)} (AnswerTag)")
        tags.append(_TAG_OF[value])
    return AnswerSubmission(
        label=_label(msg.label, f"answer {k}"),
        pair_id=msg.pair_id if target == "pair_id" else "",
        image_a=msg.images.image_a if target == "images" else "",
        image_b=msg.images.image_b if target == "images" else "",
        annotator=msg.annotator_id, tags=tuple(tags),
        confidence=msg.confidence if msg.HasField("confidence") else None,
        note=msg.note,
        started_at=seconds_of(msg.started_at) if msg.HasField("started_at") else None,
        ended_at=seconds_of(msg.ended_at) if msg.HasField("ended_at") else None,
    )


def constraint_pb(a: StoredAnswer) -> constraints_pb2.StoredConstraint:
    if a.deleted:
        status = constraints_pb2.CONSTRAINT_STATUS_DELETED
    elif a.superseded_by is not None:
        status = constraints_pb2.CONSTRAINT_STATUS_SUPERSEDED
    else:
        status = constraints_pb2.CONSTRAINT_STATUS_CURRENT
    out = constraints_pb2.StoredConstraint(
        answer_id=answer_id(a.seq), image_a=a.image_a, image_b=a.image_b,
        label=_LABEL_PB[a.label], annotator_id=a.annotator,
        tags=[_TAG_PB[t] for t in a.tags if t in _TAG_PB], note=a.note,
        started_at=timestamp(a.started_at), ended_at=timestamp(a.ended_at),
        received_at=timestamp(a.received_at), batch_id=a.batch_id, pair_id=a.pair_id,
        request_id=a.request_id, status=status,
        superseded_by=answer_id(a.superseded_by) if a.superseded_by is not None else "",
    )
    if a.confidence is not None:
        out.confidence = a.confidence
    return out


class ConstraintsServicer(constraints_pb2_grpc.ConstraintServiceServicer):
    """ConstraintService over a :class:`reidal.runtime.Runtime`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._identities = LatestIdentities()
        # Per collection: the last GetIdentities response and the result it was built
        # from. LatestIdentities returns the same result object for every call of one
        # state, so a call of that state answers with this message (never mutated once
        # built; gRPC only serialises it) instead of building ~0.5 ms of protobuf at n =
        # 2,000 again. A new result (any change, or a new cycle) builds a new one.
        self._responses: dict[str, tuple[IdentitiesResult, constraints_pb2.GetIdentitiesResponse]] = {}
        self._responses_guard = threading.Lock()

    def binding(self) -> ServiceBinding:
        return ServiceBinding(
            name=SERVICE_NAME, servicer=self,
            add_to_server=constraints_pb2_grpc.add_ConstraintServiceServicer_to_server,
            readiness=self.runtime.store.ping)

    def _contradictions(self, collection_id: str,
                        found: list[Contradiction]) -> list[constraints_pb2.Contradiction]:
        seqs = {s for c in found for s in c.answer_ids}
        answers = self.runtime.store.answers.by_seq(collection_id, seqs)
        return [constraints_pb2.Contradiction(
            answers=[constraint_pb(answers[s]) for s in c.answer_ids if s in answers],
            dropped_answer_id=answer_id(c.dropped_answer_id), explanation=explain(c, answers))
            for c in found]

    def SubmitConstraints(self, request, context):  # noqa: N802 - gRPC method name
        subs = [submission(k, a) for k, a in enumerate(request.answers)]
        out = submit(self.runtime.store, request.collection_id, subs,
                     batch_id=request.batch_id, request_id=request.request_id)
        return constraints_pb2.SubmitConstraintsResponse(
            stored_count=out.stored, replayed_count=out.replayed,
            answer_ids=[answer_id(s) for s in out.seqs],
            contradictions=self._contradictions(request.collection_id, out.contradictions),
            superseded_count=out.superseded)

    def ListConstraints(self, request, context):  # noqa: N802
        store = self.runtime.store
        store.collections.get(request.collection_id)
        size = page_size(request.page_size)
        before = parse_page_token(request.page_token)
        label = _label(request.label, "filter") if request.label else ""
        rows = store.answers.page(
            request.collection_id, image_id=request.image_id, annotator=request.annotator_id,
            label=label, batch_id=request.batch_id, include_history=request.include_history,
            before_seq=before, limit=size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return constraints_pb2.ListConstraintsResponse(
            constraints=[constraint_pb(a) for a in rows],
            next_page_token=str(rows[-1].seq) if more else "")

    def DeleteConstraint(self, request, context):  # noqa: N802
        store = self.runtime.store
        cid = request.collection_id
        store.collections.get(cid)
        seq = parse_answer_id(request.answer_id, cid)
        try:
            restored = store.answers.delete(cid, seq, actor=request.actor, reason=request.reason)
        except errors.NotFound:
            raise errors.NotFound(f"answer {request.answer_id!r} does not exist in collection "
                                  f"{cid!r} (or is already deleted)") from None
        deleted = constraint_pb(store.answers.get(cid, seq))
        out = constraints_pb2.DeleteConstraintResponse(deleted=deleted)
        if restored is not None:
            out.restored.CopyFrom(constraint_pb(store.answers.get(cid, restored)))
        return out

    def ExcludeImage(self, request, context):  # noqa: N802
        store = self.runtime.store
        store.collections.get(request.collection_id)
        reason = request.reason or "excluded"
        store.images.exclude(request.collection_id, request.image_id, reason, actor=request.actor)
        return constraints_pb2.ExcludeImageResponse(image_id=request.image_id, excluded=True,
                                                    reason=reason)

    def RestoreImage(self, request, context):  # noqa: N802
        store = self.runtime.store
        store.collections.get(request.collection_id)
        store.images.restore(request.collection_id, request.image_id, actor=request.actor)
        return constraints_pb2.ExcludeImageResponse(image_id=request.image_id, excluded=False)

    def GetIdentities(self, request, context):  # noqa: N802
        cid = request.collection_id
        try:
            result = self._identities.get(self.runtime.store, cid, self.runtime.identities_lock)
        except errors.NotFound:
            with self._responses_guard:
                self._responses.pop(cid, None)
            raise
        with self._responses_guard:
            kept = self._responses.get(cid)
        if kept is not None and kept[0] is result:
            return kept[1]
        response = constraints_pb2.GetIdentitiesResponse(
            collection_id=cid,
            identities=[constraints_pb2.Identity(
                identity_id=s.identity_id, image_ids=list(s.image_ids), size=s.size,
                same_answers=s.same_answers, different_answers=s.different_answers,
                names=list(s.names), new_individual=s.new_individual,
                name_conflict=s.name_conflict) for s in result.identities],
            excluded_image_ids=result.excluded_ids,
            model=common_pb2.ModelRef(name=result.model_name, version=result.model_version),
            applied_answers=result.applied_answers,
            contradictions=self._contradictions(cid, result.contradictions),
            cycle=result.cycle)
        with self._responses_guard:
            self._responses[cid] = (result, response)
        return response
