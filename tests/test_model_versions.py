"""Models per collection, over real gRPC with the real Triton: a training job's version
serves its own collection only, the default version never moves with training, and a
version a collection pins is loaded again when Triton has dropped it (issue 15, findings
2 and 10)."""

from __future__ import annotations

import grpc
from _services_support import Stubs, create_and_fill, ingest_message, pictures, rpc_error
from test_training_service import (  # noqa: F401 - fixtures used by name
    TINY,
    _repository_kept,
    _restore_triton_index,
    _version_ready,
    _watch_to_end,
    server,
)

from reidal.embedding.triton_repo import (
    CONFIG_FILE,
    P_DEFAULT_VERSION,
    default_version,
    name_pretrained_default,
    read_config,
    write_model_repository,
)
from reidal.v1 import (
    collections_pb2,
    common_pb2,
    embedding_pb2,
    embedding_pb2_grpc,
    training_pb2,
)


def _version_of(stubs: Stubs, cid: str) -> str:
    return stubs.collections.GetCollection(
        collections_pb2.GetCollectionRequest(collection_id=cid), timeout=30).model.version


def _wait_operation(stubs: Stubs, operation_id: str) -> collections_pb2.Operation:
    ops = list(stubs.collections.WatchOperation(
        collections_pb2.GetOperationRequest(operation_id=operation_id), timeout=180))
    assert ops[-1].state == collections_pb2.OPERATION_STATE_SUCCEEDED, ops[-1].error_message
    return ops[-1]


def _embedding(stubs: Stubs) -> embedding_pb2_grpc.EmbeddingServiceStub:
    return embedding_pb2_grpc.EmbeddingServiceStub(stubs.channel)


def _embed(stubs: Stubs, pic, version: str = "") -> embedding_pb2.EmbedResponse:
    return _embedding(stubs).Embed(embedding_pb2.EmbedRequest(
        model=common_pb2.ModelRef(version=version),
        images=[common_pb2.Image(id=pic.image_id, data=pic.png)]), timeout=300)


def test_training_one_collection_changes_no_other(server, triton):  # noqa: F811
    """Train on B and promote B: A keeps its version for new images and for an
    EmbedCollection naming no version, a new collection pins the default version, and a
    request naming no version gets the default, not B's model."""
    srv, stubs, training = server
    pics = pictures()
    create_and_fill(stubs, "a", pics[:12])
    create_and_fill(stubs, "b", pics[12:28])
    assert _version_of(stubs, "a") == _version_of(stubs, "b") == "1"

    job = training.StartTraining(training_pb2.StartTrainingRequest(
        collection_id="b", config=training_pb2.TrainingConfig(**TINY)), timeout=30)
    final = _watch_to_end(training, job.job_id)[-1]
    assert final.state == training_pb2.JOB_STATE_SUCCEEDED, final.error_message
    new = final.model.version
    assert new != "1"
    op = training.PromoteModel(training_pb2.PromoteModelRequest(
        collection_id="b", model=common_pb2.ModelRef(version=new)), timeout=30)
    _wait_operation(stubs, op.operation_id)
    assert _version_of(stubs, "b") == new
    # the job's load kept the version collection a pins, and the default
    assert _version_ready(triton, "1") and _version_ready(triton, new)

    added = stubs.collections.AddImages(iter([ingest_message("a", pics[28:30])]), timeout=120)
    assert added.embedded == 2 and added.model.version == "1"
    assert _version_of(stubs, "a") == "1"
    op = stubs.collections.EmbedCollection(
        collections_pb2.EmbedCollectionRequest(collection_id="a"), timeout=30)
    assert _wait_operation(stubs, op.operation_id).model.version == "1"
    assert _version_of(stubs, "a") == "1"

    fresh = create_and_fill(stubs, "c", pics[30:34])
    assert fresh.model.version == "1" and _version_of(stubs, "c") == "1"
    assert _embed(stubs, pics[0]).model_version == "1"
    assert _embed(stubs, pics[0], new).model_version == new  # asked for by name: served
    info = _embedding(stubs).GetModel(embedding_pb2.GetModelRequest(), timeout=30)
    assert info.version == "1"
    assert default_version(triton.repo, triton.model_name) == "1"


def test_pinned_version_triton_dropped_is_loaded_on_demand(server, triton):  # noqa: F811
    """The state `make demo` met on its second run: the model repository holds a newer
    version, Triton (restarted) loaded only its config's newest ones, and a collection
    pins version 1. Ingest loads version 1 again, keeping the other loaded."""
    import tritonclient.grpc as grpcclient

    from reidal.embedding.model import build_default_model
    from reidal.embedding.triton_versions import load_versions

    _srv, stubs, _training = server
    write_model_repository(
        triton.repo, model_name=triton.model_name, version=2, spec=triton.spec,
        model=build_default_model(seed=2, input_size=triton.spec.input_size),
        max_batch_size=triton.max_batch_size)
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:  # what a restart leaves when version 2 is the newest of the config's policy
        assert load_versions(client, triton.model_name, ["2"], keep_ready=False) == {"2"}
    finally:
        client.close()
    assert not _version_ready(triton, "1")

    pics = pictures()[:8]
    added = create_and_fill(stubs, "demo", pics,
                            model=common_pb2.ModelRef(name=triton.model_name, version="1"))
    assert added.embedded == len(pics) and added.model.version == "1"
    assert _version_ready(triton, "1") and _version_ready(triton, "2")
    # a collection that pins none takes the default version, which is still 1
    assert create_and_fill(stubs, "new", pics[:4]).model.version == "1"

    # a version the repository does not have stays NOT_FOUND, and unloads nothing
    err = rpc_error(_embedding(stubs).Embed, embedding_pb2.EmbedRequest(
        model=common_pb2.ModelRef(version="9"),
        images=[common_pb2.Image(id="x", data=pics[0].png)]), timeout=300)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "'9'" in err.details()
    assert _version_ready(triton, "1") and _version_ready(triton, "2")


def test_writers_name_the_default_version(tmp_path):
    """The first write names its version; later writes keep it (an operator's edit too);
    a folder written before the parameter existed takes its newest version then."""
    from reidal.embedding.model import build_default_model

    def named(repo) -> str:
        params = read_config(repo / "m" / CONFIG_FILE).get("parameters") or {}
        return params.get(P_DEFAULT_VERSION, {}).get("string_value", "")

    model = build_default_model(seed=0, dim=8)
    repo = tmp_path / "r"
    write_model_repository(repo, model_name="m", version=1, model=model)
    write_model_repository(repo, model_name="m", version=2, model=model)
    assert named(repo) == "1" and default_version(repo, "m") == "1"

    config = repo / "m" / CONFIG_FILE
    config.write_text(config.read_text().replace('string_value: "1"', 'string_value: "2"'))
    write_model_repository(repo, model_name="m", version=3, model=model)
    assert named(repo) == "2"

    old = tmp_path / "old"  # written before reidal named a default: Triton's newest was it
    write_model_repository(old, model_name="m", version=1, model=model)
    write_model_repository(old, model_name="m", version=2, model=model)
    text = (old / "m" / CONFIG_FILE).read_text()
    start = text.index("parameters {\n  key: \"reidal_default_version\"")
    (old / "m" / CONFIG_FILE).write_text(text[:start] + text[text.index("}\n}\n", start) + 4:])
    assert named(old) == "" and default_version(old, "m") == "2"
    before = (old / "m" / CONFIG_FILE).read_text()
    write_model_repository(old, model_name="m", version=3, model=model)
    assert named(old) == "2"
    # reidal serve's own repository: version 1 is the pretrained model it wrote
    (old / "m" / CONFIG_FILE).write_text(before)
    name_pretrained_default(old, "m")
    assert named(old) == "1"
    name_pretrained_default(old, "m")  # named already: left as it is
    assert named(old) == "1"

