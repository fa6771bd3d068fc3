"""The procedural re-ID image generator: determinism, layout on disk, identity signal."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from reidal.data.synthetic_images import (
    SyntheticConfig,
    generate_dataset,
    images_per_individual,
    iter_images,
    iter_samples,
    plan_dataset,
    render_image,
)
from reidal.data.wildlife import load_wildlife_csv

#: Every nuisance off: the same individual is drawn at the same place and size each time.
NO_NUISANCE = dict(
    rotation_deg=0.0, shear=0.0, bend=0.0, stretch=0.0, translate=0.0, scale_range=(0.8, 0.8),
    occlusion_probability=0.0, blur_max=0.0, lighting=0.0, grayscale_probability=0.0,
    noise=0.0, clutter=0.0, flip_probability=0.0,
)


def pixels(config: SyntheticConfig) -> list[np.ndarray]:
    return [np.asarray(im) for _, _, im in iter_images(config)]


def test_same_seed_gives_identical_pixels():
    a, b = pixels(SyntheticConfig.tiny()), pixels(SyntheticConfig.tiny())
    assert len(a) == len(b) == 24
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_different_seed_gives_different_pixels():
    a, b = pixels(SyntheticConfig.tiny(seed=0)), pixels(SyntheticConfig.tiny(seed=1))
    diffs = [np.abs(x.astype(int) - y.astype(int)).mean() for x, y in zip(a, b, strict=True)]
    assert min(diffs) > 5.0


def test_images_have_the_configured_size_and_mode():
    config = SyntheticConfig.tiny(image_size=48, images_per_individual=(2, 5), n_individuals=5)
    items = list(iter_images(config))
    counts = Counter(identity for _, identity, _ in items)
    assert len(counts) == 5
    assert all(2 <= c <= 5 for c in counts.values())
    assert len({image_id for image_id, _, _ in items}) == len(items)
    for _, _, im in items:
        assert isinstance(im, Image.Image)
        assert im.mode == "RGB" and im.size == (48, 48)
        arr = np.asarray(im)
        assert arr.std() > 5  # not a blank frame


def test_counts_are_long_tailed_within_the_range():
    config = SyntheticConfig(n_individuals=400, images_per_individual=(4, 16))
    counts = images_per_individual(config)
    assert counts.min() >= 4 and counts.max() <= 16
    assert counts.max() > counts.min()
    assert np.median(counts) < 10  # skewed towards the minimum, as sightings are


def test_an_individual_does_not_change_when_the_collection_grows():
    small = SyntheticConfig.tiny(n_individuals=4)
    large = SyntheticConfig.tiny(n_individuals=9)
    for individual, index in ((0, 0), (3, 2)):
        np.testing.assert_array_equal(
            np.asarray(render_image(small, individual, index)),
            np.asarray(render_image(large, individual, index)),
        )


def test_render_image_matches_the_iterator():
    config = SyntheticConfig.tiny()
    items = {image_id: im for image_id, _, im in iter_images(config)}
    plan = plan_dataset(config)
    for p in (plan[0], plan[7], plan[-1]):
        np.testing.assert_array_equal(
            np.asarray(render_image(config, p.individual, p.index)), np.asarray(items[p.image_id])
        )
    with pytest.raises(ValueError, match="individual"):
        render_image(config, config.n_individuals, 0)
    with pytest.raises(ValueError, match="index"):
        render_image(config, 0, 99)


def test_split_holds_out_whole_identities_and_keeps_a_training_image_for_the_rest():
    config = SyntheticConfig(n_individuals=40)
    plan = plan_dataset(config)
    by_id: dict[str, list[str]] = {}
    for p in plan:
        by_id.setdefault(p.identity, []).append(p.split)
    test_only = [k for k, s in by_id.items() if set(s) == {"test"}]
    assert len(test_only) == round(0.2 * 40)
    for k, s in by_id.items():
        if k not in test_only:
            assert "train" in s
    n_test_known = sum(s.count("test") for k, s in by_id.items() if k not in test_only)
    n_known = sum(len(s) for k, s in by_id.items() if k not in test_only)
    assert 0.15 < n_test_known / n_known < 0.35


def test_photos_of_one_individual_are_closer_than_photos_of_its_species_mates():
    """With the nuisances off, identity must show in raw pixels (it is the coat layout)."""
    config = SyntheticConfig.tiny(n_individuals=6, n_species=2, **NO_NUISANCE)
    samples = list(iter_samples(config))
    ids = np.array([s.identity for s in samples])
    species = np.array([s.species for s in samples])
    X = np.stack([
        np.asarray(s.image.convert("L").resize((32, 32)), np.float32).ravel() / 255
        for s in samples
    ])
    D = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
    same = (ids[:, None] == ids[None]) & ~np.eye(len(ids), dtype=bool)
    mates = (species[:, None] == species[None]) & (ids[:, None] != ids[None])
    assert D[same].mean() < 0.85 * D[mates].mean()
    np.fill_diagonal(D, np.inf)
    nn_accuracy = (ids[D.argmin(1)] == ids).mean()
    assert nn_accuracy > 0.5  # chance is 3/23


def test_generate_dataset_round_trips_through_the_wildlife_loader(tmp_path):
    config = SyntheticConfig.tiny()
    out = tmp_path / "synth"
    csv_path = generate_dataset(config, out)
    assert csv_path == out / "metadata.csv"
    with open(csv_path, newline="") as fh:
        header = next(csv.reader(fh))
    assert header[:3] == ["image_id", "identity", "path"]
    assert {"species", "viewpoint", "split"} <= set(header)

    ds = load_wildlife_csv(csv_path)
    memory = list(iter_samples(config))
    assert len(ds) == len(memory)
    assert list(ds.image_ids) == [s.image_id for s in memory]
    assert list(ds.identities) == [s.identity for s in memory]
    assert list(ds.splits) == [s.split for s in memory]
    assert list(ds.column("viewpoint")) == [s.viewpoint for s in memory]
    assert set(ds.column("viewpoint")) <= {"left", "right"}
    rendered = np.stack([np.asarray(s.image, np.float32) for s in memory])
    for k, rec in enumerate(ds):
        assert rec.path.parent == out / "images"
        with Image.open(rec.path) as im:
            disk = np.asarray(im.convert("RGB"), np.float32)
        assert disk.shape == (64, 64, 3)
        err = np.abs(rendered - disk).mean(axis=(1, 2, 3))
        # JPEG loses the pixel noise, nothing else: each file is its own render, by far
        assert err[k] < 10.0
        assert err.argmin() == k and err[k] < 0.5 * np.delete(err, k).min()


def test_generate_dataset_is_idempotent_and_rebuilds_on_a_new_config(tmp_path):
    out = tmp_path / "synth"
    config = SyntheticConfig.tiny()
    generate_dataset(config, out)
    first = sorted(out.glob("images/*.jpg"))
    stamps = {p: p.stat().st_mtime_ns for p in first}
    marker = json.loads((out / "config.json").read_text())
    assert marker["complete"] is True
    assert SyntheticConfig.from_json_dict(marker["config"]) == config

    generate_dataset(config, out)  # cached: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in sorted(out.glob("images/*.jpg"))} == stamps

    smaller = SyntheticConfig.tiny(n_individuals=3)
    generate_dataset(smaller, out)
    assert len(list(out.glob("images/*.jpg"))) == len(plan_dataset(smaller)) == 12
    assert len(load_wildlife_csv(out / "metadata.csv")) == 12

    (out / "images" / f"{plan_dataset(smaller)[0].image_id}.jpg").unlink()
    generate_dataset(smaller, out)  # a missing image invalidates the cache
    assert len(load_wildlife_csv(out / "metadata.csv")) == 12


def test_generate_dataset_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not written by generate_dataset"):
        generate_dataset(SyntheticConfig.tiny(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"n_individuals": 0}, "n_individuals"),
        ({"image_size": 16}, "image_size"),
        ({"images_per_individual": (5, 3)}, "images_per_individual"),
        ({"images_per_individual": 4}, "images_per_individual"),
        ({"scale_range": (0.0, 0.5)}, "scale_range"),
        ({"occlusion_probability": 1.5}, "occlusion_probability"),
        ({"pattern_similarity": -0.1}, "pattern_similarity"),
        ({"test_identity_fraction": 1.0}, "test_identity_fraction"),
        ({"seed": -1}, "seed"),
        ({"n_species": 2.5}, "n_species"),
        ({"clutter": "lots"}, "clutter"),
        ({"blur_max": 11.0}, "blur_max"),
    ],
)
def test_config_rejects_bad_values(change, field):
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**change)


def test_config_json_round_trip():
    config = SyntheticConfig(seed=7, scale_range=(0.6, 0.9))
    assert SyntheticConfig.from_json_dict(config.to_json_dict()) == config
    assert json.loads(json.dumps(config.to_json_dict())) == config.to_json_dict()
    as_lists = SyntheticConfig(images_per_individual=[3, 5], scale_range=[0.5, 0.7])
    assert as_lists.images_per_individual == (3, 5) and as_lists.scale_range == (0.5, 0.7)
    hash(as_lists)
    with pytest.raises(ValueError, match="unknown"):
        SyntheticConfig.from_json_dict({"n_individuals": 3, "colour": "red"})
