"""The input size of the model the tests serve when they need *some* model, not the default.

The default model (:func:`reidal.embedding.spec.default_spec`) takes 224 px images, about
3.5x the embedding time of 128 px on CPU. Tests that only need a served model embed at
:data:`TEST_INPUT_SIZE` (the previous default) to keep ``make test`` short; the default
itself goes end to end through the real Triton in tests/test_serve.py (a new repository)
and tests/test_model_upgrade.py (an old repository moved to it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reidal.embedding.spec import DEFAULT_MODEL_NAME, PREVIOUS_INPUT_SIZE, default_spec

#: (height, width) of the tests' served model: the 128 px of repositories written before
#: the default became 224 px.
TEST_INPUT_SIZE: tuple[int, int] = PREVIOUS_INPUT_SIZE


def write_test_model(data_dir: str | Path, model_name: str = DEFAULT_MODEL_NAME,
                     input_size: tuple[int, int] = TEST_INPUT_SIZE) -> Path:
    """Write the default model at ``input_size`` into ``data_dir/model_repository``, where
    ``reidal serve`` (bundled Triton) looks: it then serves that model instead of writing
    the default (:func:`reidal.embedding.triton_repo.ensure_default_model`). Returns the
    model's folder."""
    from reidal.embedding.triton_repo import write_model_repository

    return write_model_repository(Path(data_dir) / "model_repository", model_name=model_name,
                                  spec=default_spec(model_name, input_size))


def default_model_vectors(pngs: list[bytes], input_size: tuple[int, int]) -> np.ndarray:
    """What the default model, as reidal writes it (seed 0), gives for encoded images at
    ``input_size``, computed in plain torch in this process: the expected served vectors."""
    import io

    import torch
    from PIL import Image

    from reidal.embedding.model import build_default_model
    from reidal.embedding.preprocess import preprocess

    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in pngs]
    batch = torch.from_numpy(preprocess(images, default_spec(input_size=input_size)))
    with torch.inference_mode():
        return build_default_model(input_size=input_size)(batch).numpy()
