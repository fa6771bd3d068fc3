"""The `reidal` command line: run a server, drive a collection through it, run the demo.

    reidal serve [--service all|embedding|collections|sampling|constraints ...]
    reidal collection create|list|show|delete
    reidal ingest COLLECTION (FOLDER | --csv metadata.csv)
    reidal pairs COLLECTION [--budget N|0.0002] [--out pairs.csv]
    reidal answer COLLECTION (--csv answers.csv | --interactive)
    reidal identities COLLECTION [--csv identities.csv]
    reidal demo

Every client command talks to ``--server host:port`` (default: $REIDAL_SERVER, else
127.0.0.1:50051) through :class:`reidal_client.ReidalClient`, so it gets the client's
deadlines and retries. A failure prints the server's message (``error: NOT_FOUND: ...``)
on stderr and exits 1, without a traceback (set REIDAL_DEBUG=1 to see it); a usage error
exits 2.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: Environment variable naming the server of the client commands.
SERVER_ENV = "REIDAL_SERVER"
#: Set (to anything) to get the traceback of a failed command instead of one line.
DEBUG_ENV = "REIDAL_DEBUG"
DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_PORT = 50051
#: Files `reidal ingest FOLDER` picks up (what the embedding service decodes).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
#: Columns of `reidal pairs --out`; `reidal answer --csv` reads the same file back.
PAIR_CSV_FIELDS = ("batch_id", "cycle", "pair_id", "image_a", "image_b", "similarity", "pool",
                   "region", "probability", "answer")


class CliError(Exception):
    """A problem the user can fix (bad file, bad option); printed without a traceback."""


def _out(text: str = "") -> None:
    print(text, flush=True)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
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


def _client(args: argparse.Namespace) -> Any:
    from reidal_client import ReidalClient

    return ReidalClient(args.server, timeout_s=args.timeout, retries=args.retries)


# --------------------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    from reidal.grpc_server import configure_logging
    from reidal.serve import serve

    configure_logging(args.log_level, json_lines=args.log_json)
    start_triton = args.triton_url is None and args.embedding_url is None
    try:
        server = serve(args.service, address=f"{args.host}:{args.port}", data_dir=args.data_dir,
                       triton_url=args.triton_url, start_triton=start_triton,
                       embedding_url=args.embedding_url,
                       **({"model_name": args.model} if args.model else {}),
                       metrics_port=args.metrics_port, max_workers=args.workers)
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    services = ", ".join(server.services)
    _out(f"reidal serving {services} on {server.address}"
         + (f" (Triton {server.triton_url})" if server.triton_url else "")
         + (f", metrics on :{server.metrics_port}/metrics" if server.metrics_port else ""))
    server.serve_forever(grace=args.grace)
    _out("reidal stopped")
    return 0


# ---------------------------------------------------------------------- collections


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
        ("clustering", f"eps={cl.dbscan_eps:g} min_samples={cl.min_samples} k1={cl.k1} "
                       f"k2={cl.k2}"),
        ("sampling", f"mixture_eps={s.mixture_eps:g} k_max={s.k_max} s_min={s.s_min:g} "
                     f"seed={s.seed} default_budget={budget}"),
        ("created", c.created_at.isoformat(timespec="seconds") if c.created_at else "-"),
    ]
    for key, value in rows:
        _out(f"{key:<12} {value}")


def _collection_create(args: argparse.Namespace) -> int:
    from reidal_client import ClusteringParams, SamplingParams, parse_budget

    clustering = ClusteringParams(dbscan_eps=args.eps, min_samples=args.min_samples,
                                  k1=args.k1, k2=args.k2)
    sampling = SamplingParams(seed=args.seed, default_budget=parse_budget(args.default_budget)
                              if args.default_budget else None)
    with _client(args) as client:
        col = client.create_collection(args.collection, species=args.species,
                                       model=args.model, clustering=clustering,
                                       sampling=sampling)
    _out(f"created collection {col.collection_id!r}")
    _show_collection(col)
    return 0


def _collection_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        cols = client.list_collections()
    if not cols:
        _out("no collections")
        return 0
    _out(_table(("collection", "species", "images", "embedded", "answers", "cycle",
                 "budget %", "model"),
                [(c.collection_id, c.species or "-", c.image_count, c.embedded_image_count,
                  c.answer_count, c.cycle, round(100 * c.budget_used, 4), str(c.model))
                 for c in cols]))
    return 0


def _collection_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _show_collection(client.get_collection(args.collection))
    return 0


def _collection_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        col = client.get_collection(args.collection)
        if not args.yes:
            if not sys.stdin.isatty():
                raise CliError(f"deleting {args.collection!r} removes its {col.image_count} "
                               f"images and {col.answer_count} answers: pass --yes")
            reply = input(f"delete collection {args.collection!r} with {col.image_count} "
                          f"images and {col.answer_count} answers? [y/N] ")
            if reply.strip().lower() not in ("y", "yes"):
                _out("not deleted")
                return 1
        client.delete_collection(args.collection, actor=args.actor)
    _out(f"deleted collection {args.collection!r}")
    return 0


# --------------------------------------------------------------------------- ingest


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
    with _client(args) as client:
        try:
            client.get_collection(args.collection)
        except NotFound:
            if not args.create:
                raise
            client.create_collection(args.collection, species=args.species)
            _out(f"created collection {args.collection!r}")
        bar = TextProgress(f"ingest {args.collection}")
        result = client.add_images(args.collection, images, batch_size=args.batch,
                                   defer_embedding=args.defer_embedding, progress=bar)
        bar.close()
    _out(f"{result.received} images: {result.added} added, {result.already_present} already "
         f"present, {result.embedded} embedded"
         + (f" with {result.model}" if result.model.version else ""))
    if result.changed_ids:
        shown = ", ".join(result.changed_ids[:10])
        _out(f"{len(result.changed_ids)} id(s) already present with other content (kept the "
             f"stored one): {shown}" + (" ..." if len(result.changed_ids) > 10 else ""))
    return 0


# ---------------------------------------------------------------------------- pairs


def _where(items: Sequence[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--where takes key=value, got {item!r}")
        out[key] = value
    return out


def _budget(text: str | None) -> int | float | None:
    from reidal_client import parse_budget

    return None if text is None else parse_budget(text)


def _pairs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        batch = client.get_query_pairs(args.collection, _budget(args.budget),
                                       filter=_where(args.where), skip_pending=args.skip_pending,
                                       request_id=args.request_id)
    _out(f"batch {batch.batch_id} (cycle {batch.cycle}): {len(batch.pairs)} pair(s), budget "
         f"{batch.budget}, {batch.sampled_images} images sampled: {batch.reason_text}")
    if batch.finished:
        _out("nothing left to ask for now")
    if args.out:
        with Path(args.out).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=PAIR_CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for row in batch.rows():
                writer.writerow({**row, "answer": ""})
        _out(f"wrote {len(batch.pairs)} pair(s) to {args.out}; fill its 'answer' column "
             f"(same / different / unsure) and run: reidal answer {args.collection} "
             f"--csv {args.out}")
    elif batch.pairs:
        _out(_table(("pair_id", "image_a", "image_b", "similarity", "pool"),
                    [(p.pair_id, p.image_a, p.image_b, p.similarity, p.pool)
                     for p in batch.pairs]))
    return 0


# --------------------------------------------------------------------------- answer


def read_answers_csv(path: Path, annotator: str) -> tuple[list[Any], str]:
    """Answers of a CSV (``reidal pairs --out`` with its answer column filled, or any CSV
    with ``answer`` and ``pair_id`` or ``image_a``/``image_b``); blank answers are skipped.
    Returns them and the batch id they share ("" when they name none or several)."""
    from reidal_client import Answer, parse_label

    try:
        fh = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise CliError(f"{path}: cannot open ({exc.strerror})") from None
    answers, batches = [], set()
    with fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or ())
        if "answer" not in columns or not ({"pair_id"} <= columns
                                           or {"image_a", "image_b"} <= columns):
            raise CliError(f"{path}: needs an 'answer' column and 'pair_id' or "
                           f"'image_a','image_b' columns; it has {sorted(columns)}")
        for row in reader:
            text = (row.get("answer") or "").strip()
            if not text:
                continue
            line = reader.line_num
            try:
                label = parse_label(text)
                conf = (row.get("confidence") or "").strip()
                tags = tuple(t.strip() for t in (row.get("tags") or "").split(";") if t.strip())
                who = (row.get("annotator_id") or row.get("annotator") or "").strip()
                common = dict(label=label, annotator_id=who or annotator, tags=tags,
                              confidence=float(conf) if conf else None,
                              note=(row.get("note") or "").strip())
                pair_id = (row.get("pair_id") or "").strip()
                if pair_id:
                    answers.append(Answer(pair_id=pair_id, **common))
                else:
                    a, b = (row.get("image_a") or "").strip(), (row.get("image_b") or "").strip()
                    if not a or not b:
                        raise ValueError("no pair_id and no image_a/image_b")
                    answers.append(Answer(images=(a, b), **common))
            except ValueError as exc:
                raise CliError(f"{path}, line {line}: {exc}") from None
            batches.add((row.get("batch_id") or "").strip())
    if not answers:
        raise CliError(f"{path}: no answered row (the 'answer' column is empty everywhere)")
    return answers, batches.pop() if len(batches) == 1 else ""


def _report_submit(result: Any) -> None:
    _out(f"stored {result.stored_count} answer(s)"
         + (f", {result.replayed_count} replayed (request {result.request_id} was seen "
            f"before)" if result.replayed_count else "")
         + (f", {result.superseded_count} earlier answer(s) superseded"
            if result.superseded_count else ""))
    for c in result.contradictions:
        _out(f"contradiction: {c.explanation}")


def _image_label(info: Any) -> str:
    if info is None:
        return "(unknown image)"
    where = info.uri or info.metadata.get("path") or "(uploaded bytes)"
    extra = ", ".join(f"{k}={v}" for k, v in info.metadata.items() if k != "path")
    return where + (f"  [{extra}]" if extra else "")


def _ask(prompt: str, read: Callable[[str], str]) -> str:
    while True:
        try:
            reply = read(prompt).strip().lower()
        except EOFError:
            return "q"
        if reply in ("s", "d", "u", "q"):
            return reply
        _out("  answer s (same), d (different), u (unsure) or q (quit)")


def _interactive(args: argparse.Namespace, client: Any) -> int:
    from reidal_client import Answer

    batch = client.get_query_pairs(args.collection, _budget(args.budget),
                                   skip_pending=args.skip_pending)
    _out(f"batch {batch.batch_id} (cycle {batch.cycle}): {len(batch.pairs)} pair(s): "
         f"{batch.reason_text}")
    if not batch.pairs:
        return 0
    ids = sorted({i for p in batch.pairs for i in (p.image_a, p.image_b)})
    info = {i.image_id: i for i in client.list_images(
        args.collection, filter=_image_filter(ids))}
    answers = []
    for k, p in enumerate(batch.pairs, start=1):
        _out(f"\npair {k}/{len(batch.pairs)}  {p.pair_id}  similarity {p.similarity:.3f} "
             f"({p.pool})")
        _out(f"  A: {p.image_a}  {_image_label(info.get(p.image_a))}")
        _out(f"  B: {p.image_b}  {_image_label(info.get(p.image_b))}")
        reply = _ask("  same individual? [s]ame / [d]ifferent / [u]nsure / [q]uit: ", input)
        if reply == "q":
            break
        answers.append(Answer(pair_id=p.pair_id, label=reply, annotator_id=args.annotator))
    if not answers:
        _out("no answer given; nothing stored")
        return 0
    _report_submit(client.submit_answers(args.collection, answers, batch_id=batch.batch_id,
                                         request_id=args.request_id))
    return 0


def _image_filter(ids: Sequence[str]) -> Any:
    from reidal_client import ImageFilter

    return ImageFilter(image_ids=tuple(ids))


def _answer(args: argparse.Namespace) -> int:
    if bool(args.csv) == bool(args.interactive):
        raise CliError("give --csv answers.csv or --interactive (one of them)")
    with _client(args) as client:
        if args.interactive:
            return _interactive(args, client)
        answers, batch_id = read_answers_csv(Path(args.csv), args.annotator)
        _report_submit(client.submit_answers(args.collection, answers, batch_id=batch_id,
                                             request_id=args.request_id))
    return 0


# ----------------------------------------------------------------------- identities


def _identities(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.csv:
            ident = client.export_identities_csv(args.collection, args.csv)
        else:
            ident = client.get_identities(args.collection)
    groups = sum(x.size > 1 for x in ident.identities)
    images = sum(x.size for x in ident.identities)
    _out(f"{len(ident.identities)} identities ({groups} with more than one image) over "
         f"{images} images; {ident.applied_answers} answers applied, "
         f"{len(ident.contradictions)} contradiction(s); model {ident.model}, cycle "
         f"{ident.cycle}")
    for c in ident.contradictions:
        _out(f"contradiction: {c.explanation}")
    if args.csv:
        _out(f"wrote {images + len(ident.excluded_image_ids)} rows to {args.csv}")
        return 0
    shown = ident.identities if args.all else [x for x in ident.identities if x.size > 1]
    if shown:
        _out(_table(("identity", "size", "same", "different", "names", "images"),
                    [(x.identity_id, x.size, x.same_answers, x.different_answers,
                      ",".join(x.names) or ("new" if x.new_individual else "-"),
                      " ".join(x.image_ids[:4]) + (" ..." if x.size > 4 else ""))
                     for x in shown]))
    if not args.all and groups < len(ident.identities):
        _out(f"({len(ident.identities) - groups} single-image identities not shown: --all)")
    return 0


# ----------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    from reidal.demo import run_demo
    from reidal_client import parse_budget

    run_demo(args.out, cycles=args.cycles, budget_per_cycle=parse_budget(args.budget),
             seed=args.seed, n_individuals=args.individuals, dataset_csv=args.dataset)
    return 0


# --------------------------------------------------------------------------- parser


def _client_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("server")
    g.add_argument("--server", default=os.environ.get(SERVER_ENV, DEFAULT_SERVER),
                   metavar="HOST:PORT",
                   help=f"the reidal server (default: ${SERVER_ENV}, else {DEFAULT_SERVER})")
    g.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="deadline of each call in seconds (default: %(default)s)")
    g.add_argument("--retries", type=int, default=5,
                   help="retries when the server is unavailable (default: %(default)s)")
    return p


def build_parser() -> argparse.ArgumentParser:
    from reidal.demo import DEMO_BUDGET_PER_CYCLE
    from reidal.serve import SERVICES

    parser = argparse.ArgumentParser(
        prog="reidal",
        description="Active-learning server for animal re-identification (AAS + NP3).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = _client_options()

    serve = sub.add_parser(
        "serve", help="run the gRPC server (all services, or some)",
        description="Serve reidal's gRPC services on one port until SIGTERM / Ctrl-C "
                    "(graceful: calls in flight get --grace seconds). Without --triton-url "
                    "or --embedding-url the bundled Triton starts on CPU with the default "
                    "model.")
    serve.add_argument("--service", nargs="+", default=["all"], choices=["all", *SERVICES],
                       metavar="NAME", help=f"all (default) or some of: {', '.join(SERVICES)}")
    serve.add_argument("--host", default="127.0.0.1",
                       help="interface to listen on (default: %(default)s; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help="port (default: %(default)s; 0 = any free port)")
    serve.add_argument("--data-dir", default="reidal-data",
                       help="durable state: SQLite, image blobs, model repository "
                            "(default: %(default)s)")
    serve.add_argument("--triton-url", default=None, metavar="HOST:PORT",
                       help="an already running Triton's gRPC endpoint")
    serve.add_argument("--embedding-url", default=None, metavar="HOST:PORT",
                       help="a separate reidal embedding service to embed with")
    serve.add_argument("--model", default=None, help="default embedding model name")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="serve Prometheus /metrics on this port (default: none)")
    serve.add_argument("--workers", type=int, default=16, help="gRPC handler threads")
    serve.add_argument("--grace", type=float, default=30.0,
                       help="seconds calls in flight get on SIGTERM (default: %(default)s)")
    serve.add_argument("--log-json", action="store_true", help="JSON log lines")
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(func=_serve)

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

    pairs = sub.add_parser("pairs", parents=[client],
                           help="run a sampling cycle: print or save the next pairs to ask")
    pairs.add_argument("collection")
    pairs.add_argument("--budget", default=None, metavar="N|FRACTION",
                       help="pairs (40) or a fraction of all pairs (0.0002); default: the "
                            "collection's")
    pairs.add_argument("--out", default=None, metavar="CSV",
                       help="write the pairs to a CSV with an empty answer column")
    pairs.add_argument("--where", action="append", metavar="KEY=VALUE",
                       help="only images with this metadata (repeatable)")
    pairs.add_argument("--skip-pending", action="store_true",
                       help="leave out pairs asked earlier and not answered yet")
    pairs.add_argument("--request-id", default=None,
                       help="idempotency key: rerunning with it returns the same batch")
    pairs.set_defaults(func=_pairs)

    answer = sub.add_parser("answer", parents=[client],
                            help="submit answers from a CSV or interactively")
    answer.add_argument("collection")
    answer.add_argument("--csv", default=None,
                        help="answers: `reidal pairs --out` with its answer column filled "
                             "(same/different/unsure, s/d/u, yes/no)")
    answer.add_argument("--interactive", action="store_true",
                        help="sample the next pairs and ask them here")
    answer.add_argument("--budget", default=None, metavar="N|FRACTION",
                        help="with --interactive: pairs to ask")
    answer.add_argument("--skip-pending", action="store_true",
                        help="with --interactive: leave out pairs pending in other batches")
    answer.add_argument("--annotator", default=os.environ.get("USER", ""),
                        help="annotator id recorded with the answers (default: $USER)")
    answer.add_argument("--request-id", default=None,
                        help="idempotency key (default: a fresh UUID)")
    answer.set_defaults(func=_answer)

    ident = sub.add_parser("identities", parents=[client],
                           help="the identities the answers imply (table or CSV)")
    ident.add_argument("collection")
    ident.add_argument("--csv", default=None, help="write one row per image to this CSV")
    ident.add_argument("--all", action="store_true", help="also list single-image identities")
    ident.set_defaults(func=_identities)

    demo = sub.add_parser(
        "demo", help="run the whole loop on the bundled synthetic collection",
        description="Generate the synthetic collection, start the all-in-one server with "
                    "the bundled Triton on CPU, ingest the images through the client, run "
                    "active-learning cycles with a simulated annotator over gRPC, and write "
                    "a table (CSV) and a plot (PNG).")
    demo.add_argument("--out", default="demo-output", help="output folder (default: %(default)s)")
    demo.add_argument("--cycles", type=int, default=5, help="active-learning cycles (default: 5)")
    demo.add_argument("--budget", default=str(DEMO_BUDGET_PER_CYCLE),
                      help="pairs per cycle: a count (int) or a fraction of all pairs (float); "
                           "default %(default)s")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--individuals", type=int, default=None,
                      help="individuals in the generated collection (default: the generator's)")
    demo.add_argument("--dataset", default=None, metavar="CSV",
                      help="run on a WildlifeDatasets metadata CSV (image_id, identity, path) "
                           "instead of the generated collection")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (0 ok, 1 failed, 2 usage, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    from reidal_client import ReidalClientError

    try:
        return int(args.func(args) or 0)
    except (ReidalClientError, CliError, ValueError, OSError) as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
