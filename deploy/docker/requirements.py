"""Print the image's Python requirements, one a line: reidal's dependencies as
pyproject.toml lists them, then what only the image adds (the PostgreSQL driver's binary
build, and onnx/onnxruntime for the model export the gpu overlay's Triton init container
runs: reidal.embedding.onnx_export). The Dockerfile installs this list and `make image`
fills its local wheelhouse from it, so both read it here.

    python deploy/docker/requirements.py [pyproject.toml]
"""

import sys
import tomllib

#: Installed into the image beside reidal's own dependencies (pinned: the image's releases).
IMAGE_ONLY = ["psycopg[binary]==3.3.9", "onnx==1.23.2", "onnxruntime==1.32.0"]


def requirements(pyproject: str) -> list[str]:
    """reidal's dependencies, then IMAGE_ONLY."""
    with open(pyproject, "rb") as f:
        return [*tomllib.load(f)["project"]["dependencies"], *IMAGE_ONLY]


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")))
