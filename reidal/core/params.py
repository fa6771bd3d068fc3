"""Every default of clustering and sampling, in one table, and the parameter protocol of the
algorithms that take them.

:class:`ClusteringParams` and :class:`SamplingParams` are the typed parameters of a
collection (what the server stores, with these names, as JSON; ClusteringParams /
SamplingParams in collections.proto), of a training run (``TrainConfig``'s clustering and
sampler fields default to them) and of the benchmark. Their field defaults are the one
defaults table: the algorithms' own keyword defaults (DBSCANJaccard, AmbiguityAwareSampler,
the baselines) are read from :data:`CLUSTERING` and :data:`SAMPLING`, so a default changes in
one line here. A new parameter is one more field (docs/method.md, "Parameters").

:class:`ParamsMixin` gives the algorithms scikit-learn's parameter protocol (``get_params``,
``set_params``, nested ``dbscan__eps``, ``sklearn.base.clone``): ``__init__`` only stores
its arguments and checks them against the class's declared ``_constraints``
(:func:`reidal.core.validation.check_params`), which ``set_params`` checks again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, Self

from sklearn.base import BaseEstimator

from reidal.core.validation import Constraint, Interval, OneOf, check_params

#: ClusteringParams.mode: the paper's fixed values, or (OURS) calibrated per cycle from the
#: vectors and the answers (reidal.core.calibration).
CLUSTERING_MODES = ("fixed", "calibrated")
#: The deepest FINCH level a collection may fix, and the deepest the calibration tries.
MAX_FINCH_LEVEL = 4
#: What AAS's U_os ranks region medoid pairs by (SamplingParams.os_similarity): "jaccard"
#: (the paper's) or (OURS) "cosine".
OS_SIMILARITIES = ("jaccard", "cosine")


@dataclass(frozen=True)
class ClusteringParams:
    """The density clustering (DBSCAN on SpCL's k-reciprocal Jaccard distance) and FINCH.

    mode: one of CLUSTERING_MODES ("fixed": the paper). dbscan_eps, min_samples, k1, k2:
    SpCL's (method.md step 1). finch_level: the FINCH partition AAS's second clustering
    uses (0, the finest: the paper).
    """

    _constraints: ClassVar[dict[str, Any]] = {
        "mode": OneOf(CLUSTERING_MODES),
        "finch_level": Interval(0, MAX_FINCH_LEVEL, integer=True),
    }

    mode: str = "fixed"
    dbscan_eps: float = 0.6
    min_samples: int = 4
    k1: int = 30
    k2: int = 6
    finch_level: int = 0


@dataclass(frozen=True)
class SamplingParams:
    """Which pair sampler runs and its parameters (method.md step 1.5).

    sampler: a name of reidal.core.samplers.SAMPLERS ("aas": the paper). mixture_eps, k_max,
    s_min, type_weights, region_weights, pair_weights: AAS's (the paper's values).
    os_similarity (OURS, default the paper's "jaccard"): what U_os ranks medoid pairs by.
    seed: cycle c draws with seed + c. default_budget: the pairs a cycle asks when the caller
    names no budget, ``{"count": k}`` or ``{"fraction": f}`` (the paper: 0.02 % a cycle).
    """

    _constraints: ClassVar[dict[str, Any]] = {"seed": Interval(0, None, integer=True),
                                              "os_similarity": OneOf(OS_SIMILARITIES)}

    sampler: str = "aas"
    mixture_eps: float = 0.6
    k_max: int = 5
    s_min: float = 0.3
    type_weights: str = "uniform"
    region_weights: str = "disagreement"
    pair_weights: str = "uniform"
    os_similarity: str = "jaccard"
    seed: int = 0
    default_budget: Mapping[str, Any] = field(default_factory=lambda: {"fraction": 0.0002})


#: The defaults table: one instance of each group, every field at its default.
CLUSTERING = ClusteringParams()
SAMPLING = SamplingParams()
DEFAULTS: dict[str, Any] = {"clustering": CLUSTERING, "sampling": SAMPLING}

#: Stored clustering key -> its name in a calibration's ClusteringChoice (and TrainConfig,
#: which has all but finch_level).
CHOICE_NAMES = {"dbscan_eps": "eps", "min_samples": "min_samples", "k1": "k1", "k2": "k2",
                "finch_level": "finch_level"}


def check_group(params: ClusteringParams | SamplingParams) -> None:
    """The checks of a group's own declared ``_constraints`` (values no algorithm takes:
    the mode, FINCH's level bound, the seed); ValueError names the parameter."""
    check_params(asdict(params), params._constraints)


def params_from_dict(cls: type[Any], given: Mapping[str, Any] | None, what: str) -> Any:
    """``cls`` (ClusteringParams or SamplingParams) from a stored or given dict, defaults
    filled in; ``ValueError`` names unknown keys. Values are not checked here: the
    algorithms that take them check them (see reidal.core.samplers.check_collection_params).
    """
    given = dict(given or {})
    known = {f.name for f in fields(cls)}
    unknown = set(given) - known
    if unknown:
        raise ValueError(f"unknown {what} parameter(s): {sorted(unknown)}")
    return replace(cls(), **given)


def params_to_dict(params: Any) -> dict[str, Any]:
    """The stored (JSON) form: every field, by name."""
    out = asdict(params)
    if "default_budget" in out:
        out["default_budget"] = dict(out["default_budget"])
    return out


class ParamsMixin(BaseEstimator):
    """scikit-learn's get_params / set_params (sklearn.base.BaseEstimator) plus declared
    constraints: ``_constraints`` maps a parameter to what it accepts; a subclass with a
    check that spans parameters extends :meth:`_check_params`."""

    _constraints: ClassVar[Mapping[str, Constraint | tuple[Constraint, ...]]] = {}

    def _check_params(self) -> None:
        check_params(self.get_params(deep=False), self._constraints)

    def set_params(self, **params: Any) -> Self:
        """Set parameters (``name=value``, nested ``dbscan__eps=value``), checked again; a
        refused value (``ValueError``) leaves this object's parameters as they were."""
        before = self.get_params(deep=False)
        try:
            super().set_params(**params)
            self._check_params()
        except ValueError:
            for name, value in before.items():
                setattr(self, name, value)
            raise
        return self
