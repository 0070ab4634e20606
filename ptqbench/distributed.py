"""Data-parallel runs under PyTorch's own launcher, `torchrun`.

`torchrun --nproc-per-node N -m ptqbench run ...` starts N copies of the command and sets the
variables RANK, WORLD_SIZE and LOCAL_RANK (plus the rendezvous address); `DistributedContext.
from_env` reads them and joins the process group ("nccl" when the device is CUDA, "gloo" on the
CPU). A plain `python -m ptqbench run` (or torchrun with one process) is world size 1: no
process group, and every helper below is then the identity.

How the harness uses it: every rank evaluates a contiguous shard of the evaluation images
(`shard`), the main rank (rank 0) collects the per-image results (`gather_to_main`) and scores
them; calibration runs on the main rank only and its sealed model is sent to the other ranks
(`broadcast_from_main`).

Waiting: while rank 0 calibrates (minutes to hours for reconstruction methods on full-size
SAM) the other ranks wait inside a collective, so the collective timeout is long
(`COLLECTIVE_TIMEOUT`). A rank that dies does not leave the others hanging: torchrun stops
every worker of the job when one exits with an error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch

from ptqbench.errors import ConfigError

T = TypeVar("T")

COLLECTIVE_TIMEOUT = timedelta(hours=72)
"""How long a rank may wait in one collective (the other ranks wait while rank 0 calibrates)."""


def launched_rank() -> int:
    """This process's global rank as set by torchrun (0 when not launched by it)."""
    return int(os.environ.get("RANK", "0"))


def shard_of(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The contiguous block of `items` that `rank` of `world_size` handles.

    Blocks are in rank order and differ in length by at most one (the first len % world_size
    ranks get one more); concatenating the blocks of ranks 0..world_size-1 gives `items` back.
    Contiguous rather than strided blocks keep each rank's images in file order (readers and
    caches see sequential files); the load balance is the same on average.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return list(items[start:stop])


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a (possibly one-process) data-parallel run.

    rank: global rank 0..world_size-1; local_rank: rank on this machine (picks the GPU);
    device: the device this rank computes on (cuda:local_rank when CUDA is used).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: calibrates, scores, writes the store and the leaderboards, logs at INFO."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: torch.device, timeout: timedelta = COLLECTIVE_TIMEOUT) -> DistributedContext:
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group.

        device: the device the run asked for; with world size > 1 a CUDA device becomes
        cuda:LOCAL_RANK (one GPU per process) and the backend is "nccl", otherwise "gloo".
        Without torchrun's variables (or with world size 1) no process group is created.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls(device=device)
        rank, local_rank = launched_rank(), int(os.environ.get("LOCAL_RANK", "0"))
        import torch.distributed as dist

        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"local rank {local_rank} has no GPU: this machine has "
                                  f"{torch.cuda.device_count()}; start at most that many processes per node")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, device=device)

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous block of `items` (see `shard_of`)."""
        return shard_of(items, self.rank, self.world_size)

    def gather_to_main(self, objects: list[T]) -> list[T]:
        """Every rank's list of picklable `objects`, concatenated in rank order, on the main rank.

        Other ranks get an empty list. With contiguous shards the result is in the original order.
        """
        if not self.is_distributed:
            return list(objects)
        import torch.distributed as dist

        parts: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(list(objects), parts, dst=0)
        if parts is None:
            return []
        return [item for part in parts for item in part]

    def broadcast_from_main(self, obj: T | None) -> T:
        """The main rank's picklable `obj` on every rank (what other ranks pass is ignored).

        Tensors inside `obj` should be on the CPU: they are unpickled on the device they had.
        """
        if not self.is_distributed:
            return obj
        import torch.distributed as dist

        holder = [obj if self.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.is_distributed:
            import torch.distributed as dist

            dist.barrier()

    def main_first(self, work: Callable[[], T]) -> T:
        """Run `work` on the main rank, then (after a barrier) on the others: for steps that fill
        a cache or a folder every rank then reads, such as a checkpoint download."""
        if self.is_main:
            result = work()
            self.barrier()
            return result
        self.barrier()
        return work()

    def destroy(self) -> None:
        """Leave the process group (a no-op for one process)."""
        if self.is_distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
