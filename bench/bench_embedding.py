"""Embedding throughput: the default model through a real Triton (tritonclient gRPC) vs plain torch.

    .venv/bin/python bench/bench_embedding.py [--batch-sizes 1 8 32] [--image-size 128]
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

Target (issue): reidal+Triton >= 0.8x plain torch at batch 32 on CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def bench_service(batch: np.ndarray) -> float | None:
    """HOOK: reidal's gRPC embedding service.

    When the embedding service exists, measure images/s through it here (its client call on
    the same preprocessed batch, or on encoded images) and return it; main() prints it beside
    the direct Triton number. Returns None until then.
    """
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)

    import torch

    from reidal.embedding.model import build_default_model
    from reidal.embedding.spec import default_spec
    from reidal.embedding.triton_client import TritonEmbedder
    from reidal.embedding.triton_repo import write_model_repository
    from reidal.embedding.triton_server import TritonServer

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    size = (args.image_size, args.image_size)
    spec = replace(default_spec(), input_size=size)
    model = build_default_model(input_size=size)
    rng = np.random.default_rng(0)
    max_bs = max(args.batch_sizes)
    data = rng.standard_normal((max_bs, 3, *size)).astype(np.float32)

    with tempfile.TemporaryDirectory(prefix="reidal-bench-") as tmp:
        write_model_repository(
            Path(tmp) / "repo", model=model, spec=spec, num_threads=args.threads,
            max_batch_size=max(64, max_bs),
        )
        t0 = time.perf_counter()
        with TritonServer(Path(tmp) / "repo", workdir=Path(tmp) / "server") as server:
            started = time.perf_counter() - t0
            client = TritonEmbedder(server.grpc_url, spec, timeout_s=120)
            print(
                f"# Triton {server.grpc_url} ready in {started:.1f} s; threads={args.threads} "
                f"(torch here and torch_num_threads in Triton), image {size[0]}x{size[1]}, "
                f"{args.rounds} rounds x {args.seconds:g} s, median"
            )
            print(f"{'batch':>5} {'torch img/s':>12} {'triton img/s':>13} {'ratio':>6} {'service':>8}")
            for bs in args.batch_sizes:
                x = data[:bs]
                xt = torch.from_numpy(x)

                def run_torch(xt: torch.Tensor = xt) -> object:
                    with torch.inference_mode():
                        return model(xt)

                def run_triton(x: np.ndarray = x) -> object:
                    return client.embed(x)

                # Same vectors first: the comparison is only meaningful for the same model.
                diff = np.abs(client.embed(x).vectors - run_torch().numpy()).max()
                assert diff < 1e-4, f"Triton and torch disagree by {diff}"
                t_torch, t_triton = [], []
                for _ in range(args.rounds):
                    t_torch.append(images_per_second(run_torch, bs, args.seconds))
                    t_triton.append(images_per_second(run_triton, bs, args.seconds))
                a, b = statistics.median(t_torch), statistics.median(t_triton)
                svc = bench_service(x)
                svc_text = f"{svc:8.1f}" if svc is not None else f"{'hook':>8}"
                print(f"{bs:>5} {a:12.1f} {b:13.1f} {b / a:6.2f} {svc_text}", flush=True)
            client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
