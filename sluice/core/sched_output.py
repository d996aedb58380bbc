"""What the scheduler tells the worker each step, and what the worker answers: plain data.

No `Request` crosses this line. A request new to the worker comes in full; after that only its
differences come (tokens and blocks the worker has not seen, its computed count), so the worker
can live in another process and a step's message stays small. Every class here encodes with
msgspec; tensors (the grammar bitmask) go through `encode_hook` / `decode_hook`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sluice.distributed.kv_transfer.base import KVConnectorMetadata, KVConnectorOutput
from sluice.pooling.params import PoolingParams
from sluice.lora.request import LoRARequest
from sluice.multimodal.inputs import MultiModalFeature
from sluice.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the worker has not seen: everything it needs to run and sample it."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[list[int]]  # one block table per KV cache group
    num_computed_tokens: int
    stop_token_ids: list[int]  # EOS (unless ignore_eos) and stop ids: min_tokens bans them
    pooling_params: PoolingParams | None = None  # pooled once its prompt has run, never sampled
    lora_request: LoRARequest | None = None
    mm_features: list[MultiModalFeature] | None = None  # images: the worker runs their encoder


@dataclass
class CachedRequestData:
    """Running requests the worker knows, as differences; one column per field (cheap to build
    and to encode for a batch of hundreds)."""

    req_ids: list[str] = field(default_factory=list)
    new_token_ids: list[list[int]] = field(default_factory=list)  # accepted since the worker last heard
    new_block_ids: list[list[list[int]]] = field(default_factory=list)  # per group: appended to its block table
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass
class GrammarBitmask:
    """Allowed tokens of the grammar-constrained requests that sample this step: a row per
    sampling position (a request verifying k drafts has k + 1, in position order)."""

    req_ids: list[str]  # the request of each row
    bitmask: torch.Tensor  # [len(req_ids), ceil(vocab_size / 32)] int32


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: CachedRequestData = field(default_factory=CachedRequestData)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)  # in batch order, drafts included
    # draft tokens scheduled after a request's known tokens: the worker verifies them
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    # drafts the worker may propose per request after this step's sampling (absent: none, e.g. it rests)
    max_drafts: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    finished_req_ids: list[str] = field(default_factory=list)  # the worker drops their state
    preempted_req_ids: list[str] = field(default_factory=list)  # the worker drops their blocks
    grammar_bitmask: GrammarBitmask | None = None  # None: no sampling row is constrained
    kv_connector_metadata: KVConnectorMetadata | None = None  # KV transfers to start (disaggregated prefill)


@dataclass
class RunnerOutput:
    """Per request that sampled: its tokens (0, 1 or several) and, when asked, their logprobs."""

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[tuple]] = field(default_factory=dict)  # per token: (top ids, top logprobs, rank)
    prompt_logprobs: dict[str, list] = field(default_factory=dict)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)  # drafts proposed for the next step
    pooler_output: dict[str, list[float]] = field(default_factory=dict)  # pooling requests whose prompt ended
    errors: dict[str, str] = field(default_factory=dict)  # requests the worker could not run (an adapter that no longer loads)
    mm_cache_queries: int = 0  # images whose encoder output a request needed (once per request and image)
    mm_cache_hits: int = 0  # of which the encoder cache held
    kv_connector_output: KVConnectorOutput | None = None  # KV transfers that ended


def encode_hook(obj):
    if isinstance(obj, torch.Tensor):
        return [str(obj.dtype).removeprefix("torch."), list(obj.shape), obj.cpu().numpy().tobytes()]
    raise TypeError(f"cannot encode {type(obj).__name__}")


def decode_hook(kind: type, obj):
    if kind is torch.Tensor:
        dtype, shape, data = obj
        return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(shape)
    raise TypeError(f"cannot decode {kind.__name__}")
