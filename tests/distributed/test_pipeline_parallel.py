"""Pipeline parallel with micro-batches (two stages over gloo, the tiny Llama: a layer each): the
engine core keeps two disjoint batches in flight, stage 0 starting batch i+1 before stage 1 ends
batch i, and every request's greedy tokens equal one rank's: batched, chunked, preempted,
prefix-warm, aborted mid-flight, grammar-constrained; a stage that dies mid-flight fails the step
with its rank, no hang."""

from __future__ import annotations

from collections import deque

import pytest

from sluice import LLM, SamplingParams, StructuredOutputsParams
from sluice.executor.abstract import WorkerDiedError

from tests.distributed.test_tensor_parallel import PATHS, PROMPTS, check_scheduler_paths, lone, tokens  # noqa: F401

GREETING = 'root ::= greeting " " name "!"\ngreeting ::= "Hello" | "Hi"\nname ::= [A-Z] [a-z]{1,8}'
GRAMMAR = SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=StructuredOutputsParams(grammar=GREETING))


@pytest.fixture(scope="module")
def pp_llm(tiny_model_dir):
    # 13 usable blocks of 16 cannot hold four ~80-token requests (preemption); 32-token chunks
    llm = LLM(tiny_model_dir("llama"), **PATHS, pipeline_parallel_size=2, num_gpu_blocks_override=14,
              max_num_batched_tokens=32, enable_prefix_caching=True)
    yield llm
    llm.engine_core.shutdown()


def overlapping_steps(llm: LLM) -> int:
    """Steps that stage 0 started before stage 1 ended the step sent before (each stage runs every
    step, in the order sent): with one batch at a time there are none."""
    first, last = llm.engine_core.executor.collective_rpc("step_times")
    assert len(first) == len(last)
    return sum(first[k + 1][0] < last[k][1] for k in range(len(first) - 1))


def test_pp2_keeps_two_disjoint_batches_in_flight_and_equals_one_rank(pp_llm, lone):
    core = pp_llm.engine_core
    assert core.max_concurrent_batches == 2
    overlapping_steps(pp_llm)  # forget the steps so far
    check_scheduler_paths(pp_llm, lone)  # batched, in 32-token chunks, preempted, prefix-warm
    assert core.max_batches_in_flight == 2
    assert overlapping_steps(pp_llm) > 0
    assert not core.scheduler.in_flight and not core.batch_queue


def test_one_batch_at_a_time_has_no_overlap(pp_llm, lone):
    """The plain loop (what PP=2 did before): the same tokens, and the stages take turns."""
    core = pp_llm.engine_core
    overlapping_steps(pp_llm)
    core.batch_queue, core.scheduler.num_micro_batches = None, 1
    try:
        assert tokens(pp_llm, PROMPTS) == lone
        assert overlapping_steps(pp_llm) == 0
    finally:
        core.batch_queue, core.scheduler.num_micro_batches = deque(), 2


def test_abort_mid_flight_leaves_the_others_equal_and_frees_every_block(pp_llm, lone):
    core = pp_llm.engine_core
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        [request] = pp_llm.input_processor.make_requests(f"abort-{i}", prompt, params, 0)
        core.add_request(request)
    got: dict[str, list[int]] = {}
    finish: dict[str, str] = {}
    aborted = None
    while core.has_unfinished_requests():
        for out in core.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                finish[out.request_id] = out.finish_reason
        if aborted is None and core.batch_queue and len(got) >= 2:  # a batch is still in the stages
            aborted = next(iter(core.scheduler.in_flight))  # its step is in the pipeline now
            core.abort_requests([aborted])
    assert aborted is not None and finish[aborted] == "abort"
    for i in range(len(PROMPTS)):
        if f"abort-{i}" != aborted:
            assert got[f"abort-{i}"] == lone[i]
    pool = core.kv.pool
    assert pool.num_free_blocks() == pool.num_usable_blocks


def test_grammar_constrained_outputs_equal_one_rank(pp_llm, tiny_model_dir):
    one = LLM(tiny_model_dir("llama"), **PATHS, kv_cache_memory_bytes=16 << 20)
    want = [o.outputs[0].text for o in one.generate(PROMPTS, GRAMMAR, use_tqdm=False)]
    assert all(text.startswith(("Hello ", "Hi ")) for text in want), want
    assert [o.outputs[0].text for o in pp_llm.generate(PROMPTS, GRAMMAR, use_tqdm=False)] == want


def test_a_stage_dying_mid_flight_fails_the_step_naming_it(pp_llm):
    core = pp_llm.engine_core
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        [request] = pp_llm.input_processor.make_requests(f"dies-{i}", prompt, params, 0)
        core.add_request(request)
    for _ in range(4):
        core.step()
    assert core.batch_queue  # a batch is in the stages
    stage0 = core.executor.workers[0].process
    stage0.kill()
    stage0.wait()
    with pytest.raises(WorkerDiedError, match=rf"pid {stage0.pid}\) died .*rank 0 of 2"):
        while core.has_unfinished_requests():
            core.step()
