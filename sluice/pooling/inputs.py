"""Pooling prompts -> EngineCoreRequests: a whole prompt may use all of max_model_len (nothing is
generated after it); longer is an error unless truncate_prompt_tokens asks to cut it."""

from __future__ import annotations

from sluice.engine.input_processor import InputProcessor, truncate_prompt
from sluice.engine.messages import EngineCoreRequest
from sluice.pooling.params import PoolingParams
from sluice.sampling_params import SamplingParams


def pair_token_ids(processor: InputProcessor, query: str, document: str) -> list[int]:
    """A cross-encoder's input: query and document tokenized as one pair ([CLS] q [SEP] d [SEP])."""
    for name, text in (("query", query), ("document", document)):
        if not isinstance(text, str) or not text:
            raise ValueError(f"{name} must be a non-empty string, got {text!r}")
    return processor.tokenizer(query, document)["input_ids"]


def make_pooling_request(processor: InputProcessor, request_id: str, token_ids: list[int], params: PoolingParams,
                         truncate_prompt_tokens: int | None = None, field: str = "input") -> EngineCoreRequest:
    token_ids = truncate_prompt(token_ids, truncate_prompt_tokens, processor.max_model_len)
    if not token_ids:
        raise ValueError(f"{field} must not be empty (it has 0 tokens)")
    if len(token_ids) > processor.max_model_len:
        raise ValueError(f"{field} has {len(token_ids)} tokens, more than the {processor.max_model_len} this model "
                         f"takes (max_model_len); set truncate_prompt_tokens to keep only the last ones")
    if processor.kv_cache is not None and not processor.kv_cache.fits(len(token_ids)):
        raise ValueError(f"{field} does not fit the KV cache: {processor.kv_cache.describe(len(token_ids))}")
    return EngineCoreRequest(request_id, token_ids, SamplingParams(max_tokens=1), processor.eos_token_ids,
                             pooling_params=params)
