"""The in-process embedder: images (bytes or URIs) -> L2-normalised vectors from a Triton model.

:class:`ImageEmbedder` validates a batch, decodes the images (:mod:`reidal.embedding.images`),
preprocesses them as the model's spec says (:mod:`reidal.embedding.preprocess`), sends
batches to Triton (:mod:`reidal.embedding.triton_client`) and answers. Nothing is stored and
nothing here knows gRPC: the EmbeddingService (``reidal.services.embedding``) wraps one
embedder, and a process that runs the collection service next to Triton embeds through the
same object with the same checks. :class:`Embedder` is what ingest needs of any embedder
(this one, or a client of an embedding service in another process).

Choices (the published contract is in protos/reidal/v1/embedding.proto):

- All-or-nothing per request: every image is decoded before a bad one fails the call, so
  the :class:`BadImages` message lists every offending id, not only the first; Triton is
  not called again once a bad image is seen.
- One model version per answer: after the first Triton batch answers with version v,
  the remaining batches of the request ask for v explicitly, so a new version loaded
  mid-request never mixes two embedding spaces in one answer.
- Memory: one server-wide :class:`DecodeBudget` bounds the decoded pixels in flight across
  every request and handler thread. Each sub-batch of ``infer_batch`` images is opened
  (headers only), reserves its estimated decoded size at once (waiting its turn up to
  ``decode_wait_s``, then RESOURCE_EXHAUSTED), is decoded and preprocessed into the small
  input tensor, and gives the reservation back before Triton runs it. JPEGs decode at a
  reduced DCT scale close to the model's input size (``Image.draft``).
- The spec (input size, normalisation) of a model comes from ``spec_overrides`` when given,
  else from the model's Triton config (:meth:`TritonEmbedder.spec_from_triton`), cached per
  model name.
- Health: :meth:`ImageEmbedder.is_ready` (Triton reports the default model ready) is the
  readiness probe the server polls, so grpc.health.v1 follows Triton.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from reidal import errors
from reidal.embedding.decode_budget import DEFAULT_BUDGET_MB, MIB, DecodeBudget
from reidal.embedding.images import (
    SERVER_LIMITS,
    ImageError,
    ImageLimits,
    OpenedImage,
    finish_image,
    open_image,
)
from reidal.embedding.preprocess import preprocess
from reidal.embedding.spec import DEFAULT_MODEL_NAME, ModelSpec
from reidal.embedding.triton_client import (
    EmbedResult,
    ModelInfo,
    ModelNotFound,
    TritonEmbedder,
    TritonError,
    TritonUnavailable,
)
from reidal.errors import Cancelled, DeadlineExceeded
from reidal.metrics import counter, histogram

#: Most images one embedding call may carry (documented in embedding.proto).
MAX_IMAGES_PER_REQUEST = 1024
#: How many offending images a BadImages message lists by name.
MAX_LISTED_ERRORS = 20

_IMAGES = counter("reidal_embedding_images", "Images embedded, per model", ("model",))
_REJECTED = counter("reidal_embedding_rejected_images",
                    "Images refused as invalid (the whole request failed)")
_TRITON_SECONDS = histogram("reidal_embedding_triton_seconds",
                            "Time of one Triton embedding call (one batch), per model",
                            ("model",))



class BadImages(errors.InvalidArgument):
    """One or more images of a request are unusable; lists all of them (all-or-nothing)."""

    def __init__(self, problems: Sequence[ImageError], total: int) -> None:
        self.problems = list(problems)
        listed = "; ".join(str(p) for p in self.problems[:MAX_LISTED_ERRORS])
        more = len(self.problems) - MAX_LISTED_ERRORS
        tail = f"; and {more} more" if more > 0 else ""
        super().__init__(
            f"{len(self.problems)} of {total} image(s) rejected, nothing was embedded: "
            f"{listed}{tail}"
        )


@dataclass(frozen=True)
class ImageItem:
    """One image to embed: the caller's id and exactly one of encoded bytes or a URI."""

    id: str
    data: bytes | None = None
    uri: str | None = None


@dataclass(frozen=True)
class Embedded:
    """The answer to one request: ids in request order, unit vectors (n, d), the model."""

    ids: list[str]
    vectors: np.ndarray
    model_name: str
    model_version: str


class Embedder(Protocol):
    """What ingest needs from an embedder: :class:`ImageEmbedder` in this process, or a
    client of an embedding service in another one (``reidal.services.embedding_client``)."""

    default_model: str

    def embed(self, items: Sequence[ImageItem], model: str = "", version: str = "", *,
              deadline: float | None = None,
              is_active: Callable[[], bool] | None = None) -> Embedded: ...

    def model(self, name: str = "", version: str = "") -> ModelInfo: ...

    def close(self) -> None: ...


class ImageEmbedder:
    """Embeds images with the models of one Triton server (see the module docstring).

    triton_url: ``host:port`` of Triton's gRPC endpoint. default_model: the model used when a
    call names none. spec_overrides: model name -> :class:`ModelSpec` to use instead of
    the one in the model's Triton config. batch_size: the upper bound of ``infer_batch``.
    infer_batch: images decoded, preprocessed and sent to Triton at a time; calls are
    pipelined (one in flight while the next sub-batch is decoded and preprocessed), so on a
    CPU the decoding overlaps inference (the client splits further if the model's
    max_batch_size is smaller); default min(8, batch_size).
    limits: what an image may be, and which local paths a URI may name (default: none, a
    remote caller must not read the server's files; :class:`ImageLimits`). decode_workers:
    threads decoding images in parallel (Pillow releases the GIL while decoding).
    triton_timeout_s: bound of one Triton call. max_images: most images per call.
    decode_budget: the bound on decoded images in flight, shared by every call of this
    embedder (default: DEFAULT_BUDGET_MB MiB, waiting up to DEFAULT_WAIT_S).
    """

    def __init__(
        self,
        triton_url: str,
        default_model: str = DEFAULT_MODEL_NAME,
        spec_overrides: Mapping[str, ModelSpec] | None = None,
        batch_size: int = 32,
        *,
        infer_batch: int | None = None,
        limits: ImageLimits = SERVER_LIMITS,
        decode_workers: int = 2,
        triton_timeout_s: float = 30.0,
        probe_timeout_s: float = 2.0,
        max_images: int = MAX_IMAGES_PER_REQUEST,
        decode_budget: DecodeBudget | None = None,
    ) -> None:
        if not default_model:
            raise ValueError("default_model must be a non-empty Triton model name")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if infer_batch is None:
            infer_batch = min(8, batch_size)
        if not 1 <= infer_batch <= batch_size:
            raise ValueError(f"infer_batch must be in [1, batch_size={batch_size}], "
                             f"got {infer_batch}")
        if decode_workers < 1:
            raise ValueError(f"decode_workers must be >= 1, got {decode_workers}")
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        overrides = dict(spec_overrides or {})
        for name, spec in overrides.items():
            if not isinstance(spec, ModelSpec) or spec.name != name:
                raise ValueError(f"spec_overrides[{name!r}] must be a ModelSpec named {name!r}")
        self.triton_url = triton_url
        self.default_model = default_model
        self.batch_size = batch_size
        self.infer_batch = infer_batch
        self.limits = limits
        self.max_images = max_images
        self.budget = decode_budget or DecodeBudget(DEFAULT_BUDGET_MB * MIB)
        self._overrides = overrides
        self._specs: dict[str, ModelSpec] = {}
        self._specs_lock = threading.Lock()
        self._triton = TritonEmbedder(triton_url, overrides.get(default_model),
                                      timeout_s=triton_timeout_s)
        # A short timeout for health probes: a blackholed Triton must not stall the prober.
        self._probe = TritonEmbedder(triton_url, timeout_s=probe_timeout_s)
        self._pool = futures.ThreadPoolExecutor(decode_workers, thread_name_prefix="reidal-decode")
        self._infer_pool = futures.ThreadPoolExecutor(1, thread_name_prefix="reidal-infer")

    def is_ready(self) -> bool:
        """True when Triton answers and reports the default model ready; never raises."""
        try:
            return self._probe.is_ready(self.default_model)
        except TritonError:
            return False

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._infer_pool.shutdown(wait=False, cancel_futures=True)
        self._triton.close()
        self._probe.close()

    def embed(self, items: Sequence[ImageItem], model: str = "", version: str = "",
              *, deadline: float | None = None,
              is_active: Callable[[], bool] | None = None) -> Embedded:
        """Embed ``items`` with ``model`` (default model when empty) at ``version``.

        ``deadline`` is a ``time.monotonic()`` instant; ``is_active`` (e.g. the gRPC
        context's) is asked between batches, so work stops when the caller hangs up.
        Raises :class:`BadImages` / :class:`reidal.errors.InvalidArgument` (bad request),
        ``ModelNotFound``, ``TritonUnavailable``, :class:`reidal.errors.DeadlineExceeded`,
        :class:`reidal.errors.Cancelled`, :class:`reidal.errors.FailedPrecondition` (no
        usable spec): all domain errors, each naming its status code.
        """
        _check_items(items, self.max_images)
        name = model or self.default_model
        spec = self._spec(name, version)
        ids = [it.id for it in items]
        parts: list[np.ndarray] = []
        problems: list[ImageError] = []
        served = [version]  # pinned by the first Triton answer: one result, one version
        in_flight: futures.Future | None = None

        def collect() -> None:
            nonlocal in_flight
            if in_flight is not None:
                result = in_flight.result()
                in_flight = None
                served[0] = result.model_version
                parts.append(result.vectors)

        draft = max(spec.input_size)
        try:
            for start in range(0, len(items), self.infer_batch):
                _check_deadline(deadline, f"after {start} of {len(items)} images")
                if is_active is not None and not is_active():
                    raise Cancelled(f"the caller cancelled after {start} of {len(items)} images")
                group = items[start:start + self.infer_batch]
                opened = [f.result() for f in [self._pool.submit(self._open, it, draft)
                                               for it in group]]
                problems.extend(o for o in opened if isinstance(o, ImageError))
                # Pipelined: while Triton runs one sub-batch, the next is decoded and
                # preprocessed; at most one Triton call is in flight, so every call after
                # the first goes to the version that answered the first. After a bad image
                # the rest is still decoded (the error must name every one), not inferred.
                for run in _runs_within([o for o in opened if isinstance(o, OpenedImage)],
                                        self.budget.capacity):
                    batch = self._decode_run(run, spec, deadline, problems)
                    if batch is None:
                        continue
                    collect()
                    _check_deadline(deadline, f"after {start} of {len(items)} images")
                    in_flight = self._infer_pool.submit(self._infer, batch, name, served[0])
                del opened
            collect()
        finally:
            if in_flight is not None:
                in_flight.cancel()
        if problems:
            _REJECTED.inc(len(problems))
            raise BadImages(problems, len(items))
        vectors = np.concatenate(parts, axis=0)
        _IMAGES.labels(name).inc(len(items))
        return Embedded(ids, vectors, name, served[0])

    def _infer(self, batch: np.ndarray, name: str, version: str) -> EmbedResult:
        tic = time.perf_counter()
        try:
            result = self._triton.embed(batch, model=name, version=version)
        except ValueError as exc:  # the spec's tensor shape disagrees with the model
            raise errors.FailedPrecondition(
                f"model {name!r}: the preprocessing spec does not fit the model in "
                f"Triton: {exc}") from None
        _TRITON_SECONDS.labels(name).observe(time.perf_counter() - tic)
        return result

    def models(self) -> list[ModelInfo]:
        return self._triton.list_models()

    def model(self, name: str = "", version: str = "") -> ModelInfo:
        return self._triton.model_info(name or self.default_model, version)

    def _open(self, item: ImageItem, draft: int) -> OpenedImage | ImageError:
        try:
            return open_image(item.data, item.uri, item_id=item.id, limits=self.limits,
                              draft_size=draft)
        except ImageError as exc:
            return exc

    def _decode_run(self, run: list[OpenedImage], spec: ModelSpec, deadline: float | None,
                    problems: list[ImageError]) -> np.ndarray | None:
        """Decode and preprocess ``run`` holding its decode budget, which is given back
        once only the input tensor is left; None when an image of the request is bad.
        Each decode worker also preprocesses its image (the same per-image resize and
        normalisation as one batch call), so the full-size picture is dropped in the worker
        and the resizes run in parallel with the other decodes."""
        with self.budget.reserve(sum(o.decoded_bytes for o in run), deadline):
            decoded = [f.result() for f in [self._pool.submit(_finish, o, spec) for o in run]]
            run.clear()  # the opened sources are closed; drop them with the pixels
            problems.extend(d for d in decoded if isinstance(d, ImageError))
            batch = None if problems else np.concatenate(decoded, axis=0)
            del decoded
        return batch

    def _spec(self, name: str, version: str = "") -> ModelSpec:
        spec = self._overrides.get(name)
        if spec is not None:
            return spec
        with self._specs_lock:
            spec = self._specs.get(name)
        if spec is None:
            try:
                spec = self._triton.spec_from_triton(name, version)
            except (TritonUnavailable, ModelNotFound):
                raise
            except TritonError as exc:
                raise errors.FailedPrecondition(
                    f"no preprocessing spec for model {name!r}: {exc}") from None
            with self._specs_lock:
                self._specs[name] = spec
        return spec


def _finish(opened: OpenedImage, spec: ModelSpec) -> np.ndarray | ImageError:
    """One image decoded and preprocessed into its (1, ...) input tensor, or why not."""
    try:
        return preprocess([finish_image(opened)], spec)
    except ImageError as exc:
        return exc


def _runs_within(opened: list[OpenedImage], capacity: int) -> list[list[OpenedImage]]:
    """Consecutive runs of ``opened`` whose estimated decoded sizes fit in ``capacity``
    together (a run is reserved at once: a sub-batch of large images becomes several).
    An image larger than the whole budget stays a run of its own, which the budget
    refuses with RESOURCE_EXHAUSTED."""
    runs: list[list[OpenedImage]] = []
    size = 0
    for o in opened:
        if not runs or size + o.decoded_bytes > capacity:
            runs.append([])
            size = 0
        runs[-1].append(o)
        size += o.decoded_bytes
    return runs


def _check_items(items: Sequence[ImageItem], max_images: int) -> None:
    if not items:
        raise errors.InvalidArgument("the request has no images")
    if len(items) > max_images:
        raise errors.InvalidArgument(
            f"the request has {len(items)} images, at most {max_images} are allowed per "
            "request: split it or use EmbedStream")
    seen: set[str] = set()
    for index, item in enumerate(items):
        if not item.id:
            raise errors.InvalidArgument(f"image at position {index} has an empty id")
        if item.id in seen:
            raise errors.InvalidArgument(
                f"image id {item.id!r} appears more than once (again at position {index}); "
                "ids must be unique within a request")
        seen.add(item.id)
        if (item.data is None) == (item.uri is None):
            raise errors.InvalidArgument(
                f"image {item.id!r} must set exactly one of data or uri")


def _check_deadline(deadline: float | None, progress: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(f"the deadline ran out {progress}; nothing was returned")
