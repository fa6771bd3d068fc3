"""The schema both engines share (in SQLite's DDL; :mod:`reidal.store.postgres` maps the
types) and how an older database upgrades in place."""

from __future__ import annotations

from reidal.store.backend import Tx

#: Version of the schema below, recorded in ``meta``; a newer store opens an older file.
SCHEMA_VERSION = 8

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS collections (
    id TEXT PRIMARY KEY,
    species TEXT NOT NULL DEFAULT '',
    model_name TEXT NOT NULL DEFAULT '',
    model_version TEXT NOT NULL DEFAULT '',
    params TEXT NOT NULL DEFAULT '{}',
    cycle INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    image_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    uri TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{}',
    excluded_reason TEXT,
    added_at REAL NOT NULL,
    PRIMARY KEY (collection_id, image_id)
);
CREATE TABLE IF NOT EXISTS vectors (
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    image_id TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (collection_id, model_name, model_version, image_id)
);
CREATE TABLE IF NOT EXISTS answers (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    image_a TEXT NOT NULL,
    image_b TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('SAME', 'DIFFERENT', 'UNSURE')),
    annotator TEXT NOT NULL DEFAULT '',
    confidence REAL,
    tags TEXT NOT NULL DEFAULT '[]',
    note TEXT NOT NULL DEFAULT '',
    started_at REAL,
    ended_at REAL,
    received_at REAL NOT NULL,
    batch_id TEXT NOT NULL DEFAULT '',
    pair_id TEXT NOT NULL DEFAULT '',
    request_id TEXT NOT NULL DEFAULT '',
    superseded_by INTEGER,
    deleted_at REAL,
    deleted_by TEXT,
    CHECK (image_a < image_b)
);
CREATE INDEX IF NOT EXISTS answers_by_pair ON answers (collection_id, image_a, image_b);
-- Schema 5: the newest answer of a collection, and the answers a given answer superseded,
-- found without a scan (the incremental answer state reads both inside every submit).
CREATE INDEX IF NOT EXISTS answers_by_seq ON answers (collection_id, seq);
CREATE INDEX IF NOT EXISTS answers_by_superseder ON answers (collection_id, superseded_by);
CREATE TABLE IF NOT EXISTS requests (
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    request_id TEXT NOT NULL,
    response TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (collection_id, request_id)
);
CREATE TABLE IF NOT EXISTS training_jobs (
    id TEXT PRIMARY KEY,
    collection_id TEXT NOT NULL,
    state TEXT NOT NULL,
    config TEXT NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    base_model_name TEXT NOT NULL DEFAULT '',
    base_model_version TEXT NOT NULL DEFAULT '',
    model_name TEXT NOT NULL DEFAULT '',
    model_version TEXT NOT NULL DEFAULT '',
    error_code TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS training_jobs_by_collection ON training_jobs (collection_id);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id TEXT NOT NULL,
    action TEXT NOT NULL,
    actor TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '{}',
    at REAL NOT NULL
);
-- Schema 2 (tables only added, so a schema-1 file upgrades in place).
-- Where an image's pixels are: bytes kept as a blob (kind 'data', sha256 of the bytes) or
-- a URI the server reads (kind 'uri', sha256 of the URI text). Lets AddImages tell a
-- resent image from a changed one, and EmbedCollection re-embed a collection.
CREATE TABLE IF NOT EXISTS image_sources (
    collection_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('data', 'uri')),
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (collection_id, image_id),
    FOREIGN KEY (collection_id, image_id) REFERENCES images (collection_id, image_id)
        ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS batches (
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    batch_id TEXT NOT NULL,
    cycle INTEGER NOT NULL,
    budget INTEGER NOT NULL,
    reason TEXT NOT NULL,
    finished INTEGER NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    filter TEXT NOT NULL DEFAULT '{}',
    n_items INTEGER NOT NULL,
    stats TEXT NOT NULL DEFAULT '{}',
    request_id TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    PRIMARY KEY (collection_id, batch_id)
);
CREATE INDEX IF NOT EXISTS batches_by_cycle ON batches (collection_id, cycle);
CREATE UNIQUE INDEX IF NOT EXISTS batches_by_request ON batches (collection_id, request_id)
    WHERE request_id != '';
CREATE TABLE IF NOT EXISTS batch_pairs (
    collection_id TEXT NOT NULL,
    pair_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    image_a TEXT NOT NULL,
    image_b TEXT NOT NULL,
    pool TEXT NOT NULL,
    region INTEGER NOT NULL,
    probability REAL NOT NULL,
    similarity REAL NOT NULL,
    PRIMARY KEY (collection_id, pair_id),
    FOREIGN KEY (collection_id, batch_id) REFERENCES batches (collection_id, batch_id)
        ON DELETE CASCADE,
    CHECK (image_a < image_b)
);
-- Schema 6: a request answered with an existing open batch (GetQueryPairs on an unchanged
-- state) is recorded here, so its retry returns that batch as a first call's retry does.
CREATE TABLE IF NOT EXISTS batch_requests (
    collection_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    PRIMARY KEY (collection_id, request_id),
    FOREIGN KEY (collection_id, batch_id) REFERENCES batches (collection_id, batch_id)
        ON DELETE CASCADE
);
-- Schema 7: the answers each step of the answers epoch retired (a deleted answer, a deleted
-- image's answers) and the answer a deletion made current again, so a process's answer
-- state (reidal.answer_state) applies a deletion instead of loading every answer again.
CREATE TABLE IF NOT EXISTS answer_deletions (
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    restored INTEGER,
    PRIMARY KEY (collection_id, epoch, seq)
);
-- Schema 8: the last snapshot of a collection's answer state (a cache: the arrays of its
-- current SAME / DIFFERENT answers at one answers version), so a restarted process loads
-- it and catches up instead of fetching every answer (reidal.answer_state).
CREATE TABLE IF NOT EXISTS answer_snapshots (
    collection_id TEXT PRIMARY KEY REFERENCES collections(id) ON DELETE CASCADE,
    created_at REAL NOT NULL,
    epoch INTEGER NOT NULL,
    max_seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    written_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_by_seq ON images (collection_id, seq);
CREATE INDEX IF NOT EXISTS batch_pairs_by_batch ON batch_pairs (collection_id, batch_id, position);
CREATE INDEX IF NOT EXISTS batch_pairs_by_images ON batch_pairs (collection_id, image_a, image_b);
-- The identity of every image at the last GetIdentities, so ids stay stable across calls.
CREATE TABLE IF NOT EXISTS identities (
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    image_id TEXT NOT NULL,
    identity_id TEXT NOT NULL,
    PRIMARY KEY (collection_id, image_id)
);
-- Per-collection counters (e.g. the next identity number: identity ids are never reused).
CREATE TABLE IF NOT EXISTS counters (
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (collection_id, name)
);
CREATE TABLE IF NOT EXISTS operations (
    operation_id TEXT PRIMARY KEY,
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('PENDING', 'RUNNING', 'SUCCEEDED', 'FAILED')),
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    stage TEXT NOT NULL DEFAULT '',
    error_code TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS operations_by_collection ON operations (collection_id, created_at);
"""

#: Columns added to a table after its first release, as (table, column, definition): a
#: store adds the missing ones when it opens, so an older database upgrades in place.
#: Schema 3: ``owner``, the store instance (process) that runs an operation or a job.
#: Schema 4: ``cancel_requested`` of a training job (1: CancelJob asked, on any replica; the
#: process running the job reads it and stops).
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("operations", "owner", "TEXT NOT NULL DEFAULT ''"),
    ("training_jobs", "owner", "TEXT NOT NULL DEFAULT ''"),
    ("training_jobs", "cancel_requested", "INTEGER NOT NULL DEFAULT 0"),
)


def record_version(db: Tx, version: int) -> None:
    db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
               " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(version),))
