"""``python -m reidal_wildbook sync --wildbook URL --reidal ADDR --collection ID``.

Pulls the annotations of a Wildbook, feeds them to a reidal collection (created when
missing), turns Wildbook's names into answers and pushes the identities back as
proposals, printing each stage. The Wildbook API token is read from an environment
variable (``--token-env``, default WILDBOOK_TOKEN), never from the command line, where
other users of the machine could read it. Exit status: 0 done, 1 failed (the error on
stderr, one line; REIDAL_DEBUG=1 shows the traceback), 2 usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from reidal_client import ReidalClient
from reidal_client.command_line import run_command
from reidal_client.progress import TextProgress
from reidal_wildbook.api import WildbookClient, WildbookError
from reidal_wildbook.sync import WildbookSync

TOKEN_ENV = "WILDBOOK_TOKEN"
SERVER_ENV = "REIDAL_SERVER"
DEFAULT_SERVER = "127.0.0.1:50051"


def _out(text: str) -> None:
    print(text, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reidal_wildbook",
        description="Wildbook <-> reidal: annotations in, proposed identities out.")
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="pull, ingest, answers from names, identities, push "
                                       "proposals")
    sync.add_argument("--wildbook", required=True, metavar="URL",
                      help="base URL of the Wildbook (e.g. https://zebra.wildbook.org)")
    sync.add_argument("--reidal", default=os.environ.get(SERVER_ENV, DEFAULT_SERVER),
                      metavar="HOST:PORT",
                      help=f"reidal server (default: ${SERVER_ENV} or {DEFAULT_SERVER})")
    sync.add_argument("--collection", required=True, help="reidal collection id")
    sync.add_argument("--species", default=None,
                      help="Wildbook taxonomy to pull (default: every encounter)")
    sync.add_argument("--token-env", default=TOKEN_ENV, metavar="NAME",
                      help=f"environment variable holding the Wildbook API token "
                           f"(default {TOKEN_ENV}; unset = no token)")
    sync.add_argument("--no-push", action="store_true",
                      help="compute proposals but do not send them")
    sync.add_argument("--different-between-names", action="store_true",
                      help="also add one DIFFERENT answer per pair of named individuals")
    sync.add_argument("--max-named-for-different", type=int, default=100, metavar="K",
                      help="... only up to K named individuals (default 100)")
    sync.add_argument("--no-link-encounters", action="store_true",
                      help="do not chain the annotations of one unnamed encounter")
    sync.add_argument("--no-crop", action="store_true",
                      help="send whole media assets instead of annotation boxes")
    sync.add_argument("--skip-broken-images", action="store_true",
                      help="leave out images that cannot be downloaded instead of failing")
    sync.add_argument("--annotator", default="wildbook",
                      help="annotator id of the answers derived from Wildbook")
    sync.add_argument("--page-size", type=int, default=100,
                      help="encounters per Wildbook search request")
    sync.add_argument("--timeout", type=float, default=30.0,
                      help="seconds per Wildbook request and per reidal call")
    sync.set_defaults(func=_sync)
    return parser


def _sync(args: argparse.Namespace) -> int:
    token = os.environ.get(args.token_env) or None
    wildbook = WildbookClient(args.wildbook, token=token, timeout_s=args.timeout,
                              page_size=args.page_size)
    bar = TextProgress("ingest", stream=sys.stdout)
    with ReidalClient(args.reidal, timeout_s=max(args.timeout, 60.0)) as reidal:
        sync = WildbookSync(
            wildbook, reidal, args.collection, species=args.species,
            annotator_id=args.annotator, link_encounters=not args.no_link_encounters,
            different_between_names=args.different_between_names,
            max_named_for_different=args.max_named_for_different, crop=not args.no_crop,
            skip_broken_images=args.skip_broken_images, stage=_out, ingest_progress=bar)
        report = sync.run(push=not args.no_push)
        bar.close()
    for line in report.conflicts:
        _out(f"  conflict: {line}")
    for line in report.notes:
        _out(f"  note: {line}")
    for item in report.rejected:
        _out(f"  rejected by Wildbook: {item}")
    if args.no_push:
        _out(f"not pushed (--no-push): {report.proposals} proposal(s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv), (WildbookError,))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
