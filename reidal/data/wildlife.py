"""Real re-ID image sets in the WildlifeDatasets layout, so every command runs on user data.

The layout (https://github.com/WildlifeDatasets/wildlife-datasets) is one metadata CSV per
dataset: required columns ``image_id``, ``identity`` and ``path`` (relative to the
dataset folder); optional ``species``, ``date``, ``split``, ``viewpoint`` and anything else.
An empty identity or ``unknown`` marks an unlabelled image, the normal case for a
collection that active learning is about to label.

Read with the csv module (no pandas): a metadata file is small and its errors should point
at a line a person can open and fix.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REQUIRED_COLUMNS = ("image_id", "identity", "path")
#: Identity values (compared lower-cased, stripped) that mean "no label yet".
UNLABELLED_VALUES = frozenset({"", "unknown"})


@dataclass(frozen=True)
class ImageRecord:
    """One image: its id, its identity (None when unlabelled), where it is, and the rest."""

    image_id: str
    identity: str | None
    path: Path
    metadata: dict[str, str]


@dataclass
class WildlifeDataset:
    """Records in CSV order; ``root`` is the folder relative paths were resolved against."""

    root: Path
    records: list[ImageRecord]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    @property
    def image_ids(self) -> np.ndarray:
        return np.array([r.image_id for r in self.records], dtype=object)

    @property
    def identities(self) -> np.ndarray:
        """Identity per image as an object array; None where unlabelled."""
        return np.array([r.identity for r in self.records], dtype=object)

    @property
    def paths(self) -> list[Path]:
        return [r.path for r in self.records]

    @property
    def is_labelled(self) -> np.ndarray:
        return np.array([r.identity is not None for r in self.records], dtype=bool)

    @property
    def identity_names(self) -> list[str]:
        """Sorted distinct identities (unlabelled excluded): the meaning of :meth:`labels`."""
        return sorted({r.identity for r in self.records if r.identity is not None})

    def labels(self) -> np.ndarray:
        """int64 code per image, indexing :attr:`identity_names`; -1 where unlabelled.

        The -1 convention is the one :func:`reidal.core.validation.check_labels` accepts.
        """
        index = {name: k for k, name in enumerate(self.identity_names)}
        return np.array(
            [-1 if r.identity is None else index[r.identity] for r in self.records],
            dtype=np.int64,
        )

    def column(self, name: str) -> np.ndarray | None:
        """An optional metadata column as an object array (None where a row lacks it), or
        None when no row has it at all."""
        if not any(name in r.metadata for r in self.records):
            return None
        return np.array([r.metadata.get(name) for r in self.records], dtype=object)

    @property
    def splits(self) -> np.ndarray | None:
        return self.column("split")

    @property
    def species(self) -> np.ndarray | None:
        return self.column("species")

    def subset(self, index: Sequence[int] | np.ndarray) -> WildlifeDataset:
        """The records at ``index`` (integer positions or a boolean mask), same root."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(
                    f"boolean mask must have length {len(self)}, got shape {idx.shape}"
                )
            idx = np.flatnonzero(idx)
        elif idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"index must be integers or a boolean mask, got dtype {idx.dtype}")
        return WildlifeDataset(self.root, [self.records[int(i)] for i in idx.reshape(-1)])

    def filter_split(self, *splits: str) -> WildlifeDataset:
        """Only the images whose ``split`` column is one of ``splits``."""
        column = self.splits
        if column is None:
            raise ValueError("this dataset has no 'split' column to filter on")
        if not splits:
            raise ValueError("name at least one split, e.g. filter_split('train')")
        wanted = set(splits)
        known = {s for s in column if s is not None}
        missing = wanted - known
        if missing:
            raise ValueError(
                f"unknown split(s) {sorted(missing)}; this dataset has {sorted(known)}"
            )
        return self.subset(np.array([s in wanted for s in column], dtype=bool))


def load_wildlife_csv(
    csv_path: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    *,
    check_files: bool = True,
    unlabelled: Iterable[str] = UNLABELLED_VALUES,
) -> WildlifeDataset:
    """Read a WildlifeDatasets metadata CSV.

    Relative ``path`` values resolve against ``root`` when given, else against the CSV's
    folder; absolute ones are kept. Every column other than the three required ones is kept,
    as text, in each record's ``metadata``. Raises ``ValueError`` naming the file, the line
    and the problem for a missing column, a malformed row, an empty id or path, a
    duplicate image_id, or (with ``check_files``) an image file that does not exist.
    """
    csv_file = Path(csv_path)
    base = Path(root) if root is not None else csv_file.parent
    no_label = {s.strip().lower() for s in unlabelled}

    def fail(line: int, problem: str) -> ValueError:
        return ValueError(f"{csv_file}, line {line}: {problem}")

    try:
        fh = open(csv_file, newline="", encoding="utf-8-sig")
    except OSError as err:
        raise ValueError(f"{csv_file}: cannot open metadata CSV ({err.strerror})") from err
    with fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{csv_file}: the file is empty (expected a header line)") from None
        except csv.Error as err:
            raise fail(reader.line_num, f"not valid CSV ({err})") from None
        columns = [c.strip() for c in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise fail(1, f"missing required column(s) {missing}; the header has {columns}")
        dupes = sorted({c for c in columns if columns.count(c) > 1})
        if dupes:
            raise fail(1, f"column name(s) {dupes} appear more than once")
        pos = {c: k for k, c in enumerate(columns)}
        extra = [c for c in columns if c not in REQUIRED_COLUMNS and c]

        records: list[ImageRecord] = []
        first_line: dict[str, int] = {}
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise fail(reader.line_num, f"not valid CSV ({err})") from None
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue  # blank line
            if len(row) != len(columns):
                raise fail(line, f"expected {len(columns)} fields, found {len(row)}")
            image_id = row[pos["image_id"]].strip()
            if not image_id:
                raise fail(line, "empty image_id")
            if image_id in first_line:
                raise fail(
                    line, f"duplicate image_id {image_id!r} (first on line {first_line[image_id]})"
                )
            first_line[image_id] = line
            rel = row[pos["path"]].strip()
            if not rel:
                raise fail(line, f"empty path for image_id {image_id!r}")
            path = Path(rel)
            if not path.is_absolute():
                path = base / path
            if check_files and not path.is_file():
                raise fail(line, f"image file not found: {path} (image_id {image_id!r})")
            ident = row[pos["identity"]].strip()
            identity = None if ident.lower() in no_label else ident
            metadata = {c: row[pos[c]].strip() for c in extra}
            records.append(ImageRecord(image_id, identity, path, metadata))
    return WildlifeDataset(root=base, records=records)
