"""The images aggregate: images, where their pixels are, and their vectors."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from reidal.errors import FailedPrecondition, InvalidArgument, NotFound
from reidal.store.backend import Tx
from reidal.store.collections import Collections
from reidal.store.database import Database, id_chunks, timestamp
from reidal.store.records import ImageRecord, ImageRow, ImageSource


class Images:
    """Images (ingest, exclusion, deletion, listing), their sources and vectors."""

    def __init__(self, db: Database, collections: Collections) -> None:
        self._db = db
        self._collections = collections

    def add(self, collection_id: str, images: Iterable[ImageRecord]) -> tuple[int, int]:
        """Add images idempotently per image id (:meth:`ingest` without sources or
        vectors). Returns (added, already_present)."""
        return self.ingest(collection_id, list(images), {})

    def ingest(
        self,
        collection_id: str,
        images: Sequence[ImageRecord],
        sources: Mapping[str, ImageSource],
        *,
        model_name: str = "",
        model_version: str = "",
        vector_ids: Sequence[str] = (),
        vectors: np.ndarray | None = None,
    ) -> tuple[int, int]:
        """Add images with their sources and vectors in one transaction: all or nothing.

        Idempotent per image id (an id already present keeps its record and source).
        Vectors are stored for ``vector_ids`` under the model version; a collection whose
        model version is still empty is pinned to ``model_version``, and vectors of any
        other version than the collection's are refused.
        Returns (added, already_present).
        """
        vecs = None
        if vectors is not None or len(vector_ids):
            vecs = np.ascontiguousarray(vectors, dtype=np.float32)
            if vecs.ndim != 2 or vecs.shape[0] != len(vector_ids):
                raise InvalidArgument(
                    f"got {len(vector_ids)} image ids but vectors of shape {vecs.shape}")
            if not model_name or not model_version:
                raise InvalidArgument("vectors need a model name and version")
        added = present = 0
        with self._db.tx(collection_id) as db:
            self._pin_model(db, collection_id, model_name if vecs is not None else None,
                            model_version)
            (seq,) = db.execute(
                "SELECT COALESCE(MAX(seq) + 1, 0) FROM images WHERE collection_id = ?",
                (collection_id,),
            ).fetchone()
            now = timestamp()
            for img in images:
                if not img.image_id:
                    raise InvalidArgument("image id must be a non-empty string")
                cur = db.execute(
                    "INSERT INTO images (collection_id, image_id, seq, uri, name, metadata, added_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (collection_id, img.image_id, seq, img.uri, img.name,
                     json.dumps(img.metadata, sort_keys=True), now),
                )
                if cur.rowcount:
                    added += 1
                    seq += 1
                    src = sources.get(img.image_id)
                    if src is not None:
                        db.execute(
                            "INSERT INTO image_sources (collection_id, image_id, kind, sha256,"
                            " size) VALUES (?, ?, ?, ?, ?) ON CONFLICT (collection_id, image_id)"
                            " DO UPDATE SET kind = excluded.kind, sha256 = excluded.sha256,"
                            " size = excluded.size",
                            (collection_id, img.image_id, src.kind, src.sha256, src.size))
                else:
                    present += 1
            if vecs is not None and len(vector_ids):
                self._insert_vectors(db, collection_id, model_name, model_version,
                                     vector_ids, vecs)
        return added, present

    def _pin_model(self, db: Tx, collection_id: str, model_name: str | None,
                   model_version: str) -> None:
        """NotFound for an unknown collection; with a model (vectors about to be stored):
        pin a collection that pins no version yet to it, refuse vectors of any other
        model version than the one it pins (one model per collection)."""
        col = db.execute("SELECT model_name, model_version FROM collections WHERE id = ?",
                         (collection_id,)).fetchone()
        if col is None:
            raise NotFound(f"collection {collection_id!r} does not exist")
        if model_name is None:
            return
        if col["model_version"] == "":
            db.execute("UPDATE collections SET model_name = ?, model_version = ?"
                       " WHERE id = ?", (model_name, model_version, collection_id))
        elif (col["model_name"], col["model_version"]) != (model_name, model_version):
            raise FailedPrecondition(
                f"collection {collection_id!r} uses model {col['model_name']} version "
                f"{col['model_version']}, not {model_name} version {model_version}")

    @staticmethod
    def _insert_vectors(db: Tx, collection_id: str, model_name: str, model_version: str,
                        image_ids: Sequence[str], vecs: np.ndarray) -> None:
        db.executemany(
            "INSERT INTO vectors (collection_id, model_name, model_version, image_id,"
            " vector) VALUES (?, ?, ?, ?, ?) ON CONFLICT (collection_id, model_name,"
            " model_version, image_id) DO UPDATE SET vector = excluded.vector",
            [(collection_id, model_name, model_version, iid, v.tobytes())
             for iid, v in zip(image_ids, vecs, strict=True)],
        )

    def all(self, collection_id: str, *, include_excluded: bool = True) -> list[ImageRecord]:
        """Images in ingest order."""
        sql = "SELECT * FROM images WHERE collection_id = ?"
        if not include_excluded:
            sql += " AND excluded_reason IS NULL"
        rows = self._db.query(sql + " ORDER BY seq", (collection_id,))
        return [ImageRecord(r["image_id"], r["uri"], r["name"], json.loads(r["metadata"])) for r in rows]

    def get(self, collection_id: str, image_id: str) -> ImageRecord:
        """One image of the collection (NotFound when it is not one)."""
        rows = self._db.query("SELECT * FROM images WHERE collection_id = ? AND image_id = ?",
                              (collection_id, image_id))
        if not rows:
            raise NotFound(f"image {image_id!r} is not in collection {collection_id!r}")
        r = rows[0]
        return ImageRecord(r["image_id"], r["uri"], r["name"], json.loads(r["metadata"]))

    def page(self, collection_id: str, *, after_seq: int = -1,
             limit: int | None = None) -> list[ImageRow]:
        """Images in ingest order after position ``after_seq`` (for paging)."""
        sql = "SELECT * FROM images WHERE collection_id = ? AND seq > ? ORDER BY seq"
        args: list[Any] = [collection_id, after_seq]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [ImageRow(r["seq"], r["image_id"], r["uri"], r["name"], json.loads(r["metadata"]),
                         r["excluded_reason"], r["added_at"]) for r in self._db.query(sql, args)]

    def count(self, collection_id: str) -> tuple[int, int]:
        """(images, newest image position): what tells that images were added or removed."""
        r = self._db.query("SELECT COUNT(*), COALESCE(MAX(seq), -1) FROM images"
                           " WHERE collection_id = ?", (collection_id,))[0]
        return int(r[0]), int(r[1])

    def newest(self, collection_id: str) -> int:
        """The newest image position (-1 when none): one index lookup, however many images.
        An added image raises it and every removal moves the answers epoch
        (:meth:`delete`), so the two together tell that the images changed (state keys
        read them on every call; :meth:`count` scans the collection's images)."""
        r = self._db.query("SELECT MAX(seq) FROM images WHERE collection_id = ?",
                           (collection_id,))[0]
        return -1 if r[0] is None else int(r[0])

    def present(self, collection_id: str, image_ids: Iterable[str]) -> set[str]:
        """The ids among ``image_ids`` that are images of the collection."""
        out: set[str] = set()
        for marks, chunk in id_chunks(image_ids):
            out.update(r[0] for r in self._db.query(
                f"SELECT image_id FROM images WHERE collection_id = ? AND image_id IN ({marks})",
                (collection_id, *chunk)))
        return out

    def excluded(self, collection_id: str) -> dict[str, str]:
        rows = self._db.query(
            "SELECT image_id, excluded_reason FROM images"
            " WHERE collection_id = ? AND excluded_reason IS NOT NULL",
            (collection_id,),
        )
        return {r["image_id"]: r["excluded_reason"] for r in rows}

    def exclude(self, collection_id: str, image_id: str, reason: str, *, actor: str = "") -> None:
        with self._db.tx(collection_id) as db:
            cur = db.execute(
                "UPDATE images SET excluded_reason = ? WHERE collection_id = ? AND image_id = ?",
                (reason or "excluded", collection_id, image_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"image {image_id!r} is not in collection {collection_id!r}")
            self._db.bump_answers_epoch(db, collection_id)
            self._db.audit(db, collection_id, "exclude_image", actor,
                           {"image_id": image_id, "reason": reason})

    def restore(self, collection_id: str, image_id: str, *, actor: str = "") -> None:
        """Undo :meth:`exclude` (audited)."""
        with self._db.tx(collection_id) as db:
            cur = db.execute(
                "UPDATE images SET excluded_reason = NULL WHERE collection_id = ? AND image_id = ?",
                (collection_id, image_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"image {image_id!r} is not in collection {collection_id!r}")
            self._db.bump_answers_epoch(db, collection_id)
            self._db.audit(db, collection_id, "restore_image", actor, {"image_id": image_id})

    def delete(self, collection_id: str, image_id: str, *, actor: str = "") -> int:
        """Delete one image: its record, source, vectors of every version and saved
        identity, in one audited transaction. Answers about it stay stored but are retired
        (marked deleted by ``actor``, superseded ones too), so they never apply again, not
        even to a later image with the same id; answers about other images are untouched.
        Returns how many answers were retired. NotFound for an unknown collection or image.
        The caller collects the image's blob (Runtime.gc_blobs)."""
        self._collections.get(collection_id)
        with self._db.tx(collection_id) as db:
            cur = db.execute("DELETE FROM images WHERE collection_id = ? AND image_id = ?",
                             (collection_id, image_id))
            if cur.rowcount == 0:
                raise NotFound(f"image {image_id!r} is not in collection {collection_id!r}")
            for table in ("image_sources", "vectors", "identities"):
                db.execute(f"DELETE FROM {table} WHERE collection_id = ? AND image_id = ?",
                           (collection_id, image_id))
            epoch = self._db.bump_answers_epoch(db, collection_id)
            self._db.log_deletions(db, collection_id, epoch,
                                   "(image_a = ? OR image_b = ?) AND deleted_at IS NULL",
                                   (image_id, image_id))
            retired = db.execute(
                "UPDATE answers SET deleted_at = ?, deleted_by = ? WHERE collection_id = ?"
                " AND (image_a = ? OR image_b = ?) AND deleted_at IS NULL",
                (timestamp(), actor, collection_id, image_id, image_id)).rowcount
            self._db.audit(db, collection_id, "delete_image", actor,
                           {"image_id": image_id, "answers_retired": retired})
        return int(retired)

    def sources(self, collection_id: str,
                image_ids: Iterable[str] | None = None) -> dict[str, ImageSource]:
        """Where the pixels of (some of) a collection's images are, by image id (only the
        rows of ``image_ids`` are read when given: one image costs one indexed lookup)."""
        rows = self._rows_of_ids(
            "SELECT image_id, kind, sha256, size FROM image_sources WHERE collection_id = ?",
            (collection_id,), image_ids)
        return {r["image_id"]: ImageSource(r["kind"], r["sha256"], r["size"]) for r in rows}

    def referenced_blobs(self) -> set[str]:
        """SHA-256 of every blob some image of some collection still uses."""
        return {r[0] for r in self._db.query("SELECT DISTINCT sha256 FROM image_sources"
                                             " WHERE kind = 'data'")}

    def put_vectors(self, collection_id: str, model_name: str, model_version: str,
                    image_ids: Sequence[str], vectors: np.ndarray) -> None:
        """Store vectors of images of the collection; those of an image deleted meanwhile
        (:meth:`delete` while EmbedCollection ran) are dropped, so a later image with
        the same id never inherits them."""
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[0] != len(image_ids):
            raise InvalidArgument(
                f"got {len(image_ids)} image ids but vectors of shape {vecs.shape}"
            )
        with self._db.tx(collection_id) as db:
            present = {r[0] for marks, chunk in id_chunks(image_ids)
                       for r in db.execute(f"SELECT image_id FROM images WHERE collection_id = ?"
                                           f" AND image_id IN ({marks})",
                                           (collection_id, *chunk)).fetchall()}
            keep = [k for k, iid in enumerate(image_ids) if iid in present]
            self._insert_vectors(db, collection_id, model_name, model_version,
                                 [image_ids[k] for k in keep], vecs[keep])

    def add_vectors(self, collection_id: str, model_name: str, model_version: str,
                    image_ids: Sequence[str], vectors: np.ndarray, *, actor: str = "") -> None:
        """Store vectors computed elsewhere for images already in the collection, in one
        transaction (audited): NotFound for an image that is not one, the collection pinned
        as :meth:`ingest` pins it, and InvalidArgument when their length differs from the
        stored vectors of that version (checked inside the transaction, so two writers
        cannot store two lengths)."""
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._db.tx(collection_id) as db:
            self._pin_model(db, collection_id, model_name, model_version)
            present = {r[0] for marks, chunk in id_chunks(image_ids)
                       for r in db.execute(f"SELECT image_id FROM images WHERE collection_id = ?"
                                           f" AND image_id IN ({marks})",
                                           (collection_id, *chunk)).fetchall()}
            missing = [iid for iid in image_ids if iid not in present]
            if missing:
                raise NotFound(f"image(s) not in collection {collection_id!r}: {missing[:20]}")
            row = db.execute("SELECT vector FROM vectors WHERE collection_id = ? AND"
                             " model_name = ? AND model_version = ? LIMIT 1",
                             (collection_id, model_name, model_version)).fetchone()
            if row is not None and len(row[0]) // 4 != vecs.shape[1]:
                raise InvalidArgument(
                    f"vectors have {vecs.shape[1]} components but the stored vectors of "
                    f"{model_name} version {model_version} have {len(row[0]) // 4}")
            self._insert_vectors(db, collection_id, model_name, model_version, image_ids, vecs)
            # a replaced vector changes what sampling reads: no cached state may be served
            self._db.bump_answers_epoch(db, collection_id)
            self._db.audit(db, collection_id, "add_vectors", actor,
                           {"model_name": model_name, "model_version": model_version,
                         "count": len(image_ids)})

    def vectors(self, collection_id: str, model_name: str,
                model_version: str) -> tuple[list[str], np.ndarray]:
        """Vectors of one model version, in ingest order of the images (excluded ones included)."""
        rows = self._db.query(
            "SELECT v.image_id, v.vector FROM vectors v JOIN images i"
            " ON i.collection_id = v.collection_id AND i.image_id = v.image_id"
            " WHERE v.collection_id = ? AND v.model_name = ? AND v.model_version = ? ORDER BY i.seq",
            (collection_id, model_name, model_version),
        )
        if not rows:
            return [], np.empty((0, 0), dtype=np.float32)
        ids = [r["image_id"] for r in rows]
        mat = np.stack([np.frombuffer(r["vector"], dtype=np.float32) for r in rows])
        return ids, mat

    def vector_ids(self, collection_id: str, model_name: str, model_version: str,
                   image_ids: Iterable[str] | None = None) -> set[str]:
        """Ids of the images that have a vector of this model version (only among
        ``image_ids`` when given: an ingest batch looks up its own images, not the whole
        collection)."""
        rows = self._rows_of_ids(
            "SELECT image_id FROM vectors WHERE collection_id = ? AND model_name = ?"
            " AND model_version = ?", (collection_id, model_name, model_version), image_ids)
        return {r["image_id"] for r in rows}

    def _rows_of_ids(self, sql: str, args: tuple[Any, ...],
                     image_ids: Iterable[str] | None) -> list[Any]:
        """The rows of ``sql`` (a query on one collection), only those of ``image_ids``
        when given (looked up in chunks by the index, not by reading the collection)."""
        if image_ids is None:
            return list(self._db.query(sql, args))
        return [r for marks, chunk in id_chunks(image_ids)
                for r in self._db.query(f"{sql} AND image_id IN ({marks})", (*args, *chunk))]
