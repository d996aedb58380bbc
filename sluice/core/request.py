"""A request as the engine core sees it: token ids, progress, and its place in the KV cache."""

from __future__ import annotations

import enum
import itertools
from typing import TYPE_CHECKING

from sluice.engine.messages import EngineCoreRequest

if TYPE_CHECKING:
    from sluice.structured_output.manager import RequestGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_GRAMMAR = "waiting_for_grammar"  # its structured-output grammar is compiling
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"  # its prompt's KV is being pulled from a producer
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
}


_arrival_counter = itertools.count()


class Request:
    """Engine-side state. The invariant: `num_computed_tokens` catches up with `num_tokens`.

    Chunked prefill, prefix-cache hits and preemption are all just moves of
    `num_computed_tokens`; the scheduler never tracks separate prefill/decode phases.
    """

    def __init__(self, req: EngineCoreRequest, max_tokens: int) -> None:
        self.request_id = req.request_id
        self.prompt_token_ids = req.prompt_token_ids
        self.sampling_params = req.sampling_params
        self.arrival_time = req.arrival_time
        self.arrival_seq = next(_arrival_counter)  # breaks ties between equal arrival times
        self.priority = req.priority
        self.cache_salt = req.cache_salt
        self.lora_request = req.lora_request
        # folded into every block hash: adapters never share KV (nor do salts)
        self.block_hash_extra = req.cache_salt if req.lora_request is None else (req.lora_request.lora_int_id,
                                                                                 req.cache_salt)
        self.mm_features = req.mm_features or []
        self.max_tokens = max_tokens
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(req.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit of the first scheduling; -1 until then
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        self.block_hashes: list[int] = []  # chained hashes of the full blocks of all_token_ids
        params = req.sampling_params
        self.eos_token_ids = req.eos_token_ids
        self.stop_token_ids: set[int] = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            self.stop_token_ids.update(req.eos_token_ids)
        # What the worker holds of this request (0 tokens: it has not seen it yet).
        self.num_worker_tokens = 0
        self.num_worker_blocks = 0
        self.spec_token_ids: list[int] = []  # drafts to verify in the next step (speculative decoding)
        self.max_spec_tokens: int | None = None  # drafts it may verify next; None: num_speculative_tokens
        self.spec_rest_steps = 0  # steps without drafts since a lone draft failed
        self.grammar: RequestGrammar | None = None  # set by the scheduler for structured outputs
        self.trace_headers = req.trace_headers
        self.pooling_params = req.pooling_params
        extra = req.sampling_params.extra_args or {}
        self.kv_transfer_params: dict | None = extra.get("kv_transfer_params")  # disaggregated prefill
        self.kv_loaded = False  # its external tokens were loaded (a preempted request recomputes them)
        self.num_external_tokens = 0  # prompt tokens whose KV was loaded from another engine
        self.kv_transfer_params_out: dict | None = None  # what its response tells the next engine
        # Wall-clock timestamps for metrics and traces, comparable with arrival_time.
        self.queued_time = self.arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def reads_every_prompt_row(self) -> bool:
        """Prompt logprobs and per-token rewards need every prompt position computed: no prefix-cache hits."""
        return self.sampling_params.prompt_logprobs is not None or (
            self.pooling_params is not None and self.pooling_params.task == "reward")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def block_extra_key(self, start: int, end: int) -> object:
        """What the hash of the block of positions [start, end) folds in besides its tokens: the
        salt / adapter, and the content hash of every image with placeholders there (the tokens
        alone are the same for any image)."""
        images = tuple(f.identifier for f in self.mm_features if f.overlaps(start, end))
        return (self.block_hash_extra, images) if images else self.block_hash_extra

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def sort_key(self, policy: str) -> tuple:
        """Lower sorts first: served earlier, preempted last."""
        if policy == "priority":
            return (self.priority, self.arrival_time, self.arrival_seq)
        return (self.arrival_time, self.arrival_seq)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens})"
        )
