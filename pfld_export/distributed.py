"""Training on several processes (one per GPU, or CPU processes) under `torchrun`.

`torchrun` (torch.distributed.run) starts the processes and sets WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; `pfld-export train` reads them here and needs no option of its own.
Decisions, made once here:

* `--batch` is the GLOBAL batch: every optimizer step sees `batch` faces in all, `batch / world`
  on each process, and DDP averages the processes' gradients, so the step is the mean over the
  global batch as in one process. The same `--lr` therefore means the same thing on any number
  of processes; nothing is scaled behind the user's back (to grow the batch, scale --lr yourself).
* The global batches are the one-process run's (`train.epoch_batches`, a pure function of seed
  and epoch); process r takes faces r, r + world, ... of each (`ShardedBatches`). Augmentation is
  a pure function of (seed, epoch, index) too, so every face is cropped exactly as in one process.
* BatchNorm normalises with each process's own shard (SyncBatchNorm exists only for GPUs), and
  DDP copies process 0's running statistics to the others before every forward. A run on N
  processes is therefore the one-process run whose every batch is normalised in N shards.
* Torch randomness after the weights are built (--int8-noise draws) comes from a per-process
  stream re-seeded each epoch from (seed, rank, epoch), so a resumed run draws what the
  uninterrupted one drew without storing every process's RNG state.
* Process 0 alone writes files and reports progress; validation runs on process 0 and its
  figure is broadcast, so every process takes the same "best" decision.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from .errors import UsageError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank among world_size processes, local_rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """More than one process: collectives and DDP are needed."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that writes files and reports progress."""
        return self.rank == 0


def context_from_env(env: Mapping[str, str] | None = None) -> DistContext:
    """The DistContext torchrun's environment describes; one plain process without it."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return DistContext()
    try:
        world, rank, local = int(env["WORLD_SIZE"]), int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UsageError(
            f"WORLD_SIZE={env.get('WORLD_SIZE')!r} RANK={env.get('RANK')!r} LOCAL_RANK={env.get('LOCAL_RANK')!r} are not "
            "integers; launch with torchrun, which sets them, or unset them for one process"
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UsageError(f"RANK={rank} / WORLD_SIZE={world} is not a valid process; launch with torchrun or unset them")
    return DistContext(rank=rank, world_size=world, local_rank=local)


def process_device(device: torch.device, ctx: DistContext) -> torch.device:
    """One GPU per process: process `local_rank` on a machine trains on cuda:`local_rank`."""
    if device.type != "cuda" or not ctx.active:
        return device
    if ctx.local_rank >= torch.cuda.device_count():
        raise UsageError(
            f"process {ctx.rank} has LOCAL_RANK {ctx.local_rank} but this machine has {torch.cuda.device_count()} GPU(s); "
            "pass --nproc_per_node at most the GPU count, or --device cpu"
        )
    torch.cuda.set_device(ctx.local_rank)
    return torch.device("cuda", ctx.local_rank)


@contextmanager
def process_group(ctx: DistContext, device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the block (NCCL on GPUs, gloo on CPU), then leave it.

    A group someone else set up (a caller that initialised torch.distributed) is used as it is.
    """
    import torch.distributed as dist

    if not ctx.active or dist.is_initialized():
        yield
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE={ctx.world_size} but {' and '.join(missing)} unset; launch with torchrun, which sets them")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ctx.rank, world_size=ctx.world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_global_batch(batch: int, ctx: DistContext) -> None:
    """The global batch must split evenly, at least 2 faces a process (BatchNorm on a 1x1 feature)."""
    if not ctx.active:
        return
    if batch % ctx.world_size or batch // ctx.world_size < 2:
        good = max(2, -(-batch // ctx.world_size)) * ctx.world_size
        raise UsageError(
            f"--batch {batch} is the global batch and must split evenly into at least 2 faces on each of "
            f"{ctx.world_size} processes; use --batch {good} (and scale --lr if you change the batch)"
        )


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """The torch seed of process `rank` in `epoch`: distinct per process, reproducible on resume."""
    return int(np.random.SeedSequence([seed, rank, epoch, 0xDD9]).generate_state(1)[0])


class ShardedBatches(DistributedSampler):  # type: ignore[type-arg]
    """A batch sampler for `FaceDataset`: this process's share of each global batch.

    DistributedSampler's contract (`set_epoch` before each epoch, disjoint shards across
    processes), but over the one-process run's global batches: process r gets faces
    r, r + world, ... of each, as `(epoch, index)` keys. A trailing global batch too small to give
    every process 2 faces is dropped on all of them (every process must take the same steps).
    """

    def __init__(self, batches: Callable[[int], list[list[int]]], n: int, ctx: DistContext, epoch: int = 0) -> None:
        super().__init__(range(n), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=False)
        self.batches = batches
        self.set_epoch(epoch)

    def _global(self) -> list[list[int]]:
        return [b for b in self.batches(self.epoch) if len(b) >= 2 * self.num_replicas]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:  # type: ignore[override]
        e = self.epoch
        return iter([[(e, i) for i in b[self.rank :: self.num_replicas]] for b in self._global()])

    def __len__(self) -> int:
        return len(self._global())


def wrap(module: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """`module` under DDP when several processes train (gradients averaged in backward)."""
    if not ctx.active:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # static_graph: the same parameters take part in every step, and some never do (PFLD's bn8
    # without head_bn), which DDP's default refuses at the second step.
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True)


def _collective_device(device: torch.device) -> torch.device:
    # NCCL reduces GPU tensors only; gloo CPU tensors.
    return device if device.type == "cuda" else torch.device("cpu")


def all_sum(values: Sequence[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Element-wise sum over all processes (the values themselves with one process)."""
    if not ctx.active:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device(device))
    dist.all_reduce(t)
    return [float(v) for v in t.cpu()]


def from_main(value: Any, ctx: DistContext) -> Any:
    """Process 0's `value` (any picklable object) on every process."""
    if not ctx.active:
        return value
    import torch.distributed as dist

    box = [value if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


__all__ = [
    "DistContext", "context_from_env", "process_device", "process_group", "check_global_batch", "rank_seed",
    "ShardedBatches", "wrap", "all_sum", "from_main",
]
