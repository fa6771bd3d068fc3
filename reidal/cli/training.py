"""`reidal train ...`: start, follow, cancel and promote training jobs of a server.

    reidal train start COLLECTION [--epochs 25] [--lr 1e-4] [--set k1=10 ...] [--wait] [--promote]
    reidal train watch JOB_ID
    reidal train list [COLLECTION]
    reidal train cancel JOB_ID
    reidal train promote COLLECTION VERSION

A job trains the embedding head on the collection's images and every answer stored so far
(server defaults: README, "Training"); ``--promote`` re-embeds the collection with the version
the job produced once it succeeds, so the next ``reidal pairs`` asks from the better space.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from reidal.cli.common import CliError, connect, out, table

#: TrainingConfig fields with their own flag; any field can also be given with --set.
_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("mode", str, "head (the embedding head) or partial (also the last backbone stages; "
                  "server default: head)"),
    ("trainable_stages", int, "partial mode: backbone stages trained, from the last (default 1)"),
    ("epochs", int, "epochs (server default 25)"),
    ("epochs_per_cycle", int, "epochs between re-clusterings with the answers (default 5)"),
    ("iters_per_epoch", int, "optimiser steps per epoch (default 50; partial mode 10)"),
    ("lr", float, "Adam learning rate (default 1e-4)"),
    ("seed", int, "seed of the job's random draws (default 0)"),
)


def _value(text: str) -> Any:
    """``--set`` values: int, float, true/false or a string, in that order."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    return text


def training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config the user set: the flags given, then every ``--set key=value``."""
    config = {name: getattr(args, name) for name, _t, _h in _FLAGS
              if getattr(args, name) is not None}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--set takes key=value, got {item!r}")
        config[key.strip().replace("-", "_")] = _value(value.strip())
    return config


def _job_line(job: Any) -> str:
    parts = [f"job {job.job_id}", job.state.lower(), f"epoch {job.epoch}/{job.epochs}"]
    if job.epoch:
        parts += [f"loss {job.loss:.3f}", f"{job.clusters} clusters",
                  f"{job.unclustered} un-clustered", f"{job.answers_used} answers used"]
    if job.state == "SUCCEEDED":
        parts.append(f"-> {job.model.name} version {job.model.version}")
    if job.error_message:
        parts.append(f"({job.error_code}: {job.error_message})")
    return ", ".join(parts)


def _follow(client: Any, job_id: str, say: Callable[[str], None]) -> Any:
    last: list[str] = []

    def show(job: Any) -> None:
        line = _job_line(job)
        if not last or line != last[-1]:
            say(line)
            last.append(line)

    return client.wait_job(job_id, progress=show)


def _start(args: argparse.Namespace) -> int:
    with connect(args) as client:
        job = client.start_training(args.collection, **training_overrides(args))
        out(f"started training job {job.job_id} on {args.collection!r} from "
             f"{job.base_model.name} version {job.base_model.version}")
        if not (args.wait or args.promote):
            out(f"follow it with: reidal train watch {job.job_id}")
            return 0
        job = _follow(client, job.job_id, out)
        if job.state != "SUCCEEDED":
            return 1
        if args.promote:
            _promote_with(client, args.collection, job.model.version, job.model.name)
    return 0


def _promote_with(client: Any, collection: str, version: str, model: str = "") -> None:
    from reidal_client.progress import TextProgress

    out(f"re-embedding {collection!r} with version {version} ...")
    bar = TextProgress(f"promote {collection}")
    try:
        client.promote_model(collection, version, model=model,
                             progress=lambda op: bar(op.done, op.total or None))
    finally:
        bar.close()
    col = client.get_collection(collection)
    out(f"{collection!r} now uses {col.model.name} version {col.model.version}")


def _watch(args: argparse.Namespace) -> int:
    with connect(args) as client:
        job = _follow(client, args.job_id, out)
    return 0 if job.state == "SUCCEEDED" else 1


def _list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        jobs = client.list_training_jobs(args.collection or "")
    if not jobs:
        out("no training jobs")
        return 0
    out(table(["job", "collection", "state", "epoch", "loss", "answers", "model", "created"],
                [[j.job_id, j.collection_id, j.state.lower(), f"{j.epoch}/{j.epochs}",
                  j.loss, j.answers_used,
                  f"{j.model.name}:{j.model.version}" if j.model.version else "",
                  j.created_at.strftime("%Y-%m-%d %H:%M") if j.created_at else ""]
                 for j in jobs]))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with connect(args) as client:
        out(_job_line(client.cancel_job(args.job_id)))
    return 0


def _promote(args: argparse.Namespace) -> int:
    with connect(args) as client:
        _promote_with(client, args.collection, args.version, args.model)
    return 0


def add_commands(sub: Any, client: argparse.ArgumentParser) -> None:
    """Register ``reidal train`` (``client``: the shared server-connection options)."""
    train = sub.add_parser("train", help="train the embedding model on a collection's answers",
                           description=__doc__.split("\n\n")[-1].strip())
    tsub = train.add_subparsers(dest="action", required=True, metavar="ACTION")
    start = tsub.add_parser("start", parents=[client], help="start a training job")
    start.add_argument("collection")
    for name, kind, text in _FLAGS:
        start.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
                           help=text)
    start.add_argument("--set", action="append", metavar="FIELD=VALUE",
                       help="any TrainingConfig field (training.proto), e.g. --set k1=10; "
                            "repeatable")
    start.add_argument("--wait", action="store_true", help="follow the job until it ends")
    start.add_argument("--promote", action="store_true",
                       help="wait, then re-embed the collection with the new version")
    start.set_defaults(func=_start)
    watch = tsub.add_parser("watch", parents=[client], help="follow a job epoch by epoch")
    watch.add_argument("job_id")
    watch.set_defaults(func=_watch)
    lst = tsub.add_parser("list", parents=[client], help="training jobs, oldest first")
    lst.add_argument("collection", nargs="?", default="")
    lst.set_defaults(func=_list)
    cancel = tsub.add_parser("cancel", parents=[client], help="cancel a job")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=_cancel)
    promote = tsub.add_parser("promote", parents=[client],
                              help="re-embed a collection with a model version")
    promote.add_argument("collection")
    promote.add_argument("version")
    promote.add_argument("--model", default="", help="model name (default: the collection's)")
    promote.set_defaults(func=_promote)
