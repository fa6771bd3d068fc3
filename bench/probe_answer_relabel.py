"""Probe: what a relabel or a deletion costs the kept answer state of a large collection.

    .venv/bin/python bench/probe_answer_relabel.py [--answers 1000000] [--items 20000]
                                                   [--identities 2000] [--rounds 6]

Builds a :class:`~reidal.core.constraints.ConstraintSet` of ``--answers`` answers on
``--items`` images drawn as the serving bench draws them (a hidden identity per image;
half the pairs inside one identity, half at random; each labelled by the identities, so
they agree), then ``--rounds`` times relabels a random answer (``replace`` by the other
label: a SAME turned DIFFERENT contradicts its group) and deletes that new answer again
(``remove``), timing each. Every random pair of the bench's mix joins one giant component
of the answer graph, so a rebuild of everything costs what a full build costs there; run
it with ``PYTHONPATH`` at another tree to compare. Prints the load average.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from reidal.core.constraints import Answer, ConstraintSet


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--answers", type=int, default=1_000_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--identities", type=int, default=2_000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    n, m = args.items, args.answers
    ident = rng.integers(0, args.identities, n)
    order = np.argsort(ident, kind="stable")
    start = np.searchsorted(ident[order], np.arange(args.identities + 1))
    a, b = rng.integers(0, n, m), rng.integers(0, n, m)
    half = m // 2
    g = ident[a[:half]]
    b[:half] = order[start[g] + (rng.random(half) * (start[g + 1] - start[g])).astype(np.int64)]
    keep = a != b
    a, b = a[keep], b[keep]
    same = ident[a] == ident[b]
    print(f"# load average {os.getloadavg()[0]:.1f}")
    t = time.perf_counter()
    cs = ConstraintSet.from_arrays(n, a, b, same, np.arange(len(a)))
    cs.warm()
    print(f"build: {len(a)} answers ({same.mean():.2f} SAME) on {n} images: "
          f"{time.perf_counter() - t:.2f} s")
    next_id = len(a)
    for k in range(args.rounds):
        x = int(rng.integers(half if k % 2 == 0 else len(a)))
        old = cs.answer(x)
        t = time.perf_counter()
        found = cs.replace(x, Answer(old.i, old.j, not old.same, next_id))
        relabel = time.perf_counter() - t
        t = time.perf_counter()
        cs.remove(next_id)
        delete = time.perf_counter() - t
        next_id += 1
        print(f"relabel {'SAME->DIFFERENT' if old.same else 'DIFFERENT->SAME'}: {relabel:.4f} s"
              f"{' (contradiction)' if found else ''}; delete it: {delete:.4f} s")
    print(f"# load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
