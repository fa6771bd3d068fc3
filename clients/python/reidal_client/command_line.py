"""Running one command of a reidal command-line program: its exit status and one-line errors.

``reidal`` (:mod:`reidal.cli`) and ``reidal-wildbook`` (:mod:`reidal_wildbook.cli`) run
their commands through :func:`run_command`, so both print a failure the same way and the
Wildbook client needs only this package, not the server's command line.
"""

from __future__ import annotations

import argparse
import os
import sys

from reidal_client.errors import ReidalClientError

#: Set (to anything) to get the traceback of a failed command instead of one line.
DEBUG_ENV = "REIDAL_DEBUG"


def run_command(args: argparse.Namespace, expected: tuple[type[BaseException], ...] = ()) -> int:
    """Run ``args.func``; the exit status (0 ok, 1 failed, 130 interrupted). A client
    error, a ValueError, an OSError or one of ``expected`` (the program's own kinds of
    user error) prints one line (the traceback with $REIDAL_DEBUG set)."""
    try:
        return int(args.func(args) or 0)
    except (ReidalClientError, ValueError, OSError, *expected) as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
