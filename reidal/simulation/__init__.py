"""Simulation helpers for tests, benchmarks, the demo and experiments; never used to serve.

- ``synthetic``: re-ID-shaped embeddings with planted merges and splits;
- ``oracle``: a simulated annotator answering from ground truth (optionally noisy);
- ``loop``: the active-learning loop on fixed embeddings (sample, ask, refine, measure);
- ``reference``: naive dense implementations, ground truth for tests and benchmark baselines.

They depend on :mod:`reidal.core`, never the other way round: production code (the
services, workflows and the trainer) must run without anything here.
"""
