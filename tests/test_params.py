"""The one defaults table (reidal.core.params), the algorithms' get_params / set_params, and
the one sampler registry (reidal.core.samplers) the server, the trainer and the benchmark
build their samplers with."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from sklearn.base import clone

from reidal import collection_state
from reidal.benchmark.methods import SAMPLER_METHODS
from reidal.collection_state import collection_params, effective_params, make_sampler
from reidal.core.aas import AmbiguityAwareSampler
from reidal.core.baselines import NISSampler, RandomPairSampler, UncertaintySampler
from reidal.core.calibration import ClusteringCalibrator
from reidal.core.clustering import DBSCANJaccard, FinchFirstPartition
from reidal.core.continuation import AASContinuation
from reidal.core.np3 import NP3
from reidal.core.params import CLUSTERING, SAMPLING, ClusteringParams, SamplingParams
from reidal.core.samplers import SAMPLERS
from reidal.core.samplers import make_sampler as registry_sampler
from reidal.core.sampling import Sampler
from reidal.core.validation import Interval, OneOf, check_params
from reidal.errors import InvalidArgument
from reidal.training.config import SAMPLERS as TRAIN_SAMPLERS
from reidal.training.config import TrainConfig
from reidal.training.pseudo_labels import SpCLPseudoLabeler

ALGORITHMS = [DBSCANJaccard, FinchFirstPartition, AmbiguityAwareSampler, AASContinuation,
              RandomPairSampler, UncertaintySampler, NISSampler, NP3, ClusteringCalibrator,
              SpCLPseudoLabeler]


@pytest.mark.parametrize("cls", ALGORITHMS, ids=lambda c: c.__name__)
def test_init_only_stores_so_get_params_returns_the_arguments_and_clone_works(cls):
    names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    obj = cls()
    assert sorted(obj.get_params(deep=False)) == sorted(names)
    copy = clone(obj)  # sklearn's check that __init__ stores its arguments unchanged
    assert copy.get_params(deep=False).keys() == obj.get_params(deep=False).keys()


def test_algorithm_defaults_are_the_table():
    db = DBSCANJaccard()
    assert (db.eps, db.min_samples, db.k1, db.k2) == (
        CLUSTERING.dbscan_eps, CLUSTERING.min_samples, CLUSTERING.k1, CLUSTERING.k2)
    aas = AmbiguityAwareSampler()
    assert (aas.eps, aas.k_max, aas.s_min, aas.type_weights, aas.region_weights,
            aas.pair_weights, aas.os_similarity) == (
        SAMPLING.mixture_eps, SAMPLING.k_max, SAMPLING.s_min, SAMPLING.type_weights,
        SAMPLING.region_weights, SAMPLING.pair_weights, SAMPLING.os_similarity)
    assert FinchFirstPartition().partition == CLUSTERING.finch_level
    c = TrainConfig()
    assert (c.eps, c.min_samples, c.k1, c.k2, c.sampler, c.aas_os_similarity) == (
        CLUSTERING.dbscan_eps, CLUSTERING.min_samples, CLUSTERING.k1, CLUSTERING.k2,
        SAMPLING.sampler, SAMPLING.os_similarity)
    assert c.budget_per_cycle == SAMPLING.default_budget["fraction"]


def test_set_params_reaches_nested_parameters_and_checks_again():
    aas = AmbiguityAwareSampler(dbscan=DBSCANJaccard())
    aas.set_params(s_min=0.2, dbscan__k1=12)
    assert aas.s_min == 0.2 and aas.dbscan.k1 == 12
    assert aas.get_params()["dbscan__k1"] == 12
    with pytest.raises(ValueError, match="s_min"):
        aas.set_params(s_min=0.0)
    assert aas.s_min == 0.2  # a refused value is not kept
    with pytest.raises(ValueError, match="k1"):
        aas.set_params(dbscan__k1=0)
    with pytest.raises(ValueError, match="knn_index"):
        aas.set_params(knn_options={"index": "flat"})


def test_cross_parameter_checks_run_on_set_params_too():
    cal = ClusteringCalibrator(fixed={"k1": 9})
    cal.set_params(k1_min=8)
    with pytest.raises(ValueError, match="k1_min <= k1_max"):
        cal.set_params(k1_min=40)
    assert cal.k1_min == 8
    labeler = SpCLPseudoLabeler(eps=0.5)
    with pytest.raises(ValueError, match="eps_gap"):
        labeler.set_params(eps_gap=0.6)
    with pytest.raises(ValueError, match="min_samples"):
        labeler.set_params(min_samples=0)  # the DBSCAN it builds refuses it
    assert labeler.dbscan.get_params()["eps"] == 0.5 and labeler.eps_gap == 0.02


def test_declared_constraints_name_the_parameter_and_what_it_takes():
    constraints = {"k": Interval(1, None, integer=True), "w": OneOf(("a", "b"), callables=True),
                   "p": (OneOf((None,)), Interval(0.0, 1.0, closed="right"))}
    check_params({"k": 3, "w": len, "p": None}, constraints)
    check_params({"k": np.int64(3), "w": "b", "p": 1.0}, constraints)
    for values, message in (({"k": 0}, "k must be an integer >= 1, got 0"),
                            ({"k": 2.0}, "k must be an integer"),
                            ({"k": True}, "k must be an integer"),
                            ({"w": "c"}, "w must be one of 'a', 'b' or a callable"),
                            ({"p": 0.0}, r"p must be one of None or a number in \(0, 1\]"),
                            ({"p": float("nan")}, "p must be")):
        with pytest.raises(ValueError, match=message):
            check_params(values, constraints)


def test_registry_builds_every_sampler_from_the_typed_params():
    c = ClusteringParams(dbscan_eps=0.5, min_samples=2, k1=8, k2=3, finch_level=1)
    for name in SAMPLERS:
        sampler = registry_sampler(c, SamplingParams(sampler=name))
        assert isinstance(sampler, Sampler)
    aas = registry_sampler(c, SamplingParams(k_max=7, os_similarity="cosine"))
    assert (aas.dbscan.eps, aas.dbscan.k1, aas.finch.partition, aas.k_max, aas.os_similarity) \
        == (0.5, 8, 1, 7, "cosine")
    cont = registry_sampler(c, SamplingParams(sampler="aas-continued"))
    assert cont.continuation().get_params() == {"eps": 0.5, "k1": 8, "k2": 3, "k": None}
    unc = registry_sampler(c, SamplingParams(sampler="uncertainty"))
    assert (unc.eps, unc.k1, unc.k2) == (0.5, 8, 3)
    with pytest.raises(ValueError, match="sampler must be one of"):
        registry_sampler(c, SamplingParams(sampler="oracle"))


def test_one_list_of_sampler_names():
    assert TRAIN_SAMPLERS == (*SAMPLERS, "none")
    assert SAMPLER_METHODS == tuple(SAMPLERS)
    assert set(collection_state.SAMPLERS) == {"aas", "aas-continued"}  # pools the API names
    with pytest.raises(ValueError, match="sampler"):
        TrainConfig(sampler="oracle")


def test_a_collection_stored_before_a_parameter_existed_reads_with_its_default():
    old = {"clustering": {"dbscan_eps": 0.55, "min_samples": 4, "k1": 12, "k2": 6},
           "sampling": {"mixture_eps": 0.6, "k_max": 5, "s_min": 0.3, "type_weights": "uniform",
                        "region_weights": "disagreement", "pair_weights": "uniform", "seed": 2,
                        "default_budget": {"count": 9}}}
    c, s = collection_params(old)
    assert c == ClusteringParams(dbscan_eps=0.55, k1=12)
    assert s.sampler == SAMPLING.sampler and s.seed == 2 and s.default_budget == {"count": 9}
    sampler = make_sampler(old)
    assert isinstance(sampler, AmbiguityAwareSampler) and sampler.dbscan.eps == 0.55
    # effective_params keeps every stored value and adds the new ones' defaults
    full = effective_params(old["clustering"], old["sampling"])
    assert {k: full["sampling"][k] for k in old["sampling"]} == old["sampling"]
    assert full["clustering"]["finch_level"] == CLUSTERING.finch_level
    with pytest.raises(InvalidArgument, match="unknown sampling parameter"):
        collection_params({"sampling": {"mixtur_eps": 0.5}})
    with pytest.raises(InvalidArgument, match="sampler"):
        effective_params(None, {"sampler": "oracle"})


def test_a_collection_stored_in_the_old_form_samples_what_the_new_form_samples(tmp_path):
    """The stored form before the defaults table (no mode, finch_level, sampler or
    os_similarity) and the form effective_params stores now: the same batch, in a real
    SQLite store through the sampling cycle."""
    from reidal.cycle import CycleRequest, run_cycle
    from reidal.simulation.synthetic import make_reid_embeddings
    from reidal.store import ImageRecord, Store

    old = {"clustering": {"dbscan_eps": 0.6, "min_samples": 2, "k1": 6, "k2": 2},
           "sampling": {"mixture_eps": 0.6, "k_max": 5, "s_min": 0.3,
                        "type_weights": "uniform", "region_weights": "disagreement",
                        "pair_weights": "uniform", "seed": 4,
                        "default_budget": {"count": 7}}}
    new = effective_params(old["clustering"], old["sampling"])
    assert set(new["clustering"]) > set(old["clustering"])
    data = make_reid_embeddings(n_identities=8, dim=16, seed=1)
    ids = [f"img{k:03d}" for k in range(data.X.shape[0])]
    store = Store(tmp_path)
    try:
        batches = []
        for cid, params in (("old", old), ("new", new)):
            store.collections.create(cid, params=params)
            store.images.add(cid, [ImageRecord(i) for i in ids])
            store.images.add_vectors(cid, "m", "1", ids, data.X.astype(np.float32))
            batch, _ = run_cycle(store, cid, CycleRequest())
            batches.append((batch.budget, [(p.image_a, p.image_b, p.pool)
                                           for p, _ in store.batches.pairs(cid, batch.batch_id)]))
        assert batches[0][0] == 7 and batches[0][1]
        assert batches[0] == batches[1]
    finally:
        store.close()
