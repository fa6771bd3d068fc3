"""`reidal token create`: access tokens for a server run with --auth-tokens."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from reidal.cli.common import out


def _token_create(args: argparse.Namespace) -> int:
    from reidal.auth import ALL_COLLECTIONS, add_entry, create_token

    cols = [c.strip() for c in args.collections.split(",") if c.strip()]
    token, entry = create_token(args.name, ALL_COLLECTIONS if cols == [ALL_COLLECTIONS] else cols,
                                role=args.role, annotator=args.annotator)
    if args.tokens_file:
        add_entry(args.tokens_file, entry)
        out(token)
        print(f"added {entry.name!r} to {args.tokens_file}; the token above is shown only "
              "once", file=sys.stderr, flush=True)
    else:
        import json

        out(token)
        out(json.dumps(entry.to_json()))
        print("line 1: the token (shown only once; give it to its user); line 2: the entry "
              "to add to the tokens file's \"tokens\" list", file=sys.stderr, flush=True)
    return 0


def add_commands(sub: Any, client: argparse.ArgumentParser) -> None:
    """Register this group's commands on ``sub`` (``client``: the shared server-connection
    options, a parent parser)."""
    tok = sub.add_parser("token", help="access tokens for a server run with --auth-tokens")
    tsub = tok.add_subparsers(dest="action", required=True, metavar="ACTION")
    tcreate = tsub.add_parser(
        "create", help="make a new random token and its tokens-file entry",
        description="Print a new token (once: only its SHA-256 is stored) and the entry for "
                    "the server's tokens file, or add the entry to --tokens-file. The "
                    "server reads the file again when it changes.")
    tcreate.add_argument("--name", required=True,
                         help="who or what holds the token (logged; the default annotator)")
    tcreate.add_argument("--collections", required=True, metavar="ID[,ID...]|*",
                         help="collections it may use, comma-separated, or * for all")
    tcreate.add_argument("--role", default="annotator", choices=["reader", "annotator", "admin"],
                         help="reader: read only; annotator: also pairs and answers; admin: "
                              "also create, delete, ingest, train (default: %(default)s)")
    tcreate.add_argument("--annotator", default="",
                         help="record every answer of this token under this name (enforced)")
    tcreate.add_argument("--tokens-file", default=None, metavar="JSON",
                         help="add the entry to this tokens file (created when missing)")
    tcreate.set_defaults(func=_token_create)
