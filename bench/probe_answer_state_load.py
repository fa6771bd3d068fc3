"""Probe: where the first SubmitConstraints after a restart spends its time.

    .venv/bin/python bench/probe_answer_state_load.py [--answers 1000000]

The first write to a collection in a process builds its answer state
(:meth:`reidal.answer_state.AnswerState.load`) inside the write transaction. This fills a
SQLite store the way bench_server.py does (one collection of 20,000 images, ``--answers``
agreeing answers by one INSERT), opens it again as a fresh process would, and times each
part of the load one after the other, then the whole load once more. Prints the load
average: the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_server import answer_collection  # noqa: E402

from reidal.answer_state import AnswerState  # noqa: E402
from reidal.core.constraints import ConstraintSet  # noqa: E402
from reidal.store import Store  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--answers", type=int, default=1_000_000)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="probe-answer-state-") as tmp:
        store = Store(Path(tmp) / "data")
        t = time.perf_counter()
        answer_collection(store, "a", args.answers, np.random.default_rng(0))
        print(f"pre-fill {args.answers} answers: {time.perf_counter() - t:.1f} s, "
              f"load average {os.getloadavg()}", flush=True)
        store.close()
        store = Store(Path(tmp) / "data")  # what a restarted process opens
        parts: dict[str, float] = {}
        t = time.perf_counter()
        version = store.answer_log_version("a")
        excluded = frozenset(store.excluded_images("a"))
        parts["version + excluded images"] = time.perf_counter() - t
        t = time.perf_counter()
        store._query(  # noqa: SLF001 - the bare SQL of answer_rows, to split its cost
            "SELECT seq, image_a, image_b, label FROM answers WHERE collection_id = ?"
            " AND superseded_by IS NULL AND deleted_at IS NULL ORDER BY seq", ("a",))
        parts["SQL fetch of the current answers"] = time.perf_counter() - t
        t = time.perf_counter()
        rows = store.answer_rows("a")
        parts["answer_rows (SQL + one AnswerRow each)"] = time.perf_counter() - t
        t = time.perf_counter()
        kept = [r for r in rows if r.label != "UNSURE"
                and r.image_a not in excluded and r.image_b not in excluded]
        seq, a_ids, b_ids, labels = (list(c) for c in zip(*kept, strict=True))
        items: dict[str, int] = {}
        a = np.array([items.setdefault(x, len(items)) for x in a_ids], dtype=np.int64)
        b = np.array([items.setdefault(x, len(items)) for x in b_ids], dtype=np.int64)
        parts["filter + item index (a dict step per end)"] = time.perf_counter() - t
        t = time.perf_counter()
        cs = ConstraintSet.from_arrays(len(items), a, b,
                                       np.array(labels, dtype=object) == "SAME",
                                       np.array(seq, dtype=np.int64))
        parts["ConstraintSet.from_arrays"] = time.perf_counter() - t
        t = time.perf_counter()
        cs.warm()
        parts["ConstraintSet.warm"] = time.perf_counter() - t
        t = time.perf_counter()
        AnswerState.load(store, "a", version)
        parts["AnswerState.load, whole, again"] = time.perf_counter() - t
        for name, seconds in parts.items():
            print(f"{name:44s} {seconds:7.2f} s")
        print(f"load average {os.getloadavg()}")
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
