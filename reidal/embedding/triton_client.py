"""Client side of the embedding model: preprocessed batches -> L2-normalised vectors via Triton.

Talks KServe v2 gRPC through ``tritonclient.grpc`` to any Triton: the bundled CPU server
(:mod:`reidal.embedding.triton_server`) or the NGC image on a GPU cluster. Tensor names,
shapes and ``max_batch_size`` come from the model's config on the server (cached per model),
so any embedding model Triton serves works; the :class:`ModelSpec` names the default model
and is checked against that config.

Errors are three domain errors (:mod:`reidal.errors`, which names their status codes):
:class:`TritonUnavailable` (UNAVAILABLE; :class:`TritonTimeout` is its deadline flavour),
:class:`ModelNotFound` (NOT_FOUND), and :class:`TritonError` for the rest (INTERNAL). After an UNAVAILABLE the underlying gRPC
channel is dropped and the next call opens a fresh one, so one :class:`TritonEmbedder` keeps
working across a Triton restart without the reconnect back-off of a long-dead channel.

Versions: a request naming no version gets the model's default version (the config's
``reidal_default_version`` parameter, :mod:`reidal.embedding.triton_repo`; Triton's newest
loaded version for a model whose config names none), never simply the newest, which a
training job for one collection may have just added. A request naming a version Triton
has not loaded (a collection's pinned version after a restart or another job's load, or of
a model Triton has not loaded at all) loads it, keeping the loaded ones
(:meth:`TritonEmbedder.load_version`), then is sent again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from reidal import errors
from reidal.core.validation import check_embeddings, l2_normalise
from reidal.embedding.spec import DEFAULT_MODEL_NAME, ModelSpec
from reidal.embedding.triton_repo import P_DEFAULT_VERSION, spec_from_config
from reidal.embedding.triton_versions import load_versions

#: Seconds a load of one model version may take (about 10 s on 2 busy CPU cores).
DEFAULT_LOAD_TIMEOUT_S = 300.0


class TritonError(errors.BackendFailed, RuntimeError):
    """Triton answered with an error that is neither 'unavailable' nor 'no such model'."""


class TritonUnavailable(errors.Unavailable, TritonError):
    """Triton cannot be reached (down, restarting, wrong URL)."""


class TritonTimeout(TritonUnavailable):
    """Triton did not answer within the client's timeout."""


class VersionNotReady(TritonUnavailable):
    """Triton knows the model version but it is not loaded now (unloaded, or loading)."""


class ModelNotFound(errors.NotFound, TritonError):
    """The model (or the requested version of it) is not loaded in Triton."""


@dataclass(frozen=True)
class EmbedResult:
    """Unit-norm float32 vectors (B, D) and the model name and version that produced them."""

    vectors: np.ndarray
    model_name: str
    model_version: str


@dataclass(frozen=True)
class ModelInfo:
    """One model version in Triton's repository. ``dim``, ``input_size`` and
    ``max_batch_size`` are ``None`` while the model is not loaded (Triton has no config then)."""

    name: str
    version: str
    state: str
    ready: bool
    dim: int | None = None
    input_size: tuple[int, int] | None = None
    max_batch_size: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class _Signature:
    """What a client needs from a model config to call it."""

    input_name: str
    output_name: str
    input_dtype: str
    input_shape: tuple[int, ...]
    dim: int
    max_batch_size: int
    default_version: str = ""  # the config's P_DEFAULT_VERSION; "" = Triton's newest

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> _Signature:
        name = cfg.get("name", "?")
        inputs, outputs = cfg.get("input") or [], cfg.get("output") or []
        if len(inputs) != 1 or len(outputs) != 1:
            raise TritonError(
                f"model {name!r} has {len(inputs)} inputs and {len(outputs)} outputs; an "
                "embedding model has one of each"
            )
        max_batch = int(cfg.get("max_batch_size", 0) or 0)
        if max_batch < 1:
            raise TritonError(f"model {name!r} does not batch (max_batch_size 0); reidal needs it")
        out_dims = [int(d) for d in outputs[0].get("dims", [])]
        if len(out_dims) != 1:
            raise TritonError(f"model {name!r} output dims {out_dims} are not one vector per image")
        return cls(
            input_name=inputs[0]["name"],
            output_name=outputs[0]["name"],
            input_dtype=str(inputs[0].get("data_type", "TYPE_FP32")).removeprefix("TYPE_"),
            input_shape=tuple(int(d) for d in inputs[0].get("dims", [])),
            dim=out_dims[0],
            max_batch_size=max_batch,
            default_version=str(((cfg.get("parameters") or {}).get(P_DEFAULT_VERSION) or {})
                                .get("string_value", "")),
        )


class TritonEmbedder:
    """Embed preprocessed image batches with a Triton model over gRPC.

    ``url`` is ``host:port`` of Triton's gRPC endpoint (a ``grpc://`` prefix is accepted).
    ``spec`` names the default model (``reidal_embedder`` when ``None``); its tensor names,
    when given, must match the model's config. ``timeout_s`` bounds every call but a version
    load (``load_timeout_s``). ``load_on_demand``: a request for a version Triton has not
    loaded loads it (explicit model control) instead of failing. Thread-safe.
    """

    def __init__(self, url: str, spec: ModelSpec | None = None, *, timeout_s: float = 30.0,
                 load_on_demand: bool = True,
                 load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S) -> None:
        if not isinstance(url, str) or not url:
            raise ValueError(f"url must be 'host:port', got {url!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.url = url.removeprefix("grpc://")
        self.spec = spec
        self.model_name = spec.name if spec is not None else DEFAULT_MODEL_NAME
        self.timeout_s = float(timeout_s)
        self.load_on_demand = load_on_demand
        self.load_timeout_s = float(load_timeout_s)
        self._client: Any = None
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # one version load at a time from this client
        self._signatures: dict[str, _Signature] = {}

    # ----------------------------------------------------------------- embedding
    def embed(
        self, batch: np.ndarray, *, model: str | None = None, version: str = ""
    ) -> EmbedResult:
        """Embed a preprocessed batch (B, *input dims), e.g. from
        :func:`reidal.embedding.preprocess.preprocess`.

        Batches larger than the model's ``max_batch_size`` are sent in slices; all slices go
        to the version that answered the first one, so one result never mixes versions.
        ``version`` ``""``: the model's default version (see the module docstring). A
        version Triton has not loaded is loaded first.
        """
        name = model or self.model_name
        sig = self._signature(name, version=version)
        version = version or sig.default_version
        arr = np.asarray(batch)
        if arr.ndim != 1 + len(sig.input_shape) or tuple(arr.shape[1:]) != sig.input_shape:
            raise ValueError(
                f"batch must have shape (B, {', '.join(map(str, sig.input_shape))}) for model "
                f"{name!r}, got {arr.shape}"
            )
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"batch must be floating point (preprocessed), got dtype {arr.dtype}")
        np_dtype = np.float16 if sig.input_dtype == "FP16" else np.float32
        arr = np.ascontiguousarray(arr, dtype=np_dtype)
        if not np.isfinite(arr).all():
            raise ValueError("batch contains NaN or inf")
        if arr.shape[0] == 0:
            return EmbedResult(np.empty((0, sig.dim), np.float32), name, version)
        import tritonclient.grpc as grpcclient

        parts: list[np.ndarray] = []
        served = version
        for start in range(0, arr.shape[0], sig.max_batch_size):
            chunk = arr[start : start + sig.max_batch_size]
            inp = grpcclient.InferInput(sig.input_name, list(chunk.shape), sig.input_dtype)
            inp.set_data_from_numpy(chunk)
            out = grpcclient.InferRequestedOutput(sig.output_name)
            result = self._with_version(
                name, served, "infer", model_name=name, inputs=[inp], outputs=[out],
                model_version=served,
            )
            vectors = result.as_numpy(sig.output_name)
            if vectors is None or vectors.shape != (chunk.shape[0], sig.dim):
                shape = None if vectors is None else vectors.shape
                raise TritonError(
                    f"model {name!r} returned {shape} for a batch of {chunk.shape[0]}, "
                    f"expected ({chunk.shape[0]}, {sig.dim})"
                )
            served = result.get_response().model_version or served
            parts.append(vectors)
        try:
            vectors = check_embeddings(np.concatenate(parts, axis=0), normalised=False)
        except ValueError as exc:
            raise TritonError(f"model {name!r} version {served!r} returned bad vectors: {exc}") from None
        # Re-normalise: a user's model may not, and fp16 round trips drift.
        return EmbedResult(l2_normalise(vectors), name, served)

    # ----------------------------------------------------------------- discovery
    def server_ready(self) -> bool:
        """True when Triton answers and reports ready; never raises."""
        try:
            return bool(self._call("is_server_ready", "", ""))
        except TritonError:
            return False

    def is_ready(self, name: str | None = None, version: str = "") -> bool:
        """Whether ``name`` (default model) is loaded and ready. Raises TritonUnavailable."""
        name = name or self.model_name
        try:
            return bool(self._call("is_model_ready", name, version, model_name=name,
                                   model_version=version))
        except ModelNotFound:
            return False

    def list_models(self) -> list[ModelInfo]:
        """Every model version in Triton's repository index, loaded or not."""
        index = self._call("get_model_repository_index", "", "", as_json=True)
        infos = []
        for entry in index.get("models", []):
            name, version = entry.get("name", ""), entry.get("version", "")
            state = entry.get("state", "")
            ready = state == "READY"
            sig = None
            if ready:
                try:
                    sig = self._signature(name, refresh=True)
                except TritonError:
                    sig = None
            infos.append(_info(name, version, state, ready, sig, entry.get("reason", "")))
        return sorted(infos, key=lambda i: (i.name, _version_key(i.version)))

    def model_info(self, name: str | None = None, version: str = "") -> ModelInfo:
        """One model version (its default version when ``version`` is ``""``; a version
        Triton has not loaded is loaded first)."""
        name = name or self.model_name
        version = version or self._signature(name, refresh=True).default_version
        meta = self._with_version(name, version, "get_model_metadata", model_name=name,
                                  model_version=version, as_json=True)
        versions = sorted(meta.get("versions", []), key=_version_key)
        chosen = version or (versions[-1] if versions else "")
        ready = self.is_ready(name, chosen)
        sig = self._signature(name, refresh=True)
        return _info(name, chosen, "READY" if ready else "UNAVAILABLE", ready, sig, "")

    def spec_from_triton(self, name: str | None = None, version: str = "") -> ModelSpec:
        """The preprocessing spec carried in the model config's parameters (see triton_repo);
        with ``version``, a model Triton has not loaded is loaded first."""
        name = name or self.model_name
        cfg = self._config(name, version)
        try:
            return spec_from_config(cfg)
        except ValueError as exc:
            raise TritonError(str(exc)) from None

    def load_version(self, name: str, version: str) -> None:
        """Have Triton load ``version`` of ``name``, keeping every version loaded now
        (:func:`reidal.embedding.triton_versions.load_versions`). ModelNotFound when the
        repository has no such version or Triton cannot load it; TritonUnavailable when
        Triton cannot be reached."""
        from tritonclient.utils import InferenceServerException

        what = f"model {name!r} version {version!r}"
        if not version.isdigit():
            raise ModelNotFound(f"{what}: a version is a decimal number")
        with self._load_lock:
            if self.is_ready(name, version):
                return  # another request loaded it meanwhile
            client = self._get_client()
            try:
                ready = load_versions(client, name, [version], keep_ready=True,
                                      timeout_s=self.load_timeout_s)
            except ValueError as exc:
                raise ModelNotFound(f"{what}: {exc}") from None
            except InferenceServerException as exc:
                error = self._translate(exc, name, version)
                if isinstance(error, TritonUnavailable):
                    self._drop_client(client)
                    raise error from None
                raise ModelNotFound(f"{what} could not be loaded in Triton at {self.url}: "
                                    f"{exc.message()}") from None
            finally:
                self._signatures.pop(name, None)
        if version not in ready:
            raise ModelNotFound(f"{what} is not in the model repository of Triton at "
                                f"{self.url} (or failed to load: see Triton's log)")

    # ----------------------------------------------------------------- plumbing
    def _with_version(self, name: str, version: str, method: str, **kwargs: Any) -> Any:
        """``_call(method)`` for one model version, loading the version on demand once."""
        try:
            return self._call(method, name, version, **kwargs)
        except (ModelNotFound, VersionNotReady):
            if not (version and self.load_on_demand):
                raise
        self.load_version(name, version)
        return self._call(method, name, version, **kwargs)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> TritonEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                import tritonclient.grpc as grpcclient

                self._client = grpcclient.InferenceServerClient(self.url)
            return self._client

    def _drop_client(self, client: Any) -> None:
        with self._lock:
            if self._client is client:
                self._client = None
            else:
                client = None
        if client is not None:
            client.close()

    def _call(self, method: str, name: str, version: str, **kwargs: Any) -> Any:
        from tritonclient.utils import InferenceServerException

        client = self._get_client()
        try:
            return getattr(client, method)(**kwargs, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            error = self._translate(exc, name, version)
            if isinstance(error, TritonUnavailable) and not isinstance(error, VersionNotReady):
                self._drop_client(client)
            if isinstance(error, ModelNotFound) or not isinstance(error, TritonUnavailable):
                self._signatures.pop(name, None)  # the model may have been reloaded
            raise error from None

    def _translate(self, exc: Any, name: str, version: str) -> TritonError:
        status = str(exc.status() or "")
        message = str(exc.message() or exc)
        lowered = message.lower()
        what = f"model {name!r}" + (f" version {version!r}" if version else "")
        if "DEADLINE_EXCEEDED" in status or "deadline exceeded" in lowered:
            return TritonTimeout(f"Triton at {self.url} did not answer within "
                                 f"{self.timeout_s:g} s; retry later")
        if "UNAVAILABLE" in status:
            if "unknown model" in lowered or "not at ready state" in lowered:
                return VersionNotReady(f"{what} is not ready in Triton at {self.url}: "
                                       f"{message}; retry later")
            return TritonUnavailable(f"Triton at {self.url} is unreachable: {message}; "
                                     "retry later")
        if "NOT_FOUND" in status or any(
            s in lowered
            for s in ("unknown model", "is not found", "no available version", "is not ready",
                      "not loaded", "unavailable model")
        ):
            return ModelNotFound(f"{what} is not loaded in Triton at {self.url}: {message}")
        return TritonError(f"Triton at {self.url} failed for {what}: {message}")

    def _config(self, name: str, version: str = "") -> dict[str, Any]:
        """Triton's config of model ``name``. Triton has none for a model with no version
        loaded; with ``version`` named, that version is loaded on demand first, as for a
        model whose other versions are loaded: a collection pinned to a model other than
        the server's default (the 128 px model of a repository whose server now defaults to
        the 224 px one, docs/deployment.md) is served without loading it by hand."""
        return self._with_version(name, version, "get_model_config", model_name=name,
                                  as_json=True)["config"]

    def _signature(self, name: str, *, refresh: bool = False, version: str = "") -> _Signature:
        sig = None if refresh else self._signatures.get(name)
        if sig is None:
            sig = _Signature.from_config(self._config(name, version))
            spec = self.spec
            if spec is not None and spec.name == name:
                wanted = (spec.input_name, spec.output_name, spec.input_shape)
                got = (sig.input_name, sig.output_name, sig.input_shape)
                if wanted != got:
                    raise TritonError(
                        f"ModelSpec for {name!r} says input/output/shape {wanted}, the model's "
                        f"config in Triton says {got}"
                    )
            self._signatures[name] = sig
        return sig


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)


def _info(
    name: str, version: str, state: str, ready: bool, sig: _Signature | None, reason: str
) -> ModelInfo:
    size = None
    if sig is not None and len(sig.input_shape) == 3:
        c_first = sig.input_shape[0] == 3
        size = sig.input_shape[1:] if c_first else sig.input_shape[:2]
    return ModelInfo(
        name=name,
        version=version,
        state=state,
        ready=ready,
        dim=sig.dim if sig else None,
        input_size=size,
        max_batch_size=sig.max_batch_size if sig else None,
        reason=reason,
    )
