"""`python -m reidal.training`: one training run from the command line, alone or under torchrun.

    python -m reidal.training --dataset metadata.csv --mode full --device cuda --out run1
    torchrun --nproc_per_node 4 -m reidal.training --collection zebras --data-dir /var/lib/reidal \\
        --model-repository /models --export onnx --mode full --device cuda --out /shared/run1

The cluster entry point (the server's TrainingService runs head mode on CPU; this runs
either mode anywhere, and ``full`` data-parallel under torchrun, one process a GPU). What it
trains on, one of:

- ``--dataset``: a collection in the WildlifeDatasets layout, or the generated synthetic one
  (the benchmark's setting: identities known, a simulated annotator may answer);
- ``--collection``: a collection of a reidal store (``--data-dir``, or ``--database-url`` /
  ``$REIDAL_DATABASE_URL`` with the blobs under ``--data-dir``): its images and every answer
  people gave, from the collection's model version (``--model NAME[:VERSION]`` to choose)
  in ``--model-repository``; the new version is recorded as a finished training job, so
  ``reidal train list`` shows it and ``reidal train promote`` re-embeds with it.

It trains a copy of the model with :class:`reidal.training.SpCLTrainer`; rank 0 writes:

- ``OUT/model/`` the trained model (``model.pt`` + ``model.json``, :func:`save_model`),
- ``OUT/reports.json`` every epoch's report, the config, throughput and the final metrics,
- ``OUT/ranks/RANK.json`` (every rank) digests of the final parameters and hybrid memory,
  so a cluster run can check that its replicas agree,
- with ``--model-repository``: the model as the next version there, for the bundled CPU
  Triton (``--export python``) or the NGC GPU Triton (``--export onnx``; ``model.pt`` and
  ``model.json`` are kept beside ``model.onnx`` so a later job can start from it);
  ``--triton-url`` then asks that Triton to load it.

Questions: with ``--sampler aas|random`` pairs are asked at every cycle start and answered
by a simulated annotator from the dataset's identities (``--error-rate`` flips answers):
the benchmark's protocol, run as ``python -m reidal.benchmark.train`` (the same flags). This
module never builds that annotator: :func:`main` / :func:`run` take it as ``annotator``
(a production module does not depend on reidal.simulation; the benchmark's entry point
passes :class:`reidal.simulation.oracle.SimulatedOracle`). ``--sampler none`` (default) is
SpCL alone; answers people gave through the server reach training through the
TrainingService instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reidal.core.evaluation import open_set_split
from reidal.core.questions import Oracle
from reidal.data.synthetic_images import SyntheticConfig, iter_samples
from reidal.data.wildlife import load_wildlife_csv
from reidal.embedding.model import build_default_model, load_model, save_model
from reidal.embedding.spec import DEFAULT_INPUT_SIZE, DEFAULT_MODEL_NAME
from reidal.embedding.triton_repo import model_versions
from reidal.errors import ReidalError
from reidal.training import EvalSet, SpCLTrainer, TrainConfig
from reidal.training import distributed as D
from reidal.training.config import MODES, SAMPLERS, mode_schedule


def _digest(tensors: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(np.ascontiguousarray(t.detach().cpu().float().numpy()).tobytes())
    return h.hexdigest()


def synthetic_items(config: Any) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """The PIL images, identities and train/test split of a generated collection
    (``config``: a :class:`reidal.data.synthetic_images.SyntheticConfig`), in memory."""
    samples = list(iter_samples(config))
    return ([s.image for s in samples], np.array([s.identity for s in samples]),
            np.array([s.split for s in samples]))


def csv_items(path: str, *, labelled_only: bool = False
              ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """A WildlifeDatasets metadata CSV's image paths, identities (``""`` = unlabelled;
    ``labelled_only`` leaves those images out) and split column (None unless every image
    kept has one: :func:`reidal.core.evaluation.open_set_split` then draws the split)."""
    ds = load_wildlife_csv(path)
    if labelled_only:
        ds = ds.subset(ds.is_labelled)
    ids = np.array(["" if x is None else str(x) for x in ds.identities], dtype=object)
    col = ds.splits
    splits = None if col is None or any(s is None for s in col) else col.astype(str)
    return [str(p) for p in ds.paths], ids, splits


def load_items(dataset: str, image_size: int, seed: int) -> tuple[list[Any], np.ndarray,
                                                                  np.ndarray | None, str]:
    """Images (paths or PIL images), identities (``""`` = unlabelled), split column, a name.

    ``dataset``: a WildlifeDatasets metadata CSV, or ``synthetic`` / ``synthetic:N`` (the
    generator's default collection, or N individuals), rendered in memory.
    """
    if dataset == "synthetic" or dataset.startswith("synthetic:"):
        n = dataset.partition(":")[2]
        cfg = SyntheticConfig(seed=seed, image_size=image_size,
                              **({"n_individuals": int(n)} if n else {}))
        return (*synthetic_items(cfg), f"synthetic ({cfg.n_individuals} ids)")
    return (*csv_items(dataset), str(dataset))


#: Builds the annotator of a ``--sampler aas|random`` run:
#: ``annotator(identities, error_rate=..., seed=...)`` -> an Oracle answering pairs of
#: those images (:class:`reidal.simulation.oracle.SimulatedOracle` has this signature).
AnnotatorFactory = Callable[..., Oracle]

#: Where a run that asks questions is started (it supplies the simulated annotator).
QUESTIONS_ENTRY = "python -m reidal.benchmark.train"


def build_parser(prog: str = "python -m reidal.training") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog,
                                description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", metavar="CSV|synthetic[:N]")
    src.add_argument("--collection", metavar="ID", help="a collection of a reidal store")
    p.add_argument("--data-dir", default=None,
                   help="the server's data directory (SQLite store and the image blobs)")
    p.add_argument("--database-url", default=os.environ.get("REIDAL_DATABASE_URL", ""),
                   help="PostgreSQL store (default: $REIDAL_DATABASE_URL)")
    p.add_argument("--model", default="", metavar="NAME[:VERSION]|pretrained",
                   help="model to start from (default: the collection's version in "
                        "--model-repository; with --dataset the pretrained model)")
    p.add_argument("--out", required=True, help="output folder (rank 0 writes it)")
    p.add_argument("--mode", choices=MODES, default="head")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--image-size", type=int, default=DEFAULT_INPUT_SIZE[0],
                   help="square input size (pixels) of the pretrained model started from "
                        "(default: the served default model's, %(default)s)")
    p.add_argument("--trainable-stages", type=int, default=None,
                   help="partial mode: backbone stages trained, counted from the last")
    p.add_argument("--augment-views", type=int, default=None,
                   help="partial mode: augmented views cached per image (0: clean only)")
    p.add_argument("--pair-loss-weight", type=float, default=None,
                   help="weight of the contrastive loss on answered / implied pairs (0: off)")
    # Unset schedule options take the mode's small-collection schedule
    # (reidal.training.config.mode_schedule: HEAD_SCHEDULE or PARTIAL_SCHEDULE).
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--epochs-per-cycle", type=int, default=None)
    p.add_argument("--iters-per-epoch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--step-size", type=int, default=None)
    p.add_argument("--num-identities", type=int, default=16, help="P of a P x K batch")
    p.add_argument("--num-instances", type=int, default=4, help="K of a P x K batch")
    p.add_argument("--k1", type=int, default=None, help="Jaccard k1 (default: SpCL's 30)")
    p.add_argument("--k2", type=int, default=None)
    p.add_argument("--min-samples", type=int, default=None)
    p.add_argument("--eps", type=float, default=None)
    p.add_argument("--sampler", choices=SAMPLERS, default="none")
    p.add_argument("--budget", type=float, default=0.005,
                   help="pairs per cycle: a fraction of all pairs (< 1) or a count (>= 1)")
    p.add_argument("--question-rounds", type=int, default=1,
                   help="rounds a cycle's allowance is asked in (0: until spent or nothing is "
                        "left; 1: the paper's one draw)")
    p.add_argument("--error-rate", type=float, default=0.0,
                   help="simulated annotator: probability an answer is flipped")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers (full mode)")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--checkpoint-dir", default=None,
                   help="atomic checkpoint every epoch (shared by all ranks)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evaluate", action="store_true",
                   help="open-set retrieval every cycle (needs identities; the split column "
                        "when every image has one)")
    p.add_argument("--model-repository", default=None,
                   help="also write the model as the next version of --model-name here")
    p.add_argument("--model-name", default=None,
                   help="Triton model name (default: the base model's, else reidal's)")
    p.add_argument("--export", choices=("python", "onnx"), default=None,
                   help="repository format: python backend (CPU Triton) or onnx (NGC Triton); "
                        "default: what the repository's config serves")
    p.add_argument("--triton-url", default=None,
                   help="ask this Triton (gRPC host:port) to load the new version")
    return p


def run(args: argparse.Namespace, annotator: AnnotatorFactory | None = None) -> dict[str, Any]:
    """Train as ``args`` say; the summary rank 0 writes to reports.json (every rank returns
    its own). ``annotator`` answers the questions of ``--sampler aas|random`` (module
    docstring); without it such a run is refused."""
    constraints, base = None, None
    if args.collection:
        items, constraints, base = _open_collection(args)
        identities = np.full(len(items), "", dtype=object)
        splits, name = None, f"collection {args.collection!r}"
    else:
        items, identities, splits, name = load_items(args.dataset, args.image_size, args.seed)
    labelled = identities != ""
    budget: int | float = int(args.budget) if args.budget >= 1 else float(args.budget)
    schedule = {k: v for k, v in mode_schedule(args.mode).items()
                if k in TrainConfig.__dataclass_fields__}
    extra = {k: getattr(args, k) for k in ("k1", "k2", "min_samples", "eps", "epochs",
                                          "epochs_per_cycle", "iters_per_epoch", "lr",
                                          "step_size", "trainable_stages", "augment_views",
                                          "pair_loss_weight")
             if getattr(args, k) is not None}
    extra = {**schedule, **extra}
    config = TrainConfig(
        mode=args.mode, device=args.device, num_identities=args.num_identities,
        num_instances=args.num_instances, sampler=args.sampler, budget_per_cycle=budget,
        question_rounds=args.question_rounds,
        num_workers=args.num_workers, amp=not args.no_amp, seed=args.seed,
        checkpoint_dir=args.checkpoint_dir, eval_every=extra["epochs_per_cycle"], **extra)
    if base is not None:
        model = base[0]
    elif args.model and args.model != "pretrained":
        raise ValueError("--model names a repository version: it needs --collection (with "
                         "--dataset training starts from the pretrained model)")
    else:
        model = build_default_model(input_size=(args.image_size, args.image_size))

    train_idx = np.arange(len(items))
    eval_set = None
    if args.evaluate:
        if not labelled.all():
            raise ValueError("--evaluate needs an identity for every image")
        split = open_set_split(identities, split=splits, seed=args.seed)
        eval_set = EvalSet(items, identities, split)
        train_idx = split.train_idx  # the protocol trains on the known identities' images
    oracle = None
    if args.sampler != "none":
        if annotator is None:
            raise ValueError(f"--sampler {args.sampler} asks questions that a simulated "
                             "annotator answers from the dataset's identities: run "
                             f"`{QUESTIONS_ENTRY}` with the same flags, or use --sampler "
                             "none (people's answers: --collection)")
        if not labelled[train_idx].all():
            raise ValueError(f"--sampler {args.sampler} answers from the dataset's identities, "
                             "and some training images have none: use --sampler none")
        oracle = annotator(identities[train_idx], error_rate=args.error_rate,
                           seed=args.seed)  # answers from any identity values
    data = [items[i] for i in train_idx]

    rank = D.setup(torch.device("cuda" if torch.cuda.is_available() else "cpu").type
                   if args.device == "auto" else args.device)
    out = Path(args.out)
    if rank.is_main:
        print(f"training on {name}: {len(data)} images, mode {args.mode}, device "
              f"{args.device}, {rank.world_size} process(es), sampler {args.sampler}",
              flush=True)

    def on_epoch(r: Any) -> None:
        line = (f"epoch {r.epoch + 1}/{config.epochs} (cycle {r.cycle}): loss {r.loss:.3f}, "
                f"{r.n_clusters} clusters, {r.n_unclustered} un-clustered, "
                f"{r.cumulative_pairs} pairs asked, {sum(r.seconds.values()):.1f} s")
        if r.retrieval:
            line += f", mAP {100 * r.retrieval['mAP']:.1f} %"
        print(line, flush=True)

    t0 = time.perf_counter()
    try:
        result = SpCLTrainer(config, model).fit(data, oracle=oracle, eval_set=eval_set,
                                                constraints=constraints, on_epoch=on_epoch,
                                                resume=args.resume)
    finally:
        D.teardown(rank)
    seconds = time.perf_counter() - t0
    train_seconds = sum(r.seconds.get("train", 0.0) for r in result.reports)
    images = sum(r.iterations for r in result.reports) * config.batch_size
    summary = {
        "dataset": name, "config": config.to_dict(), "world_size": result.world_size,
        "rank": rank.rank, "seconds": seconds,
        "train_images_per_s": images / train_seconds if train_seconds else None,
        "initial_retrieval": result.initial_retrieval,
        "final_retrieval": result.reports[-1].retrieval if result.reports else {},
        "pairs_asked": result.reports[-1].cumulative_pairs if result.reports else 0,
        "resumed_from_epoch": result.resumed_from_epoch,
        # parameters only: DDP keeps them identical; BatchNorm running statistics are each
        # process's own (rank 0's are saved), as with any DDP model without SyncBatchNorm
        "model_digest": _digest(list(result.model.parameters())),
        "memory_digest": _digest([torch.as_tensor(result.memory_features)]),
    }
    (out / "ranks").mkdir(parents=True, exist_ok=True)
    (out / "ranks" / f"{rank.rank}.json").write_text(json.dumps(
        {k: summary[k] for k in ("rank", "world_size", "model_digest", "memory_digest")}))
    if rank.is_main:
        save_model(result.model, out / "model")
        if args.model_repository:
            # Imported here: the export path needs the server's packages (gRPC, the store),
            # a training node that only writes OUT/model does not.
            from reidal.embedding.triton_versions import triton_loader
            from reidal.training_io import export_version

            name_out = args.model_name or (base[1] if base else None) or DEFAULT_MODEL_NAME
            loader = (triton_loader(args.triton_url, args.model_repository)
                      if args.triton_url else None)
            # the new version is loaded beside the loaded ones: collections pin those
            summary["repository_version"] = export_version(
                result.model, args.model_repository, name_out, fmt=args.export,
                load=None if loader is None else
                lambda name, version: loader(name, [str(version)], keep_ready=True))
            summary["model_name"] = name_out
            if args.collection:
                summary["job_id"] = _record_job(args, config, base, summary, result,
                                                len(constraints.answers))
        summary["reports"] = [r.to_dict() for r in result.reports]
        (out / "reports.json").write_text(json.dumps(summary, indent=1, default=str))
        rate = summary["train_images_per_s"]
        print(f"done in {seconds:.1f} s ({rate or 0:.1f} training images/s); model in "
              f"{out / 'model'}" + (f"; version {summary['repository_version']} in "
                                    f"{args.model_repository}" if args.model_repository else ""),
              flush=True)
    return summary


def _open_store(args: argparse.Namespace) -> Any:
    from reidal.store import Store  # the server's packages: only a --collection run needs them

    if not args.data_dir:
        raise ValueError("--collection needs --data-dir (the images' blobs; the SQLite store "
                         "too unless --database-url)")
    return Store(database_url=args.database_url) if args.database_url else Store(args.data_dir)


def _open_collection(args: argparse.Namespace) -> tuple[list[Any], Any, tuple]:
    """The collection's images and answers, and (model, name, version) to start from. The
    store is closed again before training (rank 0 reopens it to record the job). Images
    decode as the EmbeddingService decodes them for this model (JPEGs drafted to its
    input size: :func:`reidal.embedding.images.open_image`)."""
    # the server's packages: only a --collection run needs them
    from reidal.blobs import BlobStore
    from reidal.training_io import collection_constraints, collection_images

    store = _open_store(args)
    try:
        col = store.collections.get(args.collection)
        base = _base_model(args, col)
        size = getattr(base[0], "arch", {}).get("input_size") or (args.image_size,)
        decoded = collection_images(store, BlobStore(Path(args.data_dir) / "blobs"),
                                    args.collection, draft_size=max(size))
        assert decoded is not None  # None only when a cancel event is given and set
        ids, images = decoded
        return images, collection_constraints(store, args.collection, ids), base
    finally:
        store.close()


def _base_model(args: argparse.Namespace, col: Any) -> tuple:
    """(model, name, version) a collection's training starts from (--model)."""
    if args.model == "pretrained":
        return (build_default_model(input_size=(args.image_size, args.image_size)),
                DEFAULT_MODEL_NAME, "")
    name, _, version = (args.model or "").partition(":")
    name = name or col.model_name or DEFAULT_MODEL_NAME
    version = version or (col.model_version if name == col.model_name else "")
    if not args.model_repository:
        raise ValueError("--collection starts from a version in --model-repository "
                         "(or give --model pretrained)")
    if not version:
        found = model_versions(args.model_repository, name)
        if not found:
            raise ValueError(f"{args.model_repository} has no version of {name!r}")
        version = str(found[-1])
    folder = Path(args.model_repository) / name / version
    if not (folder / "model.json").is_file():
        raise ValueError(f"{folder} holds no torch model (model.pt + model.json) to train "
                         "from; export versions with reidal, or give --model pretrained")
    return load_model(folder), name, version


def _record_job(args: argparse.Namespace, config: Any, base: tuple, summary: dict,
                result: Any, answers: int) -> str:
    """A finished training-job row, so the server lists the version this run produced."""
    from reidal.store import JOB_RUNNING, JOB_SUCCEEDED  # the server's: a --collection run

    last = result.reports[-1] if result.reports else None
    store = _open_store(args)
    try:
        job = store.jobs.create(args.collection, config.to_dict(),
                                base_model_name=base[1], base_model_version=base[2])
        store.jobs.update(job.job_id, state=JOB_RUNNING)
        store.jobs.update(
            job.job_id, state=JOB_SUCCEEDED, model_name=summary["model_name"],
            model_version=str(summary["repository_version"]),
            progress={"epoch": len(result.reports), "loss": float(last.loss) if last else 0.0,
                      "clusters": int(last.n_clusters) if last else 0,
                      "unclustered": int(last.n_unclustered) if last else 0,
                      "pairs_asked": 0, "answers_used": answers, "metrics": {}})
    finally:
        store.close()
    return job.job_id


def main(argv: list[str] | None = None, annotator: AnnotatorFactory | None = None,
         prog: str = "python -m reidal.training") -> int:
    """Parse ``argv``, train, return the exit status (2: refused, with the reason on
    stderr). ``annotator``: see :func:`run`."""
    args = build_parser(prog).parse_args(argv)
    try:
        run(args, annotator)
    except (ValueError, ReidalError) as exc:  # e.g. NotFound: an unknown collection
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
