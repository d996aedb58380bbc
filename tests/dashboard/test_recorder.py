"""The engine core's dashboard recorder on a real scheduler and KV cache (no model): off while
nobody asks, exact when it looks, and bounded in size whatever the pool's size."""

from __future__ import annotations

import msgspec

from sluice.config import SchedulerConfig
from sluice.core.kv_cache_manager import KVCacheManager
from sluice.core.request import Request
from sluice.core.scheduler import Scheduler
from sluice.engine.messages import EngineCoreRequest
from sluice.metrics.dashboard import MAX_CELLS, MAX_LISTED, MAX_STEPS, DashboardRecorder
from sluice.sampling_params import SamplingParams
from tests.utils import fake_runner_output

BLOCK_SIZE = 16
BUDGET = 64


def engine(num_blocks: int, num_requests: int, prompt_len: int, shared_prefix: int = 0):
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=BUDGET),
                          KVCacheManager(num_blocks, BLOCK_SIZE, True), 4096)
    params = SamplingParams(max_tokens=1000, ignore_eos=True)
    for i in range(num_requests):
        prompt = list(range(shared_prefix)) + [10_000 + i] * (prompt_len - shared_prefix)
        scheduler.add_request(Request(EngineCoreRequest(f"r-{i}", prompt, params, eos_token_ids=()), 1000))
    return scheduler, DashboardRecorder(scheduler, BUDGET)


def step(scheduler: Scheduler, recorder: DashboardRecorder) -> None:
    out = scheduler.schedule()
    recorder.on_step(out)
    scheduler.update_from_output(out, fake_runner_output(scheduler, out))
    recorder.record(scheduler.scheduler_stats(), scheduler.take_stats())


def test_nothing_is_recorded_while_nobody_looks():
    scheduler, recorder = engine(64, 2, 40)
    for _ in range(5):
        step(scheduler, recorder)
    assert not recorder.steps and recorder.num_steps == 0 and recorder.totals["prefix_queries"] == 0


def test_steps_split_prefill_chunks_from_decodes():
    scheduler, recorder = engine(64, 2, 40)
    recorder.snapshot()  # someone looks from now on
    for _ in range(4):
        step(scheduler, recorder)
    snap = recorder.snapshot(since_step=1)
    assert [s[0] for s in snap["steps"]] == [2, 3, 4]
    # long prompts go in chunks of long_prefill_token_threshold (budget / 4): 16 + 16 + 8, then decodes
    assert [s[2:] for s in recorder.steps] == [[0, 32, 2], [0, 32, 2], [0, 16, 2], [2, 0, 2]]
    assert snap["batch"] == [["r-0", 1, False], ["r-1", 1, False]]
    assert [r[0] for r in snap["running"]] == ["r-0", "r-1"] and snap["num_waiting"] == 0
    assert snap["totals"]["generation_tokens"] == 4  # each sampled in steps 3 and 4


def test_pool_grid_is_exact_and_names_owners():
    scheduler, recorder = engine(64, 2, 40, shared_prefix=32)
    recorder.snapshot()
    for _ in range(3):
        step(scheduler, recorder)
    pool = recorder.snapshot()["pool"]
    assert pool["stride"] == 1 and len(pool["cells"]) == 63
    held = {b.block_id for tables in scheduler.kv.req_blocks.values() for blocks in tables for b in blocks}
    assert pool["in_use"] == len(held) == 63 - scheduler.kv.pool.num_free_blocks()
    owners = {cell: rids for cell, rids in pool["owners"]}
    for i, state in enumerate(pool["cells"]):
        assert (state in "23") == (i + 1 in held)
        assert (state == "3") == (len(owners.get(i, [])) > 1)  # shared prefix blocks: both requests
    shared = [owners[i] for i, state in enumerate(pool["cells"]) if state == "3"]
    assert shared and all(sorted(rids) == ["r-0", "r-1"] for rids in shared)  # the common prefix


def test_snapshot_size_is_bounded_whatever_the_pool():
    scheduler, recorder = engine(100_001, MAX_LISTED + 6, 100)
    recorder.snapshot()
    for _ in range(MAX_STEPS + 40):
        step(scheduler, recorder)
    snap = recorder.snapshot()
    pool = snap["pool"]
    assert pool["stride"] == -(-100_000 // MAX_CELLS) and len(pool["cells"]) <= MAX_CELLS
    assert pool["in_use"] == 100_000 - scheduler.kv.pool.num_free_blocks()
    assert len(snap["steps"]) == MAX_STEPS and len(snap["running"]) <= MAX_LISTED
    assert len(msgspec.msgpack.encode(snap)) < 64_000
