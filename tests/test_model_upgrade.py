"""Upgrading a server whose model repository holds the 128 px default written before the
default became 224 px (docs/deployment.md, "Upgrading the default model"): the old model
keeps serving its collections unchanged, the 224 px default goes in beside it under a new
name, and PromoteModel moves a collection to it without losing a vector or an answer.

Real parts throughout: ``serve()`` with the bundled Triton on a data directory, gRPC over
loopback through the Python client, the expected vectors from the plain torch model.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from _model_support import default_model_vectors, write_test_model
from _services_support import pictures

from reidal.embedding.spec import (
    DEFAULT_INPUT_SIZE,
    DEFAULT_MODEL_NAME,
    PREVIOUS_INPUT_SIZE,
)
from reidal.serve import serve
from reidal.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc
from reidal_client import Answer, ReidalClient

#: The name docs/deployment.md suggests for the 224 px default beside an old repository's.
NEW_NAME = "reidal_embedder_224"
SERVICES = ["embedding", "collections", "constraints", "training"]


def _served_size(address: str, name: str = "", version: str = "") -> tuple[int, int, bool]:
    with grpc.insecure_channel(address) as channel:
        info = embedding_pb2_grpc.EmbeddingServiceStub(channel).GetModel(
            embedding_pb2.GetModelRequest(model=common_pb2.ModelRef(name=name, version=version)),
            timeout=300)
    return info.input_height, info.input_width, info.is_default


@pytest.mark.slow
def test_an_old_128px_repository_keeps_serving_and_moves_to_the_224px_default(tmp_path):
    data = tmp_path / "data"
    # What `reidal serve` wrote into a new data directory before the default became 224 px.
    old_dir = write_test_model(data, input_size=PREVIOUS_INPUT_SIZE)
    old_config = (old_dir / "config.pbtxt").read_bytes()
    pics = pictures(n_individuals=3, per_individual=2)
    herd = [(p.image_id, p.png) for p in pics]

    # 1. The upgraded server on the old data directory: the model is the one it held.
    with serve(SERVICES, data_dir=data, health_interval_s=60) as srv, \
            ReidalClient(srv.address, timeout_s=300) as client:
        assert _served_size(srv.address) == (*PREVIOUS_INPUT_SIZE, True)
        client.create_collection("herd")
        added = client.add_images("herd", herd[:4])
        assert (added.embedded, str(added.model)) == (4, f"{DEFAULT_MODEL_NAME}:1")
        client.submit_answers("herd", [Answer(images=(pics[0].image_id, pics[1].image_id),
                                              label="SAME", annotator_id="t")])
        old = client.get_vectors("herd")
    np.testing.assert_allclose(old.vectors, default_model_vectors([p.png for p in pics[:4]], PREVIOUS_INPUT_SIZE),
                               atol=1e-4, rtol=0)
    assert (old_dir / "config.pbtxt").read_bytes() == old_config

    # 2. The same data directory served with the default under a new name: it is written
    # beside the old model, new collections get it, the old collection keeps its model.
    with serve(SERVICES, data_dir=data, health_interval_s=60, model_name=NEW_NAME) as srv, \
            ReidalClient(srv.address, timeout_s=300) as client:
        assert _served_size(srv.address) == (*DEFAULT_INPUT_SIZE, True)
        fresh = client.add_images(client.create_collection("fresh").collection_id, herd[:2])
        assert str(fresh.model) == f"{NEW_NAME}:1"
        more = client.add_images("herd", herd[4:])  # Triton loads the pinned old model
        assert (more.embedded, str(more.model)) == (2, f"{DEFAULT_MODEL_NAME}:1")
        assert _served_size(srv.address, DEFAULT_MODEL_NAME, "1")[:2] == PREVIOUS_INPUT_SIZE

        # 3. PromoteModel re-embeds the collection with the new model and switches it.
        client.promote_model("herd", "1", model=NEW_NAME)
        assert str(client.get_collection("herd").model) == f"{NEW_NAME}:1"
        moved = client.get_vectors("herd")
        kept = client.get_vectors("herd", model=f"{DEFAULT_MODEL_NAME}:1")
        answers = client.list_constraints("herd")
    ids = tuple(p.image_id for p in pics)
    assert moved.ids == kept.ids == ids
    np.testing.assert_allclose(moved.vectors, default_model_vectors([p.png for p in pics], DEFAULT_INPUT_SIZE),
                               atol=1e-4, rtol=0)
    # nothing lost: the 128 px vectors stay stored beside the new ones, the answer stays
    np.testing.assert_allclose(kept.vectors[:4], old.vectors, atol=0, rtol=0)
    assert len(answers) == 1
    assert (old_dir / "config.pbtxt").read_bytes() == old_config
    assert (data / "model_repository" / NEW_NAME / "1").is_dir()
