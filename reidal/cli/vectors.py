"""`reidal vectors get|put`: read stored vectors, or store vectors computed elsewhere."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from reidal.cli.common import CliError, connect, out


def _vectors_get(args: argparse.Namespace) -> int:
    import numpy as np

    with connect(args) as client:
        got = client.get_vectors(args.collection, model=args.model)
    np.savez(args.out, ids=np.array(got.ids, dtype=str), vectors=got.vectors,
             model=np.array(f"{got.model.name}:{got.model.version}"))
    out(f"wrote {len(got.ids)} vector(s) of {got.model.name}:{got.model.version} to {args.out}")
    return 0


def _vectors_put(args: argparse.Namespace) -> int:
    import numpy as np

    try:
        with np.load(args.npz, allow_pickle=False) as data:
            ids, vectors = [str(i) for i in data["ids"]], data["vectors"]
    except (OSError, KeyError, ValueError) as exc:
        raise CliError(f"{args.npz}: an .npz with arrays 'ids' and 'vectors' is needed "
                       f"({exc})") from None
    with connect(args) as client:
        ref = client.put_vectors(args.collection, ids, vectors, model=args.model,
                                 actor=args.actor)
    out(f"stored {len(ids)} vector(s) of {ref.name}:{ref.version} in {args.collection!r}")
    return 0


def add_commands(sub: Any, client: argparse.ArgumentParser) -> None:
    """Register this group's commands on ``sub`` (``client``: the shared server-connection
    options, a parent parser)."""
    vec = sub.add_parser("vectors", help="read stored vectors, or store vectors made elsewhere")
    vsub = vec.add_subparsers(dest="action", required=True, metavar="ACTION")
    vget = vsub.add_parser("get", parents=[client], help="stored vectors to an .npz file",
                           description="Write the collection's stored vectors (arrays ids, "
                                       "vectors, model) to an .npz file: nothing is embedded.")
    vget.add_argument("collection")
    vget.add_argument("--out", type=Path, required=True, help="the .npz file to write")
    vget.add_argument("--model", default=None, metavar="NAME[:VERSION]",
                      help="another model version than the collection's")
    vget.set_defaults(func=_vectors_get)
    vput = vsub.add_parser(
        "put", parents=[client], help="store vectors computed elsewhere (MiewID, ...)",
        description="Store the vectors of an .npz file (arrays ids and vectors) for images "
                    "already in the collection (ingest them with --defer-embedding), under the "
                    "model that made them; the server L2-normalises them.")
    vput.add_argument("collection")
    vput.add_argument("npz", type=Path, help=".npz with arrays 'ids' and 'vectors'")
    vput.add_argument("--model", required=True, metavar="NAME[:VERSION]",
                      help="the model that computed them (recorded with them)")
    vput.add_argument("--actor", default=os.environ.get("USER", ""),
                      help="who stores them (audit log)")
    vput.set_defaults(func=_vectors_put)
