"""Write embedding models into a Triton model repository, and read their spec back.

Layout (Triton's standard one; adding a version is adding a folder)::

    <repo>/<model_name>/config.pbtxt          one config for all versions of the model
    <repo>/<model_name>/<version>/model.py    python-backend entry point (CPU Triton)
    <repo>/<model_name>/<version>/model.pt    state_dict of the EmbeddingNet
    <repo>/<model_name>/<version>/model.json  its architecture and serving spec

The CPU Triton bundled in nvidia-pytriton has no libtorch/onnxruntime backend, so the model
runs in Triton's python backend: ``model.py`` rebuilds the model with
:func:`reidal.embedding.model.load_model` and runs it eagerly, so the stub's Python must be
able to import reidal (it is: :class:`reidal.embedding.triton_server.TritonServer` starts it
in this interpreter's virtualenv). Chosen over a self-contained ``torch.export`` program
after measuring both on this project's 2-core machines (loaded by other jobs): loading the
exported program took 7.4 s and each of its first two calls about 4 s, against 1.0 s and
1.1 s for the state_dict; TorchScript is deprecated in torch 2.13. The GPU deployment uses
the same config with the onnxruntime backend (:mod:`reidal.embedding.onnx_export`).

The preprocessing a client must apply travels in the config's ``parameters``
(``preprocess_mean``, ``preprocess_std``, ``preprocess_layout``, ``preprocess_resize``); the
input size is the input's dims. :func:`spec_from_config` reads them back, so a client can
discover how to feed any model that follows this convention (reidal's, or a user's own
backbone served by their own Triton model).

Versions: the config keeps the latest ``keep_versions`` (2 by default) loaded when Triton
starts. Afterwards reidal decides which versions are loaded (:mod:`reidal.embedding.
triton_versions`): a training job's load keeps every version a collection pins, and a
request for a version Triton does not have loaded loads it. The version a request naming
none gets is the config's ``reidal_default_version`` parameter (:data:`P_DEFAULT_VERSION`),
not Triton's newest: training adds versions for one collection and must not change what
every other caller embeds with. A writer sets it on the first write into a model folder
(the version written) and, into a folder written without it, to the newest version the
folder held before (the one Triton served to such requests until then); afterwards it is
the operator's (edit it to change the default).

Writing a version into a model folder that already has a config keeps the operator's
settings (:func:`merge_config`). The writer owns only what the version it writes decides
(:data:`OWNED_FIELDS`): the name, platform / backend / runtime and the model file name (what
runs the file), the inputs and outputs (the file's tensors), ``max_batch_size`` (and with it
the dynamic batcher's preferred sizes above it are dropped, which Triton would refuse), the
version policy (how reidal serves the old version while a collection is re-embedded), and
the ``parameters`` it writes (the ``preprocess_*`` ones, which a client must follow, and
``torch_num_threads`` when the CPU writer is given a thread count). Everything else is the
operator's and stays as served: ``instance_group`` (count, kind, gpus), ``dynamic_batching``
(preferred sizes, queue delay, ...), ``optimization``, ``model_warmup``, ``response_cache``,
other parameters. A first write into an empty folder uses the writer's defaults. Both
writers (python backend and ONNX) go through :func:`write_config`, so both behave so.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import py_compile
import shutil
import tempfile
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reidal.embedding.spec import DEFAULT_MODEL_NAME, ModelSpec, default_spec

if TYPE_CHECKING:
    from reidal.embedding.model import EmbeddingNet

CONFIG_FILE = "config.pbtxt"
PYTHON_MODEL_FILE = "model.py"
#: Largest batch one Triton request (or one dynamically merged batch) may carry.
DEFAULT_MAX_BATCH_SIZE = 64
#: How long Triton's dynamic batcher may hold a request to merge it with others. 0 on CPU:
#: requests that queue up while the single instance is busy are still merged, and a lone
#: request is not delayed (a forward pass takes 10+ ms there, so waiting buys little).
DEFAULT_QUEUE_DELAY_US = 0
#: Versions of a model Triton keeps loaded (the newest ones).
DEFAULT_KEEP_VERSIONS = 2
#: ModelConfig fields a writer sets from the version it writes; an existing config keeps
#: every other field (see the module docstring), and its ``parameters`` the keys the writer
#: does not write.
OWNED_FIELDS = (
    "name", "platform", "backend", "runtime", "default_model_filename", "max_batch_size",
    "input", "output", "version_policy",
)

# Config parameter keys (one place; the client reads the same keys back).
P_MEAN = "preprocess_mean"
P_STD = "preprocess_std"
P_LAYOUT = "preprocess_layout"
P_RESIZE = "preprocess_resize"
P_THREADS = "torch_num_threads"
#: The version a request naming no version gets (see the module docstring).
P_DEFAULT_VERSION = "reidal_default_version"
#: Every parameter named so is the writer's (the preprocessing a client must follow): a
#: merge drops one the new version no longer writes rather than leave it stale.
PREPROCESS_PREFIX = "preprocess_"

#: The python-backend entry point copied into every version folder.
PYTHON_MODEL_SOURCE = '''\
"""reidal embedding model for Triton's python backend (written by reidal.embedding.triton_repo).

Rebuilds the EmbeddingNet saved beside this file and runs every batch Triton's dynamic
batcher hands over as one forward pass under torch.inference_mode.
"""

import importlib.util
import json
import os
import py_compile

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from reidal.embedding.model import load_model


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("torch_num_threads") or 0)
        if threads <= 0:
            threads = len(os.sched_getaffinity(0))
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set in this process
            pass
        self.module = load_model(os.path.join(args["model_repository"], args["model_version"]))
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.output_dtype = pb_utils.triton_string_to_numpy(config["output"][0]["data_type"])
        dims = [int(d) for d in config["input"][0]["dims"]]
        # Pay for the first (slow) forward pass before serving.
        with torch.inference_mode():
            self.module(torch.zeros([1] + dims, dtype=torch.float32))

    def execute(self, requests):
        arrays = [
            pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests
        ]
        try:
            x = torch.from_numpy(np.concatenate(arrays, axis=0)).to(torch.float32)
            with torch.inference_mode():
                y = self.module(x).numpy().astype(self.output_dtype, copy=False)
        except Exception as exc:
            error = pb_utils.TritonError("embedding forward pass failed: %s" % (exc,))
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for a in arrays:
            stop = start + a.shape[0]
            out = pb_utils.Tensor(self.output_name, np.ascontiguousarray(y[start:stop]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start = stop
        return responses

    def finalize(self):
        self.module = None
'''


def spec_parameters(spec: ModelSpec) -> dict[str, str]:
    """The config ``parameters`` that carry a spec's preprocessing."""
    return {
        P_MEAN: ",".join(repr(float(v)) for v in spec.mean),
        P_STD: ",".join(repr(float(v)) for v in spec.std),
        P_LAYOUT: spec.layout,
        P_RESIZE: "bilinear",
    }


def render_config(
    spec: ModelSpec,
    *,
    dim: int,
    backend: str,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    instance_kind: str = "KIND_CPU",
    instance_count: int = 1,
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    preferred_batch_sizes: tuple[int, ...] = (),
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    parameters: Mapping[str, str] | None = None,
    default_model_filename: str | None = None,
) -> str:
    """Triton ``config.pbtxt`` text for an embedding model (built as a protobuf, so it is valid)."""
    from tritonclient.grpc import model_config_pb2 as mc

    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if instance_count < 1:
        raise ValueError(f"instance_count must be >= 1, got {instance_count}")
    if keep_versions < 1:
        raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if instance_kind not in ("KIND_CPU", "KIND_GPU", "KIND_AUTO"):
        raise ValueError(f"instance_kind must be KIND_CPU, KIND_GPU or KIND_AUTO, got {instance_kind!r}")
    bad_sizes = [b for b in preferred_batch_sizes if not 1 <= b <= max_batch_size]
    if bad_sizes:
        raise ValueError(f"preferred batch sizes {bad_sizes} are outside [1, {max_batch_size}]")
    dtype = mc.TYPE_FP16 if spec.dtype == "FP16" else mc.TYPE_FP32
    cfg = mc.ModelConfig(name=spec.name, backend=backend, max_batch_size=max_batch_size)
    if default_model_filename:
        cfg.default_model_filename = default_model_filename
    cfg.version_policy.latest.num_versions = keep_versions
    cfg.input.add(name=spec.input_name, data_type=dtype, dims=list(spec.input_shape))
    cfg.output.add(name=spec.output_name, data_type=mc.TYPE_FP32, dims=[dim])
    cfg.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    cfg.dynamic_batching.preferred_batch_size.extend(preferred_batch_sizes)
    cfg.instance_group.add(
        count=instance_count, kind=mc.ModelInstanceGroup.Kind.Value(instance_kind)
    )
    for key, value in {**spec_parameters(spec), **dict(parameters or {})}.items():
        cfg.parameters[key].string_value = str(value)
    return _config_text(cfg)


def merge_config(existing: str, new: str, *, also_owned: Collection[str] = ()) -> str:
    """``new`` (a writer's rendered config) applied to the ``existing`` config of the model
    folder: the :data:`OWNED_FIELDS` (plus ``also_owned``, e.g. ``("instance_group",)`` when
    the caller was given instance settings explicitly) and the parameters ``new`` sets come
    from ``new`` (``preprocess_*`` ones it no longer sets are dropped: the writer owns them;
    ``"parameters"`` in ``also_owned``: only ``new``'s); every other field and parameter
    stays as the operator left it. Preferred batch sizes above the resulting
    ``max_batch_size`` are dropped (Triton refuses them). Comments in ``existing`` are not
    kept (protobuf text format has none)."""
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2 as mc

    _check_also_owned(also_owned)
    old, fresh = parse_config(existing), parse_config(new)
    merged = {k: v for k, v in old.items() if k != "parameters"}
    for field in (*OWNED_FIELDS, *also_owned):
        merged.pop(field, None)
        if field in fresh:
            merged[field] = fresh[field]
    kept = {} if "parameters" in also_owned else {
        k: v for k, v in (old.get("parameters") or {}).items()
        if not k.startswith(PREPROCESS_PREFIX)}
    parameters = {**kept, **(fresh.get("parameters") or {})}
    if parameters:
        merged["parameters"] = parameters
    batching = merged.get("dynamic_batching")
    if batching and batching.get("preferred_batch_size"):
        limit = int(merged.get("max_batch_size", 0) or 0)
        sizes = [b for b in batching["preferred_batch_size"] if int(b) <= limit]
        merged["dynamic_batching"] = {**batching, "preferred_batch_size": sizes}
        if not sizes:
            del merged["dynamic_batching"]["preferred_batch_size"]
    return _config_text(json_format.ParseDict(merged, mc.ModelConfig()))


def _check_also_owned(also_owned: Collection[str]) -> None:
    from tritonclient.grpc import model_config_pb2 as mc

    unknown = sorted(set(also_owned) - set(mc.ModelConfig.DESCRIPTOR.fields_by_name))
    if unknown:
        raise ValueError(f"also_owned names {unknown}, which are not ModelConfig fields")


def _config_text(cfg: Any) -> str:
    from google.protobuf import text_format

    header = (
        f"# Triton model config for the embedding model {cfg.name!r}, written by reidal.\n"
        "# Clients read the preprocessing from `parameters` and the input size from the dims.\n"
    )
    return header + text_format.MessageToString(cfg)


def parse_config(text: str) -> dict[str, Any]:
    """Parse ``config.pbtxt`` text into the JSON form Triton's model-config API returns."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2 as mc

    msg = text_format.Parse(text, mc.ModelConfig())
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def read_config(path: str | Path) -> dict[str, Any]:
    """:func:`parse_config` of the file at ``path``. A file that does not parse (a hand
    edit gone wrong, which Triton refuses too) raises ValueError naming the file, not
    protobuf's bare ParseError, so training and the CLIs report it as a bad input."""
    from google.protobuf import text_format

    try:
        return parse_config(Path(path).read_text(encoding="utf-8"))
    except text_format.ParseError as exc:
        raise ValueError(f"{path} is not a valid Triton model config ({exc}): fix or remove "
                         "it") from None


def spec_from_config(config: Mapping[str, Any]) -> ModelSpec:
    """The :class:`ModelSpec` a model config describes (JSON form, as from Triton or
    :func:`parse_config`). Raises ``ValueError`` when the config lacks the preprocessing
    parameters: reidal does not guess a normalisation; give a ModelSpec in configuration."""
    name = config.get("name") or ""
    inputs, outputs = config.get("input") or [], config.get("output") or []
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(
            f"model {name!r} must have exactly one input and one output to be an embedding "
            f"model, has {len(inputs)} and {len(outputs)}"
        )
    params = {k: (v or {}).get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
    missing = [k for k in (P_MEAN, P_STD) if not params.get(k)]
    if missing:
        raise ValueError(
            f"model {name!r} config has no {missing} parameter(s): give its preprocessing as a "
            "ModelSpec in configuration"
        )
    dims = [int(d) for d in inputs[0].get("dims", [])]
    if int(config.get("max_batch_size", 0) or 0) == 0 and len(dims) == 4:
        dims = dims[1:]  # a non-batching model lists the batch axis in its dims
    layout = params.get(P_LAYOUT) or ("NCHW" if dims and dims[0] == 3 else "NHWC")
    if len(dims) != 3 or (layout == "NCHW" and dims[0] != 3) or (layout == "NHWC" and dims[2] != 3):
        raise ValueError(f"model {name!r} input dims {dims} are not a 3-channel {layout} image")
    size = (dims[1], dims[2]) if layout == "NCHW" else (dims[0], dims[1])
    dtype = str(inputs[0].get("data_type", "TYPE_FP32")).removeprefix("TYPE_")
    return ModelSpec(
        name=name,
        input_size=size,
        mean=[float(v) for v in params[P_MEAN].split(",")],
        std=[float(v) for v in params[P_STD].split(",")],
        input_name=inputs[0]["name"],
        output_name=outputs[0]["name"],
        layout=layout,
        dtype=dtype,
    )


def write_model_repository(
    repo_dir: str | Path,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    version: int = 1,
    model: EmbeddingNet | None = None,
    spec: ModelSpec | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    num_threads: int | None = None,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as version ``version`` of ``model_name`` (python backend, CPU) and
    return the model's folder ``<repo>/<model_name>``.

    ``model`` defaults to :func:`reidal.embedding.model.build_default_model`; it must be an
    EmbeddingNet that :func:`reidal.embedding.model.save_model` can store. ``spec`` defaults
    to :func:`reidal.embedding.spec.default_spec`; its ``name`` is set to ``model_name``.
    ``num_threads``: torch threads of the Triton model instance (``None``: every CPU the
    server may use; a served config keeps its own). The version folder is built aside and
    renamed into place, so Triton never sees half a version; an existing version is refused
    unless ``overwrite``. All versions share ``config.pbtxt``: a version whose input or
    output shape differs from the existing config is refused (that is a new model: give it
    a new name); an existing config keeps its operator settings (instance groups, dynamic
    batching, ...: :func:`merge_config`), ``max_queue_delay_us`` applies to a first write.
    """
    from reidal.embedding.model import build_default_model, save_model

    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be an integer >= 1, got {version!r}")
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise ValueError(f"invalid Triton model name {model_name!r}")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
    spec = replace(spec or default_spec(), name=model_name)
    if model is None:
        model = build_default_model(input_size=spec.input_size)
    model_dir = Path(repo_dir) / model_name
    # No thread count given: a served config keeps its own (an operator setting).
    keep_threads = num_threads is None and (model_dir / CONFIG_FILE).exists()
    config = render_config(
        spec,
        dim=model.dim,
        backend="python",
        max_batch_size=max_batch_size,
        instance_kind="KIND_CPU",
        keep_versions=keep_versions,
        max_queue_delay_us=max_queue_delay_us,
        parameters={} if keep_threads else {P_THREADS: str(num_threads or 0)},
    )
    check_config(model_dir, config)
    default = default_version(repo_dir, model_name, writing=version)
    with staged_version(model_dir, version, overwrite=overwrite) as staging:
        save_model(model, staging, spec)
        (staging / PYTHON_MODEL_FILE).write_text(PYTHON_MODEL_SOURCE, encoding="utf-8")
        # Compile model.py now: otherwise the stub writes __pycache__ into the version folder
        # after Triton noted its timestamps (the stub ignores PYTHONDONTWRITEBYTECODE), and the
        # next load_model (for a new version) reloads this unchanged version too: measured
        # 19 s instead of about 10 s for adding a version on 2 busy cores.
        source = str(staging / PYTHON_MODEL_FILE)
        py_compile.compile(source, cfile=importlib.util.cache_from_source(source), doraise=True)
    write_config(model_dir, config, default_version=default)
    return model_dir


@contextmanager
def staged_version(model_dir: Path, version: int, *, overwrite: bool) -> Iterator[Path]:
    """A staging folder for version ``version`` of the model in ``model_dir``; when the block
    ends without an error it becomes ``model_dir/<version>`` by one rename, so Triton never
    sees half a version. An existing version is refused unless ``overwrite``
    (FileExistsError, also when another writer renames the same version into place first).
    Shared by the python-backend and the ONNX writers."""
    final = model_dir / str(version)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite=True to replace a served version")
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=model_dir))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700; Triton may run as another user
        yield staging
        if final.exists() and overwrite:
            shutil.rmtree(final)
        try:
            os.replace(staging, final)
        except OSError as exc:  # another writer took the version meanwhile
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            raise FileExistsError(f"{final} was written by another writer meanwhile") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_config(model_dir: Path, config: str) -> None:
    """Refuse ``config`` when the model already has a config of another model (other
    tensors or backend): versions of one model share one config, so its served versions
    could no longer be loaded."""
    path = model_dir / CONFIG_FILE
    if path.exists():
        _check_compatible(read_config(path), parse_config(config), path)


def write_config(model_dir: Path, config: str, *, also_owned: Collection[str] = (),
                 default_version: str = "") -> None:
    """Write the model's config: ``config`` itself into a folder without one, else ``config``
    merged into the existing one (:func:`merge_config`: the operator's instance groups,
    dynamic batching and other settings stay). Atomically, and only when the result differs
    from the existing config as a ModelConfig (so an unchanged hand-edited file is left as
    it is): Triton reloads every loaded version of a model whose config changed, which would
    needlessly restart the old versions. ``default_version`` (from :func:`default_version`
    taken before the new version was staged) becomes the :data:`P_DEFAULT_VERSION`
    parameter. Shared by the python-backend and the ONNX writers."""
    _check_also_owned(also_owned)
    if default_version:
        config = _with_parameter(config, P_DEFAULT_VERSION, default_version)
    path = model_dir / CONFIG_FILE
    if not path.exists():
        _atomic_write(path, config)
        return
    served = read_config(path)
    merged = merge_config(path.read_text(encoding="utf-8"), config, also_owned=also_owned)
    if parse_config(merged) != served:
        _atomic_write(path, merged)


def _with_parameter(config: str, key: str, value: str) -> str:
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = parse_config(config)
    cfg.setdefault("parameters", {})[key] = {"string_value": value}
    return _config_text(json_format.ParseDict(cfg, mc.ModelConfig()))


def default_version(repo_dir: str | Path, model_name: str, writing: int | None = None) -> str:
    """The version of ``model_name`` a request naming none gets: the config's
    :data:`P_DEFAULT_VERSION`; without it (a folder written before reidal set it, or an
    operator's) the newest version folder (what Triton serves such requests), leaving out
    ``writing`` (a writer asks before adding it); without any, ``writing`` (a new model).
    "" when there is nothing."""
    model_dir = Path(repo_dir) / model_name
    path = model_dir / CONFIG_FILE
    if path.exists():
        named = (read_config(path).get("parameters") or {}).get(P_DEFAULT_VERSION) or {}
        if named.get("string_value"):
            return str(named["string_value"])
    versions = [v for v in model_versions(repo_dir, model_name) if v != writing]
    if versions:
        return str(versions[-1])
    return str(writing) if writing is not None else ""


def ensure_default_model(repo_dir: str | Path, model_name: str = DEFAULT_MODEL_NAME) -> bool:
    """What ``reidal serve`` (bundled Triton) and ``reidal triton`` do with their repository
    before Triton starts: write the default model (:func:`reidal.embedding.spec.
    default_spec`, :data:`~reidal.embedding.spec.DEFAULT_INPUT_SIZE`) as version 1 of
    ``model_name`` when the repository has no config for that name, else leave the model as
    it is (only :func:`name_pretrained_default`). So a repository written when the default
    was 128 px keeps serving its 128 px model and every vector stored with it stays
    comparable; a new name (``reidal serve --model reidal_embedder_224``) gets the current
    default beside it (docs/deployment.md, "Upgrading the default model"). True when it
    wrote the model."""
    if (Path(repo_dir) / model_name / CONFIG_FILE).exists():
        name_pretrained_default(repo_dir, model_name)
        return False
    write_model_repository(repo_dir, model_name=model_name)
    return True


def name_pretrained_default(repo_dir: str | Path, model_name: str) -> None:
    """Name the lowest version the default (:data:`P_DEFAULT_VERSION`) of a model folder
    whose config names none: for the repository ``reidal serve`` writes itself, where
    version 1 is the pretrained model and every later one came from a training job for one
    collection (folders written before reidal named a default). A no-op otherwise."""
    model_dir = Path(repo_dir) / model_name
    path = model_dir / CONFIG_FILE
    versions = model_versions(repo_dir, model_name)
    if not path.exists() or not versions:
        return
    if P_DEFAULT_VERSION in (read_config(path).get("parameters") or {}):
        return
    write_config(model_dir, path.read_text(encoding="utf-8"),
                 default_version=str(versions[0]))


def model_versions(repo_dir: str | Path, model_name: str) -> list[int]:
    """The version folders present for ``model_name``, ascending."""
    model_dir = Path(repo_dir) / model_name
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(repo_dir: str | Path, model_name: str = DEFAULT_MODEL_NAME) -> int:
    """The version number a new export of ``model_name`` should take."""
    versions = model_versions(repo_dir, model_name)
    return (versions[-1] + 1) if versions else 1


def _check_compatible(old: dict[str, Any], new: dict[str, Any], path: Path) -> None:
    def shape(cfg: dict[str, Any]) -> str:
        keys = ("name", "data_type", "dims")
        return json.dumps(
            [[{k: t.get(k) for k in keys} for t in cfg.get(io, [])] for io in ("input", "output")]
        )

    if shape(old) != shape(new) or old.get("backend") != new.get("backend"):
        raise ValueError(
            f"{path} describes a different model (inputs/outputs/backend {shape(old)}) than the "
            f"new version ({shape(new)}); versions of one model must share a config, so write "
            "this one under a new model name"
        )


def _atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` by one rename of a complete, synced file. The temporary name is
    unique, so two writers of one model (two training jobs exporting at once, the launcher
    beside a server) never rename each other's half-written file into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; Triton may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
