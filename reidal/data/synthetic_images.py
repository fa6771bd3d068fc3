"""Seeded procedural re-ID images: many photos of a few dozen individually patterned animals.

reidal ships code, not images, so the demo, the tests and the benchmarks draw their data
from this generator. Each individual is an animal-like silhouette carrying its own coat
(stripes, spots, rosettes or a reticulated network) and is photographed many times under
random pose, scale, crop, lighting, blur, occlusion and background clutter.

What makes it a re-ID problem rather than a classification toy: individuals are grouped in
*species* that share one template (palette, body shape, pattern kind and scale) and differ
only in the layout of their marks, so an ImageNet backbone sees "a striped animal" and
confuses the members of a species, while the layout stays learnable. ``pattern_similarity``
sets how close an individual's template stays to its species'.

Everything is a function of ``(config, individual, image index)`` seeded through
:class:`numpy.random.SeedSequence`, so an individual's coat does not change when the
collection grows and two runs with the same config give identical pixels. Drawing uses
numpy coordinate grids and Pillow only.

Measured zero-shot difficulty of the default config (ImageNet EfficientNet-Lite0, global
average pooled 1280-d features, 128x128, leave-one-out over all images) is documented in
:data:`DEFAULT_ZERO_SHOT`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

#: Bumped whenever the pixels a config produces change, so cached folders are rebuilt.
GENERATOR_VERSION = 1

#: Zero-shot retrieval on ``SyntheticConfig()`` (seed 0: 305 images, 40 identities) with the
#: default backbone: ImageNet EfficientNet-Lite0, global average pooled 1280-d features,
#: L2-normalised, 128x128, ImageNet mean/std; every image queries all others (leave-one-out).
#: Measured on the JPEG files generate_dataset writes, read back with load_wildlife_csv.
#: Rendered in memory (no JPEG) seed 0 gives Top-1 0.403 / mAP 0.274, seeds 1 and 2 give
#: 0.345 / 0.266 and 0.329 / 0.268; chance Top-1 is about 0.03. With every nuisance knob at
#: 0 the same features reach Top-1 0.89: identity is in the pixels, the nuisances hide it.
#: A measurement, not asserted by tests: re-measure when the knobs or GENERATOR_VERSION
#: change.
DEFAULT_ZERO_SHOT: dict[str, float] = {
    "top1": 0.367, "top5": 0.744, "mAP": 0.262,
}

PATTERN_KINDS = ("stripes", "spots", "rosettes", "reticulated")

# Seed streams: one independent SeedSequence branch per purpose, so adding draws to one
# purpose never shifts the random numbers of another.
_S_SPECIES, _S_INDIVIDUAL, _S_IMAGE, _S_COUNT, _S_SPLIT, _S_SCENE, _S_FRAME = range(7)

# Body coordinates: u runs tail (-) to head (+), v runs back (-) to feet (+).
_U_RANGE = (-1.35, 1.35)
_V_RANGE = (-1.0, 1.15)

# (base coat, marks) colour pairs in [0, 1] RGB; species draw one and jitter it.
_PALETTES = (
    ((0.92, 0.90, 0.84), (0.10, 0.09, 0.09)),  # zebra: cream / black
    ((0.82, 0.66, 0.40), (0.30, 0.18, 0.10)),  # giraffe-ish: tan / chestnut
    ((0.86, 0.68, 0.32), (0.12, 0.10, 0.08)),  # leopard-ish: golden / black
    ((0.55, 0.56, 0.58), (0.90, 0.90, 0.88)),  # whale-shark-ish: grey / white
    ((0.70, 0.52, 0.36), (0.22, 0.14, 0.10)),  # brown / dark brown
    ((0.78, 0.76, 0.70), (0.35, 0.30, 0.26)),  # pale / grey-brown
)
_GRASS = np.array([[0.35, 0.45, 0.18], [0.50, 0.55, 0.25], [0.62, 0.58, 0.32]], np.float32)
_EARTH = np.array(
    [[0.45, 0.38, 0.28], [0.35, 0.40, 0.22], [0.55, 0.50, 0.40], [0.28, 0.30, 0.20],
     [0.60, 0.56, 0.46], [0.25, 0.22, 0.18]],
    np.float32,
)


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate and how hard to make it; every knob is a documented default.

    Geometry is in normalised image units (the frame spans [-1, 1]); probabilities are per
    image; strengths are 0 (off) to 1 (strong).
    """

    n_individuals: int = 40
    #: (min, max) images per individual, long-tailed towards min like real sightings.
    images_per_individual: tuple[int, int] = (4, 16)
    #: Square side in pixels; the default backbone runs at 128x128 on CPU.
    image_size: int = 128
    seed: int = 0
    #: Individuals are dealt round-robin into this many species templates.
    n_species: int = 4
    #: 0: every individual draws its own template; 1: a species' members differ only in
    #: the layout of their marks (phases, positions, warps).
    pattern_similarity: float = 0.7
    #: Max absolute in-plane rotation, degrees.
    rotation_deg: float = 15.0
    #: Half body length as a fraction of the half frame (1.0: nose to tail fills the width).
    scale_range: tuple[float, float] = (0.65, 0.95)
    #: Max log aspect-ratio change of the body.
    stretch: float = 0.15
    #: Max shear and max perspective foreshortening (a near end drawn larger).
    shear: float = 0.15
    #: Max body bend (pose): the spine curves by up to this much at the ends.
    bend: float = 0.15
    flip_probability: float = 0.5
    #: Max centre offset; with large scales the animal leaves the frame (a crop).
    translate: float = 0.12
    occlusion_probability: float = 0.3
    #: Max Gaussian blur radius in pixels at 128 px (scaled with image_size).
    blur_max: float = 1.0
    #: Brightness / contrast / colour-cast / directional-light jitter strength.
    lighting: float = 0.25
    #: Probability of a grey (night / IR camera-trap-like) photo.
    grayscale_probability: float = 0.05
    #: Standard deviation of additive sensor noise (in [0, 1] intensity units).
    noise: float = 0.03
    #: Background clutter strength: rocks, bushes, twigs, striped branch shadows.
    clutter: float = 0.35
    #: Fraction of identities whose every image goes to the test split (open set).
    test_identity_fraction: float = 0.2
    #: Fraction of each remaining identity's images that goes to the test split.
    test_image_fraction: float = 0.25
    jpeg_quality: int = 92
    #: Shared scenes (camera sites, pens): 0 gives every photo its own background; N > 0
    #: deals the individuals (seeded, balanced, across species) into N scenes, and every
    #: photo of an individual is taken in front of its scene's one background, so the
    #: members of a scene share most of their pixels (what an ImageNet model matches on).
    n_scenes: int = 0
    #: Near-duplicate frames: an individual's photos come in bursts of this many
    #: consecutive video-like frames sharing background, lighting and occluder, their pose
    #: differing by ``burst_jitter``; 1 = every photo drawn independently.
    burst_size: int = 1
    #: How far a burst's frames move apart, as a fraction of each pose range (rotation,
    #: scale, stretch, shear, bend, translation); 0 = identical poses (sensor noise only).
    burst_jitter: float = 0.1

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"SyntheticConfig.{name} {why}, got {getattr(self, name)!r}")

        for name in ("n_individuals", "image_size", "n_species", "seed", "jpeg_quality",
                     "n_scenes", "burst_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                bad(name, "must be an int")
        if self.n_individuals < 1:
            bad("n_individuals", "must be >= 1")
        if self.n_species < 1:
            bad("n_species", "must be >= 1")
        if self.image_size < 32:
            bad("image_size", "must be >= 32 pixels")
        if self.seed < 0:
            bad("seed", "must be >= 0")
        if self.n_scenes < 0:
            bad("n_scenes", "must be >= 0 (0: a background per photo)")
        if self.burst_size < 1:
            bad("burst_size", "must be >= 1 (1: no near-duplicate frames)")
        if not 1 <= self.jpeg_quality <= 100:
            bad("jpeg_quality", "must be in [1, 100]")
        # accept lists (e.g. from JSON) but store tuples, so configs compare and hash
        lo, hi = _pair(self.images_per_individual, "images_per_individual")
        if int(lo) != lo or int(hi) != hi or lo < 1 or hi < lo:
            bad("images_per_individual", "must be integers (min, max) with 1 <= min <= max")
        object.__setattr__(self, "images_per_individual", (int(lo), int(hi)))
        s_lo, s_hi = _pair(self.scale_range, "scale_range")
        object.__setattr__(self, "scale_range", (s_lo, s_hi))
        if not 0 < s_lo <= s_hi <= 2:
            bad("scale_range", "must satisfy 0 < min <= max <= 2")
        for name in ("pattern_similarity", "flip_probability", "occlusion_probability",
                     "grayscale_probability", "clutter", "lighting",
                     "test_identity_fraction", "test_image_fraction", "burst_jitter"):
            if not 0.0 <= _number(self, name) <= 1.0:
                bad(name, "must be in [0, 1]")
        if self.test_identity_fraction >= 1.0:
            bad("test_identity_fraction", "must leave some identities for training (< 1)")
        for name, top in (("rotation_deg", 180.0), ("stretch", 1.0), ("shear", 0.6),
                          ("bend", 1.0), ("translate", 1.0), ("blur_max", 10.0),
                          ("noise", 0.5)):
            if not 0.0 <= _number(self, name) <= top:
                bad(name, f"must be in [0, {top}]")

    @classmethod
    def tiny(cls, **overrides: object) -> SyntheticConfig:
        """Six individuals x four 64 px images: enough structure for fast unit tests."""
        base = {"n_individuals": 6, "images_per_individual": (4, 4), "image_size": 64,
                "n_species": 2}
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]

    @classmethod
    def hard(cls, **overrides: object) -> SyntheticConfig:
        """The hard preset (:data:`HARD_PRESET`): weak features on purpose, the regime of a
        new species (see there), with ``overrides`` on top."""
        return preset_config("hard", **overrides)

    def to_json_dict(self) -> dict[str, object]:
        """A JSON-safe dict (tuples as lists) that :meth:`from_json_dict` inverts.

        Fields added after data was generated and fingerprinted (:data:`LATER_FIELDS`) are
        left out while at their defaults, so a config that existed before them keeps its
        dict (and the benchmark's fingerprint and the cached folders stay valid).
        """
        def plain(v: object) -> object:
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            return v.item() if isinstance(v, np.generic) else v

        return {k: plain(v) for k, v in asdict(self).items()
                if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}

    @classmethod
    def from_json_dict(cls, data: dict[str, object]) -> SyntheticConfig:
        """Rebuild a config from :meth:`to_json_dict` output (e.g. a dataset's config.json)."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown SyntheticConfig field(s): {sorted(unknown)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kw)  # type: ignore[arg-type]


#: Fields added after the first datasets were fingerprinted, with the defaults that draw
#: exactly the pixels those datasets had (see SyntheticConfig.to_json_dict).
LATER_FIELDS: dict[str, object] = {"n_scenes": 0, "burst_size": 1, "burst_jitter": 0.1}

#: The hard generated set (``SyntheticConfig.hard()``, ``reidal bench --dataset
#: synthetic-hard``, ``reidal demo --preset hard``): the failure of issue 13 reproduced on
#: purpose. ~80 individuals of 20-50 photos; one species whose members share one template
#: (look-alikes: only the layout of the marks differs); every individual photographed in
#: one of 10 shared scenes (8 individuals a scene) where it fills a small part of the frame,
#: so background dominates an ImageNet model's features; photos in bursts of 5
#: near-duplicate frames (video), split by burst; strong nuisances (blur, noise, lighting,
#: occlusion, grey night shots, rotation). Measured zero-shot difficulty with the default
#: model under the benchmark's protocol, on 80 individuals x 20 photos: open-set mAP 21.2 %,
#: Top-1 15.3 %, AUC-ROC 55.9 % (docs/results/README.md, issue 13).
HARD_PRESET: dict[str, object] = {
    "n_individuals": 80, "images_per_individual": (20, 50), "n_species": 1,
    "pattern_similarity": 1.0, "n_scenes": 10, "burst_size": 5, "burst_jitter": 0.1,
    "scale_range": (0.3, 0.45), "clutter": 0.8, "blur_max": 2.5, "noise": 0.06,
    "lighting": 0.6, "occlusion_probability": 0.6, "grayscale_probability": 0.2,
    "rotation_deg": 30.0,
}


#: Named presets (``reidal demo --preset NAME``): overrides of SyntheticConfig's defaults.
PRESETS: dict[str, dict[str, object]] = {"default": {}, "hard": HARD_PRESET}


def preset_config(name: str, **overrides: object) -> SyntheticConfig:
    """The config of preset ``name`` (:data:`PRESETS`) with ``overrides`` on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown synthetic preset {name!r}; known: {', '.join(PRESETS)}")
    return SyntheticConfig(**{**PRESETS[name], **overrides})  # type: ignore[arg-type]


def _number(config: SyntheticConfig, name: str) -> float:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"SyntheticConfig.{name} must be a number, got {value!r}")
    return float(value)


def _pair(value: object, name: str) -> tuple[float, float]:
    try:
        lo, hi = value  # type: ignore[misc]
        return float(lo), float(hi)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"SyntheticConfig.{name} must be a (min, max) pair, got {value!r}"
        ) from err


@dataclass(frozen=True)
class PlannedImage:
    """One image's metadata, known before any pixel is drawn."""

    image_id: str
    identity: str
    individual: int
    index: int
    species: str
    split: str


def _rng(config: SyntheticConfig, stream: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([config.seed, stream, *keys]))


def identity_name(individual: int) -> str:
    """The identity label written to the CSV (zero-padded so it sorts like the index)."""
    return f"ind{individual:04d}"


def species_of(config: SyntheticConfig, individual: int) -> int:
    """Round-robin, so every species has members whatever n_individuals is."""
    return individual % config.n_species


def species_name(config: SyntheticConfig, species: int) -> str:
    """``<pattern kind>-<species index>``, e.g. ``stripes-0``."""
    return f"{PATTERN_KINDS[species % len(PATTERN_KINDS)]}-{species}"


def scene_of(config: SyntheticConfig, individual: int) -> int:
    """The scene an individual is photographed in (-1 when ``n_scenes`` is 0): a seeded
    permutation dealt round-robin, so scenes are balanced and mix species."""
    if config.n_scenes == 0:
        return -1
    order = _rng(config, _S_SCENE).permutation(config.n_individuals)
    rank = int(np.flatnonzero(order == individual)[0])
    return rank % config.n_scenes


def images_per_individual(config: SyntheticConfig) -> np.ndarray:
    """Image count of each individual: few for most, many for some (long tail)."""
    lo, hi = (int(x) for x in config.images_per_individual)
    counts = np.empty(config.n_individuals, dtype=np.int64)
    for i in range(config.n_individuals):
        u = _rng(config, _S_COUNT, i).random()
        counts[i] = min(hi, lo + int((hi - lo + 1) * u * u))
    return counts


def plan_dataset(config: SyntheticConfig) -> list[PlannedImage]:
    """Every image's id, identity, species and split, in generation order.

    The split serves the open-set protocol: a seeded ``test_identity_fraction`` of the
    identities is test-only (never seen in training); every other identity keeps at least
    one training image and sends ``test_image_fraction`` of its images (of its bursts, with
    ``burst_size`` > 1) to test.
    """
    counts = images_per_individual(config)
    n = config.n_individuals
    n_unseen = int(round(config.test_identity_fraction * n))
    n_unseen = min(n_unseen, n - 1)
    split_rng = _rng(config, _S_SPLIT)
    unseen = set(split_rng.permutation(n)[:n_unseen].tolist())
    out: list[PlannedImage] = []
    for i in range(n):
        k = int(counts[i])
        if i in unseen:
            test = np.ones(k, dtype=bool)
        else:
            # Whole bursts go to one side: a test photo is never a frame of a training burst
            # (another encounter, as in a real split by video or by day).
            burst = np.arange(k) // config.burst_size
            nb = int(burst[-1]) + 1
            n_test = min(nb - 1, int(round(config.test_image_fraction * nb)))
            test_bursts = np.zeros(nb, dtype=bool)
            test_bursts[_rng(config, _S_SPLIT, i).permutation(nb)[:n_test]] = True
            test = test_bursts[burst]
        sp = species_name(config, species_of(config, i))
        for j in range(k):
            out.append(PlannedImage(
                image_id=f"{identity_name(i)}_{j:03d}", identity=identity_name(i),
                individual=i, index=j, species=sp, split="test" if test[j] else "train",
            ))
    return out


# --------------------------------------------------------------------------- coats


@dataclass(frozen=True)
class _Template:
    """Numbers a species fixes and an individual may drift from (see pattern_similarity)."""

    base: np.ndarray  # (3,) coat colour
    mark: np.ndarray  # (3,) mark colour
    body_a: float  # torso half length
    body_b: float  # torso half height
    leg_len: float
    head: float  # head size
    neck_up: float  # how high the head is carried
    freq: float  # marks per unit length (stripes) or cell density (spots...)
    size: float  # stripe thickness / spot radius as a fraction of the cell
    warp: float  # stripe warp amplitude / spot elongation
    tilt: float  # stripe tilt


def _draw_template(rng: np.random.Generator, kind: str) -> _Template:
    base, mark = _PALETTES[int(rng.integers(len(_PALETTES)))]
    jit = rng.normal(0, 0.05, size=(2, 3))
    freq_range = {"stripes": (2.2, 4.0), "spots": (3.0, 5.0), "rosettes": (1.8, 2.5),
                  "reticulated": (2.2, 3.4)}[kind]
    return _Template(
        base=np.clip(np.array(base) + jit[0], 0.05, 0.98),
        mark=np.clip(np.array(mark) + jit[1], 0.02, 0.98),
        body_a=rng.uniform(0.72, 0.9), body_b=rng.uniform(0.3, 0.42),
        leg_len=rng.uniform(0.45, 0.7), head=rng.uniform(0.15, 0.22),
        neck_up=rng.uniform(0.1, 0.45),
        freq=rng.uniform(*freq_range), size=rng.uniform(0.3, 0.5),
        warp=rng.uniform(0.1, 0.35), tilt=rng.uniform(-0.35, 0.35),
    )


def _mix(species: _Template, own: _Template, sim: float) -> _Template:
    def m(a: object, b: object) -> object:
        return sim * np.asarray(a) + (1.0 - sim) * np.asarray(b)

    kw = {f.name: m(getattr(species, f.name), getattr(own, f.name)) for f in fields(_Template)}
    for k, v in kw.items():
        if np.ndim(v) == 0:
            kw[k] = float(v)
    return _Template(**kw)  # type: ignore[arg-type]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]
                  ) -> np.ndarray:
    """Zero-mean, roughly unit-range smooth random field (bicubic upsampled lattice)."""
    lattice = rng.uniform(-1.0, 1.0, size=(cells[0] + 1, cells[1] + 1)).astype(np.float32)
    img = Image.fromarray(lattice, mode="F").resize((shape[1], shape[0]), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _jittered_points(rng: np.random.Generator, density: float) -> np.ndarray:
    """Blue-noise-ish centres over the body box: one jittered point per grid cell."""
    (u0, u1), (v0, v1) = _U_RANGE, _V_RANGE
    nu = max(2, int(round((u1 - u0) * density)))
    nv = max(2, int(round((v1 - v0) * density)))
    gu, gv = np.meshgrid((np.arange(nu) + 0.5) / nu, (np.arange(nv) + 0.5) / nv)
    pts = np.stack([gu.ravel(), gv.ravel()], 1)
    pts += rng.uniform(-0.42, 0.42, size=pts.shape) / np.array([nu, nv])
    return np.stack([u0 + pts[:, 0] * (u1 - u0), v0 + pts[:, 1] * (v1 - v0)], 1)


def _windows(u: np.ndarray, v: np.ndarray, centres: np.ndarray, reach: np.ndarray
             ) -> Iterator[tuple[int, tuple[slice, slice], np.ndarray, np.ndarray]]:
    """Per centre, the grid window within ``reach`` of it: (index, slices, u, v views).

    Marks are local, so drawing each in its own window keeps a coat with a hundred spots
    to a few milliseconds instead of a (spots x pixels) array.
    """
    (u0, u1), (v0, v1) = (u[0, 0], u[0, -1]), (v[0, 0], v[-1, 0])
    h, w = u.shape
    for k, ((cu, cv), r) in enumerate(zip(centres, reach, strict=True)):
        x0 = max(0, int((cu - r - u0) / (u1 - u0) * (w - 1)))
        x1 = min(w, int(math.ceil((cu + r - u0) / (u1 - u0) * (w - 1))) + 1)
        y0 = max(0, int((cv - r - v0) / (v1 - v0) * (h - 1)))
        y1 = min(h, int(math.ceil((cv + r - v0) / (v1 - v0) * (h - 1))) + 1)
        if x1 > x0 and y1 > y0:
            sl = (slice(y0, y1), slice(x0, x1))
            yield k, sl, u[sl], v[sl]


def _segment_dist(u: np.ndarray, v: np.ndarray, a: tuple[float, float],
                  b: tuple[float, float]) -> np.ndarray:
    du, dv = b[0] - a[0], b[1] - a[1]
    t = np.clip(((u - a[0]) * du + (v - a[1]) * dv) / (du * du + dv * dv + 1e-12), 0, 1)
    return np.hypot(u - a[0] - t * du, v - a[1] - t * dv)


def _coat(config: SyntheticConfig, individual: int, tex_h: int, tex_w: int,
          species_templates: dict[int, _Template]) -> np.ndarray:
    """An individual's RGBA texture in body coordinates (the same for all its photos)."""
    sp = species_of(config, individual)
    kind = PATTERN_KINDS[sp % len(PATTERN_KINDS)]
    if sp not in species_templates:
        species_templates[sp] = _draw_template(_rng(config, _S_SPECIES, sp), kind)
    rng = _rng(config, _S_INDIVIDUAL, individual)
    t = _mix(species_templates[sp], _draw_template(rng, kind), config.pattern_similarity)

    uu = np.linspace(*_U_RANGE, tex_w, dtype=np.float32)
    vv = np.linspace(*_V_RANGE, tex_h, dtype=np.float32)
    u, v = np.meshgrid(uu, vv)
    soft = 1.5 * (_U_RANGE[1] - _U_RANGE[0]) / tex_w  # about one texel and a half

    n1 = _smooth_noise(rng, (tex_h, tex_w), (3, 5))
    n2 = _smooth_noise(rng, (tex_h, tex_w), (5, 9))
    if kind == "stripes":
        phase = rng.uniform(0, 2 * np.pi)
        body = 2 * np.pi * t.freq * (u + t.tilt * v + t.warp * n1) + phase
        legs = 2 * np.pi * t.freq * 1.6 * (v + 0.15 * n1) + phase
        w = _smoothstep((v - 0.35) / 0.25)
        field = (1 - w) * np.cos(body) + w * np.cos(legs)
        thr = np.cos(np.pi * (1 - t.size)) + 0.45 * n2  # breaks and forks from n2
        m = _smoothstep((field - thr) / (4 * soft * t.freq) + 0.5)
    else:
        pts = _jittered_points(rng, t.freq)
        cell = 1.0 / t.freq
        m = np.zeros((tex_h, tex_w), np.float32)
        if kind == "spots":
            r = cell * t.size * rng.uniform(0.6, 1.3, size=len(pts))
            ang = rng.uniform(0, 2 * np.pi, size=len(pts))
            reach = r * (1 + t.warp) + 2 * soft
            for k, sl, uw, vw in _windows(u, v, pts, reach):
                du, dv = uw - pts[k, 0], vw - pts[k, 1]
                r_eff = r[k] * (1 + t.warp * np.cos(2 * (np.arctan2(dv, du) - ang[k])))
                np.maximum(m[sl], _smoothstep((r_eff - np.hypot(du, dv)) / soft + 0.5),
                           out=m[sl])
        elif kind == "rosettes":
            r = cell * (0.25 + 0.2 * t.size) * rng.uniform(0.7, 1.3, size=len(pts))
            width = cell * 0.1
            lobes = rng.integers(3, 6, size=len(pts))
            psi = rng.uniform(0, 2 * np.pi, size=len(pts))
            for k, sl, uw, vw in _windows(u, v, pts, r + width + 2 * soft):
                du, dv = uw - pts[k, 0], vw - pts[k, 1]
                gaps = np.cos(lobes[k] * np.arctan2(dv, du) + psi[k]) > -0.5 + t.warp
                ring = np.where(gaps, width - np.abs(np.hypot(du, dv) - r[k]), -1.0)
                np.maximum(m[sl], _smoothstep(ring / soft + 0.5), out=m[sl])
        else:  # reticulated: Voronoi cells as patches, their borders as light lines
            d1 = np.full((tex_h, tex_w), np.inf, np.float32)
            d2 = np.full((tex_h, tex_w), np.inf, np.float32)
            wobble = 0.04 * n1
            reach = np.full(len(pts), 2.5 * cell)
            for k, sl, uw, vw in _windows(u, v, pts, reach):
                d = np.hypot(uw - pts[k, 0], vw - pts[k, 1]) + wobble[sl]
                a1, a2 = d1[sl], d2[sl]
                d2[sl] = np.minimum(a2, np.maximum(a1, d))
                d1[sl] = np.minimum(a1, d)
            border = cell * (0.05 + 0.12 * t.size) - (d2 - d1)
            m = 1.0 - _smoothstep(border / soft + 0.5)
    m = m.astype(np.float32)

    colour = (t.base[None, None] * (1 - m[..., None]) + t.mark[None, None] * m[..., None])
    colour *= (1.0 + 0.08 * n1 - 0.12 * np.clip(v, -1, 1))[..., None]  # tone, belly shade

    # Silhouette: torso superellipse + neck + head + four legs + tail, each soft-edged.
    a, b = t.body_a, t.body_b
    torso = 1.0 - (np.abs(u / a) ** 2.4 + np.abs(v / b) ** 2.4) ** (1 / 2.4)
    alpha = torso * min(a, b)
    head_c = (a + 0.16, -b * 0.5 - t.neck_up)
    neck = 0.11 - _segment_dist(u, v, (a * 0.7, -b * 0.2), head_c)
    head = t.head - np.hypot((u - head_c[0] - 0.06) / 1.35, v - head_c[1])
    alpha = np.maximum(alpha, np.maximum(neck, head))
    lj = rng.uniform(-0.05, 0.05, size=4)
    for k, (ux, dx) in enumerate(((-0.62, -0.05), (-0.42, 0.04), (0.45, -0.03), (0.62, 0.05))):
        top = (ux * a + lj[k], 0.2 * b)
        foot = (ux * a + lj[k] + dx, b + t.leg_len)
        alpha = np.maximum(alpha, 0.065 - _segment_dist(u, v, top, foot))
    tail = 0.03 - _segment_dist(u, v, (-a * 0.97, -b * 0.4), (-a - 0.18, b * 0.9))
    alpha = np.maximum(alpha, tail)
    alpha = _smoothstep(alpha / soft + 0.5)
    return np.concatenate([np.clip(colour, 0, 1), alpha[..., None]], axis=2).astype(np.float32)


# --------------------------------------------------------------------------- scenes


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(c, c)
    return x, y


def _background(rng: np.random.Generator, config: SyntheticConfig, x: np.ndarray,
                y: np.ndarray) -> np.ndarray:
    """Ground / vegetation: smooth colour fields, grain, rocks, bushes and branch shadows."""
    S = config.image_size
    cols = _EARTH[rng.choice(len(_EARTH), size=3, replace=False)]
    cols = np.clip(cols + rng.normal(0, 0.05, size=cols.shape), 0, 1).astype(np.float32)
    w1 = _smoothstep(0.5 + 0.8 * _smooth_noise(rng, (S, S), (2, 2)))
    w2 = _smoothstep(0.5 + 0.8 * _smooth_noise(rng, (S, S), (4, 4)))
    bg = cols[0] * (1 - w1)[..., None] + cols[1] * w1[..., None]
    bg = bg * (1 - 0.5 * w2)[..., None] + cols[2] * (0.5 * w2)[..., None]
    grain = _smooth_noise(rng, (S, S), (S // 6, S // 6))
    bg *= (1 + 0.12 * grain)[..., None]
    clutter = config.clutter
    # rocks and bushes: soft blobs with their own shading
    for _ in range(rng.poisson(6 * clutter)):
        cx, cy = rng.uniform(-1.1, 1.1, size=2)
        rx, ry = rng.uniform(0.08, 0.35, size=2)
        col = np.clip(_EARTH[rng.integers(len(_EARTH))] + rng.normal(0, 0.08, 3), 0, 1)
        if rng.random() < 0.5:
            col = np.clip(_GRASS[rng.integers(len(_GRASS))] * rng.uniform(0.6, 1.0), 0, 1)
        sl = _box(S, cx - rx, cx + rx, cy - ry, cy + ry)
        if sl is None:
            continue
        xw, yw = x[sl], y[sl]
        m = _smoothstep((1 - ((xw - cx) / rx) ** 2 - ((yw - cy) / ry) ** 2) * 4)[..., None]
        shade = (1 - 0.25 * np.clip((yw - cy) / ry, -1, 1))[..., None]
        bg[sl] = bg[sl] * (1 - m) + (col.astype(np.float32) * shade) * m
    # twigs: thin dark lines
    for _ in range(rng.poisson(8 * clutter)):
        p0 = rng.uniform(-1.1, 1.1, size=2)
        p1 = p0 + rng.normal(0, 0.35, size=2)
        half = rng.uniform(0.006, 0.02)
        pad = half + 2.0 / S
        sl = _box(S, min(p0[0], p1[0]) - pad, max(p0[0], p1[0]) + pad,
                  min(p0[1], p1[1]) - pad, max(p0[1], p1[1]) + pad)
        if sl is None:
            continue
        d = _segment_dist(x[sl], y[sl], tuple(p0), tuple(p1))
        m = _smoothstep((half - d) / (2.0 / S) + 0.5)
        bg[sl] *= (1 - 0.6 * m)[..., None]
    # striped shadows of branches: confusable with a coat pattern on purpose
    if rng.random() < clutter:
        ang = rng.uniform(0, np.pi)
        f = rng.uniform(3, 8)
        s = np.cos(ang) * x + np.sin(ang) * y
        stripes = np.cos(2 * np.pi * f * (s + 0.1 * _smooth_noise(rng, (S, S), (3, 3))))
        region = _smoothstep(0.5 + _smooth_noise(rng, (S, S), (2, 2)))
        bg *= (1 - 0.35 * region * (stripes > 0.2))[..., None]
    return bg.astype(np.float32)


def _box(size: int, x0: float, x1: float, y0: float, y1: float
         ) -> tuple[slice, slice] | None:
    """Pixel slices covering a box given in normalised image units; None if off-frame."""
    def px(c: float) -> float:
        return (c + 1) * size / 2 - 0.5

    i0, i1 = max(0, math.floor(px(x0))), min(size, math.ceil(px(x1)) + 1)
    j0, j1 = max(0, math.floor(px(y0))), min(size, math.ceil(px(y1)) + 1)
    if i1 <= i0 or j1 <= j0:
        return None
    return slice(j0, j1), slice(i0, i1)


def _sample(tex: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear lookup of the RGBA texture at body coordinates; outside it is transparent.

    Only pixels that fall on the texture are looked up: the animal covers a fraction of
    the frame, and the gathers are the costly part.
    """
    th, tw = tex.shape[:2]
    fx = (u - _U_RANGE[0]) * ((tw - 1) / (_U_RANGE[1] - _U_RANGE[0]))
    fy = (v - _V_RANGE[0]) * ((th - 1) / (_V_RANGE[1] - _V_RANGE[0]))
    out = np.zeros(u.shape + (4,), np.float32)
    idx = np.flatnonzero((fx >= 0) & (fx < tw - 1) & (fy >= 0) & (fy < th - 1))
    fx, fy = fx.ravel()[idx], fy.ravel()[idx]
    x0 = fx.astype(np.int32)
    y0 = fy.astype(np.int32)
    wx = (fx - x0)[:, None]
    wy = (fy - y0)[:, None]
    flat = tex.reshape(-1, 4)
    i00 = y0 * tw + x0
    top = flat[i00] * (1 - wx) + flat[i00 + 1] * wx
    bot = flat[i00 + tw] * (1 - wx) + flat[i00 + tw + 1] * wx
    out.reshape(-1, 4)[idx] = top * (1 - wy) + bot * wy
    return out


def _occluder(rng: np.random.Generator, config: SyntheticConfig, x: np.ndarray, y: np.ndarray,
              cx: float, cy: float, extent: float) -> tuple[np.ndarray, np.ndarray]:
    """Foreground grass, a branch or a rock hiding part of the animal: (alpha, colour)."""
    S = config.image_size
    alpha = np.zeros_like(x)
    colour = np.zeros(x.shape + (3,), np.float32)
    kind = rng.choice(["grass", "branch", "rock"], p=[0.5, 0.3, 0.2])
    if kind == "grass":
        base_y = 1.05
        for _ in range(int(rng.integers(6, 18))):
            x0 = cx + rng.uniform(-1.2, 1.2) * extent
            top = cy + rng.uniform(-0.6, 0.6) * extent
            lean = rng.uniform(-0.6, 0.6)
            t = np.clip((base_y - y) / max(base_y - top, 1e-3), 0, 1)
            centre = x0 + lean * t * t * (base_y - top) * 0.5
            half_w = rng.uniform(0.012, 0.03) * (1 - t) + 0.3 / S
            m = _smoothstep((half_w - np.abs(x - centre)) / (1.5 / S) + 0.5) * (y > top)
            col = np.clip(_GRASS[rng.integers(len(_GRASS))] * rng.uniform(0.7, 1.2), 0, 1)
            colour = colour * (1 - m[..., None]) + col * m[..., None]
            alpha = np.maximum(alpha, m)
    elif kind == "branch":
        ang = rng.uniform(0, np.pi)
        p = np.array([cx, cy]) + rng.uniform(-0.4, 0.4, size=2) * extent
        dvec = np.array([np.cos(ang), np.sin(ang)]) * 3
        d = _segment_dist(x, y, tuple(p - dvec), tuple(p + dvec))
        d = d + 0.02 * _smooth_noise(rng, (S, S), (4, 4))
        m = _smoothstep((rng.uniform(0.04, 0.1) - d) / (2.0 / S) + 0.5)
        col = np.array([0.30, 0.22, 0.15]) * rng.uniform(0.6, 1.2)
        colour[:] = col * (1 + 0.2 * _smooth_noise(rng, (S, S), (8, 8)))[..., None]
        alpha = m
    else:
        p = np.array([cx, cy]) + rng.uniform(-0.8, 0.8, size=2) * extent
        r = rng.uniform(0.25, 0.5) * extent
        f = np.hypot(x - p[0], (y - p[1]) * 1.3) / r + 0.15 * _smooth_noise(rng, (S, S), (3, 3))
        alpha = _smoothstep((1 - f) / (3.0 / S / r) + 0.5)
        col = np.clip(_EARTH[rng.integers(len(_EARTH))] + rng.normal(0, 0.05, 3), 0, 1)
        colour[:] = col * (1 - 0.3 * np.clip(y - p[1], -1, 1))[..., None]
    return alpha.astype(np.float32), np.clip(colour, 0, 1)


def _photo(config: SyntheticConfig, individual: int, index: int, tex: np.ndarray,
           grid: tuple[np.ndarray, np.ndarray]) -> tuple[Image.Image, str]:
    """One photo of one individual; returns the image and the visible flank (viewpoint)."""
    # A burst's frames share one draw of everything (the first frame's stream); each frame
    # then moves a little by its own stream (``frame``). Without bursts: one stream a photo.
    burst = config.burst_size
    rng = _rng(config, _S_IMAGE, individual, index - index % burst)
    frame = _rng(config, _S_FRAME, individual, index) if burst > 1 else None
    x, y = grid
    S = config.image_size
    scene = scene_of(config, individual)
    bg = _background(rng if scene < 0 else _rng(config, _S_SCENE, scene), config, x, y)

    def pose(lo: float, hi: float) -> float:
        value = rng.uniform(lo, hi)
        if frame is not None:
            value += frame.uniform(-1.0, 1.0) * config.burst_jitter * (hi - lo) / 2
        return value

    scale = pose(*config.scale_range)
    theta = math.radians(pose(-config.rotation_deg, config.rotation_deg))
    st = math.exp(pose(-config.stretch, config.stretch))
    shear = pose(-config.shear, config.shear)
    persp = pose(-config.shear, config.shear)
    bend = pose(-config.bend, config.bend)
    flip = rng.random() < config.flip_probability
    tx, ty = pose(-config.translate, config.translate), pose(-config.translate, config.translate)

    # image -> body coordinates (the inverse of: pose, flip, shear, stretch, rotate, move)
    xs, ys = x - tx, y - ty
    c, s = math.cos(theta), math.sin(theta)
    xr = (c * xs + s * ys) / (scale * st)
    yr = (-s * xs + c * ys) / (scale / st)
    u = xr - shear * yr
    v = yr
    if flip:
        u = -u
    depth = np.maximum(1.0 + persp * u, 0.2)
    u = u / depth
    v = v / depth
    v = v - bend * u * u
    animal = _sample(tex, u, v)

    a = animal[..., 3:4]
    # ground shadow under the feet, then the animal with a directional light
    shadow_f = ((x - tx) / (0.9 * scale)) ** 2 + ((y - ty - 0.75 * scale) / (0.18 * scale)) ** 2
    bg *= (1 - 0.3 * _smoothstep(1 - shadow_f))[..., None]
    L = config.lighting
    lx, ly = rng.normal(0, 0.5 * L, size=2)
    light = (1.0 + lx * x + ly * y)[..., None]
    img = bg * (1 - a) + animal[..., :3] * light * a

    if rng.random() < config.occlusion_probability:
        oa, oc = _occluder(rng, config, x, y, tx, ty, scale)
        img = img * (1 - oa[..., None]) + oc * oa[..., None]

    # global exposure: brightness, contrast, colour cast, optional grey night shot
    bright = math.exp(rng.normal(0, 0.35 * L))
    contrast = math.exp(rng.normal(0, 0.3 * L))
    cast = np.exp(rng.normal(0, 0.12 * L, size=3)).astype(np.float32)
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = ((img - mean) * contrast + mean) * bright * cast
    if rng.random() < config.grayscale_probability:
        g = img @ np.array([0.299, 0.587, 0.114], np.float32)
        img = np.repeat(g[..., None], 3, axis=2)
    if config.noise > 0:
        img = img + config.noise * (rng if frame is None else frame).standard_normal(
            size=img.shape, dtype=np.float32)
    out = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), mode="RGB")
    radius = rng.uniform(0, config.blur_max) * S / 128
    if radius > 0.25:
        out = out.filter(ImageFilter.GaussianBlur(radius))
    facing_right = (math.cos(theta) > 0) != flip
    return out, ("right" if facing_right else "left")


def _texture_shape(config: SyntheticConfig) -> tuple[int, int]:
    w = max(96, int(1.5 * config.image_size))
    h = int(round(w * (_V_RANGE[1] - _V_RANGE[0]) / (_U_RANGE[1] - _U_RANGE[0])))
    return h, w


@dataclass(frozen=True)
class SyntheticSample:
    """A rendered image with the metadata the CSV records."""

    image_id: str
    identity: str
    species: str
    viewpoint: str
    split: str
    image: Image.Image


def iter_samples(config: SyntheticConfig) -> Iterator[SyntheticSample]:
    """Render every planned image, individual by individual (one coat texture at a time)."""
    grid = _grid(config.image_size)
    tex_h, tex_w = _texture_shape(config)
    templates: dict[int, _Template] = {}
    current, tex = -1, None
    for p in plan_dataset(config):
        if p.individual != current:
            current = p.individual
            tex = _coat(config, current, tex_h, tex_w, templates)
        img, view = _photo(config, p.individual, p.index, tex, grid)
        yield SyntheticSample(p.image_id, p.identity, p.species, view, p.split, img)


def iter_images(config: SyntheticConfig) -> Iterator[tuple[str, str, Image.Image]]:
    """``(image_id, identity, RGB image)`` for in-memory use, in generation order."""
    for s in iter_samples(config):
        yield s.image_id, s.identity, s.image


def render_image(config: SyntheticConfig, individual: int, index: int) -> Image.Image:
    """One photo by coordinates, identical to the one :func:`iter_images` yields."""
    if not 0 <= individual < config.n_individuals:
        raise ValueError(f"individual must be in [0, {config.n_individuals}), got {individual}")
    count = int(images_per_individual(config)[individual])
    if not 0 <= index < count:
        raise ValueError(f"individual {individual} has {count} images, got index {index}")
    tex = _coat(config, individual, *_texture_shape(config), {})
    return _photo(config, individual, index, tex, _grid(config.image_size))[0]


# --------------------------------------------------------------------------- on disk

METADATA_COLUMNS = ("image_id", "identity", "path", "species", "viewpoint", "split")
_MARKER = "config.json"


def _marker_payload(config: SyntheticConfig, complete: bool) -> dict[str, object]:
    return {"generator": "reidal.data.synthetic_images", "generator_version": GENERATOR_VERSION,
            "config": config.to_json_dict(), "complete": complete}


def _is_cached(out: Path, config: SyntheticConfig) -> bool:
    try:
        marker = json.loads((out / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker != _marker_payload(config, complete=True):
        return False
    try:
        with open(out / "metadata.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError:
        return False
    return len(rows) == len(plan_dataset(config)) and all(
        (out / r["path"]).is_file() for r in rows
    )


def generate_dataset(config: SyntheticConfig, out_dir: str | os.PathLike[str]) -> Path:
    """Write the images and a WildlifeDatasets-style ``metadata.csv`` under ``out_dir``.

    Idempotent: a folder that already holds this exact config (recorded in
    ``config.json`` together with the generator version) is reused as is. A folder written
    by an earlier config is rebuilt; a non-empty folder this function did not write is
    refused rather than overwritten. Returns the path of ``metadata.csv``.
    """
    out = Path(out_dir)
    if _is_cached(out, config):
        return out / "metadata.csv"
    if out.exists() and any(out.iterdir()):
        if not (out / _MARKER).is_file():
            raise ValueError(
                f"{out} is not empty and was not written by generate_dataset; "
                "pick an empty or new folder"
            )
        shutil.rmtree(out / "images", ignore_errors=True)
        (out / "metadata.csv").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text(json.dumps(_marker_payload(config, complete=False), indent=1))
    img_dir = out / "images"
    img_dir.mkdir(exist_ok=True)
    rows = []
    for s in iter_samples(config):
        rel = f"images/{s.image_id}.jpg"
        s.image.save(out / rel, format="JPEG", quality=config.jpeg_quality)
        rows.append((s.image_id, s.identity, rel, s.species, s.viewpoint, s.split))
    tmp = out / "metadata.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(METADATA_COLUMNS)
        w.writerows(rows)
    tmp.replace(out / "metadata.csv")
    tmp_marker = out / (_MARKER + ".tmp")
    tmp_marker.write_text(json.dumps(_marker_payload(config, complete=True), indent=1))
    tmp_marker.replace(out / _MARKER)
    return out / "metadata.csv"

