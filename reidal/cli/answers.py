"""`reidal pairs`, `reidal answer`, `reidal identities`: the question-and-answer loop."""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from reidal.cli.common import CliError, access_token, budget_arg, connect, out, table

#: Columns of `reidal pairs --out`; `reidal answer --csv` reads the same file back.
PAIR_CSV_FIELDS = ("batch_id", "cycle", "pair_id", "image_a", "image_b", "similarity", "pool",
                   "region", "probability", "answer")


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


def _pairs(args: argparse.Namespace) -> int:
    with connect(args) as client:
        batch = client.get_query_pairs(args.collection, budget_arg(args.budget),
                                       filter=_where(args.where), skip_pending=args.skip_pending,
                                       request_id=args.request_id)
    out(f"batch {batch.batch_id} (cycle {batch.cycle}): {len(batch.pairs)} pair(s), budget "
         f"{batch.budget}, {batch.sampled_images} images sampled: {batch.reason_text}")
    ch = batch.clustering
    if ch is not None:
        out(f"clustering {ch.mode}: eps={ch.dbscan_eps:.3g} ({ch.eps_source}) k1={ch.k1} "
             f"k2={ch.k2} min_samples={ch.min_samples} finch_level={ch.finch_level} "
             f"({ch.finch_source}); sampler {batch.stats.get('sampler', 'aas')}")
    st = batch.stats
    if st.get("knn_index"):
        target = f", target {st['knn_target_recall']:.3g}" if st.get("knn_target_recall") else ""
        out(f"kNN graph {st['knn_index']}: recall@{st.get('knn_k', 0)} "
            f"{st.get('knn_recall', 0.0):.3f} +- {st.get('knn_recall_se', 0.0):.3f} on "
            f"{st.get('knn_recall_rows', 0)} sample rows{target}")
    if batch.finished:
        out("nothing left to ask for now")
    if args.out:
        with Path(args.out).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=PAIR_CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for row in batch.rows():
                writer.writerow({**row, "answer": ""})
        out(f"wrote {len(batch.pairs)} pair(s) to {args.out}; fill its 'answer' column "
             f"(same / different / unsure) and run: reidal answer {args.collection} "
             f"--csv {args.out}")
    elif batch.pairs:
        out(table(("pair_id", "image_a", "image_b", "similarity", "pool"),
                    [(p.pair_id, p.image_a, p.image_b, p.similarity, p.pool)
                     for p in batch.pairs]))
    return 0


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
    out(f"stored {result.stored_count} answer(s)"
         + (f", {result.replayed_count} replayed (request {result.request_id} was seen "
            f"before)" if result.replayed_count else "")
         + (f", {result.superseded_count} earlier answer(s) superseded"
            if result.superseded_count else ""))
    for c in result.contradictions:
        out(f"contradiction: {c.explanation}")


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
        out("  answer s (same), d (different), u (unsure) or q (quit)")


def _interactive(args: argparse.Namespace, client: Any) -> int:
    from reidal_client import Answer

    batch = client.get_query_pairs(args.collection, budget_arg(args.budget),
                                   skip_pending=args.skip_pending)
    out(f"batch {batch.batch_id} (cycle {batch.cycle}): {len(batch.pairs)} pair(s): "
         f"{batch.reason_text}")
    if not batch.pairs:
        return 0
    ids = sorted({i for p in batch.pairs for i in (p.image_a, p.image_b)})
    info = {i.image_id: i for i in client.list_images(
        args.collection, filter=_image_filter(ids))}
    answers = []
    for k, p in enumerate(batch.pairs, start=1):
        out(f"\npair {k}/{len(batch.pairs)}  {p.pair_id}  similarity {p.similarity:.3f} "
             f"({p.pool})")
        out(f"  A: {p.image_a}  {_image_label(info.get(p.image_a))}")
        out(f"  B: {p.image_b}  {_image_label(info.get(p.image_b))}")
        reply = _ask("  same individual? [s]ame / [d]ifferent / [u]nsure / [q]uit: ", input)
        if reply == "q":
            break
        answers.append(Answer(pair_id=p.pair_id, label=reply, annotator_id=args.annotator))
    if not answers:
        out("no answer given; nothing stored")
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
        args.annotator = "" if access_token(args) else os.environ.get("USER", "")
    with connect(args) as client:
        if args.interactive:
            return _interactive(args, client)
        answers, batch_id = read_answers_csv(Path(args.csv), args.annotator)
        _report_submit(client.submit_answers(args.collection, answers, batch_id=batch_id,
                                             request_id=args.request_id))
    return 0


def _identities(args: argparse.Namespace) -> int:
    with connect(args) as client:
        if args.csv:
            ident = client.export_identities_csv(args.collection, args.csv)
        else:
            ident = client.get_identities(args.collection)
    groups = sum(x.size > 1 for x in ident.identities)
    images = sum(x.size for x in ident.identities)
    out(f"{len(ident.identities)} identities ({groups} with more than one image) over "
         f"{images} images; {ident.applied_answers} answers applied, "
         f"{len(ident.contradictions)} contradiction(s); model {ident.model}, cycle "
         f"{ident.cycle}")
    for c in ident.contradictions:
        out(f"contradiction: {c.explanation}")
    if args.csv:
        out(f"wrote {images + len(ident.excluded_image_ids)} rows to {args.csv}")
        return 0
    shown = ident.identities if args.all else [x for x in ident.identities if x.size > 1]
    if shown:
        out(table(("identity", "size", "same", "different", "names", "images"),
                    [(x.identity_id, x.size, x.same_answers, x.different_answers,
                      ",".join(x.names) or ("new" if x.new_individual else "-"),
                      " ".join(x.image_ids[:4]) + (" ..." if x.size > 4 else ""))
                     for x in shown]))
    if not args.all and groups < len(ident.identities):
        out(f"({len(ident.identities) - groups} single-image identities not shown: --all)")
    return 0


def add_commands(sub: Any, client: argparse.ArgumentParser) -> None:
    """Register this group's commands on ``sub`` (``client``: the shared server-connection
    options, a parent parser)."""
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
