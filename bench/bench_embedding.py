"""Embedding throughput: the default model through a real Triton (tritonclient gRPC) vs plain torch.

    .venv/bin/python bench/bench_embedding.py [--batch-sizes 1 8 32] [--image-size 224]
                                              [--threads N] [--rounds 5] [--seconds 2]

Same model object, same preprocessed input, same image size. Fairness:
* Threads: plain torch runs with ``torch.set_num_threads(N)`` in this process, and the Triton
  model instance with ``torch_num_threads=N`` in its config (one instance, so N threads in
  all). N defaults to the CPUs this process may use. Interop threads are 1 on both sides.
* Both run on the same machine, and the Triton side includes everything a caller pays:
  serialising the tensor, gRPC over loopback, the python backend's shared-memory copies and
  the L2 re-normalisation in the client, all on the same cores.
* Noise (the dev machines are shared): the two are measured in alternating blocks of
  ``--seconds`` each, ``--rounds`` times per batch size, and the median of each is reported,
  so a burst of foreign load hits both sides alike. Triton sits idle while torch runs.

The last columns measure the product path end to end: JPEG bytes sent to reidal's gRPC
EmbeddingService (its own process, `reidal serve --service embedding`, which decodes,
preprocesses and batches them to Triton), beside plain
torch doing the same work in process (decode + preprocess + forward) on the same JPEGs.

Target (issue): reidal+Triton >= 0.8x plain torch at batch 32 on CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np


def images_per_second(fn: Callable[[], object], batch: int, seconds: float) -> float:
    """Call ``fn`` (one batch) repeatedly for about ``seconds``; images per second."""
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= 2:
            return n * batch / elapsed


def encoded_images(n: int, size: int) -> list[bytes]:
    """``n`` JPEG-encoded images of the synthetic re-ID generator, as a client would send."""
    import io

    from reidal.data.synthetic_images import SyntheticConfig, iter_images

    out: list[bytes] = []
    for _, _, img in iter_images(SyntheticConfig(image_size=size, n_individuals=max(4, n // 4))):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
        if len(out) == n:
            return out
    raise ValueError(f"the generator made fewer than {n} images")


def torch_decode_forward(model: object, spec: object, blobs: list[bytes]) -> object:
    """Plain torch doing what a caller of the EmbeddingService gets done: decode the
    encoded images, preprocess them, one forward pass (the baseline of the product path)."""
    import io

    import torch
    from PIL import Image

    from reidal.embedding.preprocess import preprocess

    imgs = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    with torch.inference_mode():
        return model(torch.from_numpy(preprocess(imgs, spec)))  # type: ignore[operator]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    from reidal.embedding.spec import DEFAULT_INPUT_SIZE

    parser.add_argument("--image-size", type=int, default=DEFAULT_INPUT_SIZE[0],
                        help="the model's square input size (default: the default model's, "
                             "%(default)s)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)


    import grpc
    import torch

    from reidal.embedding.model import build_default_model
    from reidal.embedding.spec import default_spec
    from reidal.embedding.triton_client import TritonEmbedder
    from reidal.embedding.triton_repo import write_model_repository
    from reidal.embedding.triton_server import TritonServer, free_ports
    from reidal.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    size = (args.image_size, args.image_size)
    spec = replace(default_spec(), input_size=size)
    model = build_default_model(input_size=size)
    rng = np.random.default_rng(0)
    max_bs = max(args.batch_sizes)
    data = rng.standard_normal((max_bs, 3, *size)).astype(np.float32)
    jpegs = encoded_images(max_bs, args.image_size)

    with tempfile.TemporaryDirectory(prefix="reidal-bench-") as tmp:
        write_model_repository(
            Path(tmp) / "repo", model=model, spec=spec, num_threads=args.threads,
            max_batch_size=max(64, max_bs),
        )
        t0 = time.perf_counter()
        with TritonServer(Path(tmp) / "repo", workdir=Path(tmp) / "server") as server:
            started = time.perf_counter() - t0
            client = TritonEmbedder(server.grpc_url, spec, timeout_s=120)
            # reidal's embedding service runs as its own process, as deployed (`reidal serve
            # --service embedding`): in this process it would share the GIL with the client.
            port = free_ports(1)[0]
            service = subprocess.Popen(
                [sys.executable, "-m", "reidal.cli", "serve", "--service", "embedding",
                 "--triton-url", server.grpc_url, "--port", str(port), "--log-level", "WARNING"],
                stdout=subprocess.DEVNULL)
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            grpc.channel_ready_future(channel).result(timeout=60)
            stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            print(
                f"# Triton {server.grpc_url} ready in {started:.1f} s; threads={args.threads} "
                f"(torch here and torch_num_threads in Triton), image {size[0]}x{size[1]}, "
                f"{args.rounds} rounds x {args.seconds:g} s, median"
            )
            print(f"{'batch':>5} {'torch img/s':>12} {'triton img/s':>13} {'ratio':>6} "
                  f"{'torch+decode':>13} {'reidal img/s':>13} {'ratio':>6}")
            for bs in args.batch_sizes:
                x = data[:bs]
                xt = torch.from_numpy(x)

                def run_torch(xt: torch.Tensor = xt) -> object:
                    with torch.inference_mode():
                        return model(xt)

                def run_triton(x: np.ndarray = x) -> object:
                    return client.embed(x)

                request = embedding_pb2.EmbedRequest(images=[
                    common_pb2.Image(id=f"img{i}", data=b) for i, b in enumerate(jpegs[:bs])])

                def run_torch_full(blobs: list[bytes] = jpegs[:bs]) -> object:
                    return torch_decode_forward(model, spec, blobs)

                def run_service(request: embedding_pb2.EmbedRequest = request) -> object:
                    return stub.Embed(request, timeout=120)

                # Same vectors first: the comparison is only meaningful for the same model.
                diff = np.abs(client.embed(x).vectors - run_torch().numpy()).max()
                assert diff < 1e-4, f"Triton and torch disagree by {diff}"
                got = np.array([e.vector for e in run_service().embeddings], dtype=np.float32)
                diff = np.abs(got - run_torch_full().numpy()).max()
                assert diff < 1e-4, f"reidal's service and torch disagree by {diff}"
                runs: dict[str, list[float]] = {"torch": [], "triton": [], "full": [], "svc": []}
                for _ in range(args.rounds):
                    for key, fn in (("torch", run_torch), ("triton", run_triton),
                                    ("full", run_torch_full), ("svc", run_service)):
                        runs[key].append(images_per_second(fn, bs, args.seconds))
                a, b, c, d = (statistics.median(runs[k]) for k in ("torch", "triton", "full", "svc"))
                print(f"{bs:>5} {a:12.1f} {b:13.1f} {b / a:6.2f} {c:13.1f} {d:13.1f} {d / c:6.2f}",
                      flush=True)
            channel.close()
            service.terminate()
            service.wait(timeout=30)
            client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
