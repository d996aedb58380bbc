"""What crosses between the API side and the engine core: requests in, outputs back.

Plain dataclasses, so the in-process `LLM` passes them as objects and the server sends them
over ZMQ as msgpack (msgspec encodes and decodes dataclasses natively). This module imports
no torch, so an API process that only tokenizes stays light.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec

from sluice.pooling.params import PoolingParams
from sluice.lora.request import LoRARequest
from sluice.multimodal.inputs import MultiModalFeature
from sluice.sampling_params import SamplingParams


@dataclass
class EngineCoreRequest:
    """Already tokenized and validated: the core trusts every field."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]  # the tokenizer's EOS plus generation_config's (Llama 3 has several)
    arrival_time: float = field(default_factory=time.time)
    priority: int = 0
    cache_salt: str | None = None  # extra key folded into block hashes (LoRA id, tenant salt)
    trace_headers: dict[str, str] | None = None  # W3C trace context of the HTTP request, for its span
    pooling_params: PoolingParams | None = None  # a pooling request: prefill only, no sampling
    lora_request: LoRARequest | None = None  # the adapter it runs under (already added to the core)
    mm_features: list[MultiModalFeature] | None = None  # its images, in prompt order


@dataclass
class EngineCoreOutput:
    """One request's progress in one step."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    new_logprobs: list | None = None  # per new token: (token ids, logprobs, rank of sampled)
    new_prompt_logprobs: list | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    pooling_output: list[float] | None = None  # a finished pooling request's vector (or class logits)
    kv_transfer_params: dict | None = None  # a finished prefill's: where a decode engine pulls its KV from


class QueueFullError(RuntimeError):
    """The waiting queue is over --max-num-queued-reqs / --max-num-queued-tokens: retry later."""


# ---- the wire: multipart ZMQ messages [kind, msgpack payload] ---------------------------
# API -> core
ADD = b"add"  # list[EngineCoreRequest], the children of one user request, admitted all or none
ABORT = b"abort"  # list[str] request ids
STATS = b"stats"  # None; the core answers STATS with its metrics in Prometheus text format
HELLO = b"hello"  # None; the core answers READY with what the API side needs to know
UTILITY = b"utility"  # [method, args]: a control call (UTILITY_METHODS); the core answers UTILITY
DASHBOARD = b"dashboard"  # int: the last step seen; the core answers DASHBOARD with a snapshot (/dashboard)
# core -> API
ADDED = b"added"  # [first request id, None or the reason it was refused]
OUTPUTS = b"outputs"  # list[EngineCoreOutput]
READY = b"ready"  # dict: max_model_len, vocab_size, num_blocks, block_size, kv_group_windows, pid, config
FATAL = b"fatal"  # str: the core is going down, every request it held is lost
LORAS = b"loras"  # list[[name, id, path, parent]]: the adapters added, sent to every API process on a change
# UTILITY answer: [result, None] or [None, error message]

# EngineCore methods an API process may call, with no request in hand.
UTILITY_METHODS = ("reset_prefix_cache", "sleep", "wake_up", "is_sleeping", "add_lora", "remove_lora",
                   "lora_adapters")
# the calls after which every API process gets the adapters (LORAS)
LORA_CHANGES = ("add_lora", "remove_lora")

encode = msgspec.msgpack.Encoder().encode
_decoders = {
    ADD: msgspec.msgpack.Decoder(list[EngineCoreRequest]),
    OUTPUTS: msgspec.msgpack.Decoder(list[EngineCoreOutput]),
}
_any = msgspec.msgpack.Decoder()


def decode(kind: bytes, payload: bytes):
    return _decoders.get(kind, _any).decode(payload)
