"""The `reidal` parser, assembled from one module per command group, and :func:`main`.

Each command module (server, collections, vectors, answers, demo, bench, training, tokens)
registers its commands with ``add_commands(sub, client)`` and imports only
:mod:`reidal.cli.common`; this module is the one place that knows them all, so the command
modules never import each other.
"""

from __future__ import annotations

import argparse

# Each group by its full module name: no module here imports the package reidal.cli itself,
# whose __init__ imports this one.
import reidal.cli.answers as answers
import reidal.cli.bench as bench
import reidal.cli.collections as collections
import reidal.cli.demo as demo
import reidal.cli.server as server
import reidal.cli.tokens as tokens
import reidal.cli.training as training
import reidal.cli.vectors as vectors
from reidal.cli.common import client_options, run_command

#: The command groups in the order `reidal --help` lists them.
COMMAND_GROUPS = (server, collections, vectors, answers, demo, bench, training, tokens)


def build_parser() -> argparse.ArgumentParser:
    """The whole `reidal` parser: every group's commands, sharing one set of client options."""
    parser = argparse.ArgumentParser(
        prog="reidal",
        description="Active-learning server for animal re-identification (AAS + NP3).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = client_options()
    for group in COMMAND_GROUPS:
        group.add_commands(sub, client)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (0 ok, 1 failed, 2 usage, 130 interrupted)."""
    return run_command(build_parser().parse_args(argv))
