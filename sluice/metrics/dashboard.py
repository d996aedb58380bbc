"""The engine core's side of `/dashboard`: a compact picture of the engine, only while someone looks.

The API process asks for a snapshot a few times a second (the DASHBOARD message, beside STATS);
each ask keeps the recorder listening for LISTEN_S more seconds. While nobody asks, the step
hook and the stat logger return at once. A snapshot's size is bounded whatever the pool's size:
the KV pool is sampled to at most MAX_CELLS blocks, the queues are cut at MAX_LISTED requests,
the steps since the asker's last look (at most MAX_STEPS) come as totals, and only the last
step's batch comes request by request. The per-step hook only notes the batch (a few microseconds);
the pool and the queues are read only when asked, so their cost follows the page's rate (4/s), not
the engine's.
"""

from __future__ import annotations

import collections
import itertools
import time
from typing import TYPE_CHECKING

from sluice.core.kv_cache_manager import cdiv
from sluice.metrics.stats import IterationStats, SchedulerStats

if TYPE_CHECKING:
    from sluice.core.sched_output import SchedulerOutput
    from sluice.core.scheduler import Scheduler

LISTEN_S = 5.0
MAX_CELLS = 2048
MAX_STEPS = 64
MAX_LISTED = 64
# A grid cell's state: one character per sampled block.
FREE, CACHED, IN_USE, SHARED = "0", "1", "2", "3"


class DashboardRecorder:
    def __init__(self, scheduler: Scheduler, max_num_batched_tokens: int) -> None:
        self.scheduler = scheduler
        self.budget = max_num_batched_tokens
        self.listen_until = 0.0
        # [step, time, decode tokens, prefill tokens, requests] of the latest steps
        self.steps: collections.deque[list] = collections.deque(maxlen=MAX_STEPS)
        self.num_steps = 0
        self.last_batch: list[list] = []  # the last step's [request id, tokens, is prefill], in batch order
        # Running sums while listening; the API side turns differences into rates and means.
        self.totals = {"prefix_queries": 0, "prefix_hits": 0, "preemptions": 0, "ttft_sum": 0.0, "ttft_count": 0,
                       "itl_sum": 0.0, "itl_count": 0, "generation_tokens": 0}

    @property
    def listening(self) -> bool:
        return time.monotonic() < self.listen_until

    def on_step(self, sched: SchedulerOutput) -> None:
        """The step hook: what this step's batch holds, split into decodes and prefill chunks."""
        if not self.listening:
            return
        requests = self.scheduler.requests
        batch = []
        for rid, num in sched.num_scheduled_tokens.items():
            request = requests[rid]
            computed_before = request.num_computed_tokens - num  # schedule() already advanced it
            batch.append([rid, num, computed_before < request.num_tokens - 1])
        prefill = sum(num for _, num, is_prefill in batch if is_prefill)
        self.num_steps += 1
        self.steps.append([self.num_steps, time.time(), sched.total_num_scheduled_tokens - prefill, prefill, len(batch)])
        self.last_batch = batch

    def record(self, scheduler_stats: SchedulerStats, stats: IterationStats) -> None:
        """Stat logger interface (called after every step and while idle)."""
        if not self.listening:
            return
        t = self.totals
        t["prefix_queries"] += stats.prefix_cache_queries
        t["prefix_hits"] += stats.prefix_cache_hits
        t["preemptions"] += stats.num_preemptions
        t["generation_tokens"] += stats.num_generation_tokens
        t["ttft_sum"] += sum(stats.time_to_first_tokens)
        t["ttft_count"] += len(stats.time_to_first_tokens)
        t["itl_sum"] += sum(stats.inter_token_latencies)
        t["itl_count"] += len(stats.inter_token_latencies)

    def snapshot(self, since_step: int = 0) -> dict:
        """The engine now, and the steps after `since_step`; keeps the recorder listening."""
        self.listen_until = time.monotonic() + LISTEN_S
        scheduler = self.scheduler
        return {
            "time": time.time(),
            "budget": self.budget,
            "pool": self._pool(),
            "steps": [s for s in self.steps if s[0] > since_step],
            "batch": self.last_batch,
            "running": [[r.request_id, r.num_computed_tokens, r.num_tokens, r.num_preemptions]
                        for r in scheduler.running[:MAX_LISTED]],
            "num_running": len(scheduler.running),
            "waiting": [[r.request_id, r.num_preemptions] for r in itertools.islice(scheduler.waiting, MAX_LISTED)],
            "num_waiting": scheduler.num_waiting,
            "totals": dict(self.totals),
        }

    def _pool(self) -> dict:
        """Every stride-th usable block's state, the owners of the held ones, and exact counts."""
        kv = self.scheduler.kv
        pool = kv.pool
        usable = pool.num_usable_blocks
        stride = cdiv(usable, MAX_CELLS)
        # One pass over the sampled blocks, inlined: this loop is most of a snapshot's cost.
        cells = "".join([(FREE if b.block_hash is None else CACHED) if b.ref_cnt == 0
                         else (IN_USE if b.ref_cnt == 1 else SHARED) for b in pool.blocks[1::stride]])
        owners: dict[int, list[str]] = {}
        for rid, tables in kv.req_blocks.items():  # one block table per KV cache group
            for blocks in tables:
                for block in blocks:
                    if block.block_id and (block.block_id - 1) % stride == 0:
                        owners.setdefault((block.block_id - 1) // stride, []).append(rid)
        return {"num_blocks": usable, "block_size": kv.block_size, "stride": stride, "cells": cells,
                "owners": [[cell, rids] for cell, rids in owners.items()],
                "in_use": usable - pool.num_free_blocks()}
