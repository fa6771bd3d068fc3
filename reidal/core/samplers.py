"""The one sampler registry: a sampler's name -> how it is built from the typed parameters.

The server's sampling cycle (reidal.collection_state), the trainer (TrainConfig.sampler)
and the benchmark (its sampler methods) build samplers only here, so a sampler, and what it
takes from the clustering parameters, is added or changed in one place; the names a config
may give are this table's keys. Every entry returns a :class:`reidal.core.sampling.Sampler`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from reidal.core.aas import AmbiguityAwareSampler
from reidal.core.baselines import NISSampler, RandomPairSampler, UncertaintySampler
from reidal.core.clustering import DBSCANJaccard, FinchFirstPartition
from reidal.core.continuation import AASContinuation
from reidal.core.params import CLUSTERING, SAMPLING, ClusteringParams, SamplingParams
from reidal.core.sampling import Sampler


def density_clustering(c: ClusteringParams) -> DBSCANJaccard:
    """The DBSCAN of clustering parameters ``c`` (the clusters AAS, the identities and the
    uncertainty baseline see). On the CPU: every caller gives it a precomputed distance."""
    return DBSCANJaccard(eps=c.dbscan_eps, min_samples=c.min_samples, k1=c.k1, k2=c.k2,
                         use_gpu=False)


def ambiguity_aware(c: ClusteringParams, s: SamplingParams) -> AmbiguityAwareSampler:
    """AAS on both parameter groups (the \"aas\" entry; AASContinuation's first part)."""
    return AmbiguityAwareSampler(
        eps=s.mixture_eps, k_max=s.k_max, s_min=s.s_min, dbscan=density_clustering(c),
        finch=FinchFirstPartition(partition=c.finch_level), type_weights=s.type_weights,
        region_weights=s.region_weights, pair_weights=s.pair_weights,
        os_similarity=s.os_similarity)


@dataclass(frozen=True)
class Entry:
    """How a sampler is built, and whether a collection may run it (``served``: every pool
    it draws from has a name in the API, sampling.proto's Pool)."""

    build: Callable[[ClusteringParams, SamplingParams], Sampler]
    served: bool = False


#: name -> entry. Order: the benchmark's table order.
REGISTRY: dict[str, Entry] = {
    "random": Entry(lambda c, s: RandomPairSampler()),
    "uncertainty": Entry(lambda c, s: UncertaintySampler(eps=c.dbscan_eps, k1=c.k1, k2=c.k2)),
    "nis": Entry(lambda c, s: NISSampler()),
    "aas": Entry(ambiguity_aware, served=True),
    # OURS: AAS, then its unused allowance to the pairs closest to DBSCAN's eps
    "aas-continued": Entry(lambda c, s: AASContinuation(ambiguity_aware(c, s)), served=True),
}
#: Every sampler's name (the trainer's and the benchmark's choices).
SAMPLERS: tuple[str, ...] = tuple(REGISTRY)
#: The samplers a collection on the server may run.
SERVED: tuple[str, ...] = tuple(name for name, e in REGISTRY.items() if e.served)


def make_sampler(clustering: ClusteringParams = CLUSTERING,
                 sampling: SamplingParams = SAMPLING) -> Sampler:
    """The sampler ``sampling.sampler`` names, built from both parameter groups.

    ``ValueError`` names an unknown sampler or a parameter its class refuses.
    """
    try:
        entry = REGISTRY[sampling.sampler]
    except (KeyError, TypeError):
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got "
                         f"{sampling.sampler!r}") from None
    return entry.build(clustering, sampling)
