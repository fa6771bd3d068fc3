"""What a client must know to feed one Triton embedding model: its name, input and normalisation.

This is the whole plug-in surface for a backbone: MegaDescriptor, MiewID or DINOv2 served by
Triton under some model name plug in as a :class:`ModelSpec` read from a JSON/TOML file (or
discovered from the model's ``config.pbtxt`` parameters, see
:func:`reidal.embedding.triton_client.TritonEmbedder.spec_from_triton`), with no code change.

``mean`` and ``std`` are per channel (R, G, B) on the 0..1 pixel scale, torchvision style:
``x = (pixel / 255 - mean) / std``.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

#: The usual ImageNet statistics (torchvision, timm): what most backbones a user brings expect.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: EfficientNet-Lite was trained in TensorFlow on ``(pixel - 127) / 128`` (the
#: ``MEAN_RGB=127, STDDEV_RGB=128`` of tensorflow/tpu's efficientnet_lite_builder), not on the
#: ImageNet statistics. Checked here on the bundled weights with scikit-learn's two sample
#: photos: with these constants flower.jpg is a "daisy" (top-1, 15 %); with ImageNet
#: statistics its top-1 is "honeycomb" at 4 %.
LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3

#: Name of the default model in every Triton model repository reidal writes.
DEFAULT_MODEL_NAME = "reidal_embedder"

#: Input size (height, width) of the default model written into a *new* model repository.
#: 224 px since 2026-12-08 (128 px before): on zebra-rapid the frozen backbone's zero-shot
#: mAP is 63.9 % at 224 px against 58.8 % at 128 px (docs/results/README.md, "Issue 13 at
#: 224 px", 4 seeds), for 2.5-5.5x the forward pass's time on CPU (docs/benchmarks.md). A
#: repository that already holds the default model keeps it at the size it was written with
#: (Triton refuses a version of another input shape under one model name): moving a
#: collection to 224 px is a new model name, see docs/deployment.md, "Upgrading the
#: default model".
DEFAULT_INPUT_SIZE: tuple[int, int] = (224, 224)
#: The default model's input size before 2026-12-08: repositories written then hold it.
PREVIOUS_INPUT_SIZE: tuple[int, int] = (128, 128)

LAYOUTS = ("NCHW", "NHWC")
DTYPES = ("FP32", "FP16")


@dataclass(frozen=True)
class ModelSpec:
    """How to call one Triton embedding model.

    name: Triton model name. input_size: (height, width) the image is resized to.
    mean, std: per-channel normalisation on the 0..1 scale. input_name / output_name: the
    model's tensor names. layout: ``NCHW`` or ``NHWC`` (without the batch axis in Triton's
    dims). dtype: Triton data type of the input tensor (FP32 or FP16).
    """

    name: str = DEFAULT_MODEL_NAME
    input_size: tuple[int, int] = (128, 128)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_name: str = "images"
    output_name: str = "embeddings"
    layout: str = "NCHW"
    dtype: str = "FP32"

    def __post_init__(self) -> None:
        # Normalise lists (from JSON/TOML) to tuples so specs hash and compare by value.
        object.__setattr__(self, "input_size", _int_pair(self.input_size))
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        object.__setattr__(self, "std", _triple(self.std, "std"))
        for field in ("name", "input_name", "output_name"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"ModelSpec.{field} must be a non-empty string, got {value!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"ModelSpec.std must be > 0 for every channel, got {self.std}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"ModelSpec.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelSpec.dtype must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image tensor as Triton sees it (no batch axis)."""
        h, w = self.input_size
        return (3, h, w) if self.layout == "NCHW" else (h, w, 3)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("input_size", "mean", "std"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Build from a mapping; unknown keys are refused so a typo never passes silently."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a model spec must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model spec key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**dict(data))

    @classmethod
    def from_file(cls, path: str | Path, *, table: str | None = None) -> ModelSpec:
        """Read a ``.json`` or ``.toml`` file; ``table`` picks a sub-table (e.g. ``"model"``)."""
        p = Path(path)
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() == ".json":
            data: Any = json.loads(text)
        elif p.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            raise ValueError(f"model spec file must end in .json or .toml, got {p.name!r}")
        if table is not None:
            if not isinstance(data, Mapping) or table not in data:
                raise ValueError(f"{p} has no table {table!r}")
            data = data[table]
        return cls.from_dict(data)


def default_spec(name: str = DEFAULT_MODEL_NAME,
                 input_size: tuple[int, int] = DEFAULT_INPUT_SIZE) -> ModelSpec:
    """The spec of reidal's default model (EfficientNet-Lite0, :data:`DEFAULT_INPUT_SIZE`,
    Lite normalisation); ``input_size`` gives the same model at another size (a test that
    needs only *some* model, a repository kept at :data:`PREVIOUS_INPUT_SIZE`)."""
    return ModelSpec(name=name, input_size=input_size, mean=LITE_MEAN, std=LITE_STD)


def _int_pair(value: object) -> tuple[int, int]:
    try:
        pair = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"ModelSpec.input_size must be (height, width), got {value!r}") from None
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"ModelSpec.input_size must be two integers (height, width), got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"ModelSpec.input_size must be positive, got {value!r}")
    return (int(pair[0]), int(pair[1]))


def _triple(value: object, name: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"ModelSpec.{name} must be three numbers (R, G, B), got {value!r}") from None
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"ModelSpec.{name} must be three finite numbers (R, G, B), got {value!r}")
    return vals  # type: ignore[return-value]
