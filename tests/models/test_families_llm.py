"""Greedy parity with transformers through the whole engine (`LLM` from a safetensors folder),
token for token in float32, for each architecture added after Llama/Mistral/Qwen (tiny random
models: the configs of test_model_forward, windows and soft caps included); and Gemma 2 (windowed
and global layers, soft caps) giving a lone request's tokens on every scheduler path."""

from __future__ import annotations

import pytest
import torch
import transformers

from sluice import LLM, SamplingParams

from tests.models.test_model_forward import CONFIGS
from tests.models.test_parity import check_float32
from tests.utils import smollm2_tokenizer

NUM_TOKENS = 16
PROMPTS = [[1, 17, 42, 7, 99, 3, 250, 8, 61], [5, 200]]


def save_tiny(name: str, folder) -> transformers.PreTrainedModel:
    config = CONFIGS[name]()
    config.initializer_range = 0.3  # peaky logits: greedy near-ties stay rare
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(folder)
    smollm2_tokenizer().save_pretrained(folder)
    return hf


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3", "phi3", "granite", "olmo2", "llama_gelu_yarn"])
def test_greedy_tokens_match_transformers(name, tmp_path):
    hf = save_tiny(name, tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", max_model_len=64, kv_cache_memory_bytes=4 << 20)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in PROMPTS], params, use_tqdm=False)
    for ids, out in zip(PROMPTS, outputs):
        theirs = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NUM_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        tokens = theirs.sequences[0, len(ids):].tolist()
        check_float32(out.outputs[0].token_ids, tokens, [step[0].float() for step in theirs.logits], f"{name} {ids}",
                      NUM_TOKENS)


def test_gemma2_scheduler_paths_equal_lone(tmp_path):
    """Batched, chunked (4-token chunks beside 4-token windows), preempted and prefix-warm runs."""
    save_tiny("gemma2", tmp_path)
    common = dict(dtype="float32", max_model_len=64, block_size=4)
    batch = [{"prompt_token_ids": ids} for ids in PROMPTS + [PROMPTS[0][:6] + [77, 78, 79]]]
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)

    def run(llm: LLM, prompts: list[dict]) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    lone_llm = LLM(str(tmp_path), **common, enable_prefix_caching=False, kv_cache_memory_bytes=4 << 20)
    lone = [run(lone_llm, [p])[0] for p in batch]
    chunked = LLM(str(tmp_path), **common, max_num_batched_tokens=4, kv_cache_memory_bytes=4 << 20)
    assert run(chunked, batch) == lone
    assert run(chunked, batch) == lone  # prefix-warm: the shared blocks now hit the cache
    assert chunked.get_metrics()["vllm:prefix_cache_hits"] > 0
    preempting = LLM(str(tmp_path), **common, enable_prefix_caching=False, num_gpu_blocks_override=10)
    assert run(preempting, batch) == lone
    assert preempting.get_metrics()["vllm:num_preemptions"] > 0
