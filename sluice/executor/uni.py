"""The default executor: one worker in the engine core's own process, called directly."""

from __future__ import annotations

from sluice.config import EngineConfig
from sluice.core.sched_output import RunnerOutput, SchedulerOutput
from sluice.executor.abstract import Executor, StepFuture
from sluice.loader import ModelSource
from sluice.worker.worker import Worker


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig, hf_config, source: ModelSource) -> None:
        self.worker = Worker(config, hf_config, source)

    def collective_rpc(self, method: str, *args) -> list:
        return [getattr(self.worker, method)(*args)]

    def execute_model(self, scheduler_output: SchedulerOutput,
                      non_block: bool = False) -> RunnerOutput | StepFuture:
        output = self.worker.execute_model(scheduler_output)
        if not non_block:
            return output
        future = StepFuture(lambda _: None)
        future.set_result(output)
        return future
