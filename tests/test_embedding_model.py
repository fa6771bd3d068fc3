"""The default embedding model, its spec, preprocessing and repository config (no Triton here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from reidal.embedding.model import (
    build_default_model,
    default_weights_path,
    load_model,
    load_spec,
    save_model,
)
from reidal.embedding.preprocess import preprocess
from reidal.embedding.spec import IMAGENET_MEAN, LITE_MEAN, LITE_STD, ModelSpec, default_spec
from reidal.embedding.triton_repo import (
    merge_config,
    next_version,
    parse_config,
    render_config,
    spec_from_config,
    write_model_repository,
)


@pytest.fixture(scope="module")
def model():
    return build_default_model()


# ----------------------------------------------------------------------------- spec
def test_spec_round_trips_through_dict_json_and_toml(tmp_path):
    spec = ModelSpec(name="megadescriptor", input_size=(224, 224), mean=IMAGENET_MEAN)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    (tmp_path / "m.json").write_text(json.dumps(spec.to_dict()))
    assert ModelSpec.from_file(tmp_path / "m.json") == spec
    (tmp_path / "m.toml").write_text(
        '[model]\nname = "megadescriptor"\ninput_size = [224, 224]\n'
        "mean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]\n"
    )
    assert ModelSpec.from_file(tmp_path / "m.toml", table="model") == spec
    assert spec.input_shape == (3, 224, 224)
    assert ModelSpec(layout="NHWC", input_size=(32, 48)).input_shape == (32, 48, 3)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"nmae": "x"}, "unknown model spec key"),
        ({"input_size": [128]}, "input_size"),
        ({"input_size": [0, 128]}, "positive"),
        ({"std": [0.2, 0.0, 0.2]}, "std"),
        ({"mean": [0.1, 0.2]}, "mean"),
        ({"layout": "CHW"}, "layout"),
        ({"dtype": "INT8"}, "dtype"),
        ({"name": ""}, "name"),
    ],
)
def test_spec_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelSpec.from_dict(bad)


# ----------------------------------------------------------------------------- preprocess
def test_preprocess_normalises_resizes_and_converts_modes():
    spec = ModelSpec(input_size=(20, 30), mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.2))
    colour = (200, 10, 77)
    images = [
        Image.new("RGB", (64, 48), colour),
        Image.new("RGBA", (7, 9), (*colour, 3)),  # alpha is dropped, not blended
        Image.new("L", (30, 20), 128),
    ]
    out = preprocess(images, spec)
    assert out.shape == (3, 3, 20, 30) and out.dtype == np.float32 and out.flags.c_contiguous
    want = (np.array(colour) / 255.0 - spec.mean) / spec.std
    np.testing.assert_allclose(out[0].reshape(3, -1).T, np.tile(want, (600, 1)), atol=1e-5)
    np.testing.assert_allclose(out[1].reshape(3, -1).T, np.tile(want, (600, 1)), atol=1e-5)
    grey = (128 / 255.0 - np.array(spec.mean)) / np.array(spec.std)
    np.testing.assert_allclose(out[2].reshape(3, -1).T, np.tile(grey, (600, 1)), atol=1e-5)


def test_preprocess_layout_dtype_and_bilinear_resize():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    nchw = preprocess([img], ModelSpec(input_size=(16, 24)))
    nhwc = preprocess([img], ModelSpec(input_size=(16, 24), layout="NHWC"))
    np.testing.assert_array_equal(nchw.transpose(0, 2, 3, 1), nhwc)
    ref = np.asarray(img.resize((24, 16), Image.Resampling.BILINEAR), dtype=np.float64)
    ref = (ref / 255.0 - np.array(IMAGENET_MEAN)) / np.array((0.229, 0.224, 0.225))
    np.testing.assert_allclose(nhwc[0], ref, atol=1e-5)
    assert preprocess([img], ModelSpec(dtype="FP16")).dtype == np.float16
    with pytest.raises(ValueError, match="sequence"):
        preprocess(img, ModelSpec())
    with pytest.raises(ValueError, match="not a PIL image"):
        preprocess([np.zeros((4, 4, 3))], ModelSpec())


# ----------------------------------------------------------------------------- model
def test_default_spec_is_the_lite_normalisation_the_weights_were_trained_with():
    """EfficientNet-Lite (TF) was trained on (x - 127) / 128: with it the bundled ImageNet
    classifier calls scikit-learn's flower photo a daisy; with ImageNet statistics it does not."""
    from efficientnet_lite_pytorch import EfficientNet
    from sklearn.datasets import load_sample_image

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(default_weights_path(), weights_only=True))
    net.eval()
    photo = Image.fromarray(load_sample_image("flower.jpg"))
    top1 = {}
    for label, spec in {
        "lite": ModelSpec(input_size=(224, 224), mean=LITE_MEAN, std=LITE_STD),
        "imagenet": ModelSpec(input_size=(224, 224)),
    }.items():
        with torch.inference_mode():
            top1[label] = int(net(torch.from_numpy(preprocess([photo], spec))).argmax())
    assert top1["lite"] == 985  # ImageNet class 985: daisy
    assert top1["imagenet"] != 985
    assert default_spec().mean == LITE_MEAN and default_spec().std == LITE_STD


def test_model_shapes_norms_and_the_two_halves(model, sample_images):
    x = torch.from_numpy(preprocess(sample_images[:5], default_spec()))
    with torch.inference_mode():
        out = model(x)
        feats = model.backbone_features(x)
        halves = model.embed_features(feats)
    assert out.shape == (5, 256) and feats.shape == (5, 1280)
    np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(halves.numpy(), out.numpy(), atol=1e-6)
    assert (feats >= 0).all()  # pooled ReLU6 activations: the pretrained trunk is loaded


def test_backbone_is_the_pretrained_lite0(model, sample_images):
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name("efficientnet-lite0", image_size=(128, 128))
    ref.load_state_dict(torch.load(default_weights_path(), weights_only=True))
    ref.eval()
    x = torch.from_numpy(preprocess(sample_images[:3], default_spec()))
    with torch.inference_mode():
        want = ref.extract_features(x).mean(dim=(2, 3))
        got = model.backbone_features(x)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)


def test_head_is_a_seeded_orthogonal_projection_keeping_geometry(model, sample_images):
    w = model.head.proj.weight.detach().double()
    np.testing.assert_allclose((w @ w.T).numpy(), np.eye(256), atol=1e-5)
    again = build_default_model(seed=0)
    other = build_default_model(seed=1)
    assert torch.equal(again.head.proj.weight, model.head.proj.weight)
    assert not torch.allclose(other.head.proj.weight, model.head.proj.weight)
    # The untrained embedding ranks pairs as the pooled pretrained features do.
    x = torch.from_numpy(preprocess(sample_images, default_spec()))
    with torch.inference_mode():
        feats = model.backbone_features(x)
        emb = model.embed_features(feats)
    f = torch.nn.functional.normalize(feats, dim=1)
    iu = np.triu_indices(len(sample_images), 1)
    before, after = (f @ f.T).numpy()[iu], (emb @ emb.T).numpy()[iu]
    assert np.corrcoef(before, after)[0, 1] > 0.9


def test_save_and_load_round_trip(tmp_path, model, sample_images):
    trained = build_default_model(dim=64, seed=5)
    with torch.no_grad():
        trained.head.bn.running_mean.add_(0.3)  # state a fresh build would not have
    save_model(trained, tmp_path)
    loaded = load_model(tmp_path)
    x = torch.from_numpy(preprocess(sample_images[:2], default_spec()))
    with torch.inference_mode():
        np.testing.assert_array_equal(loaded(x).numpy(), trained(x).numpy())
    assert loaded.dim == 64 and load_spec(tmp_path) == default_spec()
    with pytest.raises(ValueError, match="no saved model"):
        load_model(tmp_path / "missing")


# ----------------------------------------------------------------------------- repository
def test_config_round_trip_and_missing_preprocessing():
    spec = ModelSpec(name="dino", input_size=(224, 224), layout="NHWC", dtype="FP16")
    cfg = parse_config(render_config(spec, dim=384, backend="python"))
    assert spec_from_config(cfg) == spec
    assert cfg["max_batch_size"] == 64 and cfg["output"][0]["dims"] == ["384"]
    del cfg["parameters"]
    with pytest.raises(ValueError, match="preprocess_mean"):
        spec_from_config(cfg)


def test_write_model_repository_versions(tmp_path, model):
    model_dir = write_model_repository(tmp_path, model=model, max_batch_size=4, num_threads=1)
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == [
        "__pycache__", "model.json", "model.pt", "model.py"
    ]
    cfg = parse_config((model_dir / "config.pbtxt").read_text())
    assert cfg["backend"] == "python" and cfg["max_batch_size"] == 4
    assert cfg["instance_group"] == [{"count": 1, "kind": "KIND_CPU"}]
    assert "dynamic_batching" in cfg
    assert cfg["parameters"]["torch_num_threads"]["string_value"] == "1"
    assert spec_from_config(cfg) == default_spec()
    assert next_version(tmp_path) == 2
    with pytest.raises(FileExistsError):
        write_model_repository(tmp_path, model=model)
    with pytest.raises(ValueError, match="new model name"):
        write_model_repository(tmp_path, version=2, model=build_default_model(dim=32))
    assert next_version(tmp_path) == 2  # nothing half-written was left behind
    assert [p.name for p in model_dir.iterdir() if p.name.startswith(".")] == []


def test_a_new_version_keeps_the_served_configs_operator_settings(tmp_path, model):
    """The CPU writer shares write_config with the ONNX one: a served config keeps its
    instance groups, batching and thread count; the owned fields follow the writer."""
    model_dir = write_model_repository(tmp_path, model=model, max_batch_size=8, num_threads=2)
    path = model_dir / "config.pbtxt"
    first = parse_config(path.read_text())
    assert first["instance_group"] == [{"count": 1, "kind": "KIND_CPU"}]  # first write: defaults
    operator = (
        path.read_text()
        .replace("count: 1", "count: 2")
        .replace("dynamic_batching {", "dynamic_batching {\n  preferred_batch_size: [4, 8]\n"
                 "  max_queue_delay_microseconds: 300")
        + 'parameters { key: "operator_note" value { string_value: "keep me" } }\n'
    )
    path.write_text(operator)
    assert parse_config(operator)["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]

    write_model_repository(tmp_path, version=2, model=model, max_batch_size=4)
    cfg = parse_config(path.read_text())
    assert cfg["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    assert cfg["dynamic_batching"] == {"preferred_batch_size": [4],  # 8 > max_batch_size
                                       "max_queue_delay_microseconds": "300"}
    assert cfg["parameters"]["operator_note"]["string_value"] == "keep me"
    assert cfg["parameters"]["torch_num_threads"]["string_value"] == "2"  # not given: kept
    assert cfg["max_batch_size"] == 4  # owned
    assert spec_from_config(cfg) == default_spec()

    write_model_repository(tmp_path, version=3, model=model, max_batch_size=4, num_threads=1)
    cfg = parse_config(path.read_text())
    assert cfg["parameters"]["torch_num_threads"]["string_value"] == "1"  # given: written
    assert cfg["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    with pytest.raises(ValueError, match="not ModelConfig fields"):
        merge_config(path.read_text(), path.read_text(), also_owned=("instance_groups",))


def test_a_broken_served_config_is_a_clear_error_naming_the_file(tmp_path, model):
    """A hand edit Triton cannot parse either: the training export (and a direct write)
    raises ValueError naming the file (the launcher reports ValueErrors as 'error: ...'),
    not protobuf's bare ParseError, and writes no version."""
    from reidal.training_jobs import export_version

    model_dir = write_model_repository(tmp_path, model=model, max_batch_size=4)
    path = model_dir / "config.pbtxt"
    path.write_text(path.read_text() + "\ninstance_group [ { count: 2 kind: KIND_CPU }\n")
    before = path.read_text()
    with pytest.raises(ValueError, match="config.pbtxt"):
        export_version(model, tmp_path, "reidal_embedder")
    with pytest.raises(ValueError, match="config.pbtxt"):
        write_model_repository(tmp_path, version=2, model=model, max_batch_size=4)
    assert path.read_text() == before and not (model_dir / "2").exists()


def test_the_writer_owns_the_preprocess_parameters_and_also_owned_is_honoured(tmp_path, model):
    """Every ``preprocess_*`` parameter is the writer's (README, OWNED_FIELDS docs): one the
    new version no longer writes must not linger for clients; other parameters stay. An
    ``also_owned`` field comes from the new config, ``parameters`` included, and a name that
    is no ModelConfig field is refused even on a first write."""
    from reidal.embedding.triton_repo import write_config

    model_dir = write_model_repository(tmp_path, model=model, max_batch_size=4, num_threads=1)
    path = model_dir / "config.pbtxt"
    path.write_text(
        path.read_text()
        + 'parameters { key: "preprocess_crop" value { string_value: "center" } }\n'
        + 'parameters { key: "operator_note" value { string_value: "keep me" } }\n'
    )
    write_model_repository(tmp_path, version=2, model=model, max_batch_size=4)
    params = parse_config(path.read_text())["parameters"]
    assert "preprocess_crop" not in params
    assert params["operator_note"] == {"string_value": "keep me"}
    assert spec_from_config(parse_config(path.read_text())) == default_spec()

    fresh = render_config(default_spec(), dim=model.dim, backend="python", max_batch_size=4)
    merged = parse_config(merge_config(path.read_text(), fresh, also_owned=("parameters",)))
    assert merged["parameters"] == parse_config(fresh)["parameters"]
    with pytest.raises(ValueError, match="not ModelConfig fields"):
        write_config(tmp_path / "new", fresh, also_owned=("instance_groups",))
    assert not (tmp_path / "new" / "config.pbtxt").exists()


def test_config_writes_from_two_threads_never_leave_a_mixed_file(tmp_path):
    """Two writers of one model's config at once: every read sees one writer's whole file
    (a shared temporary name let one writer rename the other's half-written file)."""
    import threading

    from reidal.embedding.triton_repo import _atomic_write

    path = tmp_path / "config.pbtxt"
    texts = ["a" * 200_000 + "\n", "b" * 200_000 + "\n"]
    errors: list[BaseException] = []

    def write(text: str) -> None:
        try:
            for _ in range(40):
                _atomic_write(path, text)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    seen = set()
    while any(t.is_alive() for t in threads):
        if path.exists():
            seen.add(path.read_text())
    for t in threads:
        t.join()
    assert not errors
    assert seen <= set(texts) and path.read_text() in texts
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == ["config.pbtxt"]  # no temporaries left
