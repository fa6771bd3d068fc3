"""Probe: where the first SubmitConstraints after a restart spends its time.

    .venv/bin/python bench/probe_answer_state_load.py [--answers 1000000]

The first write to a collection in a process builds its answer state, before the write
transaction (:meth:`reidal.answer_state.AnswerStates.prepare`): from a snapshot kept in the
store when there is one, else from every answer (:meth:`AnswerState.load`). This fills a
SQLite store the way bench_server.py does (one collection of 20,000 images, ``--answers``
agreeing answers by one INSERT), opens it again as a fresh process would, and times each
part one after the other: the old load's fetch (one row object an answer) beside the
columnar fetch, the constraint algebra, the whole load, then writing a snapshot, reading
it back and building the state from it. With ``--server``
it then starts ``reidal serve`` on that store and sends the first SubmitConstraints of the
big collection while another client keeps submitting one answer a call to a second,
empty collection: the first call's time, and the other client's calls during it (how
much the load blocks the rest of the server). Prints the load average: the machine is
shared.
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

from bench_server import Server, answer_collection, random_answers  # noqa: E402

from reidal.answer_state import AnswerState  # noqa: E402
from reidal.core.constraints import ConstraintSet  # noqa: E402
from reidal.store import Store  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--answers", type=int, default=1_000_000)
    ap.add_argument("--server", action="store_true",
                    help="also time the first SubmitConstraints through a real server")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="probe-answer-state-") as tmp:
        store = Store(Path(tmp) / "data")
        t = time.perf_counter()
        answer_collection(store, "a", args.answers, np.random.default_rng(0))
        answer_collection(store, "b", 0, np.random.default_rng(1))
        print(f"pre-fill {args.answers} answers: {time.perf_counter() - t:.1f} s, "
              f"load average {os.getloadavg()}", flush=True)
        store.close()
        store = Store(Path(tmp) / "data")  # what a restarted process opens
        parts: dict[str, float] = {}
        t = time.perf_counter()
        version = store.answers.log_version("a")
        store.images.excluded("a")
        parts["version + excluded images"] = time.perf_counter() - t
        t = time.perf_counter()
        store.answers.rows("a")
        parts["answers.rows: one AnswerRow each (the old load's fetch)"] = time.perf_counter() - t
        t = time.perf_counter()
        cols = store.answers.constraint_columns("a", version.max_seq)
        parts["answers.constraint_columns (the columnar fetch)"] = time.perf_counter() - t
        t = time.perf_counter()
        cs = ConstraintSet.from_arrays(len(cols.image_ids), cols.a, cols.b, cols.same, cols.seqs)
        cs.warm()
        parts["ConstraintSet.from_arrays + warm"] = time.perf_counter() - t
        t = time.perf_counter()
        state = AnswerState.load(store, "a", version)
        parts["AnswerState.load, whole (no snapshot)"] = time.perf_counter() - t
        t = time.perf_counter()
        data = state.encode()
        parts[f"AnswerState.encode ({len(data) / 1e6:.1f} MB)"] = time.perf_counter() - t
        t = time.perf_counter()
        store.answers.put_snapshot("a", version, data)
        parts["answers.put_snapshot"] = time.perf_counter() - t
        t = time.perf_counter()
        snapshot = store.answers.snapshot("a")
        parts["answers.snapshot (read it back)"] = time.perf_counter() - t
        t = time.perf_counter()
        assert snapshot is not None
        AnswerState.decode(*snapshot)
        parts["AnswerState.decode (the state from the snapshot)"] = time.perf_counter() - t
        for name, seconds in parts.items():
            print(f"{name:44s} {seconds:7.2f} s")
        print(f"load average {os.getloadavg()}")
        store.close()
        if args.server:
            first_submit_beside_others(Path(tmp) / "data")
    return 0


def first_submit_beside_others(data: Path) -> None:
    import threading

    from reidal.v1 import constraints_pb2, constraints_pb2_grpc

    server = Server(data, ["sampling", "constraints"])
    try:
        stub = constraints_pb2_grpc.ConstraintServiceStub(server.channel())
        other = constraints_pb2_grpc.ConstraintServiceStub(server.channel())
        rng = np.random.default_rng(2)
        other.SubmitConstraints(constraints_pb2.SubmitConstraintsRequest(  # b's state built
            collection_id="b", answers=random_answers("b", rng, 1)), timeout=600)
        latencies: list[float] = []
        done = threading.Event()

        def others() -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                other.SubmitConstraints(constraints_pb2.SubmitConstraintsRequest(
                    collection_id="b", answers=random_answers("b", rng, 1)), timeout=600)
                latencies.append(time.perf_counter() - t0)

        thread = threading.Thread(target=others)
        thread.start()
        time.sleep(1.0)
        before = len(latencies)
        t0 = time.perf_counter()
        stub.SubmitConstraints(constraints_pb2.SubmitConstraintsRequest(
            collection_id="a", answers=random_answers("a", np.random.default_rng(3), 1)),
            timeout=3600)
        first = time.perf_counter() - t0
        done.set()
        thread.join()
        during = latencies[before:]
        print(f"first SubmitConstraints of 'a' after the start: {first:.2f} s; meanwhile "
              f"{len(during)} one-answer calls to 'b', slowest {max(during):.2f} s, median "
              f"{float(np.median(during)):.3f} s; load average {os.getloadavg()}")
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
