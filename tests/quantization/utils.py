"""What the quantization tests share: the perplexity text and how to score it."""

from __future__ import annotations

import math
from pathlib import Path

from sluice import LLM, SamplingParams
from sluice.quantization.gguf import MANY_ROWS

from tests.utils import smollm2_tokenizer

TEXT = (Path(__file__).parent / "data" / "declaration.txt").read_text()
ENGINE = dict(dtype="bfloat16", max_model_len=1024, kv_cache_memory_bytes=64 << 20)
# Steps of fewer than MANY_ROWS tokens, so prompts too take the integer kernel; no prefix cache, so
# the same prompts can be run again with every call on the weights dequantized into bf16 panels
# (MANY_ROWS = 1), which is quantization "none"'s arithmetic on the same weights.
INTEGER_PATH = dict(max_num_batched_tokens=MANY_ROWS - 1, long_prefill_token_threshold=MANY_ROWS - 1,
                    enable_prefix_caching=False)


def perplexity(llm: LLM) -> float:
    """exp(mean negative log-likelihood) of TEXT's tokens, each predicted from those before it."""
    ids = smollm2_tokenizer().encode(TEXT)
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    logprobs = [entry[token].logprob for token, entry in zip(ids[1:], out.prompt_logprobs[1:])]
    return math.exp(-sum(logprobs) / len(logprobs))
