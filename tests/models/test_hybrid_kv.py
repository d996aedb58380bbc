"""Hybrid KV cache groups end to end: tiny random Gemma 2 (windowed and global layers alternate)
and Gemma 3 (five windowed per global) with prompts several windows long. Greedy float32 tokens
match transformers; batched, chunked, preempted and prefix-warm runs give the same tokens; and a
long request's sliding groups hold a window's blocks while its full group grows."""

from __future__ import annotations

import pytest
import torch
import transformers

from sluice import LLM, SamplingParams

from tests.models.test_model_forward import GEMMA, SMALL
from tests.models.test_parity import check_float32
from tests.utils import model_folder_factory, random_model

WINDOW, BLOCK = 8, 4
NUM_TOKENS = 12
PROMPT_LENS = (45, 21, 30)  # five windows, under three, four
COMMON = dict(dtype="float32", max_model_len=128, block_size=BLOCK)
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
CONFIGS = {
    "gemma2": lambda: transformers.Gemma2Config(  # layers: sliding, full, sliding, full
        **{**SMALL, "num_hidden_layers": 4}, **GEMMA, vocab_size=300, architectures=["Gemma2ForCausalLM"],
        query_pre_attn_scalar=24, sliding_window=WINDOW, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, initializer_range=0.3),
    "gemma3": lambda: transformers.Gemma3TextConfig(  # five sliding layers, then a full one
        **{**SMALL, "num_hidden_layers": 6}, **GEMMA, vocab_size=300, architectures=["Gemma3ForCausalLM"],
        query_pre_attn_scalar=24, sliding_window=WINDOW, initializer_range=0.3),
}


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    return model_folder_factory(tmp_path_factory, lambda arch: random_model(CONFIGS[arch]()), "hybrid")


def long_prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, 300, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@torch.no_grad()
def hf_greedy(hf, ids: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens and logits, each step a whole forward (cheaper than generate's
    hybrid cache for a dozen tokens)."""
    seq, logits = list(ids), []
    for _ in range(NUM_TOKENS):
        logits.append(hf(torch.tensor([seq])).logits[0, -1].float())
        seq.append(int(logits[-1].argmax()))
    return seq[len(ids):], logits


def tokens(llm: LLM) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": ids} for ids in long_prompts()], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def gemma3_reference(hybrid_dir) -> list[list[int]]:
    """The batch through a roomy cache, checked against transformers token for token."""
    folder = hybrid_dir("gemma3")
    llm = LLM(folder, **COMMON, enable_prefix_caching=False, kv_cache_memory_bytes=4 << 20)
    groups = llm.engine_core.kv.group_windows
    assert groups == (None,) + (WINDOW,) * 5  # 1 global layer: groups of one layer, one tensor
    ours = tokens(llm)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for ids, out in zip(long_prompts(), ours):
        theirs, logits = hf_greedy(hf, ids)
        check_float32(out, theirs, logits, f"gemma3 {len(ids)}-token prompt", NUM_TOKENS)
    return ours


def test_gemma2_long_prompts_match_transformers(hybrid_dir):
    folder = hybrid_dir("gemma2")
    llm = LLM(folder, **COMMON, kv_cache_memory_bytes=4 << 20)
    assert llm.engine_core.kv.group_windows == (None, WINDOW)  # layers 1, 3 and 0, 2 share two tensors
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for ids, out in zip(long_prompts(), tokens(llm)):
        theirs, logits = hf_greedy(hf, ids)
        check_float32(out, theirs, logits, f"gemma2 {len(ids)}-token prompt", NUM_TOKENS)


@pytest.fixture(scope="module")
def chunked(hybrid_dir) -> LLM:
    return LLM(hybrid_dir("gemma3"), **COMMON, max_num_batched_tokens=12, kv_cache_memory_bytes=4 << 20)


def test_gemma3_chunked_prefix_warm_and_preempted_equal_lone(hybrid_dir, chunked, gemma3_reference):
    folder = hybrid_dir("gemma3")
    assert tokens(chunked) == gemma3_reference
    assert tokens(chunked) == gemma3_reference  # prefix-warm: every group's blocks hit
    assert chunked.get_metrics()["vllm:prefix_cache_hits"] >= sum(n // BLOCK - 1 for n in PROMPT_LENS) * BLOCK
    # a 57-token request needs 15 blocks in the full group and 3 in each sliding one: 30 of 31 usable
    preempting = LLM(folder, **COMMON, enable_prefix_caching=False, num_gpu_blocks_override=32,
                     max_num_batched_tokens=12)
    assert tokens(preempting) == gemma3_reference
    assert preempting.get_metrics()["vllm:num_preemptions"] > 0
    assert preempting.get_metrics()["sluice:num_free_blocks"] == 31


def test_long_request_sliding_groups_stay_bounded(chunked):
    """A 45-token prompt (in no cache yet) in 12-token chunks, then 40 tokens: each sliding group
    holds at most a chunk beside its window, and a window's blocks while decoding; the full group
    holds them all."""
    core = chunked.engine_core
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompt = torch.randint(3, 300, (45,), generator=torch.Generator().manual_seed(9)).tolist()
    (request,) = chunked.input_processor.make_requests("long", prompt, params)
    core.add_request(request)
    full, sliding = [], []
    while core.has_unfinished_requests():
        core.step()
        full.append(core.kv.num_held_blocks("long", 0))
        sliding.append([core.kv.num_held_blocks("long", g) for g in range(1, 6)])
    assert full[:-1] == sorted(full[:-1]) and full[-2] == -(-(45 + 40 - 1) // BLOCK)  # grows to the whole
    assert max(max(s) for s in sliding) <= (WINDOW - 1 + 12 - 1) // BLOCK + 2
    decoding = [n for s in sliding[-20:-1] for n in s]
    assert max(decoding) == (WINDOW - 1) // BLOCK + 2 and min(decoding) >= 2  # the window only
    assert full[-1] == 0 and sliding[-1] == [0] * 5
    assert core.kv.pool.num_free_blocks() == core.kv.pool.num_usable_blocks
