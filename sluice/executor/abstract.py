"""Where the workers live. The engine core calls one `execute_model(scheduler_output)` per step
and the few start-up calls below; executors differ only in how those reach their workers:
`uni` calls one in-process worker, `mp` one worker process per tensor-parallel rank over ZMQ,
`ray` one Ray actor per rank; the last two fan each call out to all ranks (`collective_rpc`).

With pipeline stages, `execute_model(..., non_block=True)` returns a future at once, so the core
can send the next batch while the stages still work on this one (`max_concurrent_batches`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future

from sluice.config import EngineConfig
from sluice.core.sched_output import RunnerOutput, SchedulerOutput
from sluice.loader import ModelSource


class WorkerDiedError(RuntimeError):
    """A worker process went away; every request of the engine is lost."""


class StepFuture(Future):
    """A step's output, read from the workers when it is asked for (no thread waits on it):
    `resolve(future)` sets it, and on `mp` also every older step's, whose replies come first."""

    def __init__(self, resolve: Callable[[StepFuture], None]) -> None:
        super().__init__()
        self._resolve = resolve

    def result(self, timeout: float | None = None) -> RunnerOutput:
        if not self.done():
            self._resolve(self)
        return super().result(timeout)


class Executor(ABC):
    @staticmethod
    def create(config: EngineConfig, hf_config, source: ModelSource) -> Executor:
        """The executor `distributed_executor_backend` names."""
        backend = config.parallel.distributed_executor_backend
        if backend == "mp":
            from sluice.executor.mp import MultiprocExecutor

            return MultiprocExecutor(config, hf_config, source)
        if backend == "ray":
            from sluice.executor.ray_executor import RayExecutor

            return RayExecutor(config, hf_config, source)
        from sluice.executor.uni import UniProcExecutor

        return UniProcExecutor(config, hf_config, source)

    @abstractmethod
    def collective_rpc(self, method: str, *args) -> list:
        """Call a Worker method on every worker; their results, by rank."""

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput,
                      non_block: bool = False) -> RunnerOutput | StepFuture:
        """Run one step on every worker; the output of the rank that samples (a future of it when
        non_block: the step is sent, and steps sent later queue behind it on every worker)."""

    @property
    def max_concurrent_batches(self) -> int:
        """Steps the engine core may keep in flight: one per pipeline stage (stage k runs batch i
        while stage k+1 runs batch i-1)."""
        return 1

    def describe(self) -> dict:
        """Rank 0's description; the KV cache groups are every rank's: pipeline stages hold different
        layers (one group each), so the cache keeps a block where any stage needs it."""
        described = self.collective_rpc("describe")
        groups = [d["kv_group_windows"] for d in described]
        if any(g != groups[0] for g in groups):
            windows = [w for g in groups for w in g]
            groups[0] = [None if None in windows else max(windows)]
        return {**described[0], "kv_group_windows": groups[0]}

    def choose_num_blocks(self, max_useful_blocks: int) -> int:
        """Blocks every worker can hold."""
        return min(self.collective_rpc("choose_num_blocks", max_useful_blocks))

    def initialize_cache(self, num_blocks: int) -> None:
        self.collective_rpc("initialize_cache", num_blocks)

    def populate_kv(self) -> None:
        self.collective_rpc("populate_kv")

    def shutdown(self) -> None:
        """Stop the workers; a no-op where they live in this process."""
