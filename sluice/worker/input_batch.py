"""The worker's own record of its requests, kept in step with the scheduler by SchedulerOutput.

A request arrives once in full (NewRequestData); afterwards each step brings only what changed:
tokens the scheduler accepted, new blocks, the computed count. What only the worker needs lives
here and nowhere else: the seeded generator (it outlives preemption, so a resumed request draws
the same numbers it would have), and how far its prompt logprobs got.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sluice.core.sched_output import NewRequestData, SchedulerOutput
from sluice.pooling.params import PoolingParams
from sluice.lora.request import LoRARequest
from sluice.multimodal.inputs import MultiModalFeature
from sluice.worker.sampler import SamplingRow


@dataclass(slots=True)
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # as accepted by the scheduler; the next sample is not here yet
    block_ids: list[list[int]]  # one block table per KV cache group
    num_computed_tokens: int
    sampling: SamplingRow  # shares the token lists above, so it is built once per request
    num_prompt_logprobs_done: int = 0  # prompt positions whose logprobs went out
    pooling_params: PoolingParams | None = None
    lora_request: LoRARequest | None = None
    mm_features: list[MultiModalFeature] = field(default_factory=list)  # its images, in prompt order
    mm_queried: set[int] = field(default_factory=set)  # images counted in the encoder-cache metrics
    mrope_positions: list[list[int]] | None = None  # M-RoPE models: the prompt's positions, 3 rows
    mrope_delta: int = 0  # M-RoPE models: what a token after the prompt adds to its index

    @classmethod
    def from_new(cls, new: NewRequestData) -> CachedRequestState:
        params = new.sampling_params
        generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        prompt, output = list(new.prompt_token_ids), []
        return cls(new.req_id, prompt, output, [list(ids) for ids in new.block_ids], new.num_computed_tokens,
                   SamplingRow(params, prompt, output, generator, set(new.stop_token_ids)),
                   pooling_params=new.pooling_params,
                   lora_request=new.lora_request, mm_features=new.mm_features or [])

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end)."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]


@dataclass
class InputBatch:
    requests: dict[str, CachedRequestState] = field(default_factory=dict)

    def update(self, out: SchedulerOutput) -> None:
        """Apply one step's differences, before the step runs."""
        for req_id in out.finished_req_ids:
            self.requests.pop(req_id, None)
        for req_id in out.preempted_req_ids:
            state = self.requests.get(req_id)
            if state is not None:  # it keeps its tokens and generator; its blocks are gone
                for table in state.block_ids:
                    table.clear()
                state.num_computed_tokens = 0
        for new in out.new_requests:
            self.requests[new.req_id] = CachedRequestState.from_new(new)
        cached = out.cached_requests
        for req_id, token_ids, block_ids, num_computed in zip(
                cached.req_ids, cached.new_token_ids, cached.new_block_ids, cached.num_computed_tokens):
            state = self.requests[req_id]
            if token_ids:
                state.output_token_ids.extend(token_ids)
            for table, new_ids in zip(state.block_ids, block_ids):
                if new_ids:
                    table.extend(new_ids)
            state.num_computed_tokens = num_computed
