"""The `reidal` command line: run a server, drive a collection through it, run the demo.

    reidal serve [--service all|embedding|collections|sampling|constraints ...]
    reidal collection create|list|show|delete
    reidal image delete COLLECTION IMAGE...
    reidal ingest COLLECTION (FOLDER | --csv metadata.csv)
    reidal pairs COLLECTION [--budget N|0.0002] [--out pairs.csv]
    reidal answer COLLECTION (--csv answers.csv | --interactive)
    reidal identities COLLECTION [--csv identities.csv]
    reidal demo
    reidal bench [--dataset CSV_OR_NAME ...] [--methods ...] [--budget 0.5%x5] [--quick]
    reidal health [--address HOST:PORT] [--service NAME]
    reidal triton [--model-repository DIR]
    reidal token create --name NAME --collections a,b [--role reader|annotator|admin]

Every client command talks to ``--server host:port`` (default: $REIDAL_SERVER, else
127.0.0.1:50051) through :class:`reidal_client.ReidalClient`, so it gets the client's
deadlines and retries. A failure prints the server's message (``error: NOT_FOUND: ...``)
on stderr and exits 1, without a traceback (set REIDAL_DEBUG=1 to see it); a usage error
exits 2. Against a server with TLS, pass ``--tls-ca`` (and ``--tls-cert/--tls-key`` for
mutual TLS); with access tokens, put the token in $REIDAL_TOKEN or a file given by
``--token-file`` (never on the command line, where ``ps`` shows it).
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
#: Environment variables holding the access token of the client commands, and of a
#: collections service for its separate embedding service.
TOKEN_ENV = "REIDAL_TOKEN"
EMBEDDING_TOKEN_ENV = "REIDAL_EMBEDDING_TOKEN"
#: Set (to anything) to get the traceback of a failed command instead of one line.
DEBUG_ENV = "REIDAL_DEBUG"
#: Environment variable with the PostgreSQL URL of `reidal serve` (as --database-url).
DATABASE_URL_ENV = "REIDAL_DATABASE_URL"
#: Environment variable with the image roots of `reidal serve` (as --image-roots).
IMAGE_ROOTS_ENV = "REIDAL_IMAGE_ROOTS"
DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_PORT = 50051
#: Port of the pair-review web page of `reidal serve` (--http-port).
DEFAULT_HTTP_PORT = 8080
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

    return ReidalClient(args.server, timeout_s=args.timeout, retries=args.retries,
                        tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                        tls_key=args.tls_key, token=_token(args))


def _token(args: argparse.Namespace) -> str | None:
    """The access token: --token-file, else $REIDAL_TOKEN, else none."""
    if args.token_file:
        text = Path(args.token_file).read_text(encoding="utf-8").strip()
        if not text:
            raise CliError(f"token file {args.token_file} is empty")
        return text
    return os.environ.get(TOKEN_ENV, "").strip() or None


# --------------------------------------------------------------------------- serve


def _review_port(args: argparse.Namespace) -> int | None:
    """The review page's port: --http-port, unless --no-http, the served services lack
    what the page calls (collections, sampling, constraints), or the gRPC port wants
    client certificates (--tls-client-ca) and the page was given none of its own
    (--review-client-cert/--review-client-key). With --tls-cert the page is HTTPS; with
    --auth-tokens it asks each person for their token."""
    from reidal.serve import PAGE_SERVICES, resolve_services

    if args.no_http or not PAGE_SERVICES <= set(resolve_services(args.service)):
        return None
    if args.tls_client_ca and not args.review_client_cert:
        print("review page off: under mutual TLS it needs its own client certificate "
              "(--review-client-cert/--review-client-key)", file=sys.stderr)
        return None
    return args.http_port


def _serve(args: argparse.Namespace) -> int:
    from reidal.grpc_server import configure_logging
    from reidal.serve import serve

    configure_logging(args.log_level, json_lines=args.log_json)
    start_triton = args.triton_url is None and args.embedding_url is None
    try:
        server = serve(args.service, address=f"{args.host}:{args.port}", data_dir=args.data_dir,
                       database_url=args.database_url or None,
                       triton_url=args.triton_url, start_triton=start_triton,
                       embedding_url=args.embedding_url,
                       **({"model_name": args.model} if args.model else {}),
                       metrics_port=args.metrics_port, metrics_addr=args.metrics_host,
                       max_workers=args.workers,
                       max_message_mb=args.max_message_mb, tls_cert=args.tls_cert,
                       tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                       auth_tokens=args.auth_tokens, **_embedding_channel(args),
                       model_repository=args.model_repository,
                       http_port=_review_port(args),
                       review_client_cert=args.review_client_cert,
                       review_client_key=args.review_client_key,
                       image_roots=[r for r in args.image_roots.split(",") if r.strip()],
                       decode_budget_mb=args.decode_budget_mb, decode_wait_s=args.decode_wait_s)
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    services = ", ".join(server.services)
    _out(f"reidal serving {services} on {server.address}"
         + (f" (Triton {server.triton_url})" if server.triton_url else "")
         + (f", metrics on :{server.metrics_port}/metrics" if server.metrics_port else "")
         + (f", review page {server.http_url}" if server.http_url else ""))
    server.serve_forever(grace=args.grace)
    _out("reidal stopped")
    return 0


def _embedding_channel(args: argparse.Namespace) -> dict[str, Any]:
    """TLS and token of the channel to a separate embedding service (--embedding-url)."""
    out: dict[str, Any] = {
        "embedding_token": os.environ.get(EMBEDDING_TOKEN_ENV, "").strip() or None}
    if args.embedding_tls_ca or args.embedding_tls_cert or args.embedding_tls_key:
        from reidal.tls import channel_credentials

        out["embedding_credentials"] = channel_credentials(
            args.embedding_tls_ca, args.embedding_tls_cert, args.embedding_tls_key)
    return out


def _token_create(args: argparse.Namespace) -> int:
    from reidal.auth import ALL_COLLECTIONS, add_entry, create_token

    cols = [c.strip() for c in args.collections.split(",") if c.strip()]
    token, entry = create_token(args.name, ALL_COLLECTIONS if cols == [ALL_COLLECTIONS] else cols,
                                role=args.role, annotator=args.annotator)
    if args.tokens_file:
        add_entry(args.tokens_file, entry)
        _out(token)
        print(f"added {entry.name!r} to {args.tokens_file}; the token above is shown only "
              "once", file=sys.stderr, flush=True)
    else:
        import json

        _out(token)
        _out(json.dumps(entry.to_json()))
        print("line 1: the token (shown only once; give it to its user); line 2: the entry "
              "to add to the tokens file's \"tokens\" list", file=sys.stderr, flush=True)
    return 0


def _health(args: argparse.Namespace) -> int:
    from reidal.health_probe import run

    return run(args)


def _triton(args: argparse.Namespace) -> int:
    """The Triton bundled in nvidia-pytriton as a process of its own (a Kubernetes pod on a
    CPU cluster), on fixed ports, with the default model written into the repository once."""
    import signal
    import threading

    from reidal.embedding.triton_repo import write_model_repository
    from reidal.embedding.triton_server import TritonServer

    repo = Path(args.model_repository)
    if not (repo / args.model / "config.pbtxt").exists():
        write_model_repository(repo, model_name=args.model)
    server = TritonServer(repo, models=[args.model], workdir=args.workdir, host=args.host,
                          grpc_port=args.grpc_port, http_port=args.http_port,
                          metrics_port=args.metrics_port,
                          startup_timeout_s=args.startup_timeout)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    _out(f"Triton serving {args.model} from {repo}: gRPC {server.grpc_url}, HTTP "
         f"{server.http_url}, metrics {server.metrics_url}; log {server.log_path}")
    while not stop.wait(2.0):
        if not server.running:
            print(f"error: tritonserver exited; end of its log:\n{server.log_tail()}",
                  file=sys.stderr, flush=True)
            return 1
    server.stop()
    _out("Triton stopped")
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
        ("clustering", f"{cl.mode or 'fixed'}: " + " ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in (
                ("eps", cl.dbscan_eps), ("min_samples", cl.min_samples), ("k1", cl.k1),
                ("k2", cl.k2), ("finch_level", cl.finch_level)) if v is not None)
            + (" (the rest chosen every cycle)" if cl.mode == "calibrated" else "")),
        ("sampling", f"{s.sampler or 'aas'}: mixture_eps={s.mixture_eps:g} k_max={s.k_max} "
                     f"s_min={s.s_min:g} seed={s.seed} default_budget={budget}"),
        ("created", c.created_at.isoformat(timespec="seconds") if c.created_at else "-"),
    ]
    for key, value in rows:
        _out(f"{key:<12} {value}")


def _collection_create(args: argparse.Namespace) -> int:
    from reidal_client import ClusteringParams, SamplingParams, parse_budget

    clustering = ClusteringParams(dbscan_eps=args.eps, min_samples=args.min_samples,
                                  k1=args.k1, k2=args.k2, finch_level=args.finch_level,
                                  mode=args.clustering)
    sampling = SamplingParams(seed=args.seed, default_budget=parse_budget(args.default_budget)
                              if args.default_budget else None, sampler=args.sampler)
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


def _image_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for image_id in args.image:
            retired = client.delete_image(args.collection, image_id, actor=args.actor)
            _out(f"deleted image {image_id!r} from {args.collection!r} ({retired} answer(s) "
                 "about it retired)")
    return 0


# --------------------------------------------------------------------------- vectors


def _vectors_get(args: argparse.Namespace) -> int:
    import numpy as np

    with _client(args) as client:
        got = client.get_vectors(args.collection, model=args.model)
    np.savez(args.out, ids=np.array(got.ids, dtype=str), vectors=got.vectors,
             model=np.array(f"{got.model.name}:{got.model.version}"))
    _out(f"wrote {len(got.ids)} vector(s) of {got.model.name}:{got.model.version} to {args.out}")
    return 0


def _vectors_put(args: argparse.Namespace) -> int:
    import numpy as np

    try:
        with np.load(args.npz, allow_pickle=False) as data:
            ids, vectors = [str(i) for i in data["ids"]], data["vectors"]
    except (OSError, KeyError, ValueError) as exc:
        raise CliError(f"{args.npz}: an .npz with arrays 'ids' and 'vectors' is needed "
                       f"({exc})") from None
    with _client(args) as client:
        ref = client.put_vectors(args.collection, ids, vectors, model=args.model,
                                 actor=args.actor)
    _out(f"stored {len(ids)} vector(s) of {ref.name}:{ref.version} in {args.collection!r}")
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
    ch = batch.clustering
    if ch is not None:
        _out(f"clustering {ch.mode}: eps={ch.dbscan_eps:.3g} ({ch.eps_source}) k1={ch.k1} "
             f"k2={ch.k2} min_samples={ch.min_samples} finch_level={ch.finch_level} "
             f"({ch.finch_source}); sampler {batch.stats.get('sampler', 'aas')}")
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
    if args.annotator is None:  # with a token the server records the token's annotator
        args.annotator = "" if _token(args) else os.environ.get("USER", "")
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
             seed=args.seed, n_individuals=args.individuals, dataset_csv=args.dataset,
             train=not args.no_train, preset=args.preset, clustering=args.clustering,
             sampler=args.sampler)
    return 0


# --------------------------------------------------------------------------- parser

#: ClusteringParams.mode and SamplingParams.sampler values (reidal.collection_state's, kept
#: here so building the parser imports no algorithm; test_cli_choices_match_the_server's).
CLUSTERING_MODES = ("fixed", "calibrated")
SAMPLERS = ("aas", "aas-continued")


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


def build_parser() -> argparse.ArgumentParser:
    from reidal.demo_params import DEMO_BUDGET_PER_CYCLE
    from reidal.embedding.decode_budget import DEFAULT_BUDGET_MB, DEFAULT_WAIT_S
    from reidal.embedding.spec import DEFAULT_MODEL_NAME
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
    serve.add_argument("--database-url", default=os.environ.get(DATABASE_URL_ENV, ""),
                       metavar="URL",
                       help="keep the store in PostgreSQL (postgresql://user:pass@host:5432/db; "
                            f"default: ${DATABASE_URL_ENV}) instead of SQLite in --data-dir, "
                            "so replicas can share it; blobs stay in --data-dir")
    serve.add_argument("--triton-url", default=None, metavar="HOST:PORT",
                       help="an already running Triton's gRPC endpoint")
    serve.add_argument("--embedding-url", default=None, metavar="HOST:PORT",
                       help="a separate reidal embedding service to embed with")
    serve.add_argument("--model", default=None, help="default embedding model name")
    serve.add_argument("--model-repository", default=None, metavar="DIR",
                       help="with --triton-url: that Triton's model repository (a shared "
                            "volume), where training writes new model versions")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="serve Prometheus /metrics on this port (default: none)")
    serve.add_argument("--metrics-host", default=None,
                       help="interface of the metrics port (default: the --host interface)")
    serve.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                       help="serve the pair-review web page on this port, on the --host "
                            "interface (default: %(default)s; 0 = any free port)")
    serve.add_argument("--no-http", action="store_true",
                       help="do not serve the pair-review web page")
    serve.add_argument("--workers", type=int, default=16, help="gRPC handler threads")
    serve.add_argument("--grace", type=float, default=30.0,
                       help="seconds calls in flight get on SIGTERM (default: %(default)s)")
    serve.add_argument("--max-message-mb", type=float, default=64.0, metavar="MB",
                       help="largest gRPC message either way (default: %(default)s)")
    serve.add_argument("--tls-cert", default=None, metavar="PEM",
                       help="serve TLS with this certificate chain (needs --tls-key)")
    serve.add_argument("--tls-key", default=None, metavar="PEM",
                       help="the certificate's private key")
    serve.add_argument("--tls-client-ca", default=None, metavar="PEM",
                       help="require client certificates signed by this CA (mutual TLS)")
    serve.add_argument("--review-client-cert", default=None, metavar="PEM",
                       help="with --tls-client-ca: the client certificate (signed by that CA) "
                            "the review page presents to the gRPC port; without it the page "
                            "is off under mutual TLS")
    serve.add_argument("--review-client-key", default=None, metavar="PEM",
                       help="the review page's client certificate's key")
    serve.add_argument("--auth-tokens", default=None, metavar="JSON",
                       help="tokens file: every call needs a token allowed for its "
                            "collection (see `reidal token create`; docs/security.md)")
    serve.add_argument("--embedding-tls-ca", default=None, metavar="PEM",
                       help="with --embedding-url: TLS to it, trusting this CA")
    serve.add_argument("--embedding-tls-cert", default=None, metavar="PEM",
                       help="with --embedding-url: client certificate for mutual TLS")
    serve.add_argument("--embedding-tls-key", default=None, metavar="PEM",
                       help="with --embedding-url: the client certificate's key (its token: "
                            f"${EMBEDDING_TOKEN_ENV})")
    serve.add_argument("--image-roots", default=os.environ.get(IMAGE_ROOTS_ENV, ""),
                       metavar="DIR[,DIR...]",
                       help="directories whose files an image URI (a path or file://) may "
                            "name, symlinks resolved (default: $" + IMAGE_ROOTS_ENV + "; "
                            "none: no local path is read, clients send bytes)")
    serve.add_argument("--decode-budget-mb", type=float, default=DEFAULT_BUDGET_MB, metavar="MB",
                       help="most memory decoded images may hold at once, all requests "
                            "together (estimated from headers; default: %(default)s)")
    serve.add_argument("--decode-wait-s", type=float, default=DEFAULT_WAIT_S, metavar="S",
                       help="how long a request waits for decode memory before "
                            "RESOURCE_EXHAUSTED (default: %(default)s)")
    serve.add_argument("--log-json", action="store_true", help="JSON log lines")
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(func=_serve)

    health = sub.add_parser(
        "health", help="check a server's grpc.health.v1 status (exit 0 when SERVING)",
        description="One health check, for scripts and container probes (a probe every few "
                    "seconds should run `python -m reidal.health_probe`, the same check "
                    "without the CLI's start-up cost).")
    from reidal.health_probe import add_arguments as health_arguments

    health_arguments(health)
    health.set_defaults(func=_health)

    triton = sub.add_parser(
        "triton", help="run the bundled CPU Triton on fixed ports (a pod of its own)",
        description="Run the Triton server bundled in nvidia-pytriton on a model repository "
                    "(the default model is written into it when missing) until SIGTERM. "
                    "Point `reidal serve --triton-url` at its gRPC port.")
    triton.add_argument("--model-repository", default="model_repository", metavar="DIR",
                        help="the repository (default: %(default)s)")
    triton.add_argument("--model", default=DEFAULT_MODEL_NAME,
                        help="model to load at start (default: %(default)s)")
    triton.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default: %(default)s; 0.0.0.0 for all)")
    triton.add_argument("--grpc-port", type=int, default=8001)
    triton.add_argument("--http-port", type=int, default=8000)
    triton.add_argument("--metrics-port", type=int, default=8002)
    triton.add_argument("--workdir", default=None, metavar="DIR",
                        help="log and backend folder (default: a temporary folder)")
    triton.add_argument("--startup-timeout", type=float, default=180.0, metavar="S")
    triton.set_defaults(func=_triton)

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
    answer.add_argument("--annotator", default=None,
                        help="annotator id recorded with the answers (default: $USER; with "
                             "a token: the token's annotator, filled in by the server)")
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
    demo.add_argument("--preset", default="default", metavar="NAME",
                      help="which generated collection: 'default' (40 individuals) or "
                           "'hard' (reidal.data.synthetic_images.PRESETS) (80 individuals in shared scenes, near-duplicate "
                           "frames, look-alikes: weak features; ~2,400 images)")
    demo.add_argument("--dataset", default=None, metavar="CSV",
                      help="run on a WildlifeDatasets metadata CSV (image_id, identity, path) "
                           "instead of the generated collection")
    demo.add_argument("--no-train", action="store_true",
                      help="skip the last step (train on the answers, promote, re-measure)")
    demo.add_argument("--clustering", default="fixed", choices=CLUSTERING_MODES,
                      help="the collection's clustering mode: 'fixed' (default: the demo's "
                           "k1 / k2 / min_samples) or 'calibrated' (chosen every cycle by the "
                           "server from the vectors and the answers)")
    demo.add_argument("--sampler", default="aas", choices=SAMPLERS,
                      help="the collection's sampler (default: %(default)s)")
    demo.set_defaults(func=_demo)

    from reidal.benchmark.runner import add_bench_arguments, bench_command

    bench = sub.add_parser(
        "bench", help="AAS against its baselines on a dataset (the paper's Table 1, Figure 3)",
        description="Train every method (zero-shot, supervised skyline, SpCL alone, SpCL + "
                    "random / uncertainty / NIS / AAS pairs) on each dataset for each seed "
                    "under one schedule and per-cycle budget, resumably; write results.csv, "
                    "summary.md (means, Wilcoxon tests) and PNG plots. No server needed.")
    add_bench_arguments(bench)
    bench.set_defaults(func=bench_command)

    from reidal.cli_training import add_train_parser

    add_train_parser(sub, client)

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
    return parser


def run_command(args: argparse.Namespace, expected: tuple[type[BaseException], ...] = ()) -> int:
    """Run ``args.func``; the exit status (0 ok, 1 failed, 130 interrupted). A client
    error, a CliError, a ValueError, an OSError or one of ``expected`` prints one line (the
    traceback with $REIDAL_DEBUG set). Shared by every reidal command-line program."""
    from reidal_client import ReidalClientError

    try:
        return int(args.func(args) or 0)
    except (ReidalClientError, CliError, ValueError, OSError, *expected) as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (0 ok, 1 failed, 2 usage, 130 interrupted)."""
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
