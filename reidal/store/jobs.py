"""The training-jobs aggregate."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from reidal.errors import InvalidArgument, NotFound
from reidal.store.database import Database, timestamp
from reidal.store.records import (
    JOB_CANCELLED,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_RUNNING,
    TrainingJobRecord,
)

_JOB_COLUMNS = frozenset({"state", "progress", "model_name", "model_version", "error_code",
                          "error_message"})


class Jobs:
    """Training jobs: queued, run by one store instance, cancellable from any."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, collection_id: str, config: Mapping[str, Any], *,
               base_model_name: str, base_model_version: str) -> TrainingJobRecord:
        job_id = uuid.uuid4().hex
        now = timestamp()
        with self._db.tx(collection_id) as db:
            db.execute("INSERT INTO training_jobs (id, collection_id, state, config,"
                       " base_model_name, base_model_version, created_at, updated_at, owner)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, collection_id, JOB_QUEUED, json.dumps(dict(config), default=str),
                        base_model_name, base_model_version, now, now, self._db.owner))
        return self.get(job_id)

    def update(self, job_id: str, **changes: Any) -> bool:
        """Set columns of a job (``progress`` a dict); a final state is never left. False
        when nothing changed: the job is final already (e.g. cancelled while queued)."""
        unknown = set(changes) - _JOB_COLUMNS
        if unknown:
            raise InvalidArgument(f"training jobs have no column(s) {sorted(unknown)}")
        if "progress" in changes:
            changes["progress"] = json.dumps(changes["progress"])
        cols = ", ".join(f"{k} = ?" for k in changes)
        with self._db.tx() as db:
            cur = db.execute(f"UPDATE training_jobs SET {cols}, updated_at = ? WHERE id = ?"
                             " AND state NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED')",
                             (*changes.values(), timestamp(), job_id))
            return cur.rowcount > 0

    def request_cancel(self, job_id: str) -> TrainingJobRecord:
        """Record that the job must stop, where every replica sees it: the process running
        the job reads ``cancel_requested`` between training steps and ends it CANCELLED. A
        job nobody runs ends CANCELLED at once: one still QUEUED (its runner finds it final
        and never starts) or one whose owner's store is closed (its process is gone). A
        final job is left as it is. Returns the job as stored afterwards; NotFound for an
        unknown id."""
        rows = self._db.query("SELECT owner FROM training_jobs WHERE id = ?", (job_id,))
        if not rows:
            raise NotFound(f"training job {job_id!r} not found")
        owner = rows[0]["owner"]
        # Ids are per store instance, so a dead owner never comes back. But on PostgreSQL a
        # live owner's mark is also missing for a moment after a database restart (until its
        # next readiness probe takes it again): its job is then CANCELLED here while it still
        # runs, and it stops at its next check (cancel_requested is set too); only one in the
        # middle of its export exports anyway (logged by the runner, the job stays CANCELLED).
        orphaned = not self._db.owner_alive(owner)
        stop_now = (JOB_QUEUED, JOB_RUNNING if orphaned else JOB_QUEUED)
        with self._db.tx() as db:
            db.execute("UPDATE training_jobs SET cancel_requested = 1, updated_at = ?,"
                       " state = CASE WHEN state IN (?, ?) THEN ? ELSE state END"
                       " WHERE id = ? AND state NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED')",
                       (timestamp(), *stop_now, JOB_CANCELLED, job_id))
        return self.get(job_id)

    def get(self, job_id: str) -> TrainingJobRecord:
        rows = self._db.query("SELECT * FROM training_jobs WHERE id = ?", (job_id,))
        if not rows:
            raise NotFound(f"training job {job_id!r} not found")
        return _training_job(rows[0])

    def all(self, collection_id: str = "") -> list[TrainingJobRecord]:
        sql = "SELECT * FROM training_jobs"
        args: tuple[Any, ...] = ()
        if collection_id:
            sql += " WHERE collection_id = ?"
            args = (collection_id,)
        return [_training_job(r) for r in self._db.query(sql + " ORDER BY created_at, id", args)]

    def fail_interrupted(self, message: str) -> int:
        """Mark FAILED (ABORTED) every QUEUED or RUNNING job that nobody runs any more (as
        :meth:`Operations.fail_unfinished` does for operations)."""
        return self._db.fail_abandoned("training_jobs", (JOB_QUEUED, JOB_RUNNING),
                                       "state = ?, error_code = 'ABORTED', error_message = ?",
                                       (JOB_FAILED, message))


def _training_job(r: Any) -> TrainingJobRecord:
    return TrainingJobRecord(
        r["id"], r["collection_id"], r["state"], json.loads(r["config"]),
        json.loads(r["progress"]), r["base_model_name"], r["base_model_version"],
        r["model_name"], r["model_version"], r["error_code"], r["error_message"],
        r["created_at"], r["updated_at"], bool(r["cancel_requested"]))
