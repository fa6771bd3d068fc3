"""Export the embedding model to ONNX and write an NGC-Triton (GPU) model repository.

    python -m reidal.embedding.onnx_export --out deploy/triton/model_repository
    python -m reidal.embedding.onnx_export --out DIR --model-dir data/models/v3 --version 3

writes ``DIR/<name>/config.pbtxt`` (onnxruntime backend, dynamic batching, KIND_GPU
instances, the same tensor names and preprocessing parameters as the CPU python-backend
model, so the same :class:`reidal.embedding.triton_client.TritonEmbedder` drives both) and
``DIR/<name>/<version>/model.onnx`` with a dynamic batch axis. Unless ``--no-verify``, the
exported file is run with onnxruntime on CPU against the torch model before it is kept.

Exporting a version into a model folder that already has a config (training's next
version, a re-export) updates only what the export owns, i.e. the backend, model file
name, tensors, ``max_batch_size``, version policy and ``preprocess_*`` parameters
(:data:`reidal.embedding.triton_repo.OWNED_FIELDS`), and keeps the operator's
``instance_group`` (e.g. 2 instances on gpus [0, 1], or KIND_CPU), ``dynamic_batching``
(preferred sizes, queue delay) and every other setting; ``--instances`` / ``--kind``, when
given, replace the instance group. A first export uses the defaults below.

torch 2.13's default (dynamo) exporter needs onnxscript, which reidal does not depend on, so
the TorchScript-based exporter (``dynamo=False``) is used; it handles this plain CNN fine.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from reidal.embedding.spec import DEFAULT_MODEL_NAME, ModelSpec, default_spec
from reidal.embedding.triton_repo import (
    CONFIG_FILE,
    DEFAULT_KEEP_VERSIONS,
    check_config,
    default_version,
    render_config,
    staged_version,
    write_config,
)

ONNX_FILE = "model.onnx"
DEFAULT_OPSET = 17
#: GPU defaults: one instance per GPU, batches merged up to 64, 0.5 ms queueing.
GPU_MAX_BATCH_SIZE = 64
GPU_PREFERRED_BATCH_SIZES = (16, 32, 64)
GPU_QUEUE_DELAY_US = 500
#: Largest |onnxruntime - torch| accepted when verifying an export.
VERIFY_ATOL = 1e-4


def export_onnx(model: object, path: str | Path, spec: ModelSpec, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model`` (a torch module mapping (B, *spec.input_shape) -> (B, D)) as ONNX with a
    dynamic batch axis, input/output named as in ``spec``. The module is exported in eval
    mode; its own mode is restored afterwards."""
    import onnx
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        sample = torch.zeros((2, *spec.input_shape), dtype=torch.float32)
        with warnings.catch_warnings(), torch.inference_mode(False):
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(
                model,
                (sample,),
                str(out),
                dynamo=False,
                input_names=[spec.input_name],
                output_names=[spec.output_name],
                dynamic_axes={spec.input_name: {0: "batch"}, spec.output_name: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
            )
    finally:
        model.train(was_training)
    onnx.checker.check_model(str(out))
    return out


def onnx_max_abs_diff(model: object, onnx_path: str | Path, batch: np.ndarray, spec: ModelSpec) -> float:
    """max |onnxruntime(batch) - model(batch)| with onnxruntime on CPU."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([spec.output_name], {spec.input_name: batch.astype(np.float32)})[0]
    with torch.inference_mode():
        want = model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).numpy()
    if got.shape != want.shape:
        raise ValueError(f"onnx output shape {got.shape} differs from torch's {want.shape}")
    return float(np.max(np.abs(got - want)))


def write_onnx_repository(
    out_dir: str | Path,
    *,
    model: object | None = None,
    spec: ModelSpec | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    version: int = 1,
    max_batch_size: int = GPU_MAX_BATCH_SIZE,
    instance_count: int | None = None,
    instance_kind: str | None = None,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    overwrite: bool = True,
) -> Path:
    """Write ``<out_dir>/<model_name>/{config.pbtxt, <version>/model.onnx}`` (with
    ``model.pt`` + ``model.json`` beside it when reidal can rebuild the model, so training
    can start from that version); return the model folder. ``model`` defaults to the
    default EmbeddingNet. With ``verify`` the export is compared with torch on a random
    batch (onnxruntime, CPU) and refused above 1e-4. An existing version is replaced unless
    ``overwrite`` is false (then FileExistsError). An existing config of another model
    (other tensors, or another backend such as the CPU repository's python one) is refused:
    its versions could no longer be served. An existing config keeps its operator settings
    (instance groups, dynamic batching, other parameters; see the module docstring) and
    takes the fields the export owns; ``instance_count`` / ``instance_kind`` (None: keep
    the served instance group, or 1 x KIND_GPU in a new folder), when either is given,
    replace the instance group with that one. The config is rewritten only when it changes
    (Triton reloads every version of a model whose config changed)."""
    from reidal.embedding.model import build_default_model

    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be an integer >= 1, got {version!r}")
    spec = replace(spec or default_spec(), name=model_name)
    if model is None:
        model = build_default_model(input_size=spec.input_size)
    model_dir = Path(out_dir) / model_name
    default = default_version(out_dir, model_name, writing=version)
    with staged_version(model_dir, version, overwrite=overwrite) as staging:
        onnx_path = export_onnx(model, staging / ONNX_FILE, spec, opset=opset)
        batch = np.random.default_rng(0).standard_normal((3, *spec.input_shape)).astype(np.float32)
        if verify:
            diff = onnx_max_abs_diff(model, onnx_path, batch, spec)
            if diff > VERIFY_ATOL:
                raise ValueError(f"ONNX export differs from torch by {diff:.2e} > {VERIFY_ATOL:g}")
        import onnxruntime as ort

        dim = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).get_outputs()[
            0
        ].shape[1]
        config = render_gpu_config(
            spec, dim=int(dim), max_batch_size=max_batch_size,
            instance_count=1 if instance_count is None else instance_count,
            instance_kind=instance_kind or "KIND_GPU", keep_versions=keep_versions,
        )
        check_config(model_dir, config)
        try:  # the torch files too, so training can start from this version later
            from reidal.embedding.model import save_model

            save_model(model, staging, spec)  # type: ignore[arg-type]
        except ValueError:
            pass  # a module reidal cannot rebuild: ONNX only
    explicit = instance_count is not None or instance_kind is not None
    write_config(model_dir, config, also_owned=("instance_group",) if explicit else (),
                 default_version=default)
    return model_dir


def render_gpu_config(
    spec: ModelSpec,
    *,
    dim: int,
    max_batch_size: int = GPU_MAX_BATCH_SIZE,
    instance_count: int = 1,
    instance_kind: str = "KIND_GPU",
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
) -> str:
    """``config.pbtxt`` of the ONNX model for the NGC Triton image."""
    preferred = tuple(b for b in GPU_PREFERRED_BATCH_SIZES if b <= max_batch_size)
    return render_config(
        spec,
        dim=dim,
        backend="onnxruntime",
        max_batch_size=max_batch_size,
        instance_kind=instance_kind,
        instance_count=instance_count,
        max_queue_delay_us=GPU_QUEUE_DELAY_US,
        preferred_batch_sizes=preferred,
        keep_versions=keep_versions,
        default_model_filename=ONNX_FILE,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reidal.embedding.onnx_export",
        description="Export the embedding model to ONNX as a Triton (GPU) model repository.",
    )
    parser.add_argument("--out", required=True, type=Path, help="model repository folder")
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="a saved model (model.pt + model.json, e.g. a version folder of the CPU "
        "repository); default: the untrained default model",
    )
    parser.add_argument("--name", default=DEFAULT_MODEL_NAME, help="Triton model name")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=GPU_MAX_BATCH_SIZE)
    parser.add_argument(
        "--instances", type=int,
        help="model instances per GPU (default: keep the existing config's instance group, "
        "else 1)",
    )
    parser.add_argument(
        "--kind", choices=["KIND_GPU", "KIND_CPU", "KIND_AUTO"],
        help="instance kind (default: keep the existing config's instance group, else KIND_GPU)",
    )
    parser.add_argument("--dim", type=int, default=256, help="embedding width (default model)")
    parser.add_argument("--seed", type=int, default=0, help="head seed (default model)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    args = parser.parse_args(argv)

    from reidal.embedding.model import build_default_model, load_model, load_spec

    if args.model_dir is not None:
        model, spec = load_model(args.model_dir), load_spec(args.model_dir)
    else:
        spec = default_spec(args.name)
        model = build_default_model(args.dim, args.seed, input_size=spec.input_size)
    model_dir = write_onnx_repository(
        args.out,
        model=model,
        spec=spec,
        model_name=args.name,
        version=args.version,
        max_batch_size=args.max_batch_size,
        instance_count=args.instances,
        instance_kind=args.kind,
        opset=args.opset,
        verify=not args.no_verify,
    )
    print(f"wrote {model_dir / CONFIG_FILE} and {model_dir / str(args.version) / ONNX_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
