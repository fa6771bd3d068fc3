"""`reidal collection ...`, `reidal image delete`, `reidal ingest`: collections and their images."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from reidal.cli.common import (
    CLUSTERING_MODES,
    OS_SIMILARITIES,
    SAMPLERS,
    CliError,
    connect,
    out,
    table,
)

#: Files `reidal ingest FOLDER` picks up (what the embedding service decodes).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})


def _show_collection(c: Any) -> None:
    cl, s = c.clustering, c.sampling
    budget = s.default_budget
    rows = [
        ("collection", c.collection_id),
        ("species", c.species or "-"),
        ("model", str(c.model) or "-"),
        ("images", f"{c.image_count} ({c.embedded_image_count} embedded, "
                   f"{c.excluded_image_count} excluded)"),
        ("answers", c.answer_count),
        ("cycle", c.cycle),
        ("pairs asked", f"{c.pairs_asked} of {c.total_pairs} "
                        f"({100 * c.budget_used:.4f} % of all pairs)"),
        ("clustering", f"{cl.mode or 'fixed'}: " + " ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in (
                ("eps", cl.dbscan_eps), ("min_samples", cl.min_samples), ("k1", cl.k1),
                ("k2", cl.k2), ("finch_level", cl.finch_level)) if v is not None)
            + (" (the rest chosen every cycle)" if cl.mode == "calibrated" else "")),
        ("sampling", f"{s.sampler or 'aas'}: mixture_eps={s.mixture_eps:g} k_max={s.k_max} "
                     f"s_min={s.s_min:g} os_similarity={s.os_similarity or 'jaccard'} "
                     f"seed={s.seed} default_budget={budget}"),
        ("created", c.created_at.isoformat(timespec="seconds") if c.created_at else "-"),
    ]
    for key, value in rows:
        out(f"{key:<12} {value}")


def _collection_create(args: argparse.Namespace) -> int:
    from reidal_client import ClusteringParams, SamplingParams, parse_budget

    clustering = ClusteringParams(dbscan_eps=args.eps, min_samples=args.min_samples,
                                  k1=args.k1, k2=args.k2, finch_level=args.finch_level,
                                  mode=args.clustering)
    sampling = SamplingParams(seed=args.seed, default_budget=parse_budget(args.default_budget)
                              if args.default_budget else None, sampler=args.sampler,
                              os_similarity=args.os_similarity)
    with connect(args) as client:
        col = client.create_collection(args.collection, species=args.species,
                                       model=args.model, clustering=clustering,
                                       sampling=sampling)
    out(f"created collection {col.collection_id!r}")
    _show_collection(col)
    return 0


def _collection_list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        cols = client.list_collections()
    if not cols:
        out("no collections")
        return 0
    out(table(("collection", "species", "images", "embedded", "answers", "cycle",
                 "budget %", "model"),
                [(c.collection_id, c.species or "-", c.image_count, c.embedded_image_count,
                  c.answer_count, c.cycle, round(100 * c.budget_used, 4), str(c.model))
                 for c in cols]))
    return 0


def _collection_show(args: argparse.Namespace) -> int:
    with connect(args) as client:
        _show_collection(client.get_collection(args.collection))
    return 0


def _collection_delete(args: argparse.Namespace) -> int:
    with connect(args) as client:
        col = client.get_collection(args.collection)
        if not args.yes:
            if not sys.stdin.isatty():
                raise CliError(f"deleting {args.collection!r} removes its {col.image_count} "
                               f"images and {col.answer_count} answers: pass --yes")
            reply = input(f"delete collection {args.collection!r} with {col.image_count} "
                          f"images and {col.answer_count} answers? [y/N] ")
            if reply.strip().lower() not in ("y", "yes"):
                out("not deleted")
                return 1
        client.delete_collection(args.collection, actor=args.actor)
    out(f"deleted collection {args.collection!r}")
    return 0


def _image_delete(args: argparse.Namespace) -> int:
    with connect(args) as client:
        for image_id in args.image:
            retired = client.delete_image(args.collection, image_id, actor=args.actor)
            out(f"deleted image {image_id!r} from {args.collection!r} ({retired} answer(s) "
                 "about it retired)")
    return 0


def folder_images(folder: Path) -> list[Any]:
    """Every image file under ``folder`` (sorted), id = its path relative to the folder."""
    from reidal_client import ImageInput

    if not folder.is_dir():
        raise CliError(f"{folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CliError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return [ImageInput(p.relative_to(folder).as_posix(), path=p,
                       metadata={"path": str(p.resolve())}) for p in files]


def csv_images(csv_path: Path, *, with_names: bool = False) -> list[Any]:
    """The images of a WildlifeDatasets metadata CSV: id = image_id; metadata = the other
    columns plus ``path``; with ``with_names`` the identity column becomes the platform's
    name of each image (leave it off to let active learning find the identities)."""
    from reidal.data.wildlife import load_wildlife_csv
    from reidal_client import ImageInput

    try:
        dataset = load_wildlife_csv(csv_path)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return [ImageInput(r.image_id, path=r.path,
                       name=(r.identity or "") if with_names else "",
                       metadata={**{k: v for k, v in r.metadata.items() if v},
                                 "path": str(r.path)})
            for r in dataset]


def _ingest(args: argparse.Namespace) -> int:
    from reidal_client import NotFound
    from reidal_client.progress import TextProgress

    if (args.folder is None) == (args.csv is None):
        raise CliError("give a FOLDER or --csv metadata.csv (one of them)")
    images = (folder_images(Path(args.folder)) if args.folder is not None
              else csv_images(Path(args.csv), with_names=args.names))
    with connect(args) as client:
        try:
            client.get_collection(args.collection)
        except NotFound:
            if not args.create:
                raise
            client.create_collection(args.collection, species=args.species)
            out(f"created collection {args.collection!r}")
        bar = TextProgress(f"ingest {args.collection}")
        result = client.add_images(args.collection, images, batch_size=args.batch,
                                   defer_embedding=args.defer_embedding, progress=bar)
        bar.close()
    out(f"{result.received} images: {result.added} added, {result.already_present} already "
         f"present, {result.embedded} embedded"
         + (f" with {result.model}" if result.model.version else ""))
    if result.changed_ids:
        shown = ", ".join(result.changed_ids[:10])
        out(f"{len(result.changed_ids)} id(s) already present with other content (kept the "
             f"stored one): {shown}" + (" ..." if len(result.changed_ids) > 10 else ""))
    return 0


def add_commands(sub: Any, client: argparse.ArgumentParser) -> None:
    """Register this group's commands on ``sub`` (``client``: the shared server-connection
    options, a parent parser)."""
    col = sub.add_parser("collection", help="create, list, show or delete collections")
    csub = col.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = csub.add_parser("create", parents=[client], help="create an empty collection")
    create.add_argument("collection")
    create.add_argument("--species", default="")
    create.add_argument("--model", default=None, metavar="NAME[:VERSION]",
                        help="embedding model (default: the server's)")
    create.add_argument("--eps", type=float, default=None, help="DBSCAN eps (default 0.6)")
    create.add_argument("--min-samples", type=int, default=None,
                        help="DBSCAN min_samples (default 4)")
    create.add_argument("--k1", type=int, default=None,
                        help="k-reciprocal k1 (default 30; about 5-10 for a few dozen images)")
    create.add_argument("--k2", type=int, default=None, help="query expansion k2 (default 6)")
    create.add_argument("--finch-level", type=int, default=None,
                        help="FINCH partition level of AAS's second clustering (default 0)")
    create.add_argument("--clustering", default="", choices=CLUSTERING_MODES,
                        help="'fixed' (default: the values above) or 'calibrated' (chosen "
                             "every cycle from the vectors and the answers; values given "
                             "above are kept)")
    create.add_argument("--sampler", default="", choices=SAMPLERS,
                        help="'aas' (default, the paper's) or 'aas-continued' (AAS, then "
                             "the pairs nearest DBSCAN's eps fill the budget)")
    create.add_argument("--os-similarity", default="", choices=OS_SIMILARITIES,
                        help="what AAS's over-segmentation pool ranks region medoids by: "
                             "'jaccard' (default, the paper's) or 'cosine'")
    create.add_argument("--seed", type=int, default=None, help="sampling seed (default 0)")
    create.add_argument("--default-budget", default=None, metavar="N|FRACTION",
                        help="budget of `reidal pairs` without --budget (default 0.0002)")
    create.set_defaults(func=_collection_create)
    lst = csub.add_parser("list", parents=[client], help="every collection")
    lst.set_defaults(func=_collection_list)
    show = csub.add_parser("show", parents=[client], help="one collection in detail")
    show.add_argument("collection")
    show.set_defaults(func=_collection_show)
    delete = csub.add_parser("delete", parents=[client],
                             help="delete a collection and everything in it")
    delete.add_argument("collection")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete.add_argument("--actor", default=os.environ.get("USER", ""),
                        help="who deletes (audit log)")
    delete.set_defaults(func=_collection_delete)

    image = sub.add_parser("image", help="one image of a collection")
    isub = image.add_subparsers(dest="action", required=True, metavar="ACTION")
    idelete = isub.add_parser(
        "delete", parents=[client], help="delete images (e.g. ones that cannot be embedded)",
        description="Delete images from a collection with their vectors; answers about them "
                    "are retired (kept in the history, never applied again).")
    idelete.add_argument("collection")
    idelete.add_argument("image", nargs="+", help="image id(s)")
    idelete.add_argument("--actor", default=os.environ.get("USER", ""),
                         help="who deletes (audit log)")
    idelete.set_defaults(func=_image_delete)

    ingest = sub.add_parser(
        "ingest", parents=[client], help="add images from a folder or a WildlifeDatasets CSV",
        description="Send images to a collection (embedded on arrival unless "
                    "--defer-embedding). Safe to rerun: images already present are skipped.")
    ingest.add_argument("collection")
    ingest.add_argument("folder", nargs="?", default=None,
                        help="a folder of images (id = path relative to it)")
    ingest.add_argument("--csv", default=None, metavar="METADATA_CSV",
                        help="a WildlifeDatasets metadata CSV (image_id, identity, path, ...)")
    ingest.add_argument("--names", action="store_true",
                        help="with --csv: send the identity column as the platform's names")
    ingest.add_argument("--batch", type=int, default=32, help="images per message")
    ingest.add_argument("--create", action="store_true",
                        help="create the collection when it does not exist")
    ingest.add_argument("--species", default="", help="with --create: the species")
    ingest.add_argument("--defer-embedding", action="store_true",
                        help="store only; embed later with EmbedCollection")
    ingest.set_defaults(func=_ingest)
