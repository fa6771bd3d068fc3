"""The SpCL + NP3 + active-learning trainer (reidal.training), on CPU.

Real path: procedural images -> the default EfficientNet-Lite0 -> cached backbone features ->
head mode. The pieces are checked against plain transcriptions of SpCL's own code (dense
label matrices, per-element loops), never against themselves.
"""

from __future__ import annotations

import os
import socket
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _training_support import SMALL, small_collection

from reidal.core.aas import AmbiguityAwareSampler
from reidal.core.clustering import DBSCANJaccard
from reidal.core.evaluation import clustering_quality
from reidal.core.np3 import NP3
from reidal.simulation.oracle import SimulatedOracle
from reidal.training import (
    HybridMemory,
    SpCLTrainer,
    TrainConfig,
    load_checkpoint,
    pk_batches,
    pk_pass,
    reliability_filter,
    save_checkpoint,
)
from reidal.training.checkpoint import checkpoint_path
from reidal.training.pseudo_labels import compact_with_singletons


@pytest.fixture(scope="module")
def collection():
    """91 procedural 128 px images of 12 individuals, their backbone features and identities."""
    return small_collection(128)


def _head_weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- memory
def _spcl_memory_loss(inputs, indexes, features, labels, temp):
    """SpCL's HybridMemory.forward (masked softmax over label-averaged similarities)."""
    sims = inputs @ features.t() / temp
    n_cls = int(labels.max()) + 1
    sim = torch.zeros(n_cls, inputs.shape[0])
    for i in range(features.shape[0]):  # index_add_ spelt out
        sim[labels[i]] += sims[:, i]
    nums = torch.bincount(labels, minlength=n_cls).float().unsqueeze(1)
    sim = (sim / nums).t()
    exps = torch.exp(sim)
    p = exps / (exps.sum(1, keepdim=True) + 1e-6)
    return F.nll_loss(torch.log(p + 1e-6), labels[indexes])


def test_hybrid_memory_matches_spcl():
    g = torch.Generator().manual_seed(0)
    n, d = 40, 16
    feats = F.normalize(torch.randn(n, d, generator=g), dim=1)
    labels = compact_with_singletons(np.r_[np.repeat(np.arange(8), 4), -np.ones(8, int)])
    mem = HybridMemory(d, n, temp=0.05, momentum=0.2)
    mem.init_features(feats)
    mem.set_labels(torch.from_numpy(labels))
    x = F.normalize(torch.randn(12, d, generator=g), dim=1).requires_grad_(True)
    idx = torch.tensor([0, 5, 5, 9, 33, 33, 33, 2, 17, 39, 5, 21])
    loss = mem(x, idx)
    ref = _spcl_memory_loss(x.detach(), idx, feats, torch.from_numpy(labels), 0.05)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # momentum update: SpCL's per-element loop, repeated indices in batch order
    expect = feats.clone()
    for xi, yi in zip(x.detach(), idx, strict=True):
        expect[yi] = 0.2 * expect[yi] + 0.8 * xi
        expect[yi] /= expect[yi].norm()
    mem.update(x, idx)
    assert torch.allclose(mem.features, expect, atol=1e-6)
    with pytest.raises(ValueError, match="compact"):
        mem.set_labels(torch.tensor([0] * 20 + [2] * 20))


# --------------------------------------------------------------------------- PK sampler
def test_pk_pass_visits_every_identity_once_with_k_images():
    rng = np.random.default_rng(0)
    labels = compact_with_singletons(np.r_[np.repeat(np.arange(6), [9, 4, 3, 2, 7, 5]),
                                           -np.ones(5, int)])
    for _ in range(20):
        stream = pk_pass(labels, 4, rng)
        lab = labels[stream]
        cut = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
        runs = np.split(stream, cut[1:])
        assert sorted(labels[r[0]] for r in runs) == sorted(set(labels.tolist()))
        for r in runs:
            size = int(np.sum(labels == labels[r[0]]))
            assert len(r) == (1 if size == 1 else 4)
            if size >= 4:
                assert len(set(r.tolist())) == 4  # without replacement
            elif size > 1:
                assert r[0] not in r[1:]  # the others are drawn among the non-anchors
    batches = list(pk_batches(labels, 4, 16, 7, rng))
    assert len(batches) == 7 and all(b.size == 16 for b in batches)


# --------------------------------------------------------------------------- reliability
def _spcl_reliability(labels, tight, loose, thres):
    """SpCL's spcl_train_usl.py criterion with dense (N, N) label matrices, as written there."""
    def gen(ids):
        num = len(set(ids)) - (1 if -1 in ids else 0)
        out, k = [], 0
        for x in ids:
            out.append(x if x != -1 else num + k)
            k += x == -1
        return np.array(out)

    pl, pt, plo = gen(list(labels)), gen(list(tight)), gen(list(loose))
    ls, lt, ll = (np.equal.outer(p, p).astype(float) for p in (pl, pt, plo))
    r_comp = 1 - np.minimum(ls, lt).sum(-1) / np.maximum(ls, lt).sum(-1)
    r_indep = 1 - np.minimum(ls, ll).sum(-1) / np.maximum(ls, ll).sum(-1)
    keys = sorted(set(pl.tolist()))
    c_comp = [min(r_comp[pl == k]) for k in keys]
    c_indep = [min(r_indep[pl == k]) for k in keys]
    noins = [c_indep[k] for k in keys if np.sum(pl == k) > 1]
    if thres is None:
        thres = np.sort(noins)[min(len(noins) - 1, np.round(len(noins) * 0.9).astype(int))]
    out, k = pl.copy(), 0
    for i, lab in enumerate(pl):
        if not (c_indep[lab] <= thres and r_comp[i] <= c_comp[lab]):
            out[i] = len(c_indep) + k
            k += 1
    return out, thres


def _partition(labels):
    """Labels renumbered by first occurrence: equal iff the two partitions are equal."""
    lab = compact_with_singletons(labels)
    _, first, inverse = np.unique(lab, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[inverse.reshape(-1)]


def test_reliability_filter_matches_spcl_dense_code():
    from reidal.simulation.synthetic import make_reid_embeddings

    data = make_reid_embeddings(n_identities=25, images_per_identity=(2, 12), dim=32, seed=3)
    X = data.X
    from reidal.core.neighbors import jaccard_distance

    D = jaccard_distance(X, k1=10, k2=3)
    labs = [DBSCANJaccard(eps=e, min_samples=2, k1=10, k2=3)(X, distance=D)
            for e in (0.45, 0.5, 0.55)]
    assert len(set(map(tuple, labs))) == 3  # the three clusterings differ
    ref, thres = _spcl_reliability(labs[1], labs[0], labs[2], None)
    got = reliability_filter(labs[1], labs[0], labs[2], indep_threshold=None, percentile=0.9)
    assert got.indep_threshold == pytest.approx(thres)
    assert np.array_equal(_partition(got.labels), _partition(ref))
    assert (got.labels == -1).sum() > (labs[1] == -1).sum()  # it dissolved something
    # a fixed threshold (later epochs) is used as given
    ref2, _ = _spcl_reliability(labs[1], labs[0], labs[2], 0.2)
    got2 = reliability_filter(labs[1], labs[0], labs[2], indep_threshold=0.2, percentile=0.9)
    assert np.array_equal(_partition(got2.labels), _partition(ref2))


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, field", [
    ({"mode": "gpu"}, "mode"), ({"epochs": 0}, "epochs"), ({"device": "tpu"}, "device"),
    ({"sampler": "lbas"}, "sampler"), ({"momentum": 1.0}, "momentum"),
    ({"eps": 0.6, "eps_gap": 0.5}, "eps"), ({"budget_per_cycle": 0}, "budget_per_cycle"),
    ({"iters_per_epoch": 2.5}, "iters_per_epoch"), ({"temperature": 0}, "temperature"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**kwargs)


def test_every_config_field_has_a_declared_constraint():
    """TrainConfig's checks are one table: a new field without an entry fails here, and each
    entry refuses a value of the wrong kind with a message naming the field."""
    from dataclasses import fields

    names = {f.name for f in fields(TrainConfig)}
    assert set(TrainConfig._constraints) == names
    for name in sorted(names):
        with pytest.raises(ValueError, match=rf"^TrainConfig\.{name} must be .*, got <object"):
            TrainConfig(**{name: object()})


def test_fit_refuses_a_batch_larger_than_the_collection_and_a_missing_oracle(collection):
    model, feats, truth = collection
    with pytest.raises(ValueError, match="larger than the collection of 20 items"):
        SpCLTrainer(TrainConfig(sampler="none"), model).fit(feats[:20])
    with pytest.raises(ValueError, match="needs an oracle"):
        SpCLTrainer(TrainConfig(**SMALL), model).fit(feats)
    with pytest.raises(ValueError, match="backbone features"):
        SpCLTrainer(TrainConfig(**SMALL, sampler="none"), model).fit(feats[:, :100])


# --------------------------------------------------------------------------- training
def test_head_training_with_aas_raises_pseudo_label_f1(collection):
    """A few epochs with answers beat both the epoch-0 clustering and NP3 alone with the
    same answers on the untrained embeddings (so the training itself adds)."""
    model, feats, truth = collection
    before = _head_weights(model)
    config = TrainConfig(**SMALL, epochs=6, epochs_per_cycle=2, iters_per_epoch=30,
                         budget_per_cycle=30, sampler="aas", seed=0)
    seen = []
    result = SpCLTrainer(config, model).fit(feats, oracle=SimulatedOracle(truth),
                                            true_labels=truth, on_epoch=seen.append)
    assert _same_state(before, model.state_dict())  # the caller's model is untouched
    assert [r.epoch for r in seen] == list(range(6)) and result.reports == seen
    X0 = model.embed_features(feats).detach().numpy()
    dbscan = DBSCANJaccard(k1=10, k2=3, min_samples=2)
    initial = clustering_quality(dbscan(X0), truth)["f1"]
    np3_only = clustering_quality(NP3()(dbscan(X0), X0, result.constraints).labels, truth)["f1"]
    final = result.quality["f1"]
    assert final > initial + 0.05, (initial, final)
    assert final > np3_only + 0.02, (np3_only, final)
    assert all(np.isfinite(r.loss) for r in result.reports)

    # Questions only at cycle starts, never twice, ids increasing, within the budget.
    asked = [r.pairs_asked for r in result.reports]
    assert all(a == 0 for e, a in enumerate(asked) if e % 2)
    assert all(0 < a <= 30 for e, a in enumerate(asked) if e % 2 == 0)
    answers = result.constraints.answers
    assert len(answers) == sum(asked) == result.reports[-1].cumulative_pairs
    assert [a.answer_id for a in answers] == list(range(len(answers)))
    pairs = {(min(a.i, a.j), max(a.i, a.j)) for a in answers}
    assert len(pairs) == len(answers)
    assert all(a.same == (truth[a.i] == truth[a.j]) for a in answers)


def test_spcl_alone_asks_nothing(collection):
    model, feats, truth = collection
    config = TrainConfig(**SMALL, epochs=2, epochs_per_cycle=1, iters_per_epoch=5,
                         sampler="none")
    result = SpCLTrainer(config, model).fit(feats, true_labels=truth)
    assert [r.pairs_asked for r in result.reports] == [0, 0]
    assert len(result.constraints.answers) == 0
    assert all(r.n_clusters > 0 for r in result.reports)


def test_resume_repeats_the_uninterrupted_run(collection, tmp_path):
    model, feats, truth = collection
    common = dict(**SMALL, epochs=4, epochs_per_cycle=2, iters_per_epoch=8,
                  budget_per_cycle=15, seed=1)
    whole = SpCLTrainer(TrainConfig(**common, checkpoint_dir=tmp_path / "a"), model).fit(
        feats, oracle=SimulatedOracle(truth), true_labels=truth)

    cancel = threading.Event()
    config = TrainConfig(**common, checkpoint_dir=tmp_path / "b")

    def stop_after_epoch_1(report):
        if report.epoch == 1:
            cancel.set()

    first = SpCLTrainer(config, model).fit(feats, oracle=SimulatedOracle(truth),
                                           true_labels=truth, on_epoch=stop_after_epoch_1,
                                           cancel=cancel)
    assert first.cancelled and len(first.reports) == 2
    assert load_checkpoint(tmp_path / "b")["next_epoch"] == 2
    rest = SpCLTrainer(config, model).fit(feats, oracle=SimulatedOracle(truth),
                                          true_labels=truth, resume=True)
    assert rest.resumed_from_epoch == 2 and not rest.cancelled
    assert _same_state(whole.model.state_dict(), rest.model.state_dict())
    assert np.array_equal(whole.memory_features, rest.memory_features)
    assert whole.constraints.answers == rest.constraints.answers
    assert [r.loss for r in whole.reports] == [r.loss for r in rest.reports]
    assert [r.quality for r in whole.reports] == [r.quality for r in rest.reports]
    # a different job cannot resume this checkpoint
    other = TrainConfig(**{**common, "lr": 1e-3}, checkpoint_dir=tmp_path / "b")
    with pytest.raises(ValueError, match="lr"):
        SpCLTrainer(other, model).fit(feats, oracle=SimulatedOracle(truth), resume=True)


def test_cancel_stops_between_iterations_and_leaves_the_model_alone(collection):
    model, feats, truth = collection
    before = _head_weights(model)
    cancel = threading.Event()
    oracle = SimulatedOracle(truth)

    def annotator(pairs):  # the annotator's answers arrive, then the job is cancelled
        cancel.set()
        return oracle(pairs)

    config = TrainConfig(**SMALL, epochs=3, iters_per_epoch=50, budget_per_cycle=10)
    result = SpCLTrainer(config, model).fit(feats, oracle=annotator, cancel=cancel)
    assert result.cancelled and result.reports == []
    assert len(result.constraints.answers) > 0
    assert _same_state(before, model.state_dict())
    assert result.model is not model


class _EpochStartSignal(threading.Event):
    """A cancel flag that also says when the trainer first looked at it (the first epoch's
    start), so a test can cancel once the epoch is under way."""

    def __init__(self) -> None:
        super().__init__()
        self.looked = threading.Event()

    def is_set(self) -> bool:
        self.looked.set()
        return super().is_set()


def test_cancel_reaches_an_epoch_of_any_length(collection):
    """An epoch of 10**9 steps: its batches are drawn as it goes, so a cancel made while it
    starts stops it at its first steps (it used to build the whole list first: memory and
    minutes in proportion to iters_per_epoch before the first check)."""
    model, feats, _truth = collection
    config = TrainConfig(**SMALL, sampler="none", epochs=1, iters_per_epoch=10**9)
    cancel = _EpochStartSignal()
    out = {}
    worker = threading.Thread(
        target=lambda: out.update(result=SpCLTrainer(config, model).fit(feats, cancel=cancel)),
        daemon=True)
    worker.start()
    assert cancel.looked.wait(120)
    cancel.set()
    worker.join(120)  # a generous bound: the point is that it ends at all
    assert not worker.is_alive(), "the epoch did not stop on cancel"
    assert out["result"].cancelled and out["result"].reports == []


def test_checkpoint_write_is_atomic(tmp_path):
    save_checkpoint(tmp_path, {"next_epoch": 3, "w": torch.ones(3)})
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        save_checkpoint(tmp_path, {"next_epoch": 4, "bad": threading.Lock()})
    state = load_checkpoint(tmp_path)
    assert state["next_epoch"] == 3 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_path(tmp_path).name]


# --------------------------------------------------------------------------- full mode
@pytest.fixture(scope="module")
def tiny_images():
    from reidal.data.synthetic_images import SyntheticConfig, iter_samples
    from reidal.embedding.model import build_default_model

    samples = list(iter_samples(SyntheticConfig.tiny()))  # 6 individuals x 4 images, 64 px
    return build_default_model(input_size=(64, 64)), [s.image for s in samples]


FULL = dict(mode="full", device="cpu", epochs=1, num_identities=4, num_instances=4, k1=5, k2=2,
            min_samples=2, sampler="none", num_workers=0)


def test_full_mode_fine_tunes_the_backbone(tiny_images):
    model, images = tiny_images
    before = _head_weights(model)
    result = SpCLTrainer(TrainConfig(**FULL, iters_per_epoch=2), model).fit(images)
    assert result.reports[0].iterations == 2 and np.isfinite(result.reports[0].loss)
    assert _same_state(before, model.state_dict())
    trained = result.model.state_dict()
    changed = [k for k in before if "backbone" in k and not torch.equal(before[k], trained[k])]
    assert changed  # the backbone itself moved


def test_full_mode_under_a_one_process_gloo_group(tiny_images, monkeypatch):
    """The torchrun path (process group, DDP wrapper, gathers) with world size 1."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                 "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    model, images = tiny_images
    result = SpCLTrainer(TrainConfig(**FULL, iters_per_epoch=1), model).fit(images)
    assert result.world_size == 1 and result.reports[0].iterations == 1
    assert not dist.is_initialized()  # the group the trainer created is gone
    assert "RANK" in os.environ


def test_fit_starts_from_given_constraints_without_changing_them(collection):
    from reidal.core.constraints import Answer, ConstraintSet

    model, feats, truth = collection
    n = feats.shape[0]
    same = [(i, j) for i in range(n) for j in range(i + 1, n) if truth[i] == truth[j]][:20]
    given = ConstraintSet.from_answers(n, [Answer(i, j, True, k) for k, (i, j) in enumerate(same)])
    config = TrainConfig(**SMALL, epochs=1, epochs_per_cycle=1, iters_per_epoch=2,
                         sampler="none")
    result = SpCLTrainer(config, model).fit(feats, constraints=given)
    assert len(given) == len(same)  # the caller's set is untouched
    assert len(result.constraints) == len(same)
    for i, j in same:  # every given must-link holds in the final pseudo-labels
        assert result.labels[i] == result.labels[j] and result.labels[i] >= 0
    with pytest.raises(ValueError, match="constraints are for"):
        SpCLTrainer(config, model).fit(feats, constraints=ConstraintSet(n + 1))


def test_question_rounds_ask_what_the_answers_leave(collection):
    """question_rounds 0 (no cap) asks one draw's batch first, then what the answers leave,
    within the allowance, and stops early only when the sampler has nothing left."""
    model, feats, truth = collection
    budget = 400

    def one_cycle(rounds):
        config = TrainConfig(**{**SMALL, "epochs": 1, "epochs_per_cycle": 1,
                                "iters_per_epoch": 1, "budget_per_cycle": budget,
                                "sampler": "aas", "question_rounds": rounds, "seed": 0})
        return SpCLTrainer(config, model).fit(feats, oracle=SimulatedOracle(truth))

    one, many = one_cycle(1), one_cycle(0)
    a1 = [(a.i, a.j) for a in one.constraints.answers]
    am = [(a.i, a.j) for a in many.constraints.answers]
    assert 0 < len(a1) < budget  # the premise: AAS's pool is smaller than the allowance
    assert am[:len(a1)] == a1  # round 0 is the one-draw schedule's batch
    assert len(a1) < len(am) <= budget  # later rounds asked more, within the allowance
    assert len(set(am)) == len(am)
    assert many.reports[0].pairs_asked == len(am)
    # Stopping below the allowance means the sampler has nothing left on the same features
    # (cycle 1 clusters the memory's first features: the untrained head's embeddings).
    with torch.no_grad():
        X0 = F.normalize(model.embed_features(feats).float(), dim=1).numpy()
    aas = AmbiguityAwareSampler(dbscan=DBSCANJaccard(k1=10, k2=3, min_samples=2))
    assert len(aas.sample(X0, many.constraints, budget - len(am), seed=7).pairs) == 0
    with pytest.raises(ValueError, match="TrainConfig.question_rounds"):
        TrainConfig(question_rounds=-1)


def test_a_checkpoint_from_before_an_option_existed_resumes_at_its_default(collection,
                                                                            tmp_path):
    """A checkpoint written before question_rounds / aas_os_similarity existed holds no such
    keys; it was made with their defaults (the old behaviour), so it resumes under them and
    is refused only under another value."""
    model, feats, truth = collection
    common = dict(**SMALL, epochs=2, epochs_per_cycle=2, iters_per_epoch=2,
                  budget_per_cycle=5, seed=1, checkpoint_dir=tmp_path)
    SpCLTrainer(TrainConfig(**common), model).fit(feats, oracle=SimulatedOracle(truth))
    state = load_checkpoint(tmp_path)
    for key in ("question_rounds", "aas_os_similarity"):
        del state["config"][key]
    state.pop("format")
    save_checkpoint(tmp_path, state)
    done = SpCLTrainer(TrainConfig(**common), model).fit(feats, oracle=SimulatedOracle(truth),
                                                         resume=True)
    assert done.resumed_from_epoch == 2
    with pytest.raises(ValueError, match=r"different \['question_rounds'\]"):
        SpCLTrainer(TrainConfig(**common, question_rounds=0), model).fit(
            feats, oracle=SimulatedOracle(truth), resume=True)


# --------------------------------------------------------------------------- partial mode
PARTIAL = dict(mode="partial", device="cpu", num_identities=4, num_instances=4, k1=5, k2=2,
               min_samples=2, sampler="none", trainable_stages=2, augment_views=2,
               eval_every=0)


def test_cached_lower_stage_maps_equal_recomputed_ones(tiny_images):
    """The cache is exact: each map (clean or augmented view) is what the frozen lower part
    computes on that image, and the upper part on the clean map is the served model (up to
    float32 rounding, which differs with the batch a convolution runs in: ~3e-5 here; a
    lower part run in training mode would differ by whole units)."""
    from reidal.embedding.preprocess import preprocess
    from reidal.training.augment import scene_augment
    from reidal.training.data import spec_for
    from reidal.training.partial import cache_lower_features, view_seed

    model, images = tiny_images
    bb = model.backbone
    first = bb.first_trainable_block(2)
    assert first == 11  # EfficientNet-Lite0's stages start at blocks 0 1 3 5 8 11 15
    spec = spec_for(model)
    cache = cache_lower_features(model, images[:5], first, views=2, seed=7, batch=4)
    assert cache.clean.shape[0] == 5 and cache.views.shape[:2] == (5, 2)
    with torch.no_grad():
        for i, img in enumerate(images[:5]):
            x = torch.from_numpy(preprocess([img], spec))
            torch.testing.assert_close(cache.clean[i], bb.lower(x, first)[0], rtol=1e-4, atol=1e-4)
            served = model(x)[0]
            via_cache = model.embed_features(model.pooled(bb.upper(cache.clean[i:i + 1],
                                                                   first)))[0]
            torch.testing.assert_close(via_cache, served, rtol=1e-4, atol=1e-4)
            for v in (1, 2):
                view = scene_augment(img.convert("RGB"), np.random.default_rng(
                    view_seed(7, i, v)), crop_scale=0.4, jitter=0.4)
                xv = torch.from_numpy(preprocess([view], spec))
                torch.testing.assert_close(cache.views[i, v - 1], bb.lower(xv, first)[0],
                                           rtol=1e-4, atol=1e-4)
        assert not torch.allclose(cache.views[0, 0], cache.clean[0])  # views do differ
    # a subset cached on its own, numbered as in the whole set, gets the same views
    part = cache_lower_features(model, images[3:5], first, views=2, seed=7, indices=[3, 4])
    torch.testing.assert_close(part.views, cache.views[3:5], rtol=1e-4, atol=1e-4)


def test_partial_mode_trains_the_last_stages_and_lowers_its_loss(tiny_images):
    from reidal.training.partial import lite_backbone

    model, images = tiny_images
    before = _head_weights(model)
    truth = np.repeat(np.arange(6), 4)  # SyntheticConfig.tiny(): 6 individuals x 4 images
    config = TrainConfig(**{**PARTIAL, "epochs": 3, "iters_per_epoch": 4, "lr": 1e-3,
                            "trainable_stages": 1, "augment_views": 1})
    result = SpCLTrainer(config, model).fit(images, fixed_labels=truth)
    losses = [r.loss for r in result.reports]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert _same_state(before, model.state_dict())  # the caller's model is untouched
    trained = result.model.state_dict()
    first = lite_backbone(model).first_trainable_block(1)
    changed = {k for k in before if not torch.equal(before[k], trained[k])}
    upper = {f"backbone.net._blocks.{i}." for i in range(first, 16)}
    assert any(k.startswith("head.") for k in changed)
    assert any(k.startswith(tuple(upper)) for k in changed)
    assert any(k.startswith("backbone.net._conv_head") for k in changed)
    lower = [k for k in changed if k.startswith(("backbone.net._conv_stem", "backbone.net._bn0"))
             or (k.startswith("backbone.net._blocks.") and int(k.split(".")[3]) < first)]
    assert lower == []  # frozen below the split, BatchNorm statistics included


def test_partial_mode_refuses_a_feature_matrix_and_bad_stage_counts(collection, tiny_images):
    model, feats, _ = collection
    with pytest.raises(ValueError, match="images"):
        SpCLTrainer(TrainConfig(**{**PARTIAL, "epochs": 1}), model).fit(feats)
    tiny_model, images = tiny_images
    with pytest.raises(ValueError, match="trainable_stages must be in 1..7"):
        SpCLTrainer(TrainConfig(**{**PARTIAL, "epochs": 1, "trainable_stages": 8}),
                    tiny_model).fit(images)


@pytest.mark.parametrize("kwargs, field", [
    ({"trainable_stages": 0}, "trainable_stages"), ({"augment_views": -1}, "augment_views"),
    ({"pair_loss_weight": -0.5}, "pair_loss_weight"), ({"crop_scale": 0.0}, "crop_scale"),
    ({"pair_margin": 1.0}, "pair_margin"),
])
def test_bad_partial_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**kwargs)


def test_pair_loss_matches_a_pairwise_transcription():
    """Every answered or implied pair between a batch item and any item, checked pair by
    pair with ConstraintSet.implied (the transitive closure of the answers)."""
    from reidal.core.constraints import Answer, ConstraintSet
    from reidal.training.pair_loss import AnswerPairs

    n, margin = 12, 0.3
    answers = [(0, 1, True), (1, 2, True), (2, 5, False), (6, 7, True), (7, 8, False),
               (9, 10, False), (3, 4, True)]
    cs = ConstraintSet.from_answers(n, [Answer(i, j, same=s, answer_id=k)
                                        for k, (i, j, s) in enumerate(answers)])
    g = torch.Generator().manual_seed(3)
    memory = F.normalize(torch.randn(n, 8, generator=g), dim=1)
    idx = torch.tensor([0, 5, 7, 11, 3, 2])
    emb = F.normalize(torch.randn(len(idx), 8, generator=g), dim=1).requires_grad_(True)
    got = AnswerPairs(cs, torch.device("cpu")).loss(emb, idx, memory, margin)
    same, diff = [], []
    for b, i in enumerate(idx.tolist()):
        for j in range(n):
            if j == i:
                continue
            rel = cs.implied(i, j)
            s = float(emb[b].detach() @ memory[j])
            if rel is True:
                same.append(1.0 - s)
            elif rel is False:
                diff.append(max(0.0, s - margin))
    assert same and diff
    want = np.mean(same) + np.mean(diff)
    assert abs(float(got.detach()) - want) < 1e-5
    got.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    none = AnswerPairs(ConstraintSet(n), torch.device("cpu")).loss(emb, idx, memory, margin)
    assert float(none.detach()) == 0.0


def test_pair_loss_weight_changes_training_only_with_answers(collection):
    from reidal.core.constraints import Answer, ConstraintSet

    model, feats, truth = collection
    base = dict(**SMALL, epochs=1, iters_per_epoch=3, sampler="none")
    plain = SpCLTrainer(TrainConfig(**base), model).fit(feats)
    weighted_no_answers = SpCLTrainer(TrainConfig(**base, pair_loss_weight=1.0), model).fit(feats)
    assert plain.reports[0].loss == weighted_no_answers.reports[0].loss
    same = [(i, j) for i in range(20) for j in range(i + 1, 20) if truth[i] == truth[j]][:10]
    cs = ConstraintSet.from_answers(len(truth), [Answer(i, j, same=True, answer_id=k)
                                                 for k, (i, j) in enumerate(same)])
    a = SpCLTrainer(TrainConfig(**base), model).fit(feats, constraints=cs)
    b = SpCLTrainer(TrainConfig(**base, pair_loss_weight=1.0), model).fit(feats, constraints=cs)
    assert a.reports[0].loss != b.reports[0].loss
