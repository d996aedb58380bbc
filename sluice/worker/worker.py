"""One worker: a model replica with its KV cache, driven by an executor.

The executor calls these methods in order: `describe`, `choose_num_blocks`, `initialize_cache`,
then `execute_model` once per step. Tensor- and pipeline-parallel ranks will be N workers that
receive the same calls (`rank` tells them apart); today every engine runs one.
"""

from __future__ import annotations

from sluice.config import EngineConfig
from sluice.core.sched_output import RunnerOutput, SchedulerOutput
from sluice.loader import ModelSource
from sluice.worker.model_runner import ModelRunner


class Worker:
    def __init__(self, config: EngineConfig, hf_config, source: ModelSource, rank: int = 0) -> None:
        self.rank = rank
        self.runner = ModelRunner(config, hf_config, source)

    def describe(self) -> dict:
        """What the engine core needs from the model before it sizes anything."""
        return {"sliding_window": getattr(self.runner.model, "sliding_window", None),
                "bytes_per_block": self.runner.bytes_per_block()}

    def choose_num_blocks(self, max_useful_blocks: int) -> int:
        return self.runner.choose_num_blocks(max_useful_blocks)

    def initialize_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def populate_kv(self) -> None:
        self.runner.populate_kv()

    def execute_model(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute_model(scheduler_output)
