"""`reidal bench` usability (issue 13, item 5) and the hard generated set (item 4).

- ``--seeds``: a count means that many seeds (``1`` = exactly one), ``0`` is refused with a
  message saying what to write instead, and the reproduce line summary.md prints is read
  back by the command line into the same benchmark;
- the backbone features are kept on disk between invocations, keyed by the dataset, the
  backbone's weights and the input size, with progress lines while they are computed;
- ``--threads`` is part of a run's key (the numbers depend on it);
- the hard preset: its counts, shared scenes, near-duplicate bursts and burst-level split.
"""

from __future__ import annotations

import argparse
import shlex

import numpy as np
import pytest
import torch

from reidal.benchmark import BenchConfig, dataset_fingerprint, load_dataset
from reidal.benchmark.datasets import BUNDLED, backbone_features, feature_cache_key
from reidal.benchmark.runner import (
    _command,
    add_bench_arguments,
    config_from_args,
    format_seeds,
    parse_seeds,
    run_key,
)
from reidal.cli import main as cli_main
from reidal.data.synthetic_images import (
    HARD_PRESET,
    SyntheticConfig,
    images_per_individual,
    plan_dataset,
    render_image,
    scene_of,
)


# --------------------------------------------------------------------------- --seeds
@pytest.mark.parametrize("text, seeds", [
    ("1", (0,)), ("4", (0, 1, 2, 3)), ("0,2,7", (0, 2, 7)), ("5,", (5,)), ("0,", (0,)),
])
def test_seeds_parse(text, seeds):
    assert parse_seeds(text) == seeds


def test_seeds_zero_is_refused_saying_what_to_write(capsys):
    with pytest.raises(ValueError, match=r"--seeds 0 is a count of no seeds.*--seeds 0,"):
        parse_seeds("0")
    for bad in ("-1", "x", ","):
        with pytest.raises(ValueError, match="--seeds must be a count"):
            parse_seeds(bad)
    assert cli_main(["bench", "--seeds", "0", "--out", "unused"]) != 0
    assert "count of no seeds" in capsys.readouterr().err


@pytest.mark.parametrize("seeds", [(0,), (1,), (5,), (0, 1, 2), (0, 2, 7), (3, 4)])
def test_reproduce_line_is_read_back_into_the_same_benchmark(tmp_path, seeds):
    config = BenchConfig(datasets=("synthetic-hard",), methods=("zero-shot", "aas"),
                         seeds=seeds, threads=2)
    assert parse_seeds(format_seeds(seeds)) == seeds
    line = _command(config, tmp_path)
    argv = shlex.split(line)
    assert argv[:2] == ["reidal", "bench"]
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    back = config_from_args(p.parse_args(argv[2:]))
    assert (back.datasets, back.methods, back.seeds, back.budget, back.threads) == (
        config.datasets, config.methods, seeds, config.budget, 2)


@pytest.mark.parametrize("argv, iters", [
    (["--mode", "partial"], 10), (["--mode", "partial", "--iters", "7"], 7), ([], 50),
    (["--mode", "head"], 50),
])
def test_a_mode_brings_its_own_steps_an_epoch_unless_given(tmp_path, argv, iters):
    """--mode partial trains with partial mode's schedule (PARTIAL_SCHEDULE's 10 steps, each
    also running a backbone stage), not head mode's 50; an explicit --iters wins; the
    reproduce line reads back into the same schedule."""
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    config = config_from_args(p.parse_args(["--dataset", "synthetic-small", *argv]))
    assert config.schedule.iters_per_epoch == iters
    back = config_from_args(p.parse_args(shlex.split(_command(config, tmp_path))[2:]))
    assert back.schedule == config.schedule


# --------------------------------------------------------------------------- --threads
def test_threads_are_part_of_the_run_key():
    base = BenchConfig(datasets=("synthetic",))
    key, what = run_key(base, "fp", "aas", 0)
    assert "threads" not in what  # keys stored without --threads stay valid
    one = run_key(BenchConfig(datasets=("synthetic",), threads=1), "fp", "aas", 0)[0]
    two = run_key(BenchConfig(datasets=("synthetic",), threads=2), "fp", "aas", 0)[0]
    assert len({key, one, two}) == 3
    assert one == run_key(BenchConfig(datasets=("synthetic",), threads=1), "fp", "aas", 0)[0]


# --------------------------------------------------------------------------- feature cache
@pytest.fixture(scope="module")
def model():
    from _model_support import TEST_INPUT_SIZE

    from reidal.embedding.model import build_default_model

    return build_default_model(input_size=TEST_INPUT_SIZE)


def test_features_are_cached_on_disk_with_progress(tmp_path, model):
    from reidal.data.synthetic_images import iter_images

    images = [im for _, _, im in iter_images(SyntheticConfig.tiny())]
    key = feature_cache_key("fp-a", model)
    lines: list[str] = []
    first = backbone_features(images, model, key, cache_dir=tmp_path, progress=lines.append)
    assert f"  backbone features {len(images)}/{len(images)} images" in lines[-2]
    assert (tmp_path / f"{key}.pt").is_file() and "stored in" in lines[-1]
    lines.clear()
    again = backbone_features(images, model, key, cache_dir=tmp_path, progress=lines.append)
    assert torch.equal(first, again) and len(lines) == 1 and "read from" in lines[0]

    # A truncated file is recomputed and replaced, never trusted.
    (tmp_path / f"{key}.pt").write_bytes(b"not a tensor")
    lines.clear()
    fixed = backbone_features(images, model, key, cache_dir=tmp_path, progress=lines.append)
    assert torch.equal(first, fixed) and "stored in" in lines[-1]

    # The key follows the data, the weights and the input size.
    from reidal.embedding.model import build_default_model

    assert feature_cache_key("fp-b", model) != key
    assert feature_cache_key("fp-a", build_default_model(input_size=(160, 160))) != key
    changed = build_default_model(input_size=model.arch["input_size"])
    with torch.no_grad():
        next(changed.backbone.parameters()).add_(1.0)
    assert feature_cache_key("fp-a", changed) != key
    assert feature_cache_key("fp-a", build_default_model(input_size=model.arch["input_size"])) == key


def test_a_second_load_reads_the_cached_features(tmp_path, model):
    lines: list[str] = []
    a = load_dataset("synthetic-small", model, cache_dir=tmp_path, progress=lines.append)
    assert any("backbone features" in x and "/s)" in x for x in lines)
    lines.clear()
    b = load_dataset("synthetic-small", model, cache_dir=tmp_path, progress=lines.append)
    assert [x for x in lines if "backbone features" in x] == [
        f"  backbone features read from {tmp_path / (feature_cache_key(a.fingerprint, model) + '.pt')}"]
    assert torch.equal(a.features, b.features)
    assert np.array_equal(a.split.query_idx, b.split.query_idx)


# --------------------------------------------------------------------------- the hard set
def test_hard_preset_shape():
    config = SyntheticConfig.hard()
    assert BUNDLED["synthetic-hard"] is HARD_PRESET
    assert dataset_fingerprint("synthetic-hard") != dataset_fingerprint("synthetic")
    counts = images_per_individual(config)
    assert config.n_individuals == 80 and counts.min() >= 20 and counts.max() <= 50
    scenes = np.array([scene_of(config, i) for i in range(config.n_individuals)])
    per_scene = np.bincount(scenes, minlength=config.n_scenes)
    assert per_scene.min() >= 2 and per_scene.max() - per_scene.min() <= 1  # shared, balanced
    # look-alikes: one species, every member on its template (only the mark layout differs)
    assert config.n_species == 1 and config.pattern_similarity == 1.0
    # whole bursts on one side of the split
    plan = plan_dataset(config)
    sides: dict[tuple[int, int], set[str]] = {}
    for p in plan:
        sides.setdefault((p.individual, p.index // config.burst_size), set()).add(p.split)
    assert all(len(s) == 1 for s in sides.values())
    assert {p.split for p in plan} == {"train", "test"}


def test_hard_preset_frames_are_near_duplicates_and_scenes_shared():
    config = SyntheticConfig.hard(image_size=64)
    a, b, c = (np.asarray(render_image(config, 0, k), dtype=np.float32) for k in (0, 1, 5))
    assert np.abs(a - b).mean() > 0  # not copies

    def coarse(x: np.ndarray) -> np.ndarray:  # 8x8 block means: sensor noise averaged out
        return x.reshape(8, 8, 8, 8, 3).mean(axis=(1, 3))

    in_burst = np.abs(coarse(a) - coarse(b)).mean()
    across = np.abs(coarse(a) - coarse(c)).mean()
    assert in_burst < across / 2
    # two individuals of one scene share their background: the corners match closely
    mates = [i for i in range(1, config.n_individuals) if scene_of(config, i) == scene_of(config, 0)]
    other = next(i for i in range(1, config.n_individuals)
                 if scene_of(config, i) != scene_of(config, 0))
    corner = (slice(0, 8), slice(0, 8))
    m = np.asarray(render_image(config, mates[0], 0), dtype=np.float32)[corner]
    o = np.asarray(render_image(config, other, 0), dtype=np.float32)[corner]
    assert np.abs(a[corner] - m).mean() < np.abs(a[corner] - o).mean()


def test_new_generator_fields_leave_old_configs_alone():
    d = SyntheticConfig().to_json_dict()
    assert not {"n_scenes", "burst_size", "burst_jitter"} & set(d)
    assert SyntheticConfig.from_json_dict(d) == SyntheticConfig()
    h = SyntheticConfig.hard().to_json_dict()
    assert h["n_scenes"] == HARD_PRESET["n_scenes"]
    assert SyntheticConfig.from_json_dict(h) == SyntheticConfig.hard()
    for bad in ({"n_scenes": -1}, {"burst_size": 0}, {"burst_jitter": 2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SyntheticConfig(**bad)


def test_demo_takes_the_hard_preset_by_name(tmp_path, capsys):
    from reidal.data.synthetic_images import preset_config

    assert preset_config("hard", seed=3) == SyntheticConfig.hard(seed=3)
    assert preset_config("default") == SyntheticConfig()
    assert cli_main(["demo", "--preset", "nope", "--out", str(tmp_path / "d")]) != 0
    assert "unknown synthetic preset 'nope'; known: default, hard" in capsys.readouterr().err
