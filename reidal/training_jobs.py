"""Training jobs of the server: durable records, one runner thread per job, model export.

Transport-free: :mod:`reidal.services.training` translates messages around this module.

A job trains the embedding head (head mode, :class:`reidal.training.SpCLTrainer`), or the
head and the last backbone stages (partial mode), of the collection's current model version
on the collection's images (their cached backbone features or lower-stage maps),
with no oracle (answers come from people, through the sampling and constraint services, so
the trainer's sampler is "none"), then writes the trained model as the next version of the
model into the Triton model repository and asks Triton to load it (explicit model control).
The collection keeps its vectors: :func:`promote` re-embeds it with the new version.

Models per collection: the new version is for the job's collection only. Every collection
keeps the version it pins (stored with it, so every replica serves the same one) until
PromoteModel (or EmbedCollection) switches that collection; the model's default version,
which a new collection pins and a request naming no version gets, is the model config's
(:data:`reidal.embedding.triton_repo.P_DEFAULT_VERSION`) and training never changes it.
The job's load keeps every pinned version loaded, with the default and the new one, and
unloads the others (:meth:`TrainingJobs.served_versions`); a pinned version Triton dropped
anyway (a Triton restart loads its config's newest versions) is loaded again by the first
request that needs it (:class:`reidal.embedding.triton_client.TritonEmbedder`).

Jobs are rows of the store's ``training_jobs`` table. A job survives its client; a server
start marks jobs left QUEUED or RUNNING as FAILED
(:meth:`reidal.store.jobs.Jobs.fail_interrupted`), so none is ever shown running
after a restart.

A job runs in the process that started it, but CancelJob may reach any replica on the
database: the request is recorded in the store (``cancel_requested``) and the running
process finds it through :class:`CancelSignal`, the flag its trainer checks between steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from reidal.embedding.triton_repo import default_version
from reidal.errors import FailedPrecondition, InvalidArgument, NotFound, status_code
from reidal.ingest import embed_missing
from reidal.logs import log_kv
from reidal.runtime import Runtime
from reidal.store import (
    JOB_CANCELLED,
    JOB_FAILED,
    JOB_FINAL_STATES,
    JOB_QUEUED,
    JOB_RUNNING,
    JOB_SUCCEEDED,
    Store,
    TrainingJobRecord,
)
from reidal.training_io import (  # noqa: F401 - also importable from here
    EXPORT_ATTEMPTS,
    collection_constraints,
    collection_images,
    export_version,
    repository_format,
)
from reidal.training_limits import check_job_config

log = logging.getLogger("reidal.training_jobs")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    JOB_QUEUED, JOB_RUNNING, JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED)
FINAL_STATES = JOB_FINAL_STATES
JobRecord = TrainingJobRecord
INTERRUPTED = "interrupted by a server restart"
#: Seconds between a running job's reads of its stored cancel request (one made on another
#: replica) when no notification brought it sooner (operational, not part of the method).
CANCEL_CHECK_S = 2.0

#: TrainConfig fields a client may set (TrainingConfig in training.proto).
CLIENT_FIELDS: tuple[str, ...] = (
    "mode", "epochs", "epochs_per_cycle", "iters_per_epoch", "num_identities",
    "num_instances", "lr", "weight_decay", "step_size", "gamma", "momentum", "temperature",
    "eps", "min_samples", "k1", "k2", "eps_gap", "reliability_percentile", "self_paced",
    "cluster_features", "seed", "trainable_stages", "augment_views", "pair_loss_weight")
#: The modes a server job may run (CPU); "full" needs GPUs: reidal.training under torchrun.
SERVER_MODES = ("head", "partial")
#: The mode of a job whose client names none.
DEFAULT_MODE = "head"

#: What a server job fixes whatever the client asks: no questions, no checkpoints, CPU-cheap
#: data loading, evaluation only when asked for (never: the server has no ground truth).
SERVER_FIXED: dict[str, Any] = {"sampler": "none", "checkpoint_dir": None, "num_workers": 0,
                                "eval_every": 0, "device": "cpu"}

# ------------------------------------------------------------------------ config


def build_config(overrides: Mapping[str, Any], n_images: int,
                 clustering: Mapping[str, Any] | None = None) -> Any:
    """The TrainConfig of a server job: client overrides on the defaults, the server-fixed
    fields on top. Defaults: TrainConfig's, with the small-collection schedule of the mode
    (:func:`reidal.training.config.mode_schedule`: HEAD_SCHEDULE or PARTIAL_SCHEDULE; the
    mode is :data:`DEFAULT_MODE` unless the client names one) and the collection's own DBSCAN
    parameters (``clustering``: the stored ``params["clustering"]``), so the job's
    pseudo-labels are the clusters the collection's sampling and identities see (mode
    "calibrated": the job calibrates them per cycle from its answers, keeping the values the
    collection or the client set).
    InvalidArgument names the bad field (TrainConfig's own checks, mode "full", a value
    beyond the server's bounds (:mod:`reidal.training_limits`), a batch larger than the
    collection)."""
    # torch (reidal.training): loaded when a job is started, never by a server without one
    from reidal.training import TrainConfig
    from reidal.training.config import CLUSTERING_FIELDS, PINNABLE, mode_schedule

    unknown = sorted(set(overrides) - set(CLIENT_FIELDS))
    if unknown:
        raise InvalidArgument(f"unknown training config field(s) {unknown}")
    c = dict(clustering or {})
    from_collection = {field: c[key] for field, key in CLUSTERING_FIELDS.items() if key in c}
    if c.get("mode") == "calibrated":  # the job re-chooses them as the cycles do
        from_collection["clustering"] = "calibrated"
        from_collection["clustering_pinned"] = tuple(
            k for k in PINNABLE if k in from_collection or k in overrides)
    try:
        mode = overrides.get("mode", DEFAULT_MODE)
        cfg = TrainConfig(**{"mode": DEFAULT_MODE, **mode_schedule(mode), **from_collection,
                             **dict(overrides), **SERVER_FIXED})
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"config: {exc}") from None
    if cfg.mode not in SERVER_MODES:
        raise InvalidArgument(f"config.mode {cfg.mode!r}: the server trains in "
                              f"{' or '.join(repr(m) for m in SERVER_MODES)} mode (run 'full' "
                              "mode with reidal.training under torchrun)")
    check_job_config(cfg)
    if (cfg.batch_size > n_images and "num_identities" not in overrides
            and n_images >= 2 * cfg.num_instances):
        # the default P x K = 16 x 4 suits collections of hundreds; a smaller one gets
        # fewer pseudo-identities per batch rather than a refusal (a P the client set is kept)
        cfg = replace(cfg, num_identities=n_images // cfg.num_instances)
    if cfg.batch_size > n_images:
        raise InvalidArgument(
            f"config.num_identities x config.num_instances = {cfg.batch_size} images per "
            f"batch is larger than the collection of {n_images} images")
    return cfg


# ------------------------------------------------------------------------ features


def cached_features(model: Any, images: list[Any], config: Any, spec: Any,
                    cancel: threading.Event) -> Any:
    """What the job trains on, computed one batch at a time with ``cancel`` checked before
    each, so a job on a large collection stops within one batch of a request; None when
    cancelled. Head mode: the pooled backbone features; partial mode: the maps below the
    trainable stages, clean and in ``augment_views`` views (reidal.training.partial; each
    image's views seeded by its index in the collection, as one call would)."""
    import torch  # lazy like every torch import here: only a running job needs it

    from reidal.training import cache_backbone_features
    from reidal.training.partial import LowerFeatures, cache_lower_features, lite_backbone

    batch = config.embed_batch_size
    first = (lite_backbone(model).first_trainable_block(config.trainable_stages)
             if config.mode == "partial" else None)
    parts = []
    for start in range(0, max(len(images), 1), batch):
        if cancel.is_set():
            return None
        chunk = images[start:start + batch]
        with torch.no_grad():
            if first is None:
                parts.append(cache_backbone_features(model, chunk, batch=batch, spec=spec))
            elif chunk:
                parts.append(cache_lower_features(
                    model, chunk, first, views=config.augment_views, seed=config.seed,
                    crop_scale=config.crop_scale, jitter=config.color_jitter, spec=spec,
                    batch=batch, indices=range(start, start + len(chunk))))
    return torch.cat(parts) if first is None else LowerFeatures.concat(parts)


# ------------------------------------------------------------------------ Triton


#: How a job has Triton serve a model's versions: ``load(name, versions)`` loads exactly
#: ``versions`` (:func:`reidal.embedding.triton_versions.triton_loader`).
VersionLoader = Callable[[str, Collection[str]], Any]


# ------------------------------------------------------------------------ jobs


def job_key(job_id: str) -> tuple[str, str]:
    """The notifier key of a job (watchers wake on it)."""
    return ("training_job", job_id)


class CancelSignal(threading.Event):
    """The cancel flag of one running job, as the trainer sees it (``is_set`` before every
    training step): set in this process (a local CancelJob, a server stop: the runtime's
    notifier closes first thing in a stop, so a job stops while calls drain, not after
    the grace) or found in the store, where CancelJob on any replica records it.

    The store is read when the job's notifier key has moved since the last read (another
    replica's bump arrives by PostgreSQL NOTIFY; the job's own progress bumps it once per
    epoch) and otherwise every ``check_s`` seconds, so the per-step check is a clock and a
    counter read. A failed read is logged and retried later: the local flag still works.
    """

    def __init__(self, store: Store, job_id: str, notifier: Any,
                 check_s: float = CANCEL_CHECK_S) -> None:
        super().__init__()
        self._store = store
        self._job_id = job_id
        self._notifier = notifier
        self._check_s = check_s
        self._due = 0.0  # the first check reads the store
        self._seen = -1

    def is_set(self) -> bool:
        if super().is_set():
            return True
        if self._notifier.closed:  # the server is stopping: the job ends with it
            self.set()
            return True
        if (time.monotonic() >= self._due
                or self._notifier.version(job_key(self._job_id)) != self._seen):
            return self.check_store()
        return False

    def check_store(self) -> bool:
        """Read the stored request now (e.g. right before exporting); the flag after."""
        self._seen = self._notifier.version(job_key(self._job_id))
        self._due = time.monotonic() + self._check_s
        try:
            if self._store.jobs.get(self._job_id).cancel_requested:
                self.set()
        except NotFound:
            pass  # the collection was deleted under the job: nothing asked it to stop
        except Exception:
            log.exception("could not read the cancel request of training job %s",
                          self._job_id)
        return super().is_set()


class TrainingJobs:
    """Starts, runs, cancels and watches the training jobs of one server process.

    ``repository``: the Triton model repository new versions are written into (None: every
    StartTraining is refused with FAILED_PRECONDITION). ``load_model``: has Triton serve
    exactly the given versions of a model (:data:`VersionLoader`). ``model_name``: the
    served model.
    """

    def __init__(self, runtime: Runtime, repository: str | Path | None,
                 load_model: VersionLoader | None, model_name: str, *,
                 cancel_check_s: float = CANCEL_CHECK_S) -> None:
        self.runtime = runtime
        self.store = runtime.store
        self.repository = Path(repository) if repository is not None else None
        self.load_model = load_model
        self.model_name = model_name
        self.cancel_check_s = cancel_check_s
        self._cancel: dict[str, threading.Event] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._guard = threading.Lock()
        self._closing = False
        self._export_lock = threading.Lock()  # version numbers are picked one at a time
        aborted = self.store.jobs.fail_interrupted(INTERRUPTED)
        if aborted:
            log_kv(log, logging.WARNING, "training_jobs_interrupted", count=aborted)

    # -- API --------------------------------------------------------------------------
    def start(self, collection_id: str, overrides: Mapping[str, Any]) -> JobRecord:
        col = self.store.collections.get(collection_id)  # NotFound first
        n_images = len(self.store.images.all(collection_id, include_excluded=False))
        config = build_config(overrides, n_images, col.params.get("clustering"))
        if self.repository is None or self.load_model is None:
            raise FailedPrecondition("training needs the model repository: start the server "
                                     "with start_triton or pass model_repository")
        name = col.model_name or self.model_name
        version = col.model_version or self._default_version(name)
        # One job per collection at a time: two would train from the same base version and
        # race to export. The check and the insert happen under the store's cross-process
        # lock (replicas sharing a database included) and this process's guard.
        with self.store.exclusive(f"training-start:{collection_id}"), self._guard:
            running = [j.job_id for j in self.store.jobs.all(collection_id)
                       if not j.final]
            if running:
                raise FailedPrecondition(
                    f"collection {collection_id!r} already has training job {running[0]} "
                    "queued or running: wait for it or cancel it first")
            job = self.store.jobs.create(collection_id, config.to_dict(),
                                         base_model_name=name, base_model_version=version)
            cancel = CancelSignal(self.store, job.job_id, self.runtime.notifier,
                                  self.cancel_check_s)
            thread = threading.Thread(target=self._run, args=(job, config, cancel),
                                      name=f"training-{job.job_id[:8]}", daemon=True)
            self._cancel[job.job_id] = cancel
            self._threads[job.job_id] = thread
        thread.start()
        return job

    def get(self, job_id: str) -> JobRecord:
        return self.store.jobs.get(job_id)

    def list(self, collection_id: str = "") -> list[JobRecord]:
        if collection_id:
            self.store.collections.get(collection_id)
        return self.store.jobs.all(collection_id)

    def cancel(self, job_id: str, *, wait_s: float = 30.0) -> JobRecord:
        """Ask the job to stop, whichever replica runs it: the request is recorded in the
        store (a job nobody runs ends CANCELLED at once); a job running here is also told
        now and waited for (up to ``wait_s``). The job as stored afterwards: a job another
        replica runs is still RUNNING, with ``cancel_requested``, until that replica's next
        check stops it. A final job is returned unchanged."""
        job = self.store.jobs.request_cancel(job_id)
        if job.final and not job.cancel_requested:
            return job  # it had finished: nothing was recorded
        self.runtime.notifier.bump(job_key(job_id))  # watchers, and a runner elsewhere
        with self._guard:
            event = self._cancel.get(job_id)
            thread = self._threads.get(job_id)
        if event is not None:
            event.set()
        if thread is not None:
            thread.join(timeout=wait_s)
        return self.store.jobs.get(job_id)

    def watch(self, job_id: str, is_active: Callable[[], bool], *,
              poll_s: float = 2.0) -> Iterator[JobRecord]:
        """The job now, then at every change, until final (or the caller leaves, or the
        server stops)."""
        key = job_key(job_id)
        notifier = self.runtime.notifier
        last: JobRecord | None = None
        while True:
            seen = notifier.version(key)
            record = self.store.jobs.get(job_id)
            if record != last:
                yield record
                last = record
            if record.final or not is_active() or notifier.closed:
                return
            notifier.wait(key, seen, poll_s)

    def close(self, timeout: float = 10.0) -> None:
        """Stop running jobs and wait for their threads, ``timeout`` seconds in all (they
        end FAILED: interrupted). A job still running then (in a step that checks no flag)
        is recorded FAILED now, so the stop never waits on it and the store never shows it
        running; its thread is a daemon and ends with the process."""
        with self._guard:
            self._closing = True
            running = dict(self._threads)
            events = list(self._cancel.values())
        for e in events:
            e.set()
        deadline = time.monotonic() + timeout
        for job_id, t in running.items():
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log_kv(log, logging.WARNING, "training_job_abandoned", job=job_id,
                       waited_s=timeout)
                try:
                    self._update(job_id, state=FAILED, error_code="ABORTED",
                                 error_message="interrupted by a server stop")
                except Exception:
                    log.exception("could not record the stop of training job %s", job_id)

    # -- the job ------------------------------------------------------------------------
    def _default_version(self, name: str) -> str:
        """The version a collection that pins none (nothing embedded yet) would pin."""
        assert self.repository is not None
        version = default_version(self.repository, name)
        if not version:
            raise FailedPrecondition(f"the model repository has no version of {name!r}")
        return version

    def served_versions(self, name: str, new: str) -> set[str]:
        """The versions of model ``name`` Triton should serve once version ``new`` is
        written: every version a collection pins or is being re-embedded with (stored, so
        the same on every replica), the model's default version (new collections pin it)
        and ``new``. The others are unloaded (each loaded version costs memory: about
        280 MB RSS for the CPU python backend)."""
        keep = {new, self._default_version(name)}
        for col in self.store.collections.all():
            if col.model_name == name and col.model_version:
                keep.add(col.model_version)
            for op in self.store.operations.all(col.id, unfinished_only=True):
                if op.result.get("model_name") == name and op.result.get("model_version"):
                    keep.add(str(op.result["model_version"]))
        return keep

    def _serve_new_version(self, name: str, version: int) -> None:
        assert self.load_model is not None
        keep = self.served_versions(name, str(version))
        self.load_model(name, keep)
        log_kv(log, logging.INFO, "model_versions_served", model=name,
               versions=",".join(sorted(keep)))

    def _update(self, job_id: str, **changes: Any) -> bool:
        changed = self.store.jobs.update(job_id, **changes)
        self.runtime.notifier.bump(job_key(job_id))
        return changed

    def _run(self, job: JobRecord, config: Any, cancel: CancelSignal) -> None:
        try:
            if not self._update(job.job_id, state=RUNNING):
                return  # final already: cancelled while queued, so it never starts
            produced = self._train(job, config, cancel)
            if produced is None:
                # stopped: by a stop of this server, unless someone (anywhere) asked first
                stopped = ((self._closing or self.runtime.notifier.closed)
                           and not self.store.jobs.get(job.job_id).cancel_requested)
                if stopped:
                    self._update(job.job_id, state=FAILED, error_code="ABORTED",
                                 error_message="interrupted by a server stop")
                else:
                    self._update(job.job_id, state=CANCELLED)
            else:
                self._update(job.job_id, state=SUCCEEDED, model_name=job.base_model_name,
                             model_version=produced)
            log_kv(log, logging.INFO, "training_job_done", job=job.job_id,
                   state=self.store.jobs.get(job.job_id).state, version=produced or "")
        except BaseException as exc:  # a job's failure is recorded, never raised into nothing
            code = status_code(exc) or "INTERNAL"
            log.exception("training job %s failed", job.job_id)
            try:
                self._update(job.job_id, state=FAILED, error_code=code,
                             error_message=f"{type(exc).__name__}: {exc}")
            except Exception:
                log.exception("could not record the failure of training job %s", job.job_id)
        finally:
            with self._guard:
                self._cancel.pop(job.job_id, None)
                self._threads.pop(job.job_id, None)

    def _train(self, job: JobRecord, config: Any, cancel: CancelSignal) -> str | None:
        """Train and export; the version produced, or None when cancelled."""
        from reidal.embedding.model import load_model, load_spec  # torch: a running job only
        from reidal.training import SpCLTrainer

        assert self.repository is not None and self.load_model is not None
        version_dir = self.repository / job.base_model_name / job.base_model_version
        if not version_dir.is_dir():
            raise FailedPrecondition(f"model {job.base_model_name} version "
                                     f"{job.base_model_version} is not in the repository")
        model = load_model(version_dir)
        spec = load_spec(version_dir)
        decoded = self._images(job.collection_id, max(spec.input_size), cancel)
        if decoded is None:
            return None
        ids, images = decoded
        answers = collection_constraints(self.store, job.collection_id, ids)
        used = len(answers.answers)
        data = cached_features(model, images, config, spec, cancel)
        if data is None:
            return None

        def on_epoch(report: Any) -> None:
            self._update(job.job_id, progress={
                "epoch": report.epoch + 1, "loss": float(report.loss),
                "clusters": int(report.n_clusters), "unclustered": int(report.n_unclustered),
                "pairs_asked": int(report.cumulative_pairs),
                "answers_used": used,
                "metrics": {k: float(v) for k, v in report.quality.items()}})

        result = SpCLTrainer(config, model, spec=spec).fit(
            data, constraints=answers, on_epoch=on_epoch, cancel=cancel)
        if result.cancelled or cancel.check_store():  # a request up to this moment counts
            return None
        with self._export_lock:
            version = export_version(result.model, self.repository, job.base_model_name,
                                     spec=spec, load=self._serve_new_version)
        return str(version)

    def _images(self, collection_id: str, draft_size: int, cancel: threading.Event
                ) -> tuple[list[str], list[Any]] | None:
        return collection_images(self.store, self.runtime.blobs, collection_id,
                                 self.runtime.image_limits, draft_size, cancel)


def promote(runtime: Runtime, collection_id: str, model_name: str, version: str) -> Any:
    """Start re-embedding the collection with the model version (an Operation record): the
    new vectors are stored beside the old ones and the collection switches to the new
    version only once all are stored (:func:`reidal.ingest.embed_missing`)."""
    if not version:
        raise InvalidArgument("model.version is required: the version to promote")
    col = runtime.store.collections.get(collection_id)
    name = model_name or col.model_name
    if not name:
        raise InvalidArgument("model.name is required: the collection has no model yet")
    runtime.require_embedder().model(name, version)  # NotFound / unavailable before starting
    ops = runtime.operations
    assert ops is not None
    op = ops.start(collection_id, "embed_collection",
                   lambda progress: embed_missing(runtime, collection_id, name, version,
                                                  progress))
    runtime.store.operations.update(op.operation_id,
                                    result={"model_name": name, "model_version": version})
    return runtime.store.operations.get(op.operation_id)


__all__ = [
    "CANCEL_CHECK_S", "CLIENT_FIELDS", "FINAL_STATES", "INTERRUPTED", "CancelSignal",
    "JobRecord", "TrainingJobs", "VersionLoader", "build_config", "collection_constraints",
    "promote",
]
