"""Data parallelism under torchrun: process-group set-up and the few collectives the trainer uses.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (plus MASTER_ADDR/PORT); when they are present
the trainer joins (or creates) the default process group: NCCL on CUDA, gloo on CPU. Every
process builds the same PK batch stream and trains on its own slice of each batch; the hybrid
memory is replicated, so every process updates it with the embeddings of the whole batch
(all-gathered), and the memories stay identical. Only rank 0 asks the annotator, writes
checkpoints and calls ``on_epoch``; the answers are broadcast. A resumed job reads the
checkpoint on every process, so ``checkpoint_dir`` must be on a file system they share.

Tested here only with a single gloo process (world size 1): no multi-GPU machine was
available, so true multi-process runs are untested.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, local rank, and who owns the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group is in use (even of one process)."""
        return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def setup(device_type: str) -> DistContext:
    """Join the torchrun process group, creating it when needed; single process otherwise."""
    if not launched_by_torchrun():
        return DistContext()
    if not dist.is_available():  # pragma: no cover - torch built without distributed
        raise RuntimeError("launched by torchrun but torch.distributed is not available")
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        created = True
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]),
                       created)


def teardown(ctx: DistContext) -> None:
    if ctx.created_group and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_rows(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate every process's rows (sizes may differ), in rank order."""
    if not ctx.active or ctx.world_size == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, n)
    top = int(max(int(s) for s in sizes))
    padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)])


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not ctx.active or ctx.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_flag(flag: bool, device: torch.device, ctx: DistContext) -> bool:
    """True on every process when it is True on any (e.g. a cancel request)."""
    if not ctx.active or ctx.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
