"""The engine core: schedule -> execute -> update, and nothing else.

It sees token ids only; tokenization, chat templates and detokenization live in the caller's
process, so this loop can run in a process of its own.
"""

from __future__ import annotations

import functools
import logging
import os
import time

from sluice.config import EngineConfig
from sluice.core.kv_cache_manager import KVCacheManager, cdiv
from sluice.core.request import Request
from sluice.core.scheduler import Scheduler
from sluice.engine.messages import EngineCoreOutput, EngineCoreRequest, QueueFullError
from sluice.loader import ModelSource, get_tokenizer
from sluice.metrics.loggers import LoggingStatLogger
from sluice.metrics.prometheus import PrometheusStatLogger
from sluice.structured_output.manager import StructuredOutputManager
from sluice.worker.model_runner import ModelRunner

logger = logging.getLogger("sluice")


def resolve_max_model_len(requested: int | None, hf_config, model) -> int:
    model_len = getattr(hf_config, "max_position_embeddings", None) or 2048
    window = getattr(model, "sliding_window", None)
    if window and window < model_len:
        # Attention here spans the full context, exact only while it stays inside the window.
        logger.warning("capping the context at the model's sliding window of %d tokens", window)
        model_len = window
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
        self.runner = ModelRunner(config, hf_config, source)
        self.max_model_len = resolve_max_model_len(config.model.max_model_len, hf_config, self.runner.model)
        block_size = config.cache.block_size
        max_useful = cdiv(self.max_model_len, block_size) * config.scheduler.max_num_seqs + 1
        num_blocks = self.runner.choose_num_blocks(max_useful)
        self.runner.allocate_kv_cache(num_blocks)
        obs = config.observability
        self.kv = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching, obs.kv_cache_metrics)
        grammars = StructuredOutputManager(config.structured_outputs, functools.partial(get_tokenizer, config),
                                           hf_config.vocab_size)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, grammars)
        self.metrics = PrometheusStatLogger(config, self.max_model_len, self.kv.pool.num_usable_blocks)
        self.stat_loggers: list = [self.metrics]
        if not obs.disable_log_stats:
            self.stat_loggers.append(LoggingStatLogger())
        self.tracer = None
        if obs.otlp_traces_endpoint:
            from sluice.metrics.tracing import RequestTracer  # OpenTelemetry loads only when asked for

            self.tracer = RequestTracer(config)
            self.stat_loggers.append(self.tracer)
        cache_gib = num_blocks * self.runner.bytes_per_block() / 2**30
        logger.info(
            "model %s loaded in %.1f s (%s); KV cache: %d blocks of %d tokens (%.2f GiB), "
            "max concurrency %.1fx for %d-token requests",
            source.name, time.monotonic() - started, config.model.torch_dtype, num_blocks,
            block_size, cache_gib, (num_blocks - 1) * block_size / self.max_model_len, self.max_model_len,
        )

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
        return self.scheduler.has_unfinished()

    def step(self) -> list[EngineCoreOutput]:
        started = time.time()
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            outputs = self.scheduler.update_from_output(sched, {})
        else:
            scheduled = time.time()
            result = self.runner.execute_model(sched)
            executed = time.time()
            outputs = self.scheduler.update_from_output(sched, result.sampled, result.logprobs, result.prompt_logprobs)
            if self.tracer is not None and self.tracer.detailed:
                self.tracer.step_span((started, scheduled, executed, time.time()),
                                      [s.request.request_id for s in sched.scheduled], sched.total_num_tokens)
        self.record_stats()
        return outputs

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

    @property
    def is_sleeping(self) -> bool:
        return getattr(self, "sleeping_weights", None) is not None

    def sleep(self, level: int = 1) -> dict:
        """vLLM's level-1 sleep, on CPU: weights to a disk-backed file, the KV cache's pages
        dropped (see worker/sleep.py). Only when idle; returns the RSS it freed."""
        from sluice.worker.sleep import SleepingWeights, drop_kv_cache

        if level != 1:
            raise ValueError(f"level must be 1 (weights kept on disk, KV cache discarded), got {level}")
        if self.has_unfinished_requests():
            raise ValueError("cannot sleep while requests are unfinished; retry when they are done")
        before = resident_bytes()
        if not self.is_sleeping:
            self.reset_prefix_cache()  # the blocks' contents are about to go
            stop_populating = getattr(self.runner, "_populate_stop", None)
            if stop_populating is not None:
                stop_populating.set()
                self.runner.kv_populator.join(timeout=5)
            drop_kv_cache(self.runner.kv_caches)
            self.sleeping_weights = SleepingWeights(self.runner.model)
        after = resident_bytes()
        logger.info("engine asleep: RSS %.0f MiB -> %.0f MiB", before / 2**20, after / 2**20)
        return {"rss_bytes_before": before, "rss_bytes_after": after}

    def wake_up(self) -> dict:
        """Weights back into memory; the KV cache's pages come back zeroed as they are used."""
        before = resident_bytes()
        if self.is_sleeping:
            self.sleeping_weights.restore()
            self.sleeping_weights = None
        after = resident_bytes()
        logger.info("engine awake: RSS %.0f MiB -> %.0f MiB", before / 2**20, after / 2**20)
        return {"rss_bytes_before": before, "rss_bytes_after": after}


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
