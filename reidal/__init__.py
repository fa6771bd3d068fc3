"""reidal: an active-learning server for animal re-identification.

The algorithms live in :mod:`reidal.core` (no gRPC), the gRPC servicers in
:mod:`reidal.services`, and the Triton-facing embedding code in :mod:`reidal.embedding`.
"""

__version__ = "0.1.0"
