"""Scheduler decisions without a model: budgets, chunking, preemption, priority, never-fit."""

from sluice.config import SchedulerConfig
from sluice.core.kv_cache_manager import KVCacheManager
from sluice.core.request import Request, RequestStatus
from sluice.engine.messages import EngineCoreRequest
from sluice.core.scheduler import Scheduler
from sluice.sampling_params import SamplingParams

from tests.utils import fake_runner_output

BS = 4


def make_scheduler(num_blocks=64, caching=True, max_model_len=1024, **cfg) -> Scheduler:
    kv = KVCacheManager(num_blocks, BS, caching)
    return Scheduler(SchedulerConfig(**cfg), kv, max_model_len)


def add(sched: Scheduler, rid: str, num_prompt: int, max_tokens: int = 8, priority: int = 0,
        first_token: int = 1, arrival: float = 0.0) -> Request:
    core = EngineCoreRequest(
        rid, list(range(first_token, first_token + num_prompt)),
        SamplingParams(max_tokens=max_tokens, ignore_eos=True), eos_token_ids=(),
        priority=priority, arrival_time=arrival,
    )
    request = Request(core, max_tokens)
    sched.add_request(request)
    return request


def run_step(sched: Scheduler, token: int = 7):
    """Schedule, pretend the forward pass sampled `token` for every sampling request, update."""
    out = sched.schedule()
    return out, sched.update_from_output(out, fake_runner_output(sched, out, token))


def scheduled(out) -> dict[str, int]:
    return out.num_scheduled_tokens


def test_budget_is_shared_and_long_prompts_are_chunked():
    sched = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=24)
    add(sched, "long", 100, arrival=0)
    add(sched, "short", 10, arrival=1, first_token=500)
    out, _ = run_step(sched)
    assert scheduled(out) == {"long": 24, "short": 10}
    out, _ = run_step(sched)
    # short now decodes (1 token) in the same step as the long prompt's next chunk
    assert scheduled(out) == {"long": 24, "short": 1}
    assert out.total_num_scheduled_tokens <= 64


def test_running_decodes_are_never_starved_by_a_new_long_prompt():
    sched = make_scheduler(max_num_batched_tokens=32, long_prefill_token_threshold=16, max_num_partial_prefills=2)
    for i in range(4):
        add(sched, f"chat{i}", 6, max_tokens=50, arrival=i)
    run_step(sched)
    add(sched, "long", 4000 // BS, arrival=10)
    for _ in range(5):
        out, _ = run_step(sched)
        steps = scheduled(out)
        assert all(steps[f"chat{i}"] == 1 for i in range(4))
        assert steps.get("long", 0) <= 16


def test_several_partial_prefills_in_one_step():
    sched = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=16, max_num_partial_prefills=3)
    for i in range(4):
        add(sched, f"p{i}", 40, arrival=i, first_token=100 * i)
    out, _ = run_step(sched)
    assert scheduled(out) == {"p0": 16, "p1": 16, "p2": 16}


def test_max_num_seqs_caps_running():
    sched = make_scheduler(max_num_seqs=2)
    for i in range(3):
        add(sched, str(i), 5, arrival=i)
    out, _ = run_step(sched)
    assert set(scheduled(out)) == {"0", "1"}
    assert sched.num_waiting == 1


def test_preemption_frees_latest_and_admits_nothing_that_step():
    # 6 usable blocks of 4 tokens; two requests of 11 tokens each take 3 blocks.
    sched = make_scheduler(num_blocks=7, caching=False)
    add(sched, "a", 11, max_tokens=20, arrival=0)
    b = add(sched, "b", 11, max_tokens=20, arrival=1)
    run_step(sched)
    add(sched, "c", 2, arrival=2)
    out, _ = run_step(sched)  # both reach 12 tokens: still fits; c waits (no room)
    out, _ = run_step(sched)  # a needs a 4th block: b (latest) is preempted
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert sched.stats.num_preemptions == 1 and b.num_preemptions == 1
    assert set(scheduled(out)) == {"a"}
    # b's generated tokens are kept and recomputed later, never lost
    assert b.num_output_tokens == 2 and b in sched.waiting
    assert out.preempted_req_ids == ["b"]


def test_priority_policy_preempts_lowest_priority_first():
    sched = make_scheduler(num_blocks=7, caching=False, scheduling_policy="priority")
    add(sched, "important", 11, max_tokens=20, priority=0, arrival=1)
    low = add(sched, "low", 11, max_tokens=20, priority=5, arrival=0)
    for _ in range(3):
        run_step(sched)
    assert low.status == RequestStatus.PREEMPTED


def test_priority_policy_admits_by_priority_then_arrival():
    sched = make_scheduler(max_num_seqs=1, scheduling_policy="priority")
    add(sched, "late-urgent", 3, priority=-1, arrival=5)
    add(sched, "early", 3, priority=0, arrival=0)
    out, _ = run_step(sched)
    assert set(scheduled(out)) == {"late-urgent"}


def test_request_that_outgrows_the_whole_cache_fails_with_error():
    sched = make_scheduler(num_blocks=4, caching=False)  # 12 tokens of cache
    # its prompt fits (the input processor refuses one that does not), its output does not
    grow = add(sched, "grow", 10, max_tokens=100)
    finished = []
    for _ in range(10):
        _, outputs = run_step(sched)
        finished += [o for o in outputs if o.finish_reason]
    assert finished and finished[0].finish_reason == "error"
    assert grow.status == RequestStatus.FINISHED_ERROR
    assert sched.kv.pool.num_free_blocks() == 3
    assert not sched.has_unfinished()


def test_abort_frees_blocks_and_reports():
    sched = make_scheduler()
    add(sched, "x", 10, max_tokens=100)
    add(sched, "y", 10, max_tokens=100)
    run_step(sched)
    sched.abort_requests(["x", "y", "unknown"])
    _, outputs = run_step(sched)
    assert {o.request_id: o.finish_reason for o in outputs} == {"x": "abort", "y": "abort"}
    assert sched.kv.pool.num_free_blocks() == sched.kv.pool.num_usable_blocks


def test_max_tokens_and_stop_token():
    sched = make_scheduler()
    add(sched, "len", 3, max_tokens=2)
    core = EngineCoreRequest("stop", [1, 2, 3], SamplingParams(max_tokens=10, stop_token_ids=[7]), eos_token_ids=(9,))
    sched.add_request(Request(core, 10))
    _, outputs = run_step(sched, token=7)
    by_id = {o.request_id: o for o in outputs}
    assert by_id["stop"].finish_reason == "stop" and by_id["stop"].stop_reason == 7
    assert by_id["len"].finish_reason is None
    _, outputs = run_step(sched, token=7)
    assert outputs[0].request_id == "len" and outputs[0].finish_reason == "length"


def test_prefix_hits_counted_once_per_admission():
    sched = make_scheduler(max_num_batched_tokens=64)
    add(sched, "a", 17, max_tokens=1)
    run_step(sched)
    add(sched, "b", 17, max_tokens=1)
    run_step(sched)
    assert (sched.stats.prefix_cache_queries, sched.stats.prefix_cache_hits) == (34, 16)


def test_a_request_preempted_after_it_was_scheduled_gives_its_budget_back():
    # Priority policy: low-priority L runs first in the batch, then a higher-priority request
    # needs a block L holds; L's 16 tokens of this step go back to the budget and M uses them.
    sched = make_scheduler(num_blocks=18, caching=False, scheduling_policy="priority",
                           max_num_batched_tokens=24, long_prefill_token_threshold=16)
    add(sched, "L", 60, max_tokens=20, priority=5, arrival=0)
    run_step(sched)
    add(sched, "H", 4, max_tokens=20, priority=0, arrival=1, first_token=100)
    add(sched, "M", 40, max_tokens=20, priority=1, arrival=2, first_token=200)
    for _ in range(2):
        out, _ = run_step(sched)
        assert "L" in scheduled(out) and not out.preempted_req_ids
    out, _ = run_step(sched)
    assert out.preempted_req_ids == ["L"]
    # without the refund M would get 24 - 16 (L) - 1 (H) = 7 tokens
    assert scheduled(out) == {"H": 1, "M": 16}


def test_fcfs_queue_serves_in_order_and_puts_preempted_requests_first():
    from sluice.core.request_queue import FCFSQueue, PriorityQueue

    sched = make_scheduler()
    a, b, c = (add(sched, rid, 3, priority=p, arrival=t) for rid, p, t in (("a", 2, 0), ("b", 0, 1), ("c", 1, 2)))
    fcfs = FCFSQueue()
    fcfs.add(a)
    fcfs.add(b)
    fcfs.add_preempted(c)
    assert [fcfs.pop() for _ in range(3)] == [c, a, b]
    by_priority = PriorityQueue()
    for request in (a, b, c):
        by_priority.add(request)
    by_priority.remove(c)
    assert [by_priority.pop() for _ in range(2)] == [b, a] and not by_priority


def test_several_tokens_in_one_step_stop_at_the_first_stop_token():
    from sluice.core.sched_output import RunnerOutput

    sched = make_scheduler()
    core = EngineCoreRequest("s", [1, 2, 3], SamplingParams(max_tokens=10, stop_token_ids=[7]), eos_token_ids=())
    request = Request(core, 10)
    sched.add_request(request)
    out = sched.schedule()
    outputs = sched.update_from_output(out, RunnerOutput(sampled_token_ids={"s": [5, 7, 6]},
                                                         logprobs={"s": [([5], [-0.1], 1), ([7], [-0.2], 1),
                                                                         ([6], [-0.3], 1)]}))
    assert outputs[0].new_token_ids == [5, 7] and outputs[0].finish_reason == "stop"
    assert outputs[0].new_logprobs == [([5], [-0.1], 1), ([7], [-0.2], 1)]
    assert request.output_token_ids == [5, 7] and sched.stats.num_generation_tokens == 2


def test_the_worker_hears_new_requests_in_full_then_differences():
    sched = make_scheduler(num_blocks=7, caching=False)
    add(sched, "a", 11, max_tokens=20, arrival=0)
    b = add(sched, "b", 11, max_tokens=20, arrival=1)
    out, _ = run_step(sched)
    assert [(n.req_id, n.block_ids, n.num_computed_tokens) for n in out.new_requests] == [("a", [[1, 2, 3]], 0),
                                                                                          ("b", [[4, 5, 6]], 0)]
    out, _ = run_step(sched)
    assert not out.new_requests and out.cached_requests.new_token_ids == [[7], [7]]
    assert out.cached_requests.new_block_ids == [[[]], [[]]] and out.cached_requests.num_computed_tokens == [11, 11]
    out, _ = run_step(sched)  # a needs a 4th block: b is preempted
    assert out.preempted_req_ids == ["b"] and out.cached_requests.new_block_ids == [[[6]]]  # freed tail first
    sched.abort_requests(["a"])
    out, _ = run_step(sched)  # b resumes: all its blocks again, and the tokens it has not seen
    assert out.finished_req_ids == ["a"] and out.cached_requests.req_ids == ["b"]
    assert len(out.cached_requests.new_block_ids[0][0]) == 4 and out.cached_requests.new_token_ids == [[7]]
    assert out.cached_requests.num_computed_tokens == [0] and b.num_output_tokens == 3  # recomputed, sampled again


def test_micro_batches_are_disjoint_shares_and_in_flight_requests_are_never_preempted():
    """Pipeline parallel (two batches in flight): each batch takes half the requests, none twice,
    and a request short of blocks preempts one that is not in flight (r1, not the later r3)."""
    sched = make_scheduler(num_blocks=5)  # 4 usable blocks: one per 4-token prompt, none to grow into
    sched.num_micro_batches = 2
    for i in range(4):
        add(sched, f"r{i}", BS, arrival=i, first_token=100 * i + 1)
    first, second = sched.schedule(), sched.schedule()
    assert set(scheduled(first)) == {"r0", "r1"} and set(scheduled(second)) == {"r2", "r3"}
    assert not scheduled(sched.schedule())  # everyone is in flight
    sched.update_from_output(first, fake_runner_output(sched, first))
    third = sched.schedule()  # r0's 5th token needs a block: r3 is in flight, so r1 gives its up
    assert scheduled(third) == {"r0": 1}
    assert sched.requests["r1"].status == RequestStatus.PREEMPTED
    assert all(sched.requests[r].status == RequestStatus.RUNNING for r in ("r2", "r3"))
    sched.update_from_output(second, fake_runner_output(sched, second))
    assert scheduled(sched.schedule()) == {"r2": 1}  # r0 is in flight now: r3 gives its block up
    assert sched.requests["r0"].status == RequestStatus.RUNNING
    assert sched.requests["r3"].status == RequestStatus.PREEMPTED
