"""`reidal bench`: run every (dataset, method, seed), resumably, then write the tables and plots.

Output folder::

    runs/<dataset>__<method>__seed<k>.json   one finished run (its config key inside)
    results.csv                              one row per dataset x method x seed x cycle
    summary.md                               Table 1 per dataset, every cycle, Wilcoxon tests
    <dataset>_map_vs_budget.png              Figure 3
    <dataset>_pairs_per_cycle.png

Resuming: a run whose JSON exists with the same key (a hash of everything that decides its
numbers: the dataset's fingerprint, method, seed, schedule, budget, error rate, split seed,
model and ``--threads`` when given) is not recomputed; a run whose key differs is run again and overwritten. When
every run is done the dataset is not even loaded. Outputs are rewritten only when their
bytes change. Memory: one dataset's cached features at a time, one trainer alive at a time
(each run's model copy is dropped before the next starts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reidal.benchmark.budget import BudgetSpec, parse_budget_spec
from reidal.benchmark.datasets import (
    SPLIT_SEED,
    dataset_fingerprint,
    dataset_name,
    default_feature_cache,
    load_dataset,
)
from reidal.benchmark.methods import (
    METHODS,
    QUICK_SCHEDULE,
    TRITON_PREFIX,
    BenchSchedule,
    RunContext,
    check_method,
    parse_triton_method,
    run_method,
)
from reidal.benchmark.plots import map_vs_budget_png, pairs_per_cycle_png
from reidal.benchmark.report import results_csv, summary_markdown
from reidal.embedding.spec import ModelSpec
from reidal.embedding.triton_client import TritonEmbedder

#: Bumped when a run's stored numbers would change meaning; older run files are redone.
RUN_FORMAT = 1
#: The benchmark's default per-cycle budget: the demo's 0.5 % of all pool pairs, 5 cycles
#: (the paper's 0.02 % of a ~150-image pool would be 2 pairs a cycle).
DEFAULT_BUDGET = "0.5%x5"
DEFAULT_SEEDS = 4
#: ``--quick``: the small synthetic set, 2 seeds, 4 methods, 2 short cycles (CI).
QUICK_DATASET = "synthetic-small"
QUICK_SEEDS = 2
QUICK_METHODS = ("zero-shot", "usl", "random", "aas")
QUICK_BUDGET = "0.5%x2"
#: The schedule's command-line options: (argparse dest, BenchSchedule field); the flag is
#: the dest with dashes.
SCHEDULE_OPTIONS = (("lr", "lr"), ("iters", "iters_per_epoch"),
                    ("epochs_per_cycle", "epochs_per_cycle"), ("step_size", "step_size"),
                    ("k1", "k1"), ("k2", "k2"), ("min_samples", "min_samples"),
                    ("num_identities", "num_identities"),
                    ("question_rounds", "question_rounds"), ("mode", "mode"),
                    ("image_size", "image_size"), ("trainable_stages", "trainable_stages"),
                    ("augment_views", "augment_views"),
                    ("pair_loss_weight", "pair_loss_weight"), ("clustering", "clustering"))
#: Clustering parameters an explicit option pins under ``--clustering calibrated``.
PINNABLE_OPTIONS = ("k1", "k2", "min_samples")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark: datasets x methods x seeds under one schedule, budget and annotator."""

    datasets: tuple[str, ...]
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = tuple(range(DEFAULT_SEEDS))
    budget: BudgetSpec = field(default_factory=lambda: parse_budget_spec(DEFAULT_BUDGET))
    error_rate: float = 0.0
    schedule: BenchSchedule = field(default_factory=BenchSchedule)
    threads: int | None = None
    triton_spec: str | None = None  # ModelSpec file (.json/.toml) for triton: rows
    #: Folder of the on-disk backbone feature cache (None: compute, keep nothing);
    #: see reidal.benchmark.datasets.backbone_features. Not part of a run's key: the
    #: cached features are the ones that would be computed.
    feature_cache: str | None = None

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("name at least one dataset (a bundled name or a CSV)")
        if not self.methods:
            raise ValueError("name at least one method")
        for m in self.methods:
            check_method(m)
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods repeat: {list(self.methods)}")
        names = [dataset_name(d) for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"two datasets would be reported under one name: {names}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                 for s in self.seeds):
            raise ValueError(f"seeds must be integers >= 0, got {list(self.seeds)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {list(self.seeds)}")
        if not 0.0 <= float(self.error_rate) <= 0.5:
            raise ValueError(f"error_rate must be in [0, 0.5], got {self.error_rate}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


def run_key(config: BenchConfig, fingerprint: str, method: str, seed: int) -> tuple[str, dict]:
    """The hash that identifies one run's numbers, and what it hashes."""
    from reidal.embedding.model import DEFAULT_BACKBONE, DEFAULT_DIM  # torch: only for a run

    spec = None
    if method.startswith(TRITON_PREFIX) and config.triton_spec is not None:
        spec = Path(config.triton_spec).read_text(encoding="utf-8")
    what = {
        "format": RUN_FORMAT, "dataset": fingerprint, "method": method, "seed": seed,
        "schedule": config.schedule.to_dict(),
        "budget": {"per_cycle": config.budget.per_cycle, "cycles": config.budget.cycles},
        "error_rate": float(config.error_rate), "split_seed": SPLIT_SEED,
        "model": {"backbone": DEFAULT_BACKBONE, "dim": DEFAULT_DIM, "head_seed": 0},
        "triton_spec": spec,
    }
    # torch's and faiss's CPU kernels sum in a thread-count-dependent order, so the numbers
    # depend on --threads: a run with a thread count is its own run. Left out when not
    # given (the libraries' own choice), so keys stored before this stay valid.
    if config.threads is not None:
        what["threads"] = int(config.threads)
    blob = json.dumps(what, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20], what


def run_path(out: Path, dataset: str, method: str, seed: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", method)
    return out / "runs" / f"{dataset}__{safe}__seed{seed}.json"


def _load_run(path: Path, key: str) -> dict[str, Any] | None:
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return run if run.get("key") == key else None


def _write_atomic(path: Path, data: bytes) -> bool:
    """Write ``data`` unless the file already holds exactly it; True when written."""
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def _say(line: str) -> None:
    print(line, flush=True)


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except (ImportError, AttributeError):  # pragma: no cover
        pass


def _check_triton(methods: Sequence[str]) -> None:
    """Fail before hours of training when a Triton row's server does not answer."""
    for m in methods:
        if m.startswith(TRITON_PREFIX):
            name, url = parse_triton_method(m)
            with TritonEmbedder(url) as emb:
                if not emb.server_ready() or not emb.is_ready(name):
                    raise ValueError(f"{m}: Triton at {url} is not ready to serve {name!r}")


@dataclass
class BenchResult:
    rows: list[dict[str, Any]]
    ran: int  # runs computed now
    skipped: int  # runs found finished
    files: list[Path]  # output files (written or already up to date)


def run_benchmark(config: BenchConfig, out: str | Path, *,
                  progress: Callable[[str], None] | None = None, command: str = ""
                  ) -> BenchResult:
    """Run what is not done yet, then write results.csv, summary.md and the plots.

    ``progress``: receives one line per run and per cycle (default: printed, flushed).
    ``command``: the command line quoted in summary.md (default: rebuilt from ``config``).
    """
    if progress is None:
        progress = _say
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    plan = []
    for spec in config.datasets:
        fp = dataset_fingerprint(spec)
        name = dataset_name(spec)
        for seed in config.seeds:
            for m in config.methods:
                key, what = run_key(config, fp, m, seed)
                plan.append((spec, name, m, seed, key, what))
    total = len(plan)
    runs: dict[tuple[str, str, int], dict[str, Any]] = {}
    todo = []
    for k, (spec, name, m, seed, key, what) in enumerate(plan, 1):
        done = _load_run(run_path(out, name, m, seed), key)
        if done is not None:
            runs[(name, m, seed)] = done
            progress(f"[{k}/{total}] {name} {m} seed {seed}: finished before, skipped")
        else:
            todo.append((k, spec, name, m, seed, key, what))
    if todo:
        _run_all(config, out, todo, total, runs, progress)
    rows = []
    for _, name, m, seed, _, _ in plan:
        for r in runs[(name, m, seed)]["rows"]:
            rows.append({"dataset": name, "method": m, "seed": seed, **r})
    files = _write_outputs(config, out, rows, runs, command)
    return BenchResult(rows, len(todo), total - len(todo), files)


def _run_all(config: BenchConfig, out: Path, todo: list, total: int,
             runs: dict[tuple[str, str, int], dict[str, Any]],
             progress: Callable[[str], None]) -> None:
    import gc

    from reidal.embedding.model import build_default_model  # torch: only for a run

    _set_threads(config.threads)
    _check_triton(sorted({t[3] for t in todo}))
    triton_spec = None
    if config.triton_spec is not None:
        triton_spec = ModelSpec.from_file(config.triton_spec)
    size = config.schedule.image_size
    model = build_default_model(input_size=(size, size))
    ctx = RunContext(model, config.schedule, config.budget, float(config.error_rate),
                     triton_spec, progress)
    for spec in dict.fromkeys(t[1] for t in todo):
        t = time.perf_counter()
        progress(f"loading {spec}: images, backbone features (once), open-set split")
        data = load_dataset(spec, model, cache_dir=config.feature_cache, progress=progress)
        progress(f"  {len(data.identities)} images; pool {data.pool.size} images of "
                 f"{len(set(data.identities[data.pool]))} known identities, "
                 f"{data.split.query_idx.size} queries, {data.split.gallery_idx.size} gallery; "
                 f"allowance {config.budget.pairs_per_cycle(data.pool.size)} pairs a cycle x "
                 f"{config.budget.cycles} ({time.perf_counter() - t:.1f} s)")
        for k, _, name, m, seed, key, what in (x for x in todo if x[1] == spec):
            progress(f"[{k}/{total}] {name} {m} seed {seed}")
            result = run_method(m, data, seed, ctx)
            run = {"key": key, "config": what, "dataset": name, "method": m, "seed": seed,
                   **result}
            _write_atomic(run_path(out, name, m, seed),
                          (json.dumps(run, indent=1, sort_keys=True) + "\n").encode())
            runs[(name, m, seed)] = run
            last = result["rows"][-1]
            progress(f"  done in {result['seconds']:.0f} s: mAP {100 * last['mAP']:.1f} %, "
                     f"Top-1 {100 * last['top1']:.1f} %, {last['cumulative_pairs']} pairs "
                     f"({last['budget_used_pct']:.3f} %)")
            del result
            gc.collect()
        del data
        gc.collect()


def _settings(config: BenchConfig) -> list[str]:
    s = config.schedule
    return [
        f"datasets: {', '.join(dataset_name(d) for d in config.datasets)}; methods: "
        f"{', '.join(config.methods)}; seeds: {', '.join(map(str, config.seeds))}",
        f"budget: {config.budget} (per cycle, % of all pairs of the training pool, or pairs); "
        f"simulated annotator error rate {config.error_rate:g}",
        f"schedule (every method): {_mode_text(s)}, "
        f"{config.budget.cycles} cycles x {s.epochs_per_cycle} epochs x {s.iters_per_epoch} "
        f"iterations, Adam lr {s.lr:g}, StepLR every {s.step_size} epochs, batch "
        f"{s.num_identities} x {s.num_instances}; "
        + (f"DBSCAN on Jaccard eps {s.eps:g}, k1 {s.k1}, k2 {s.k2}, min_samples {s.min_samples}"
           if s.clustering == "fixed" else
           "DBSCAN / FINCH parameters calibrated every cycle (reidal.core.calibration; kept "
           f"as given: {', '.join(s.clustering_pinned) or 'none'}; chosen values in "
           "results.csv)")
        + "; a cycle's allowance asked in "
        + ("rounds until spent or nothing is left" if s.question_rounds == 0 else
           f"up to {s.question_rounds} round(s)"),
        "protocol: open-set split (20 % of training identities held out, gallery of up to 5 "
        "images per known identity by similarity under the untrained model, queries = test "
        f"split), split seed {SPLIT_SEED}; metrics after each cycle's last epoch",
        "`budget used %` is cumulative pairs asked / all pairs of the pool; `supervised` "
        "knows every label (100 %, no pairs asked); `zero-shot` and Triton rows train nothing "
        "(the same numbers every cycle)",
    ]


def _mode_text(s: BenchSchedule) -> str:
    text = (f"{s.mode} mode (EfficientNet-Lite0 at {s.image_size} px, 256-d head; "
            + ("frozen backbone)" if s.mode == "head" else
               f"its last {s.trainable_stages} stage(s) trained on {s.augment_views} cached "
               f"augmented views per image + the clean one, the views drawn once per "
               f"dataset and shared by every method and seed)"))
    if s.pair_loss_weight:
        text += f", loss on the answered / implied pairs at weight {s.pair_loss_weight:g}"
    return text


def _write_outputs(config: BenchConfig, out: Path, rows: list[dict[str, Any]],
                   runs: dict[tuple[str, str, int], dict[str, Any]], command: str
                   ) -> list[Path]:
    import statistics


    files = {out / "results.csv": results_csv(rows).encode(),
             out / "summary.md": summary_markdown(
                 rows, title="reidal benchmark: AAS against its baselines",
                 settings=_settings(config), command=command or _command(config, out)
             ).encode()}
    for d in dict.fromkeys(r["dataset"] for r in rows):
        init = [v["initial"]["mAP"] for (dd, _, _), v in runs.items()
                if dd == d and "initial" in v]
        initial = {"mAP": statistics.fmean(init)} if init else None
        files[out / f"{d}_map_vs_budget.png"] = map_vs_budget_png(rows, d, initial)
        files[out / f"{d}_pairs_per_cycle.png"] = pairs_per_cycle_png(rows, d)
    for path, data in files.items():
        _write_atomic(path, data)
    return list(files)


def _command(config: BenchConfig, out: Path) -> str:
    args = ["reidal", "bench"]
    for d in config.datasets:
        args += ["--dataset", d]
    args += ["--methods", *config.methods, "--budget", str(config.budget), "--seeds",
             format_seeds(config.seeds), "--error-rate", f"{config.error_rate:g}"]
    if config.threads is not None:
        args += ["--threads", str(config.threads)]
    s, default = config.schedule, BenchSchedule()
    for opt, name in SCHEDULE_OPTIONS:
        value = getattr(s, name)
        if value != getattr(default, name) or name in s.clustering_pinned:
            args += ["--" + opt.replace("_", "-"),
                     value if isinstance(value, str) else f"{value:g}"]
    args += ["--out", str(out)]
    return shlex.join(args)


# --------------------------------------------------------------------------- command line


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"4"`` -> 4 seeds, 0..3 (``"1"``: exactly one, seed 0); ``"0,2,7"`` -> those seeds;
    ``"5,"`` -> seed 5 alone. ``"0"`` is refused: a count of no seeds (seed 0 alone is
    ``"1"`` or ``"0,"``)."""
    s = text.strip()
    try:
        if "," in s:
            seeds = tuple(int(x) for x in s.split(",") if x.strip())
            if not seeds:
                raise ValueError
        else:
            count = int(s)
            if count == 0:
                raise ValueError("--seeds 0 is a count of no seeds: for seed 0 alone write "
                                 "--seeds 1 (a count) or --seeds 0, (a list)")
            if count < 0:
                raise ValueError
            seeds = tuple(range(count))
    except ValueError as err:
        if str(err).startswith("--seeds"):
            raise
        raise ValueError(f"--seeds must be a count (4 = seeds 0..3) or a list (0,2,7; one "
                         f"seed: 5,), got {text!r}") from None
    return seeds


def format_seeds(seeds: Sequence[int]) -> str:
    """The ``--seeds`` text :func:`parse_seeds` reads back as ``seeds``: a count for 0..N-1,
    else a list (one seed with a trailing comma)."""
    seeds = tuple(seeds)
    if seeds == tuple(range(len(seeds))):
        return str(len(seeds))
    return ",".join(map(str, seeds)) + ("," if len(seeds) == 1 else "")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `reidal bench` (shared by the CLI and ``python -m``)."""
    d = BenchSchedule()
    p.add_argument("--dataset", action="append", default=None, metavar="CSV_OR_NAME",
                   help="a WildlifeDatasets metadata CSV, or 'synthetic' (the default set) / "
                        "'synthetic-small'; repeat for several (default: synthetic)")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help=f"any of {', '.join(METHODS)}, triton:MODEL@HOST:PORT "
                        "(default: all seven)")
    p.add_argument("--budget", default=None, metavar="SPEC",
                   help=f"per-cycle budget x cycles: 0.5%%x5, 0.005x5 or 100x5 pairs "
                        f"(default {DEFAULT_BUDGET.replace('%', '%%')})")
    p.add_argument("--seeds", default=None, metavar="N|LIST",
                   help=f"number of seeds (N: seeds 0..N-1) or a list 0,2,7 (one seed: 5,) "
                        f"(default {DEFAULT_SEEDS})")
    p.add_argument("--error-rate", type=float, default=0.0,
                   help="probability that the simulated annotator flips an answer (default 0)")
    p.add_argument("--out", default="bench-output", help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"CI mode: {QUICK_DATASET}, {QUICK_SEEDS} seeds, "
                        f"{', '.join(QUICK_METHODS)}, budget {QUICK_BUDGET.replace('%', '%%')}, a short "
                        "schedule "
                        "(options given explicitly still win)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and faiss (default: their own); the numbers "
                        "depend on it, so a run with a thread count is kept apart from one "
                        "without (part of the resume key)")
    p.add_argument("--feature-cache", default=None, metavar="DIR|none",
                   help="folder keeping the backbone features between invocations (default: "
                        "$REIDAL_CACHE_DIR/bench-features, else ~/.cache/reidal/bench-features; "
                        "'none' = compute every time)")
    g = p.add_argument_group("schedule (the same for every method; defaults: see BenchSchedule)")
    g.add_argument("--lr", type=float, default=None, help=f"Adam learning rate ({d.lr:g})")
    g.add_argument("--iters", type=int, default=None,
                   help=f"iterations per epoch ({d.iters_per_epoch}; with --mode partial "
                        "partial mode's own, 10: reidal.training.config.PARTIAL_SCHEDULE)")
    g.add_argument("--epochs-per-cycle", type=int, default=None, help=f"({d.epochs_per_cycle})")
    g.add_argument("--step-size", type=int, default=None,
                   help=f"StepLR step in epochs ({d.step_size})")
    g.add_argument("--k1", type=int, default=None, help=f"Jaccard k1 ({d.k1})")
    g.add_argument("--k2", type=int, default=None, help=f"Jaccard k2 ({d.k2})")
    g.add_argument("--min-samples", type=int, default=None,
                   help=f"DBSCAN min_samples ({d.min_samples})")
    g.add_argument("--num-identities", type=int, default=None,
                   help=f"pseudo-identities per batch ({d.num_identities}; x 4 images)")
    g.add_argument("--clustering", default=None, choices=("fixed", "calibrated"),
                   help="DBSCAN / FINCH parameters: 'fixed' (the schedule's) or 'calibrated' "
                        "(chosen every cycle from the data and the answers; --k1 / --k2 / "
                        f"--min-samples given explicitly stay as given) ({d.clustering})")
    g.add_argument("--question-rounds", type=int, default=None,
                   help=f"rounds a cycle's allowance is asked in, 0 = until spent or nothing "
                        f"is left, 1 = the paper's one draw ({d.question_rounds})")
    g.add_argument("--mode", choices=("head", "partial"), default=None,
                   help=f"training mode of every trained method: head (frozen backbone) or "
                        f"partial (its last --trainable-stages stages too) ({d.mode})")
    g.add_argument("--image-size", type=int, default=None,
                   help=f"the model's square input size in pixels ({d.image_size})")
    g.add_argument("--trainable-stages", type=int, default=None,
                   help=f"partial mode: backbone stages trained, from the last "
                        f"({d.trainable_stages})")
    g.add_argument("--augment-views", type=int, default=None,
                   help=f"partial mode: augmented views cached per image ({d.augment_views})")
    g.add_argument("--pair-loss-weight", type=float, default=None,
                   help=f"weight of the contrastive loss on answered / implied pairs, 0 = off "
                        f"({d.pair_loss_weight:g})")
    p.add_argument("--triton-spec", default=None, metavar="JSON_OR_TOML",
                   help="ModelSpec file for triton: rows whose model config carries no "
                        "preprocessing parameters")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """A BenchConfig from parsed `reidal bench` options (``--quick`` fills what is not given)."""
    from dataclasses import replace

    quick = bool(args.quick)
    base = QUICK_SCHEDULE if quick else BenchSchedule()
    overrides = {name: getattr(args, opt) for opt, name in SCHEDULE_OPTIONS
                 if getattr(args, opt) is not None}
    if overrides.get("mode", base.mode) != base.mode and "iters_per_epoch" not in overrides:
        # a mode's own steps an epoch (partial: PARTIAL_SCHEDULE's 10, each step also runs
        # the last backbone stage) unless --iters says otherwise
        from reidal.training.config import mode_schedule

        overrides["iters_per_epoch"] = mode_schedule(overrides["mode"])["iters_per_epoch"]
    if overrides.get("clustering") == "calibrated":
        overrides["clustering_pinned"] = tuple(o for o in PINNABLE_OPTIONS if o in overrides)
    schedule = replace(base, **overrides)
    datasets = tuple(args.dataset or ([QUICK_DATASET] if quick else ["synthetic"]))
    methods = tuple(args.methods or (QUICK_METHODS if quick else METHODS))
    budget = parse_budget_spec(args.budget or (QUICK_BUDGET if quick else DEFAULT_BUDGET))
    seeds = parse_seeds(args.seeds) if args.seeds else tuple(
        range(QUICK_SEEDS if quick else DEFAULT_SEEDS))
    cache = args.feature_cache
    if cache is None:
        cache = str(default_feature_cache())
    elif cache.strip().lower() == "none":
        cache = None
    return BenchConfig(datasets=datasets, methods=methods, seeds=seeds, budget=budget,
                       error_rate=float(args.error_rate), schedule=schedule,
                       threads=args.threads, triton_spec=args.triton_spec,
                       feature_cache=cache)


def bench_command(args: argparse.Namespace) -> int:
    """`reidal bench`: run, then print where the outputs are."""
    config = config_from_args(args)
    t = time.perf_counter()
    res = run_benchmark(config, args.out, command=_command(config, Path(args.out)))
    print(f"{res.ran} run(s) computed, {res.skipped} finished before; "
          f"{time.perf_counter() - t:.0f} s. Wrote:", flush=True)
    for f in res.files:
        print(f"  {f}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reidal.benchmark",
                                description="AAS against its baselines (Table 1, Figure 3)")
    add_bench_arguments(p)
    return bench_command(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
