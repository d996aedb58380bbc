"""One worker: a model replica with its KV cache, driven by an executor.

The executor calls these methods in order: `describe`, `choose_num_blocks`, `initialize_cache`,
then `execute_model` once per step. Tensor-parallel ranks are N workers that receive the same
calls and join one process group (`distributed_init_method`); each holds its share of every
layer's heads and of every KV block. Pipeline stages each hold their layers (and those layers'
KV); the executor answers with the last stage's first rank's output. Each stage runs the steps in
the order they were sent, so with several in flight stage k works on batch i while stage k+1
still works on batch i-1.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque

from sluice.config import EngineConfig
from sluice.core.sched_output import RunnerOutput, SchedulerOutput
from sluice.distributed import get_tp_group, init_parallel
from sluice.distributed.kv_transfer.factory import create_worker_connector
from sluice.loader import ModelSource
from sluice.lora.manager import LoRAManager
from sluice.lora.request import LoRARequest
from sluice.worker.model_runner import ModelRunner
from sluice.worker.sleep import SleepingWeights, drop_kv_cache, resident_bytes


STEP_TIMES_KEPT = 4096  # the most recent steps' (start, end) a worker keeps for step_times()


def configure_logging(level: int, rank: int, world_size: int) -> None:
    """A worker process's log lines, marked with its rank when there are several."""
    where = f" [rank {rank}]" if world_size > 1 else ""
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s")


class Worker:
    def __init__(self, config: EngineConfig, hf_config, source: ModelSource, rank: int = 0,
                 distributed_init_method: str | None = None) -> None:
        self.rank = rank
        parallel = config.parallel
        if parallel.world_size > 1:
            init_parallel(rank, parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                          distributed_init_method, config.model.device)
        self.runner = ModelRunner(config, hf_config, source)
        self.sleeping_weights: SleepingWeights | None = None
        self.kv_connector = create_worker_connector(config)  # disaggregated prefill
        self.step_intervals: deque[tuple[float, float]] = deque(maxlen=STEP_TIMES_KEPT)

    def describe(self) -> dict:
        """What the engine core needs from the model before it sizes anything."""
        return {"kv_group_windows": [group.sliding_window for group in self.runner.kv_groups],
                "bytes_per_block": self.runner.bytes_per_block(), "quantization": self.runner.quantization,
                "pooler": dataclasses.asdict(self.runner.pooler.config) if self.runner.pooler else None}

    def choose_num_blocks(self, max_useful_blocks: int) -> int:
        return self.runner.choose_num_blocks(max_useful_blocks)

    def initialize_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)
        if self.kv_connector is not None:
            self.kv_connector.register_kv_caches(self.runner.kv_caches, self.kv_layout())

    def kv_layout(self) -> list:
        """What both ends of a KV transfer must share: block size, and each layer's attention
        backend (its element order), cache dtype and block shape."""
        runner = self.runner
        return [runner.block_size, *([type(attn.backend).__name__, str(cache.dtype), list(cache.shape[2:])]
                                     for attn, cache in zip(runner.attention_layers, runner.kv_caches))]

    def populate_kv(self) -> None:
        self.runner.populate_kv()

    def execute_model(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        started = time.monotonic()
        if self.kv_connector is None:
            output = self.runner.execute_model(scheduler_output)
        else:
            self.kv_connector.start_step(scheduler_output.kv_connector_metadata)
            output = self.runner.execute_model(scheduler_output)
            output.kv_connector_output = self.kv_connector.get_finished()
        self.step_intervals.append((started, time.monotonic()))
        return output

    def step_times(self) -> list[tuple[float, float]]:
        """(start, end) of each step run since the last ask, on the system-wide monotonic clock (so
        ranks on one machine compare): when this rank was in a step, waits for its neighbours included."""
        times, self.step_intervals = list(self.step_intervals), deque(maxlen=STEP_TIMES_KEPT)
        return times

    def communication_stats(self) -> dict:
        """Seconds and calls spent in tensor-parallel collectives since the last ask."""
        return get_tp_group().take_stats()

    def add_lora(self, request: LoRARequest | dict) -> bool:
        """Load and check an adapter (a dict when it came over the wire)."""
        return self._lora_manager().add_lora(LoRARequest(**request) if isinstance(request, dict) else request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self._lora_manager().remove_lora(lora_int_id)

    def _lora_manager(self) -> LoRAManager:
        if self.runner.lora_manager is None:
            raise ValueError("LoRA is off: start the engine with enable_lora=True (--enable-lora)")
        return self.runner.lora_manager

    def sleep(self) -> dict:
        """vLLM's level-1 sleep, on CPU: weights to a disk-backed file, the KV cache's pages dropped
        (see worker/sleep.py); this process's RSS before and after."""
        before = resident_bytes()
        if self.sleeping_weights is None:
            runner = self.runner
            stop_populating = getattr(runner, "_populate_stop", None)
            if stop_populating is not None:
                stop_populating.set()
                runner.kv_populator.join(timeout=5)
            drop_kv_cache(runner.kv_tensors)
            self.sleeping_weights = SleepingWeights(runner.model)
            runner.attach_decoder_stacks()  # their weights moved
        return {"rss_bytes_before": before, "rss_bytes_after": resident_bytes()}

    def wake_up(self) -> dict:
        """Weights back into memory; the KV cache's pages come back zeroed as they are used."""
        before = resident_bytes()
        if self.sleeping_weights is not None:
            self.sleeping_weights.restore()
            self.sleeping_weights = None
            self.runner.attach_decoder_stacks()
        return {"rss_bytes_before": before, "rss_bytes_after": resident_bytes()}
