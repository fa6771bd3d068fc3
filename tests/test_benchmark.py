"""`reidal bench` (reidal.benchmark): the quick run end to end, resuming, budget accounting,
the annotator's errors, the supervised hook, the budget parser and the summary statistics.

The quick run is real: the small synthetic set rendered, the default EfficientNet-Lite0's
features cached, every method trained (head mode, a short schedule). Statistics are checked
against an exact sign-flip enumeration written here, not against scipy's own output.
"""

from __future__ import annotations

import csv
import itertools
import json
import math

import numpy as np
import pytest
from PIL import Image

from reidal.benchmark import (
    CSV_COLUMNS,
    METHODS,
    QUICK_SCHEDULE,
    SAMPLER_METHODS,
    BenchConfig,
    BudgetSpec,
    RunContext,
    load_dataset,
    parse_budget_spec,
    read_results_csv,
    results_csv,
    run_method,
    summary_markdown,
    wilcoxon_tests,
)
from reidal.benchmark.methods import BenchSchedule
from reidal.cli import main as cli_main

QUICK_SEEDS = 2
QUICK_CYCLES = 2
#: What keeps --quick quick (bounds on work, not on time): training steps a run, images a
#: batch, images in the training pool.
QUICK_MAX_STEPS = 40
QUICK_MAX_BATCH = 32
QUICK_MAX_POOL = 100


# --------------------------------------------------------------------------- budget spec
@pytest.mark.parametrize("text, per_cycle, cycles", [
    ("0.5%x5", 0.005, 5), ("0.02%x5", 0.0002, 5), ("100x5", 100, 5), ("100 x 3", 100, 3),
    ("0.005x2", 0.005, 2), ("7", 7, 5), ("1%", 0.01, 5), ("100%x1", 1.0, 1),
])
def test_budget_spec_parses(text, per_cycle, cycles):
    b = parse_budget_spec(text)
    assert b.cycles == cycles
    assert type(b.per_cycle) is type(per_cycle) and b.per_cycle == pytest.approx(per_cycle)


@pytest.mark.parametrize("text, problem", [
    ("", "non-empty"), ("abc", "neither a percentage"), ("0%x5", r"\(0, 100\]"),
    ("150%x5", r"\(0, 100\]"), ("0x5", "at least 1 pair"), ("100x0", "at least 1 cycle"),
    ("100xa", "not a positive integer"), ("1.5x5", r"in \(0, 1\]"), ("a%x5", "not a percentage"),
    ("-3x5", r"in \(0, 1\]"), ("x5", "not PER_CYCLE"),
])
def test_bad_budget_spec_names_the_problem(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_budget_spec(text)


def test_budget_allowance_counts_pairs_of_the_pool():
    n = 50
    all_pairs = n * (n - 1) // 2  # 1225
    pct = parse_budget_spec("0.5%x5")
    assert pct.pairs_per_cycle(n) == math.ceil(0.005 * all_pairs) == 7
    assert pct.allotted_pct(n, 3) == pytest.approx(100 * 3 * 7 / all_pairs)
    assert parse_budget_spec("100x5").pairs_per_cycle(n) == 100
    assert str(parse_budget_spec("0.5%x5")) == "0.5%x5" and str(BudgetSpec(100, 2)) == "100x2"


def test_bench_config_refuses_bad_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        BenchConfig(datasets=("synthetic",), methods=("magic",))
    with pytest.raises(ValueError, match="triton:MODEL@HOST:PORT"):
        BenchConfig(datasets=("synthetic",), methods=("triton:nohost",))
    with pytest.raises(ValueError, match="neither a bundled name"):
        from reidal.benchmark import dataset_fingerprint

        dataset_fingerprint(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="seeds repeat"):
        BenchConfig(datasets=("synthetic",), seeds=(1, 1))


# --------------------------------------------------------------------------- summary stats
def _exact_wilcoxon_p(diffs: list[float]) -> float:
    """Two-sided exact signed-rank p by enumerating every sign assignment (no ties in |d|)."""
    d = [x for x in diffs if x != 0]
    ranks = {v: r for r, v in enumerate(sorted(abs(x) for x in d), 1)}
    w_plus = sum(ranks[abs(x)] for x in d if x > 0)
    total = sum(ranks.values())
    observed = min(w_plus, total - w_plus)
    sums = [sum(r for r, s in zip(ranks.values(), signs, strict=True) if s)
            for signs in itertools.product((0, 1), repeat=len(d))]
    return min(1.0, 2 * sum(w <= observed for w in sums) / len(sums))


def _rows(method: str, final_maps: list[float], first_map: float = 0.9) -> list[dict]:
    rows = []
    for seed, m in enumerate(final_maps):
        for cycle, value in ((1, first_map), (2, m)):
            row = {c: 0.0 for c in CSV_COLUMNS}
            row.update(dataset="toy", method=method, seed=seed, cycle=cycle, mAP=value,
                       top1=value, pairs_asked=3, cumulative_pairs=3 * cycle, budget_pairs=4,
                       n_clusters=1, contradictions=0, flipped_answers=0, k1=10,
                       min_samples=2, finch_level=0, eps=0.6, eps_source="config")
            rows.append(row)
    return rows


def test_wilcoxon_and_summary_on_hand_made_rows():
    aas = [0.40, 0.42, 0.44, 0.46]
    rnd = [0.35, 0.43, 0.41, 0.40]  # differences +5, -1, +3, +6 points
    rows = _rows("aas", aas) + _rows("random", rnd) + _rows("usl", aas)
    # CSV round trip keeps every value
    back = read_results_csv(results_csv(rows))
    assert [tuple(r.values()) for r in back] == [tuple(r[c] for c in CSV_COLUMNS) for r in rows]

    tests = {(t["method"], t["metric"]): t for t in wilcoxon_tests(rows)}
    t = tests[("random", "mAP")]
    diffs = [a - b for a, b in zip(aas, rnd, strict=True)]
    assert (t["n"], t["n_nonzero"], t["wins"], t["ties"], t["losses"]) == (4, 4, 3, 0, 1)
    assert t["p"] == pytest.approx(_exact_wilcoxon_p(diffs))
    assert t["statistic"] == 1.0  # the one loss has the smallest |difference|
    assert t["mean_diff"] == pytest.approx(np.mean(diffs))
    assert t["min_p"] == 0.125
    same = tests[("usl", "mAP")]  # identical results: no test, not a crash
    assert same["p"] is None and same["ties"] == 4

    md = summary_markdown(rows, title="toy", settings=["s"], command="reidal bench")
    # final cycle only (cycle 1 was 90 % everywhere): mean and sample std of the seeds
    line = next(x for x in md.splitlines() if x.startswith("| `aas` | 4 |"))
    assert f"{np.mean(aas) * 100:.1f} ± {np.std(aas, ddof=1) * 100:.1f}" in line
    assert "90.0" not in line
    p_text = f"{_exact_wilcoxon_p(diffs):.3g}"
    assert any(x.startswith("| `aas` vs `random` | mAP | 4 | 3 / 0 / 1 |") and p_text in x
               for x in md.splitlines())
    assert "the smallest two-sided p is 0.125" in md


# --------------------------------------------------------------------------- quick run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`reidal bench --quick` with every method, into a fresh folder."""
    out = tmp_path_factory.mktemp("bench")
    rc = cli_main(["bench", "--quick", "--methods", *METHODS, "--threads", "1",
                   "--feature-cache", str(tmp_path_factory.mktemp("features")),
                   "--out", str(out)])
    assert rc == 0
    return out


def test_quick_run_stays_small(quick_run):
    """--quick is CI's check that the pipeline works, so it must stay small. Measured as the
    work each stored run did (training steps, batch, pool), not as wall time: the suite runs
    on shared, loaded machines where a timed assertion fails for the wrong reason."""
    runs = [json.loads(p.read_text()) for p in sorted((quick_run / "runs").glob("*.json"))]
    assert len(runs) == len(METHODS) * QUICK_SEEDS
    for run in runs:
        schedule, budget = run["config"]["schedule"], run["config"]["budget"]
        steps = budget["cycles"] * schedule["epochs_per_cycle"] * schedule["iters_per_epoch"]
        assert steps <= QUICK_MAX_STEPS, (run["method"], schedule, budget)
        assert schedule["num_identities"] * schedule["num_instances"] <= QUICK_MAX_BATCH
    rows = read_results_csv((quick_run / "results.csv").read_text())
    first = next(r for r in rows if r["method"] in SAMPLER_METHODS and r["cycle"] == 1)
    pool_pairs = 100.0 * first["budget_pairs"] / first["allotted_pct"]
    assert pool_pairs <= QUICK_MAX_POOL * (QUICK_MAX_POOL - 1) / 2, pool_pairs


def test_quick_run_writes_every_row_table_and_plot(quick_run):
    out = quick_run
    with open(out / "results.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        raw = list(reader)
    rows = read_results_csv((out / "results.csv").read_text())
    assert len(raw) == len(rows) == len(METHODS) * QUICK_SEEDS * QUICK_CYCLES
    assert {(r["method"], r["seed"], r["cycle"]) for r in rows} == set(
        itertools.product(METHODS, range(QUICK_SEEDS), range(1, QUICK_CYCLES + 1)))
    for r in rows:
        assert all(0.0 <= r[k] <= 1.0 for k in ("mAP", "mINP", "top1", "top10", "BAKS"))
        assert r["top1"] <= r["top3"] <= r["top5"] <= r["top10"]

    md = (out / "summary.md").read_text()
    assert "| method | seeds | mAP % |" in md
    for m in METHODS:
        assert f"| `{m}` | {QUICK_SEEDS} |" in md
    for m in METHODS:
        if m != "aas":
            assert f"| `aas` vs `{m}` | mAP | {QUICK_SEEDS} |" in md
    assert "Wilcoxon" in md and "reidal bench --dataset synthetic-small" in md

    for name in ("synthetic-small_map_vs_budget.png", "synthetic-small_pairs_per_cycle.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200


def test_budget_accounting(quick_run):
    out = quick_run
    rows = read_results_csv((out / "results.csv").read_text())
    for (m, _seed), grp in itertools.groupby(rows, key=lambda r: (r["method"], r["seed"])):
        grp = sorted(grp, key=lambda r: r["cycle"])
        asked = [r["pairs_asked"] for r in grp]
        assert [r["cumulative_pairs"] for r in grp] == list(itertools.accumulate(asked))
        if m in SAMPLER_METHODS:
            allowance = grp[0]["budget_pairs"]
            assert allowance > 0 and all(a <= allowance for a in asked)
            all_pairs = 100.0 * allowance / grp[0]["allotted_pct"]  # cycle 1: one allowance
            for r in grp:
                assert r["allotted_pct"] == pytest.approx(
                    100 * r["cycle"] * allowance / all_pairs, rel=1e-4)
                assert r["budget_used_pct"] == pytest.approx(
                    100 * r["cumulative_pairs"] / all_pairs, rel=1e-4)
                assert r["budget_used_pct"] <= r["allotted_pct"] + 1e-9
        else:
            assert asked == [0] * len(grp) and all(r["contradictions"] == 0 for r in grp)
        if m == "supervised":  # trained on the true identities: perfect pseudo-labels
            assert all(r["pl_f1"] == 1.0 and r["budget_used_pct"] == 100.0 for r in grp)
        if m == "zero-shot":  # nothing trains: the same numbers every cycle
            assert len({(r["mAP"], r["pl_f1"]) for r in grp}) == 1


def test_rerun_skips_finished_runs_and_leaves_files_alone(quick_run, capsys):
    out = quick_run
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    capsys.readouterr()
    # the same --threads: the thread count is part of every run's key
    assert cli_main(["bench", "--quick", "--methods", *METHODS, "--threads", "1",
                     "--feature-cache", "none", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    n = len(METHODS) * QUICK_SEEDS
    assert f"0 run(s) computed, {n} finished before" in text
    assert text.count("finished before, skipped") == n
    assert "loading" not in text  # the dataset is not even loaded
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before


# --------------------------------------------------------------------------- single runs
@pytest.fixture(scope="module")
def small_data():
    from _model_support import TEST_INPUT_SIZE

    from reidal.embedding.model import build_default_model

    model = build_default_model(input_size=TEST_INPUT_SIZE)
    return model, load_dataset("synthetic-small", model)


def test_annotator_errors_make_contradictions(small_data):
    """A consistent annotator can never contradict itself; one flipping 20 % of a large
    random batch (triangles of answers abound) does."""
    model, data = small_data
    budget = BudgetSpec(300, 1)
    ctx = {e: RunContext(model, QUICK_SCHEDULE, budget, e, progress=lambda s: None)
           for e in (0.0, 0.2)}
    clean = run_method("random", data, 0, ctx[0.0])["rows"][-1]
    noisy = run_method("random", data, 0, ctx[0.2])["rows"][-1]
    assert clean["pairs_asked"] == noisy["pairs_asked"] == 300
    assert clean["contradictions"] == 0 and clean["flipped_answers"] == 0
    assert noisy["flipped_answers"] > 0 and noisy["contradictions"] > 0
    assert noisy["contradictions"] <= noisy["flipped_answers"] * 300


def test_fixed_labels_replace_the_clustering(small_data):
    from reidal.simulation.oracle import SimulatedOracle
    from reidal.training import SpCLTrainer

    model, data = small_data
    feats, truth = data.features[data.pool], data.pool_truth
    config = QUICK_SCHEDULE.train_config(1, BudgetSpec(5, 1), 0, "none")
    result = SpCLTrainer(config, model).fit(feats, true_labels=truth, fixed_labels=truth)
    multi = int(np.sum(np.bincount(truth) > 1))
    assert all(r.n_clusters == multi and r.n_np3_changed == 0 for r in result.reports)
    assert all(r.quality["f1"] == 1.0 for r in result.reports)
    assert np.array_equal(result.labels, truth)
    with pytest.raises(ValueError, match="fixed_labels must be a 1-D array"):
        SpCLTrainer(config, model).fit(feats, fixed_labels=truth[:-1])
    aas = QUICK_SCHEDULE.train_config(1, BudgetSpec(5, 1), 0, "aas")
    with pytest.raises(ValueError, match="answers would be ignored"):
        SpCLTrainer(aas, model).fit(feats, oracle=SimulatedOracle(truth), fixed_labels=truth)


def test_triton_row_matches_the_zero_shot_row(small_data, triton):
    """The default model served by Triton is the zero-shot model: same numbers."""
    model, data = small_data
    ctx = RunContext(model, QUICK_SCHEDULE, BudgetSpec(5, 2), 0.0, progress=lambda s: None)
    zero = run_method("zero-shot", data, 0, ctx)["rows"]
    served = run_method(f"triton:{triton.model_name}@{triton.grpc_url}", data, 0, ctx)["rows"]
    assert len(served) == len(zero) == 2
    for key in ("mAP", "mINP", "top1", "top5", "BAKS", "AUC_ROC", "pl_f1"):
        assert served[-1][key] == pytest.approx(zero[-1][key], abs=1e-3), key


def test_bench_schedule_keeps_stored_run_keys_at_defaults():
    d = BenchSchedule().to_dict()
    assert "question_rounds" not in d and "aas_os_similarity" not in d
    v = BenchSchedule(question_rounds=3, aas_os_similarity="cosine")
    assert v.to_dict()["question_rounds"] == 3
    c = v.train_config(2, type("B", (), {"per_cycle": 10})(), 0, "aas")
    assert c.question_rounds == 3 and c.aas_os_similarity == "cosine"


def test_partial_mode_inputs_are_cached_once_and_match_a_direct_cache(monkeypatch):
    """The benchmark caches partial mode's lower-stage maps once per dataset: the pool's
    rows (clean + views) and every image's clean map, numbered as in the whole set; in
    chunks (here of 2 images, to have several) that change nothing."""
    import torch

    from reidal.benchmark import datasets, methods
    from reidal.benchmark.budget import parse_budget_spec
    from reidal.benchmark.datasets import BenchDataset
    from reidal.benchmark.methods import RunContext, _training_inputs
    from reidal.core.evaluation import open_set_split
    from reidal.data.synthetic_images import SyntheticConfig, iter_samples
    from reidal.embedding.model import build_default_model
    from reidal.training.partial import cache_lower_features

    samples = list(iter_samples(SyntheticConfig.tiny()))
    images = [s.image for s in samples]
    ids = np.array([s.identity for s in samples])
    data = BenchDataset("tiny", "fp", images, None, ids, open_set_split(ids, seed=0))
    model = build_default_model(input_size=(64, 64))
    schedule = BenchSchedule(mode="partial", augment_views=1)
    ctx = RunContext(model, schedule, parse_budget_spec("2x1"), 0.0, progress=lambda _: None)
    config = schedule.train_config(1, ctx.budget, 0, "none")
    monkeypatch.setattr(datasets, "FEATURE_CHUNK", 1)
    monkeypatch.setattr(methods, "LOWER_CACHE_BATCH", 4)
    pool, every = _training_inputs(data, ctx, config)
    assert _training_inputs(data, ctx, config)[0] is pool  # cached on the dataset
    assert len(pool) == data.pool.size and len(every) == len(images) and every.views is None
    direct = cache_lower_features(model, images, pool.first_block, views=1)
    torch.testing.assert_close(every.clean, direct.clean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pool.views, direct.views[torch.from_numpy(data.pool)],
                               rtol=1e-4, atol=1e-4)


def test_partial_mode_maps_are_kept_on_disk_between_invocations(tmp_path):
    """With a feature cache folder the lower-stage maps are stored once and read back by a
    later invocation (a fresh dataset object) exactly; other view parameters are another file."""
    import torch

    from reidal.benchmark.budget import parse_budget_spec
    from reidal.benchmark.datasets import BenchDataset
    from reidal.benchmark.methods import RunContext, _training_inputs
    from reidal.core.evaluation import open_set_split
    from reidal.data.synthetic_images import SyntheticConfig, iter_samples
    from reidal.embedding.model import build_default_model

    samples = list(iter_samples(SyntheticConfig.tiny()))
    images = [s.image for s in samples]
    ids = np.array([s.identity for s in samples])
    split = open_set_split(ids, seed=0)
    model = build_default_model(input_size=(64, 64))

    def load(views: int) -> tuple[object, list[str]]:
        lines: list[str] = []
        data = BenchDataset("tiny", "fp", images, None, ids, split, cache_dir=tmp_path,
                            feature_key="k")
        schedule = BenchSchedule(mode="partial", augment_views=views)
        ctx = RunContext(model, schedule, parse_budget_spec("2x1"), 0.0,
                         progress=lines.append)
        return _training_inputs(data, ctx, schedule.train_config(1, ctx.budget, 0, "none")), lines

    (pool, every), lines = load(1)
    assert any("stored in" in x for x in lines) and len(list(tmp_path.glob("lower-*.pt"))) == 1
    total = split.train_idx.size * 2 + len(images) - split.train_idx.size
    assert any(f"inputs: {total}/{total} maps" in x for x in lines)  # progress while caching
    (pool2, every2), lines = load(1)
    assert [x for x in lines if "caching" in x] == [] and "read from" in lines[-1]
    assert torch.equal(pool.clean, pool2.clean) and torch.equal(pool.views, pool2.views)
    assert torch.equal(every.clean, every2.clean) and every2.views is None
    (pool0, _), lines = load(0)
    assert pool0.views is None and any("caching" in x for x in lines)
    assert len(list(tmp_path.glob("lower-*.pt"))) == 2
