"""A windowed model (tiny random Mistral, a 16-token window on every layer) on every scheduler
path: batched, chunked, preempted and prefix-warm runs give a lone request's tokens while the KV
cache frees the blocks behind the window; a long request holds about window/block_size + 1 blocks."""

from __future__ import annotations

import pytest

from sluice import LLM, SamplingParams

from tests.engine.test_scheduler_paths import GREEDY, tokens
from tests.models.test_sliding_window import WINDOW, long_prompts, windowed_model_dir  # noqa: F401 (fixture)

BLOCK = 16
COMMON = dict(dtype="float32", max_model_len=256, block_size=BLOCK)


def prompts() -> list[dict]:
    return [{"prompt_token_ids": ids} for ids in long_prompts()]


@pytest.fixture(scope="module")
def mistral(windowed_model_dir) -> str:  # noqa: F811
    return windowed_model_dir("mistral")


@pytest.fixture(scope="module")
def plain_llm(mistral) -> LLM:
    return LLM(mistral, **COMMON, enable_prefix_caching=False, kv_cache_memory_bytes=4 << 20)


@pytest.fixture(scope="module")
def chunked_llm(mistral) -> LLM:
    return LLM(mistral, **COMMON, enable_prefix_caching=False, max_num_batched_tokens=24, kv_cache_memory_bytes=4 << 20)


@pytest.fixture(scope="module")
def lone_reference(plain_llm) -> list[list[int]]:
    return [tokens(plain_llm, [p])[0] for p in prompts()]


def test_batched_and_chunked_equal_lone(plain_llm, chunked_llm, lone_reference):
    assert tokens(plain_llm, prompts()) == lone_reference
    assert tokens(chunked_llm, prompts()) == lone_reference


def test_preemption_equals_lone(mistral, lone_reference):
    # Chunks of up to 24 tokens beside a 16-token window: each request holds up to 4 blocks,
    # and 7 usable blocks cannot hold three requests at once.
    llm = LLM(mistral, **COMMON, enable_prefix_caching=False, num_gpu_blocks_override=8, max_num_batched_tokens=24)
    outs = llm.generate(prompts(), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == lone_reference
    metrics = llm.get_metrics()
    assert metrics["vllm:num_preemptions"] > 0
    assert metrics["sluice:num_free_blocks"] == 7


def test_prefix_warm_equals_lone(mistral, lone_reference):
    llm = LLM(mistral, **COMMON, enable_prefix_caching=True, kv_cache_memory_bytes=4 << 20)
    assert tokens(llm, prompts()) == lone_reference
    # the blocks the window left behind stayed cached: the same prompts hit them again
    assert tokens(llm, prompts()) == lone_reference
    assert llm.get_metrics()["vllm:prefix_cache_hits"] >= sum(len(p) // BLOCK - 1 for p in long_prompts()) * BLOCK


def test_long_request_holds_only_its_window(chunked_llm):
    """A 101-token prompt in 24-token chunks, then 48 tokens: the blocks held after each step
    never exceed what a chunk beside its window needs, and while decoding stay at the window."""
    core = chunked_llm.engine_core
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    (request,) = chunked_llm.input_processor.make_requests("long", long_prompts()[0], params)
    core.add_request(request)
    held = []
    while core.has_unfinished_requests():
        core.step()
        held.append(core.kv.num_held_blocks("long"))
    decode_steps = held[-40:-1]  # the last step finished the request and freed everything
    assert max(held) <= (WINDOW - 1 + 24 - 1) // BLOCK + 2
    assert max(decode_steps) == (WINDOW - 1) // BLOCK + 2 and held[-1] == 0
    assert core.kv.pool.num_free_blocks() == core.kv.pool.num_usable_blocks
