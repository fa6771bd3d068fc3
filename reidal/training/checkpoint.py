"""Atomic training checkpoints: a crash mid-write never leaves a half-written ``last.pt``.

The state is written to a temporary file in the same folder, flushed to disk, then moved over
the old checkpoint with ``os.replace`` (atomic on POSIX and Windows when both paths are on one
file system), and the folder entry itself is synced. A reader therefore sees either the old
checkpoint or the new one, never a mix.

A checkpoint holds everything the next epoch depends on: model, optimiser, scheduler and
gradient-scaler states, the hybrid memory (features and labels), the next epoch number, the
fixed reliability threshold, every answer so far (with its id) and the reports of the epochs
already run. Random draws are derived from (seed, epoch), not carried, so a resumed job
repeats what the uninterrupted job would have done. Only tensors and plain values (numbers,
strings, lists, dicts) are stored, so loading never unpickles code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from reidal.core.constraints import Answer

CHECKPOINT_NAME = "last.pt"
FORMAT = "reidal.training.checkpoint/1"


def checkpoint_path(directory: str | Path) -> Path:
    return Path(directory) / CHECKPOINT_NAME


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/last.pt`` atomically; returns the path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(out)
    fd, tmp = tempfile.mkstemp(prefix=".last-", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(out, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return final
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def load_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """The last checkpoint in ``directory``, or None when there is none."""
    path = checkpoint_path(directory)
    if not path.exists():
        return None
    # weights_only: tensors and plain containers only, never arbitrary pickled objects
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a reidal training checkpoint (format "
                         f"{state.get('format') if isinstance(state, dict) else None!r})")
    return state


def answers_to_rows(answers: tuple[Answer, ...] | list[Answer]) -> list[tuple[int, int, bool, int]]:
    """Answers as plain tuples (i, j, same, answer_id): what a checkpoint stores."""
    return [(int(a.i), int(a.j), bool(a.same), int(a.answer_id)) for a in answers]


def rows_to_answers(rows: list[tuple[int, int, bool, int]]) -> list[Answer]:
    return [Answer(int(i), int(j), bool(s), int(k)) for i, j, s, k in rows]
