"""The engine core: schedule -> execute -> update, and nothing else.

It sees token ids only; tokenization, chat templates and detokenization live in the caller's
process, so this loop can run in a process of its own.

With pipeline stages the loop keeps a batch queue: up to one scheduled batch per stage is in
flight (disjoint requests: the scheduler skips a request whose step is not back yet), and the
outputs are applied oldest first. With one stage it is the plain loop, step by step.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque

from sluice.config import EngineConfig
from sluice.core.kv_cache_manager import KVCacheManager, cdiv
from sluice.core.request import Request
from sluice.core.scheduler import Scheduler
from sluice.core.sched_output import RunnerOutput, SchedulerOutput
from sluice.distributed.kv_transfer.factory import create_scheduler_connector
from sluice.engine.messages import EngineCoreOutput, EngineCoreRequest, QueueFullError
from sluice.executor.abstract import Executor, StepFuture
from sluice.lora.request import LoRARequest
from sluice.loader import ModelSource, get_tokenizer
from sluice.metrics.dashboard import DashboardRecorder
from sluice.metrics.loggers import LoggingStatLogger
from sluice.metrics.prometheus import PrometheusStatLogger
from sluice.pooling.config import PoolerConfig, position_offset
from sluice.structured_output.manager import StructuredOutputManager

logger = logging.getLogger("sluice")

# A step with nothing to run while KV transfers are in flight waits this long before asking again.
KV_TRANSFER_IDLE_WAIT_S = 0.002


def resolve_max_model_len(requested: int | None, hf_config) -> int:
    text_config = hf_config.get_text_config()  # a vision-language model's decoder sets the length
    model_len = (getattr(text_config, "max_position_embeddings", None) or 2048) - position_offset(hf_config)
    if requested is None:
        return model_len
    if requested > model_len:
        raise ValueError(
            f"max_model_len={requested} exceeds the model's context length ({model_len} tokens, "
            "max_position_embeddings in its config)"
        )
    return requested


class EngineCore:
    def __init__(self, config: EngineConfig, hf_config, source: ModelSource) -> None:
        self.config = config
        started = time.monotonic()
        self.executor = Executor.create(config, hf_config, source)
        # pipeline parallel: (scheduled batch, its output's future, when it was scheduled), oldest first
        self.max_concurrent_batches = self.executor.max_concurrent_batches
        self.batch_queue: deque[tuple[SchedulerOutput, StepFuture, float, float]] | None = \
            deque() if self.max_concurrent_batches > 1 else None
        self.max_batches_in_flight = 0  # the most batches the queue ever held at once
        self.sleeping = False  # weights on disk, KV cache dropped (sleep mode)
        self.loras: dict[int, tuple[LoRARequest, str | None]] = {}  # added adapters (and parent), by id
        model = self.executor.describe()
        self.quantization: str = model["quantization"]
        self.max_model_len = resolve_max_model_len(config.model.max_model_len, hf_config)
        block_size = config.cache.block_size
        # a table per KV cache group, every one as long as the request
        num_groups = len(model["kv_group_windows"])
        max_useful = cdiv(self.max_model_len, block_size) * config.scheduler.max_num_seqs * num_groups + 1
        num_blocks = self.executor.choose_num_blocks(max_useful)
        self.executor.initialize_cache(num_blocks)
        obs = config.observability
        self.pooler = PoolerConfig(**model["pooler"]) if model["pooler"] else None  # None: a generating model
        encoder_only = model["bytes_per_block"] == 0
        self.kv = KVCacheManager(num_blocks, block_size, self._prefix_caching(encoder_only), obs.kv_cache_metrics,
                                 group_windows=tuple(model["kv_group_windows"]))
        grammars = StructuredOutputManager(config.structured_outputs, functools.partial(get_tokenizer, config),
                                           hf_config.get_text_config().vocab_size)
        if config.kv_transfer.enabled and (self.kv.group_windows != (None,) or encoder_only):
            raise ValueError("kv_transfer_config: disaggregated prefill needs a decoder whose every layer keeps "
                             "its whole KV (this model has sliding-window layers, or is encoder-only)")
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, grammars, config.speculative,
                                   config.lora.max_loras if config.lora.enable_lora else None,
                                   create_scheduler_connector(config))
        self.scheduler.whole_prompts = encoder_only
        self.scheduler.num_micro_batches = self.max_concurrent_batches
        if encoder_only and config.scheduler.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens={config.scheduler.max_num_batched_tokens} is less than "
                             f"max_model_len={self.max_model_len}: an encoder-only model runs each prompt whole "
                             "in one step; raise --max-num-batched-tokens or lower --max-model-len")
        self.metrics = PrometheusStatLogger(config, self.max_model_len, self.kv.pool.num_usable_blocks,
                                            self.quantization)
        self.dashboard = DashboardRecorder(self.scheduler, config.scheduler.max_num_batched_tokens)  # /dashboard
        self.stat_loggers: list = [self.metrics, self.dashboard]
        if not obs.disable_log_stats:
            self.stat_loggers.append(LoggingStatLogger())
        self.tracer = None
        if obs.otlp_traces_endpoint:
            from sluice.metrics.tracing import RequestTracer  # OpenTelemetry loads only when asked for

            self.tracer = RequestTracer(config)
            self.stat_loggers.append(self.tracer)
        cache_gib = num_blocks * model["bytes_per_block"] / 2**30
        logger.info(
            "model %s loaded in %.1f s (%s, quantization %s); KV cache: %d blocks of %d tokens (%.2f GiB, "
            "kv_cache_dtype %s%s), max concurrency %.1fx for %d-token requests",
            source.name, time.monotonic() - started, config.model.torch_dtype, self.quantization, num_blocks,
            block_size, cache_gib, config.cache.kv_cache_dtype, self.kv.spec.describe_groups("; "),
            self.kv.spec.num_blocks / self.kv.spec.blocks_needed(self.max_model_len),
            self.max_model_len,
        )

    def _prefix_caching(self, encoder_only: bool) -> bool:
        """A pooled vector may skip cached tokens only where it reads the last one alone (LAST);
        an encoder-only model keeps no KV at all."""
        wanted = self.config.cache.enable_prefix_caching
        if wanted and (encoder_only or (self.pooler and self.pooler.pooling_type != "LAST")):
            logger.info("prefix caching off: this model's pooling reads every prompt token")
            return False
        return wanted

    def add_requests(self, core_requests: list[EngineCoreRequest]) -> None:
        """Admit the children of one user request together, or none of them (QueueFullError)."""
        self.check_queue_room(core_requests)
        for core_request in core_requests:
            self.add_request(core_request)

    def check_queue_room(self, core_requests: list[EngineCoreRequest]) -> None:
        config = self.config.scheduler
        if config.max_num_queued_reqs is not None:
            if self.scheduler.num_waiting + len(core_requests) > config.max_num_queued_reqs:
                raise QueueFullError(
                    f"the server is busy: {self.scheduler.num_waiting} requests are waiting "
                    f"(max_num_queued_reqs={config.max_num_queued_reqs}); retry later"
                )
        if config.max_num_queued_tokens is not None:
            queued = self.scheduler.num_waiting_tokens()
            new = sum(len(r.prompt_token_ids) for r in core_requests)
            if queued and queued + new > config.max_num_queued_tokens:
                raise QueueFullError(
                    f"the server is busy: {queued} prompt tokens are waiting "
                    f"(max_num_queued_tokens={config.max_num_queued_tokens}); retry later"
                )

    def add_request(self, core_request: EngineCoreRequest) -> None:
        max_tokens = core_request.sampling_params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - len(core_request.prompt_token_ids)
        self.scheduler.add_request(Request(core_request, max_tokens))

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.batch_queue)

    def step(self) -> list[EngineCoreOutput]:
        if self.batch_queue is not None:
            return self._step_with_batch_queue()
        started = time.time()
        sched = self.scheduler.schedule()
        if not sched.total_num_scheduled_tokens:  # e.g. flushing aborts: no batch for the dashboard
            outputs = self.scheduler.update_from_output(sched, self._idle_step(sched))
        else:
            self.dashboard.on_step(sched)
            scheduled = time.time()
            outputs = self._apply(sched, self.executor.execute_model(sched), started, scheduled)
        return self._end_step(outputs)

    def _step_with_batch_queue(self) -> list[EngineCoreOutput]:
        """Schedule and send a batch while the queue has room; once it is full, or nothing new can run,
        wait for the oldest batch and apply its output."""
        queue = self.batch_queue
        if len(queue) < self.max_concurrent_batches:
            started = time.time()
            sched = self.scheduler.schedule()
            if sched.total_num_scheduled_tokens:
                self.dashboard.on_step(sched)
                queue.append((sched, self.executor.execute_model(sched, non_block=True), started, time.time()))
                self.max_batches_in_flight = max(self.max_batches_in_flight, len(queue))
                if len(queue) < self.max_concurrent_batches:
                    return []
            elif not queue:
                return self._end_step(self.scheduler.update_from_output(sched, self._idle_step(sched)))
        sched, future, started, scheduled = queue.popleft()
        return self._end_step(self._apply(sched, future.result(), started, scheduled))

    def _apply(self, sched: SchedulerOutput, result: RunnerOutput, started: float,
               scheduled: float) -> list[EngineCoreOutput]:
        """A run step's output into the scheduler (and its span, when detailed traces are on)."""
        executed = time.time()
        outputs = self.scheduler.update_from_output(sched, result)
        if self.tracer is not None and self.tracer.detailed:
            self.tracer.step_span((started, scheduled, executed, time.time()),
                                  list(sched.num_scheduled_tokens), sched.total_num_scheduled_tokens)
        return outputs

    def _end_step(self, outputs: list[EngineCoreOutput]) -> list[EngineCoreOutput]:
        if self.scheduler.kv_new_holds:
            outputs += self._send_kv_holds()
        self.record_stats()
        return outputs

    def _send_kv_holds(self) -> list[EngineCoreOutput]:
        """Blocks of prefills that just finished: their worker serves them from now on, not from
        the next step (an idle producer, e.g. an offline LLM, may not take one soon)."""
        self.scheduler.kv_new_holds = False
        flush = SchedulerOutput(kv_connector_metadata=self.scheduler.connector.build_connector_meta())
        return self.scheduler.update_from_output(flush, self.executor.execute_model(flush))

    def _idle_step(self, sched) -> RunnerOutput:
        """A step that runs no tokens: the worker still hears of KV transfers to start (or
        release) and reports those that ended."""
        if not (sched.kv_connector_metadata or self.scheduler.kv_transfers_pending()):
            return RunnerOutput()
        result = self.executor.execute_model(sched)
        if not sched.kv_connector_metadata and not result.kv_connector_output:
            time.sleep(KV_TRANSFER_IDLE_WAIT_S)
        return result

    def shutdown(self) -> None:
        self.executor.shutdown()

    def record_stats(self) -> None:
        """Hand what happened since the last call to every stat logger."""
        scheduler_stats, iteration_stats = self.scheduler.scheduler_stats(), self.scheduler.take_stats()
        for stat_logger in self.stat_loggers:
            stat_logger.record(scheduler_stats, iteration_stats)

    def get_stats(self) -> dict[str, float]:
        """Counters and gauges under vLLM's metric names, as they stand now."""
        self.record_stats()
        return self.metrics.values()

    def metrics_text(self) -> bytes:
        """Every metric in the Prometheus text format, as they stand now."""
        self.record_stats()
        return self.metrics.render()

    # ---- control: asked for by the API server (/reset_prefix_cache, /sleep, /wake_up) ----
    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; False (nothing done) while a request holds blocks."""
        return self.kv.pool.reset_prefix_cache()

    def add_lora(self, lora_request: LoRARequest | dict, parent: str | None = None) -> bool:
        """Load and check an adapter on every worker (a ValueError names what is wrong); False if
        it was already added. parent: the model an API server lists it under (/v1/models)."""
        if isinstance(lora_request, dict):  # as msgspec decodes it off the wire
            lora_request = LoRARequest(**lora_request)
        added = self.executor.collective_rpc("add_lora", lora_request)[0]
        self.loras[lora_request.lora_int_id] = (lora_request, parent)
        return added

    def remove_lora(self, lora_int_id: int) -> bool:
        self.loras.pop(lora_int_id, None)
        return self.executor.collective_rpc("remove_lora", lora_int_id)[0]

    def lora_adapters(self) -> list[list]:
        """The adapters added, as [name, id, path, parent]: what every API process serves (the
        core owns them, so a load through one API process reaches all)."""
        return [[r.lora_name, r.lora_int_id, r.lora_path, parent] for r, parent in self.loras.values()]

    @property
    def is_sleeping(self) -> bool:
        return self.sleeping

    def sleep(self, level: int = 1) -> dict:
        """vLLM's level-1 sleep on every worker (see Worker.sleep). Only when idle; returns the RSS
        the (first) worker freed."""
        if level != 1:
            raise ValueError(f"level must be 1 (weights kept on disk, KV cache discarded), got {level}")
        if self.has_unfinished_requests():
            raise ValueError("cannot sleep while requests are unfinished; retry when they are done")
        if not self.sleeping:
            self.reset_prefix_cache()  # the blocks' contents are about to go
        result = self.executor.collective_rpc("sleep")[0]
        self.sleeping = True
        logger.info("engine asleep: RSS %.0f MiB -> %.0f MiB", result["rss_bytes_before"] / 2**20,
                    result["rss_bytes_after"] / 2**20)
        return result

    def wake_up(self) -> dict:
        """Weights back into memory on every worker."""
        result = self.executor.collective_rpc("wake_up")[0]
        self.sleeping = False
        logger.info("engine awake: RSS %.0f MiB -> %.0f MiB", result["rss_bytes_before"] / 2**20,
                    result["rss_bytes_after"] / 2**20)
        return result
