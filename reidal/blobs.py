"""Image bytes kept beside the database, named by their SHA-256 (content addressed).

Why keep them: vectors are tied to one model version, and after training the collection is
re-embedded by the new version; the images a client sent as bytes must still be there. Why
by content: the same photo sent twice (or to two collections) is stored once, a resend is
recognised, and a file is never half-written under its final name (written aside, fsynced,
renamed), so a crash leaves either the whole blob or none.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: Threads writing (and fsyncing) the blobs of one ingest batch at once (OURS).
BLOB_WRITERS = 8


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    """``root/ab/abcdef...``: one file per distinct content."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError(f"not a SHA-256 hex digest: {sha!r}")
        return self.root / sha[:2] / sha

    def put(self, data: bytes) -> str:
        """Store ``data`` durably (idempotent); returns its SHA-256."""
        sha = sha256_hex(data)
        final = self.path(sha)
        if final.exists():
            return sha
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return sha

    def put_many(self, blobs: Sequence[bytes], workers: int = BLOB_WRITERS) -> list[str]:
        """:meth:`put` each of ``blobs`` on up to ``workers`` threads: every file is still
        fsynced before this returns, but the disk overlaps the fsyncs (measured on this
        project's VM: 32 small files 0.44-0.64 s one by one, 0.08-0.18 s on 8-16 threads)."""
        if len(blobs) <= 1 or workers <= 1:
            return [self.put(b) for b in blobs]
        with ThreadPoolExecutor(min(workers, len(blobs)),
                                thread_name_prefix="reidal-blob-write") as pool:
            return list(pool.map(self.put, blobs))

    def get(self, sha: str) -> bytes:
        try:
            return self.path(sha).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"blob {sha} is missing from {self.root}") from None

    def all(self) -> set[str]:
        return {p.name for p in self.root.glob("??/*") if not p.name.startswith(".")}

    def remove_except(self, keep: Iterable[str]) -> int:
        """Delete every blob not in ``keep`` (after a collection was deleted); returns how
        many were removed."""
        keep_set = set(keep)
        removed = 0
        for sha in self.all() - keep_set:
            with contextlib.suppress(FileNotFoundError):
                self.path(sha).unlink()
                removed += 1
        return removed
