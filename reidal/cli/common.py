"""What every `reidal` command shares: the server-connection options, the client they
make, one-line errors and exit statuses, text tables.

Every client command talks to ``--server host:port`` (default: $REIDAL_SERVER, else
127.0.0.1:50051) through :class:`reidal_client.ReidalClient`, so it gets the client's
deadlines and retries. A failure prints the server's message (``error: NOT_FOUND: ...``)
on stderr and exits 1, without a traceback (set REIDAL_DEBUG=1 to see it); a usage error
exits 2. Against a server with TLS, pass ``--tls-ca`` (and ``--tls-cert/--tls-key`` for
mutual TLS); with access tokens, put the token in $REIDAL_TOKEN or a file given by
``--token-file`` (never on the command line, where ``ps`` shows it). Nothing here imports
a command module, so the command modules import this one without a cycle.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reidal_client.command_line import DEBUG_ENV  # noqa: F401 - the CLI's debug switch
from reidal_client.command_line import run_command as run_client_command

#: Environment variable naming the server of the client commands.
SERVER_ENV = "REIDAL_SERVER"
#: Environment variable holding the access token of the client commands.
TOKEN_ENV = "REIDAL_TOKEN"
DEFAULT_SERVER = "127.0.0.1:50051"
#: ClusteringParams.mode, SamplingParams.sampler and SamplingParams.os_similarity values
#: (reidal.core.params' and reidal.collection_state's, kept here so building the parser
#: imports no algorithm; test_cli_choices_match_the_server's).
CLUSTERING_MODES = ("fixed", "calibrated")
SAMPLERS = ("aas", "aas-continued")
OS_SIMILARITIES = ("jaccard", "cosine")


class CliError(Exception):
    """A problem the user can fix (bad file, bad option); printed without a traceback."""


def out(text: str = "") -> None:
    """One line of a command's result on stdout, flushed (scripts read it as it comes)."""
    print(text, flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A left-aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in r] for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]
    numeric = [all(isinstance(r[k], int | float) and not isinstance(r[k], bool)
                   for r in rows) and bool(rows) for k in range(len(headers))]
    lines = []
    for r in cells:
        lines.append("  ".join(c.rjust(w) if num else c.ljust(w)
                               for c, w, num in zip(r, widths, numeric, strict=True)).rstrip())
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def connect(args: argparse.Namespace) -> Any:
    """The :class:`reidal_client.ReidalClient` the client options (``client_options``) ask for."""
    from reidal_client import ReidalClient

    return ReidalClient(args.server, timeout_s=args.timeout, retries=args.retries,
                        tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                        tls_key=args.tls_key, token=access_token(args))


def access_token(args: argparse.Namespace) -> str | None:
    """The access token: --token-file, else $REIDAL_TOKEN, else none."""
    if args.token_file:
        text = Path(args.token_file).read_text(encoding="utf-8").strip()
        if not text:
            raise CliError(f"token file {args.token_file} is empty")
        return text
    return os.environ.get(TOKEN_ENV, "").strip() or None


def budget_arg(text: str | None) -> int | float | None:
    """A ``--budget`` value: None (the collection's default), a pair count or a fraction."""
    from reidal_client import parse_budget

    return None if text is None else parse_budget(text)


def client_options() -> argparse.ArgumentParser:
    """The server-connection options every client command shares (a parent parser)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("server")
    g.add_argument("--server", default=os.environ.get(SERVER_ENV, DEFAULT_SERVER),
                   metavar="HOST:PORT",
                   help=f"the reidal server (default: ${SERVER_ENV}, else {DEFAULT_SERVER})")
    g.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="deadline of each call in seconds (default: %(default)s)")
    g.add_argument("--retries", type=int, default=5,
                   help="retries when the server is unavailable (default: %(default)s)")
    g.add_argument("--tls", action="store_true",
                   help="use TLS, trusting the system's CAs (implied by --tls-ca)")
    g.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="CA certificate(s) that signed the server's certificate (enables TLS)")
    g.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="client certificate, for a server requiring mutual TLS")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="the client certificate's key")
    g.add_argument("--token-file", default=None, metavar="FILE",
                   help=f"file holding the access token (default: ${TOKEN_ENV})")
    return p


def run_command(args: argparse.Namespace, expected: tuple[type[BaseException], ...] = ()) -> int:
    """Run ``args.func`` as every reidal program does
    (:func:`reidal_client.command_line.run_command`: exit status 0 ok, 1 failed, 130
    interrupted; one line per error, the traceback with $REIDAL_DEBUG set), a CliError
    printed as one line too."""
    return run_client_command(args, (CliError, *expected))
