"""The periodic log line: the figures an operator watches, every few seconds while busy."""

from __future__ import annotations

import logging
import time

from sluice.metrics.stats import IterationStats, SchedulerStats

logger = logging.getLogger("sluice")

LOG_INTERVAL_S = 5.0


class LoggingStatLogger:
    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self.since = now
        self.prompt_tokens = self.generation_tokens = 0
        self.prefix_queries = self.prefix_hits = 0
        self.spec_drafts = self.spec_accepted = 0

    def record(self, scheduler: SchedulerStats, it: IterationStats) -> None:
        self.prompt_tokens += it.num_prompt_tokens
        self.generation_tokens += it.num_generation_tokens
        self.prefix_queries += it.prefix_cache_queries
        self.prefix_hits += it.prefix_cache_hits
        self.spec_drafts += it.spec.num_drafts
        self.spec_accepted += it.spec.num_accepted_tokens
        now = time.monotonic()
        elapsed = now - self.since
        if elapsed < self.interval_s:
            return
        busy = scheduler.num_running or scheduler.num_waiting
        if busy or self.prompt_tokens or self.generation_tokens:
            logger.info(
                "engine: prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, KV cache %.1f%%, "
                "prefix cache hit rate %.1f%%",
                self.prompt_tokens / elapsed, self.generation_tokens / elapsed,
                scheduler.num_running, scheduler.num_waiting, 100 * scheduler.kv_cache_usage,
                100 * self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0,
            )
            if self.spec_drafts:  # tokens per verification: the kept drafts plus the one sampled after
                logger.info("speculative decoding: mean acceptance length %.2f over %d drafts",
                            1 + self.spec_accepted / self.spec_drafts, self.spec_drafts)
        self._reset(now)
