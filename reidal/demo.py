"""`reidal demo`: the whole active-learning loop, through the reidal server, over gRPC.

What it runs, every part real: the procedural image generator writes a collection to disk;
the all-in-one reidal server starts (:func:`reidal.serve.serve` with the bundled Triton on
CPU); the demo is then only a client (:class:`reidal_client.ReidalClient` on loopback):

1. CreateCollection with clustering parameters scaled to a small collection (or, with
   ``clustering="calibrated"``, chosen by the server every cycle),
2. AddImages streams every image in (embedded by the server through Triton on arrival),
3. per cycle: GetQueryPairs (Ambiguity-Aware Sampling on the server), a simulated
   annotator answers from the generator's ground truth, SubmitConstraints, then
   GetIdentities (the server's NP3-refined identities), whose pseudo-label quality is
   measured against the ground truth.

Retrieval (mAP / Top-1 under the open-set protocol) needs vectors: the ones the server
stored for the collection's pinned model version (GetVectors, so they are the vectors the
sampling used), read again only when the collection's model version changes; no image is
embedded twice.

4. then (unless ``train=False``) the loop closes through the TrainingService: StartTraining
   trains the embedding head on the collection's images and every answer given (server
   defaults), WatchJob follows it epoch by epoch, PromoteModel re-embeds the collection with
   the new model version Triton now serves, and retrieval and identities are measured again.

The run ends with a table of the cycles, written as CSV and as a PNG, and ``training.csv``
(before / after training) when it trained.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reidal.core.evaluation import clustering_quality, evaluate_open_set, open_set_split
from reidal.data.synthetic_images import generate_dataset, preset_config
from reidal.data.wildlife import load_wildlife_csv
from reidal.demo_params import (  # noqa: F401 - re-exported, the demo's defaults
    DEMO_BUDGET_PER_CYCLE,
    DEMO_K1,
    DEMO_K2,
    DEMO_MIN_SAMPLES,
)
from reidal.embedding.spec import DEFAULT_MODEL_NAME
from reidal.serve import serve
from reidal.serve_config import ServeConfig
from reidal.simulation.loop import CycleReport
from reidal.simulation.oracle import SimulatedOracle
from reidal.training_jobs import DEFAULT_MODE
from reidal_client import (
    Answer,
    ClusteringParams,
    ModelRef,
    NotFound,
    ReidalClient,
    SamplingParams,
)
from reidal_client.progress import TextProgress

#: The collection the demo creates (deleted and re-created on every run).
DEMO_COLLECTION = "demo"
#: Annotator id recorded with the simulated answers.
DEMO_ANNOTATOR = "simulated-annotator"
#: Images per AddImages message.
DEMO_INGEST_BATCH = 32


@dataclass
class DemoCycleReport(CycleReport):
    """A cycle as the demo sees it through the API: ``retrieval`` holds the open-set
    metrics of the collection's vectors after the cycle. NP3's change count is not part
    of the API, so ``n_changed_by_np3`` is -1 (unknown)."""

    retrieval: dict[str, float] = field(default_factory=dict)
    #: The clustering the cycle's GetQueryPairs used (BatchStats.clustering: mode, eps, k1,
    #: k2, min_samples, finch_level, eps_source, ...) and its sampler.
    clustering: dict[str, Any] = field(default_factory=dict)


#: The per-cycle clustering columns of cycles.csv: the benchmark's results.csv names
#: (reidal.benchmark.methods.CLUSTERING_KEYS), the rest of BatchStats.clustering, and the
#: kNN graph's index and measured recall (BatchStats.knn_index, knn_recall).
CLUSTERING_COLUMNS = ("clustering_mode", "eps", "k1", "k2", "min_samples", "finch_level",
                      "eps_source", "finch_source", "sampler", "knn_index", "knn_recall")


def clustering_columns(batch: Any) -> dict[str, Any]:
    """A batch's chosen clustering (reidal_client.QueryBatch) as cycles.csv's columns."""
    ch = batch.clustering
    if ch is None:
        return {}
    return {"clustering_mode": ch.mode, "eps": ch.dbscan_eps, "k1": ch.k1, "k2": ch.k2,
            "min_samples": ch.min_samples, "finch_level": ch.finch_level,
            "eps_source": ch.eps_source, "finch_source": ch.finch_source,
            "sampler": batch.stats.get("sampler", "aas"),
            "knn_index": batch.stats.get("knn_index", ""),
            "knn_recall": batch.stats.get("knn_recall", "")}


@dataclass
class DemoResult:
    reports: list[CycleReport]
    zero_shot: dict[str, float]
    initial_quality: dict[str, float]
    csv_path: Path
    png_path: Path
    server_address: str = ""
    #: Before / after the training step (None when the demo did not train): mAP, top1, f1,
    #: ari, model version, seconds.
    training: dict[str, Any] | None = None


def _say(msg: str) -> None:
    print(msg, flush=True)


def identity_labels(assignment: dict[str, str], image_ids: list[str]) -> np.ndarray:
    """Identity of each image in ``image_ids`` order as int labels; an image alone in its
    identity (or missing, i.e. excluded) is -1, DBSCAN's outlier convention, so the
    cluster count means "identities of two images or more"."""
    names = np.array([assignment.get(i, "") for i in image_ids], dtype=object)
    _, codes, counts = np.unique(names.astype(str), return_inverse=True, return_counts=True)
    codes = codes.reshape(-1)
    labels = codes.astype(np.int64)
    labels[(counts[codes] < 2) | (names == "")] = -1
    return labels


def _budget_text(budget: float | int, n_pairs: int) -> str:
    if isinstance(budget, float):
        return f"{100 * budget:g} % of {n_pairs} pairs (~{math.ceil(budget * n_pairs)} pairs)"
    return f"{budget} pairs"


def run_demo(out_dir: str | Path = "demo-output", *, cycles: int = 5,
             budget_per_cycle: float | int = DEMO_BUDGET_PER_CYCLE, seed: int = 0,
             n_individuals: int | None = None, dataset_csv: str | Path | None = None,
             train: bool = True, preset: str = "default", clustering: str = "fixed",
             sampler: str = "aas", train_mode: str | None = None) -> DemoResult:
    """Run the demo; with ``dataset_csv`` (WildlifeDatasets layout) on that data instead of
    the generated collection (``preset``: a name of
    :data:`reidal.data.synthetic_images.PRESETS`, e.g. "hard"); ``train``: end with the
    training step. ``clustering``: the collection's ClusteringParams.mode ("fixed": the
    demo's k1 / k2 / min_samples; "calibrated": every value chosen per cycle by the
    server); ``sampler``: SamplingParams.sampler ("aas" or "aas-continued"); ``train_mode``:
    the training job's TrainingConfig.mode ("head" or "partial"; None: the server's
    default, reidal.training_jobs.DEFAULT_MODE). Output lands in
    ``out_dir``; the server's state in ``out_dir/server`` (its model repository is reused
    by the next run; the collection always starts from the pretrained version 1)."""
    if int(cycles) < 1:
        raise ValueError(f"cycles must be >= 1, got {cycles}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = preset_config(preset, seed=seed) if n_individuals is None else preset_config(
        preset, seed=seed, n_individuals=n_individuals)

    t = time.perf_counter()
    if dataset_csv is not None:
        _say(f"[1/7] loading the collection {dataset_csv}")
        dataset = load_wildlife_csv(dataset_csv)
    else:
        _say(f"[1/7] generating the synthetic collection ({config.n_individuals} individuals) "
             f"in {out / 'collection'}")
        dataset = load_wildlife_csv(generate_dataset(config, out / "collection"))
    image_ids = [str(i) for i in dataset.image_ids]
    labels = dataset.labels()
    n = len(image_ids)
    _say(f"  {n} images of {len(dataset.identity_names)} individuals "
         f"({time.perf_counter() - t:.1f} s)")

    _say("[2/7] starting the all-in-one reidal server (bundled Triton on CPU, default model)")
    t = time.perf_counter()
    server = serve(ServeConfig(data_dir=out / "server"))  # all services, bundled Triton
    try:
        _say(f"  serving {', '.join(server.services)} on {server.address}, Triton at "
             f"{server.triton_url} ({time.perf_counter() - t:.1f} s)")
        with ReidalClient(server.address, timeout_s=600.0) as client:
            cid = DEMO_COLLECTION
            fixed = clustering == "fixed"
            shown = (f"k1={DEMO_K1}, k2={DEMO_K2}, min_samples={DEMO_MIN_SAMPLES}" if fixed
                     else "clustering calibrated every cycle") + f", sampler {sampler}"
            _say(f"[3/7] collection {cid!r}: CreateCollection ({shown}), then AddImages "
                 "through the CollectionService (embedded on arrival)")
            try:
                client.delete_collection(cid, actor="reidal demo")  # a previous run's
            except NotFound:
                pass
            species = dataset.species
            client.create_collection(
                cid, species=", ".join(sorted({str(s) for s in species if s}))[:200]
                if species is not None else "",
                clustering=ClusteringParams(k1=DEMO_K1, k2=DEMO_K2,
                                            min_samples=DEMO_MIN_SAMPLES) if fixed
                else ClusteringParams(mode=clustering),
                sampling=SamplingParams(seed=seed, sampler=sampler),
                # version 1 is the pretrained model; a previous run's training added others
                model=ModelRef(DEFAULT_MODEL_NAME, "1"))
            t = time.perf_counter()
            bar = TextProgress("  ingest", stream=sys.stdout)
            added = client.add_images(
                cid, [(r.image_id, r.path, {k: v for k, v in r.metadata.items() if v})
                      for r in dataset], batch_size=DEMO_INGEST_BATCH, progress=bar)
            bar.close()
            model = added.model
            _say(f"  {added.added} images added and {added.embedded} embedded by {model} "
                 f"({time.perf_counter() - t:.1f} s)")

            vectors: dict[Any, np.ndarray] = {}

            def retrieval(current: Any) -> dict[str, float]:
                if current not in vectors:
                    got = client.get_vectors(cid, model=current)
                    row = {iid: k for k, iid in enumerate(got.ids)}
                    vectors[current] = got.vectors[[row[r.image_id] for r in dataset]]
                X = vectors[current]
                split = open_set_split(dataset.identities, split=dataset.splits, X=X,
                                       seed=seed)
                return evaluate_open_set(X, dataset.identities, split)

            _say(f"[4/7] retrieval: the vectors the server stored with model version {model} "
                 "(GetVectors; nothing is embedded again)")
            t = time.perf_counter()
            zero_shot = retrieval(model)
            _say(f"  open-set retrieval of the pretrained model: mAP "
                 f"{100 * zero_shot['mAP']:.1f} %, Top-1 {100 * zero_shot['top1']:.1f} %, "
                 f"AUC-ROC {100 * zero_shot['AUC_ROC']:.1f} % "
                 f"({int(zero_shot['n_queries'])} queries, {int(zero_shot['n_gallery'])} "
                 f"gallery; {time.perf_counter() - t:.1f} s)")

            n_pairs = n * (n - 1) // 2
            _say(f"[5/7] {cycles} active-learning cycles over gRPC: GetQueryPairs (AAS) -> "
                 f"simulated annotator -> SubmitConstraints -> GetIdentities (NP3); budget "
                 f"{_budget_text(budget_per_cycle, n_pairs)} per cycle")
            oracle = SimulatedOracle(labels, seed=seed)
            index = {image_id: k for k, image_id in enumerate(image_ids)}
            initial = clustering_quality(
                identity_labels(client.get_identities(cid).assignment(), image_ids), labels)
            _say(f"  before any answer: DBSCAN pseudo-labels F1 {initial['f1']:.3f}, "
                 f"ARI {initial['ari']:.3f}")
            reports: list[CycleReport] = []
            for _ in range(int(cycles)):
                t0 = time.perf_counter()
                batch = client.get_query_pairs(cid, budget_per_cycle)
                pairs = np.array([[index[p.image_a], index[p.image_b]] for p in batch.pairs],
                                 dtype=np.int64).reshape(-1, 2)
                if len(pairs):
                    same = oracle(pairs)
                    client.submit_answers(
                        cid, [Answer(pair_id=p.pair_id, label=bool(s),
                                     annotator_id=DEMO_ANNOTATOR)
                              for p, s in zip(batch.pairs, same.tolist(), strict=True)],
                        batch_id=batch.batch_id)
                ident = client.get_identities(cid)
                col = client.get_collection(cid)
                quality = clustering_quality(identity_labels(ident.assignment(), image_ids),
                                             labels)
                report = DemoCycleReport(
                    cycle=batch.cycle, pairs_asked=len(batch.pairs), budget=batch.budget,
                    cumulative_pairs=col.pairs_asked,
                    cumulative_budget_pct=100.0 * col.budget_used,
                    contradictions=len(ident.contradictions), reason=batch.reason_text,
                    n_clusters=int(quality["n_clusters"]), n_changed_by_np3=-1,
                    seconds=time.perf_counter() - t0, quality=quality,
                    stats=dict(batch.stats), pairs=pairs, retrieval=retrieval(col.model),
                    clustering=clustering_columns(batch))
                reports.append(report)
                r = report.retrieval
                _say(f"  cycle {report.cycle}: asked {report.pairs_asked} pairs (cumulative "
                     f"{report.cumulative_pairs} = {report.cumulative_budget_pct:.3f} % of all "
                     f"pairs), {report.contradictions} contradictions, F1 {quality['f1']:.3f}, "
                     f"ARI {quality['ari']:.3f}, mAP {100 * r['mAP']:.1f} %, Top-1 "
                     f"{100 * r['top1']:.1f} % ({report.seconds:.1f} s; {report.reason})")
            trained = None
            if train:
                last = reports[-1]  # cycles >= 1
                before = {"mAP": last.retrieval["mAP"], "top1": last.retrieval["top1"],
                          "f1": last.quality["f1"], "ari": last.quality["ari"]}
                trained = _train_and_promote(client, cid, image_ids, labels, retrieval, before,
                                             train_mode)
    finally:
        server.stop(grace=5)

    _say(f"[7/7] {len(reports)} cycles (pseudo-labels vs ground truth; retrieval open-set)")
    for line in format_table(reports, initial):
        _say("  " + line)
    csv_path, png_path = write_table(out, reports, initial, zero_shot)
    _say(f"table: {csv_path}\nplot:  {png_path}")
    if trained is not None:
        _say(f"training: {out / 'training.csv'}")
        with (out / "training.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["stage", "model_version", "mAP", "top1", "f1", "ari"])
            for stage in ("before", "after"):
                row = trained[stage]
                w.writerow([stage, row["version"], row["mAP"], row["top1"], row["f1"],
                            row["ari"]])
    return DemoResult(reports, zero_shot, initial, csv_path, png_path, server.address,
                      trained)


def _train_and_promote(client: Any, cid: str, image_ids: list[str], labels: np.ndarray,
                       retrieval: Any, before: dict[str, float], mode: str | None = None
                       ) -> dict[str, Any]:
    """The training step of the demo (see the module docstring): returns before / after.
    ``mode``: the job's TrainingConfig.mode (None: the server's default)."""
    t = time.perf_counter()
    col = client.get_collection(cid)
    _say(f"[6/7] training over gRPC: StartTraining on {cid!r} ({mode or DEFAULT_MODE} mode, "
         f"the server's defaults, {col.answer_count} answers as constraints) -> WatchJob -> "
         "PromoteModel")
    job = client.start_training(cid, **({"mode": mode} if mode else {}))
    shown: set[int] = set()

    def progress(j: Any) -> None:
        if j.epoch and j.epoch not in shown and (j.epoch % 5 == 0 or j.epoch == j.epochs):
            shown.add(j.epoch)
            _say(f"  epoch {j.epoch}/{j.epochs}: loss {j.loss:.3f}, {j.clusters} "
                 f"pseudo-identities, {j.unclustered} un-clustered")

    job = client.wait_job(job.job_id, progress=progress)
    if job.state != "SUCCEEDED":
        raise RuntimeError(f"training job {job.job_id} ended {job.state}")
    _say(f"  job {job.job_id} produced {job.model} ({time.perf_counter() - t:.1f} s); "
         "Triton loaded it; re-embedding the collection with it")
    client.promote_model(cid, job.model.version, model=job.model.name)
    col = client.get_collection(cid)
    after = dict(retrieval(col.model))
    quality = clustering_quality(identity_labels(client.get_identities(cid).assignment(),
                                                 image_ids), labels)
    after = {"mAP": after["mAP"], "top1": after["top1"], "f1": quality["f1"],
             "ari": quality["ari"], "version": col.model.version}
    _say(f"  after training: mAP {100 * before['mAP']:.1f} -> {100 * after['mAP']:.1f} %, "
         f"Top-1 {100 * before['top1']:.1f} -> {100 * after['top1']:.1f} %, identities F1 "
         f"{before['f1']:.3f} -> {after['f1']:.3f} ({time.perf_counter() - t:.1f} s in all)")
    return {"before": {**before, "version": job.base_model.version}, "after": after,
            "seconds": time.perf_counter() - t}


def format_table(reports: list[CycleReport], initial: dict[str, float]) -> list[str]:
    """The cycle table as text lines (cycle 0 = before any answer). ``eps``, ``k1``,
    ``ms`` (min_samples) and ``lvl`` (FINCH level) are the values the cycle's
    GetQueryPairs clustered with, ``src`` where eps came from (BatchStats.clustering)."""
    lines = [f"{'cycle':>5} {'asked':>6} {'budget %':>9} {'contra':>6} {'prec':>6} "
             f"{'recall':>6} {'F1':>6} {'ARI':>6} {'clusters':>8} {'mAP %':>6} {'Top-1 %':>7} "
             f"{'eps':>5} {'k1':>3} {'ms':>3} {'lvl':>3} {'src':>7} {'sec':>5}  why",
             f"{0:>5} {0:>6} {0.0:>9.3f} {0:>6} {initial['precision']:>6.3f} "
             f"{initial['recall']:>6.3f} {initial['f1']:>6.3f} {initial['ari']:>6.3f} "
             f"{initial['n_clusters']:>8} {'':>6} {'':>7} {'':>5} {'':>3} {'':>3} {'':>3} "
             f"{'':>7} {'':>5}  no answers yet"]
    for r in reports:
        q = r.quality
        ret = getattr(r, "retrieval", {}) or {}
        m = f"{100 * ret['mAP']:.1f}" if "mAP" in ret else "-"
        t1 = f"{100 * ret['top1']:.1f}" if "top1" in ret else "-"
        c = getattr(r, "clustering", {}) or {}
        eps = f"{c['eps']:.3f}" if "eps" in c else "-"
        lines.append(f"{r.cycle:>5} {r.pairs_asked:>6} {r.cumulative_budget_pct:>9.3f} "
                     f"{r.contradictions:>6} {q['precision']:>6.3f} {q['recall']:>6.3f} "
                     f"{q['f1']:>6.3f} {q['ari']:>6.3f} {r.n_clusters:>8} {m:>6} {t1:>7} "
                     f"{eps:>5} {c.get('k1', '-'):>3} {c.get('min_samples', '-'):>3} "
                     f"{c.get('finch_level', '-'):>3} {c.get('eps_source', '-'):>7} "
                     f"{r.seconds:>5.1f}  {r.reason}")
    return lines


def write_table(out: Path, reports: list[CycleReport], initial: dict[str, float],
                zero_shot: dict[str, float]) -> tuple[Path, Path]:
    """The cycle table as CSV and as a PNG plot of quality against budget used.

    ``mAP`` / ``top1`` are the retrieval after each cycle (a report's ``retrieval`` when it
    has one, else ``zero_shot``); ``mAP_zero_shot`` / ``top1_zero_shot`` the pretrained
    model's.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ret(r: CycleReport | None) -> dict[str, float]:
        return (getattr(r, "retrieval", None) or zero_shot) if r is not None else zero_shot

    csv_path = out / "cycles.csv"
    fields = ["cycle", "pairs_asked", "cumulative_pairs", "cumulative_budget_pct",
              "contradictions", "precision", "recall", "f1", "ari", "n_clusters", "mAP", "top1",
              "mAP_zero_shot", "top1_zero_shot", "seconds", "reason", *CLUSTERING_COLUMNS]
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerow({"cycle": 0, "pairs_asked": 0, "cumulative_pairs": 0,
                    "cumulative_budget_pct": 0.0, "contradictions": 0,
                    **{k: initial[k] for k in ("precision", "recall", "f1", "ari")},
                    "n_clusters": initial["n_clusters"], "mAP": zero_shot["mAP"],
                    "top1": zero_shot["top1"], "mAP_zero_shot": zero_shot["mAP"],
                    "top1_zero_shot": zero_shot["top1"], "seconds": 0.0,
                    "reason": "no answers yet"})
        for r in reports:
            w.writerow({"cycle": r.cycle, "pairs_asked": r.pairs_asked,
                        "cumulative_pairs": r.cumulative_pairs,
                        "cumulative_budget_pct": round(r.cumulative_budget_pct, 5),
                        "contradictions": r.contradictions,
                        **{k: r.quality[k] for k in ("precision", "recall", "f1", "ari")},
                        "n_clusters": r.n_clusters, "mAP": ret(r)["mAP"],
                        "top1": ret(r)["top1"], "mAP_zero_shot": zero_shot["mAP"],
                        "top1_zero_shot": zero_shot["top1"], "seconds": round(r.seconds, 3),
                        "reason": r.reason, **(getattr(r, "clustering", {}) or {})})
    budget = [0.0] + [r.cumulative_budget_pct for r in reports]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("f1", "pairwise F1"), ("ari", "ARI"), ("precision", "precision"),
                       ("recall", "recall")):
        ax1.plot(budget, [initial[key]] + [r.quality[key] for r in reports], marker="o",
                 label=label)
    for key, label in (("mAP", "retrieval mAP"), ("top1", "retrieval Top-1")):
        ax1.plot(budget, [zero_shot[key]] + [ret(r)[key] for r in reports], linestyle="--",
                 marker=".", label=label)
    ax1.set_xlabel("cumulative budget used (% of all pairs)")
    ax1.set_ylabel("quality")
    ax1.set_title("AAS + NP3 through the reidal server")
    ax1.legend(fontsize="small")
    ax1.grid(alpha=0.3)
    ax2.bar([r.cycle for r in reports], [r.pairs_asked for r in reports])
    ax2.set_xlabel("cycle")
    ax2.set_ylabel("pairs asked")
    ax2.set_title("questions per cycle")
    fig.tight_layout()
    png_path = out / "cycles.png"
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return csv_path, png_path


if __name__ == "__main__":  # pragma: no cover
    run_demo(sys.argv[1] if len(sys.argv) > 1 else "demo-output")
