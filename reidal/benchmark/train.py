"""`python -m reidal.benchmark.train`: ``python -m reidal.training`` with a simulated annotator.

The benchmark's protocol on one run, alone or under torchrun: with ``--sampler aas|random``
the pairs asked at each cycle start are answered from the dataset's identities by
:class:`reidal.simulation.oracle.SimulatedOracle` (``--error-rate`` flips answers). The
flags are those of :mod:`reidal.training.launch`; the annotator is passed in here, so the
production entry point (``python -m reidal.training``) never imports reidal.simulation.
"""

from __future__ import annotations

import sys

from reidal.simulation.oracle import SimulatedOracle
from reidal.training.launch import QUESTIONS_ENTRY
from reidal.training.launch import main as launch_main


def main(argv: list[str] | None = None) -> int:
    """Train as ``argv`` says, questions answered by a simulated annotator."""
    return launch_main(argv, annotator=SimulatedOracle, prog=QUESTIONS_ENTRY)


if __name__ == "__main__":
    sys.exit(main())
