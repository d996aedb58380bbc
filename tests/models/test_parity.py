"""Greedy parity with Hugging Face transformers, token for token.

A batch of prompts of different lengths goes through sluice together; transformers runs each
prompt alone. float32: identical for 32 tokens, except a divergence at a near-tie (the two
tokens' logits within 1e-2 in transformers' own scores). bfloat16: vLLM's rule, at the first
divergence each side's token is in the other's top-5.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from sluice import LLM, SamplingParams

from tests.utils import TINY_ARCHITECTURES, smollm2_tokenizer

NUM_TOKENS = 32
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "A list of prime numbers: 2, 3, 5,",
    "Water boils at",
]


def prompt_ids() -> list[list[int]]:
    tokenizer = smollm2_tokenizer()
    return [tokenizer.encode(p) for p in PROMPTS]


def hf_greedy(model, ids: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy continuation, never stopping at EOS, with its raw logits per step."""
    out = model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=NUM_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(ids):].tolist()
    return tokens, [step[0].float() for step in out.logits]


def check_float32(ours: list[int], theirs: list[int], logits: list[torch.Tensor], label: str,
                  num_tokens: int = NUM_TOKENS) -> None:
    assert len(ours) == len(theirs) == num_tokens, label
    for step, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            gap = abs(logits[step][a] - logits[step][b]).item()
            assert gap < 1e-2, f"{label}: step {step} sluice {a} vs transformers {b}, logit gap {gap:.4f}"
            return


def check_bfloat16(ours: list[int], our_top: list[dict], theirs: list[int], logits: list[torch.Tensor], label: str) -> None:
    for step, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            their_top5 = set(torch.topk(logits[step], 5).indices.tolist())
            assert a in their_top5, f"{label}: step {step}: sluice token {a} not in transformers' top-5"
            assert b in our_top[step], f"{label}: step {step}: transformers token {b} not in sluice's top-5"
            return


def run_sluice(model: str, dtype: str, logprobs: int | None = None, prompts: list[list[int]] | None = None):
    """Greedy outputs of the prompts (default: all of PROMPTS), batched together. quantization none:
    a GGUF dequantized at load, as transformers reads it."""
    llm = LLM(model, dtype=dtype, quantization="none", max_model_len=512, kv_cache_memory_bytes=64 << 20)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=logprobs)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts or prompt_ids()], params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_tiny_models_float32(arch, tiny_model_dir):
    folder = tiny_model_dir(arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    outputs = run_sluice(folder, "float32")
    for ids, out in zip(prompt_ids(), outputs):
        theirs, logits = hf_greedy(hf, ids)
        check_float32(out.token_ids, theirs, logits, f"{arch} {ids[:4]}")


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_tiny_models_bfloat16(arch, tiny_model_dir):
    folder = tiny_model_dir(arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    outputs = run_sluice(folder, "bfloat16", logprobs=5)
    for ids, out in zip(prompt_ids(), outputs):
        theirs, logits = hf_greedy(hf, ids)
        check_bfloat16(out.token_ids, [set(d) for d in out.logprobs], theirs, logits, f"{arch} bf16")


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf):
    def load(dtype):
        return transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=dtype,
            quantization_config=transformers.GgufConfig(dequantize=True),
        ).eval()
    return load


def test_smollm2_float32(smollm2_hf):
    hf = smollm2_hf(torch.float32)
    outputs = run_sluice(None, "float32")
    for ids, out in zip(prompt_ids(), outputs):
        theirs, logits = hf_greedy(hf, ids)
        check_float32(out.token_ids, theirs, logits, f"SmolLM2 {ids[:4]}")


def test_smollm2_bfloat16(smollm2_hf):
    hf = smollm2_hf(torch.bfloat16)
    outputs = run_sluice(None, "bfloat16", logprobs=5)
    for ids, out in zip(prompt_ids(), outputs):
        theirs, logits = hf_greedy(hf, ids)
        check_bfloat16(out.token_ids, [set(d) for d in out.logprobs], theirs, logits, "SmolLM2 bf16")
