"""The ranks' process group: the one communicator tensor-parallel layers call, and the pipeline
stage that tells a rank its layers and its neighbours. (`kv_transfer/` moves KV between engines.)

Every rank runs the same model code on its shard of the weights; the layers meet at three
collectives (all-reduce after a row-parallel matmul, all-gather of the vocabulary-parallel
logits, broadcast) which go through `torch.distributed` (gloo on CPU, NCCL on CUDA). A
process that never joined a group (tensor_parallel_size=1) gets a communicator of one rank
whose collectives return their input untouched.
"""

from __future__ import annotations

import datetime
import logging
import re
import time

import torch
import torch.distributed as dist

logger = logging.getLogger("sluice")

# A rank that waits longer than this on its peers fails instead of hanging (the executor
# notices a dead rank within a second; this bounds a live but stuck one).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)
# a decoder layer's tensor or module, by its path (model.layers.3.mlp..., PEFT's
# base_model.model.model.layers.3.self_attn.q_proj): its index
_DECODER_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


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

    def all_reduce(self, x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """Sum (or op) of x over the ranks (in place)."""
        if self.world_size == 1:
            return x
        start = time.perf_counter()
        dist.all_reduce(x, op=op, group=self.group)
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


class PipelineStage:
    """This rank's stage of the pipeline: which decoder layers it runs, and the ranks it receives
    hidden states from and sends them to (the same tensor-parallel rank of the stages around it)."""

    def __init__(self, stage: int = 0, num_stages: int = 1, prev_rank: int | None = None,
                 next_rank: int | None = None) -> None:
        self.stage, self.num_stages, self.prev_rank, self.next_rank = stage, num_stages, prev_rank, next_rank

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def holds(self, name: str, num_layers: int) -> bool:
        """Whether the tensor or module at this path is this stage's to hold (or refuse): everything
        but another stage's decoder layer (a layer the model lacks is every stage's to refuse)."""
        layer = _DECODER_LAYER.search(name)
        if layer is None or self.num_stages == 1 or not 0 <= int(layer[1]) < num_layers:
            return True
        start, end = self.layer_range(num_layers)
        return start <= int(layer[1]) < end

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """[start, end) of this stage's layers: equal shares, the first stages one more each when
        the layers do not divide."""
        share, extra = divmod(num_layers, self.num_stages)
        start = self.stage * share + min(self.stage, extra)
        return start, start + share + (self.stage < extra)

    def send(self, x: torch.Tensor) -> None:
        """This stage's output hidden states to the next stage."""
        dist.send(x.contiguous(), self.next_rank)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The previous stage's output hidden states."""
        x = torch.empty(shape, dtype=dtype)
        dist.recv(x, self.prev_rank)
        return x


_TP = Communicator()
_PP = PipelineStage()


def get_tp_group() -> Communicator:
    """This process's tensor-parallel communicator (one rank unless init_parallel ran)."""
    return _TP


def get_pp_group() -> PipelineStage:
    """This process's pipeline stage (the only one unless init_parallel ran)."""
    return _PP


def init_parallel(rank: int, tp: int, pp: int, init_method: str, device: str) -> None:
    """Join the ranks' process group (init_method: tcp://host:port of rank 0). Rank r is
    tensor-parallel rank r % tp of pipeline stage r // tp."""
    global _TP, _PP
    world_size = tp * pp
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    stage = rank // tp
    group = dist.group.WORLD
    if pp > 1 and tp > 1:  # every rank creates every stage's group, in the same order
        group = [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(pp)][stage]
    _TP = Communicator(rank % tp, tp, group if tp > 1 else None)
    _PP = PipelineStage(stage, pp, rank - tp if stage > 0 else None, rank + tp if stage < pp - 1 else None)
    logger.info("rank %d of %d joined (%s, %s): tensor-parallel rank %d of %d, pipeline stage %d of %d", rank,
                world_size, backend, init_method, rank % tp, tp, stage, pp)
