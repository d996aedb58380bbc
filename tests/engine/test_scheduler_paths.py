"""Greedy output never depends on the scheduler's path: batching, chunked prefill, preemption,
prefix caching. Each path is held to the tokens of a lone request (SmolLM2, float32), in-process
and, for the paths that send the worker differences (chunks, preemption, cache hits), with the
worker in a process of its own (`mp`)."""

from __future__ import annotations

import pytest

from sluice import LLM, SamplingParams

from tests.utils import smollm2_tokenizer

NUM_TOKENS = 24
SYSTEM = (
    "You are a careful assistant for a small bakery. Answer in one short paragraph, mention "
    "prices in euros, and never invent products that are not on the menu of the day. "
)
QUESTIONS = [
    "Do you sell rye bread?",
    "What time do you open on Sundays?",
    "Can I order a birthday cake for twelve people, with strawberries and no nuts?",
    "Is the croissant made with butter?",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
# The dense float32 weights: on the GGUF blocks (quantization auto) each activation row is rounded to
# 8 bits, which turns the last-bit float differences between paths into whole rounding steps.
COMMON = dict(dtype="float32", quantization="none", max_model_len=256, block_size=16)  # paths in 16-token blocks
BOTH_EXECUTORS = pytest.mark.parametrize("backend", ["uni", "mp"])


def prompts() -> list[dict]:
    tok = smollm2_tokenizer()
    return [{"prompt_token_ids": tok.encode(SYSTEM + q)} for q in QUESTIONS]


def tokens(llm: LLM, batch: list[dict]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def lone_reference() -> list[list[int]]:
    llm = LLM(**COMMON, enable_prefix_caching=False, kv_cache_memory_bytes=64 << 20)
    return [tokens(llm, [p])[0] for p in prompts()]


def test_prompts_are_long_enough_to_chunk_and_share_blocks():
    lengths = [len(p["prompt_token_ids"]) for p in prompts()]
    assert min(lengths) > 32


def test_batched_equals_lone(lone_reference):
    llm = LLM(**COMMON, enable_prefix_caching=False, kv_cache_memory_bytes=64 << 20)
    assert tokens(llm, prompts()) == lone_reference


@BOTH_EXECUTORS
def test_tiny_chunks_equal_lone(lone_reference, backend):
    llm = LLM(**COMMON, enable_prefix_caching=False, max_num_batched_tokens=32, kv_cache_memory_bytes=64 << 20,
              distributed_executor_backend=backend)
    assert tokens(llm, prompts()) == lone_reference


@BOTH_EXECUTORS
def test_preemption_equals_lone(lone_reference, backend):
    # Each request needs ~6 blocks of 16 at the end; 13 usable blocks cannot hold all four.
    llm = LLM(**COMMON, enable_prefix_caching=False, num_gpu_blocks_override=14, distributed_executor_backend=backend)
    outs = llm.generate(prompts(), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == lone_reference
    total = llm.get_metrics()["vllm:num_preemptions"]
    assert total > 0
    assert sum(o.metrics["num_preemptions"] for o in outs) == total
    assert llm.get_metrics()["sluice:num_free_blocks"] == 13


@BOTH_EXECUTORS
def test_prefix_cache_hits_equal_lone(lone_reference, backend):
    llm = LLM(**COMMON, enable_prefix_caching=True, kv_cache_memory_bytes=64 << 20, distributed_executor_backend=backend)
    batch = prompts()
    first = tokens(llm, batch[:1])
    rest = tokens(llm, batch[1:])
    metrics = llm.get_metrics()
    assert first + rest == lone_reference
    assert metrics["vllm:prefix_cache_hits"] >= 3 * 32  # the shared system prompt, in full blocks
    assert metrics["vllm:prefix_cache_queries"] == sum(len(p["prompt_token_ids"]) for p in batch)
    # the same prompts again hit their whole cached prompts (all but the last partial block)
    assert tokens(llm, batch) == lone_reference


def test_prefix_caching_off_never_hits(lone_reference):
    llm = LLM(**COMMON, enable_prefix_caching=False, kv_cache_memory_bytes=64 << 20)
    assert tokens(llm, prompts()[:1]) + tokens(llm, prompts()[1:]) == lone_reference
    assert llm.get_metrics()["vllm:prefix_cache_hits"] == 0
