"""Tensor parallelism's process group: the one communicator the parallel layers call.

Every rank runs the same model code on its shard of the weights; the layers meet at three
collectives (all-reduce after a row-parallel matmul, all-gather of the vocabulary-parallel
logits, broadcast) which go through `torch.distributed` (gloo on CPU, NCCL on CUDA). A
process that never joined a group (tensor_parallel_size=1) gets a communicator of one rank
whose collectives return their input untouched.
"""

from __future__ import annotations

import datetime
import logging
import time

import torch
import torch.distributed as dist

logger = logging.getLogger("sluice")

# A rank that waits longer than this on its peers fails instead of hanging (the executor
# notices a dead rank within a second; this bounds a live but stuck one).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)


class Communicator:
    """all_reduce / all_gather / broadcast over one group, timing what they cost."""

    def __init__(self, rank: int = 0, world_size: int = 1, group: dist.ProcessGroup | None = None) -> None:
        self.rank, self.world_size, self.group = rank, world_size, group
        self.seconds = 0.0  # time spent inside collectives, for the benchmark's per-step figure
        self.calls = 0

    @property
    def is_driver(self) -> bool:
        """The rank whose step output the executor returns."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks (in place)."""
        if self.world_size == 1:
            return x
        start = time.perf_counter()
        dist.all_reduce(x, group=self.group)
        self._count(start)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x, concatenated along dim in rank order."""
        if self.world_size == 1:
            return x
        start = time.perf_counter()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        self._count(start)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank src's x on every rank (in place)."""
        if self.world_size == 1:
            return x
        start = time.perf_counter()
        dist.broadcast(x, src=src, group=self.group)
        self._count(start)
        return x

    def _count(self, start: float) -> None:
        self.seconds += time.perf_counter() - start
        self.calls += 1

    def take_stats(self) -> dict:
        """Collective time and calls since the last call (then reset)."""
        stats = {"seconds": self.seconds, "calls": self.calls}
        self.seconds, self.calls = 0.0, 0
        return stats


_TP = Communicator()


def get_tp_group() -> Communicator:
    """This process's tensor-parallel communicator (one rank unless init_tensor_parallel ran)."""
    return _TP


def init_tensor_parallel(rank: int, world_size: int, init_method: str, device: str) -> Communicator:
    """Join the ranks' process group (init_method: tcp://host:port of rank 0)."""
    global _TP
    if world_size > 1:
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=COLLECTIVE_TIMEOUT)
        logger.info("tensor-parallel rank %d of %d joined (%s, %s)", rank, world_size, backend, init_method)
    _TP = Communicator(rank, world_size, dist.group.WORLD if world_size > 1 else None)
    return _TP


def destroy_tensor_parallel() -> None:
    global _TP
    if dist.is_initialized():
        dist.destroy_process_group()
    _TP = Communicator()
