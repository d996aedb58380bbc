"""What the engine core measures, as plain records its stat loggers consume.

The scheduler fills one `IterationStats` as it works (tokens, latencies, finished requests,
preemptions, prefix-cache lookups) and the core hands it, with a `SchedulerStats` snapshot of
the queues and the KV cache, to every stat logger (Prometheus, the periodic log line, tracing).
Times are wall-clock seconds (time.time()), the clock the API process stamps arrivals with.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SchedulerStats:
    """The engine's state right now: the gauges."""

    num_running: int = 0
    num_waiting_capacity: int = 0  # waiting for room in the batch or the KV cache
    num_waiting_deferred: int = 0  # waiting on something else first (a grammar compiling)
    num_waiting_tokens: int = 0  # prompt tokens the waiting queue still has to compute
    kv_cache_usage: float = 0.0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    running_lora_adapters: dict[str, int] = field(default_factory=dict)  # adapter name -> requests
    waiting_lora_adapters: dict[str, int] = field(default_factory=dict)
    max_lora: int = 0  # max_loras; 0: LoRA is off

    @property
    def num_waiting(self) -> int:
        return self.num_waiting_capacity + self.num_waiting_deferred


@dataclass
class FinishedRequestStats:
    """One request's life, recorded when it finishes (however it finishes)."""

    request_id: str
    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    max_tokens: int
    n: int
    arrival_time: float  # the API process received it
    queued_time: float  # the core admitted it
    scheduled_time: float | None  # first scheduled; None if it never ran
    first_token_time: float | None
    finished_time: float
    num_cached_tokens: int = 0  # prefix-cache hits and KV loaded from another engine
    num_preemptions: int = 0
    num_external_tokens: int = 0  # prompt tokens whose KV was loaded from another engine
    temperature: float = 1.0
    top_p: float = 1.0
    trace_headers: dict[str, str] | None = None

    @property
    def e2e_latency(self) -> float:
        return self.finished_time - self.arrival_time

    @property
    def queue_time(self) -> float:
        """Admitted until first scheduled (or until it finished, if it never ran)."""
        return (self.scheduled_time or self.finished_time) - self.queued_time

    @property
    def prefill_time(self) -> float:
        if self.scheduled_time is None or self.first_token_time is None:
            return 0.0
        return self.first_token_time - self.scheduled_time

    @property
    def decode_time(self) -> float:
        return self.finished_time - self.first_token_time if self.first_token_time is not None else 0.0

    @property
    def inference_time(self) -> float:
        return self.finished_time - self.scheduled_time if self.scheduled_time is not None else 0.0

    @property
    def time_per_output_token(self) -> float | None:
        if self.num_generation_tokens < 2:
            return None
        return self.decode_time / (self.num_generation_tokens - 1)


@dataclass
class KVBlockEvents:
    """Block-level timings, collected only with --kv-cache-metrics."""

    lifetimes: list[float] = field(default_factory=list)  # allocated until its cached content was evicted
    idle_before_evict: list[float] = field(default_factory=list)  # last released until evicted
    reuse_gaps: list[float] = field(default_factory=list)  # between consecutive uses of a cached block


@dataclass
class SpecDecodingStats:
    """Speculative decoding since the last look: drafts verified, and how many were kept."""

    num_drafts: int = 0  # requests that verified drafts, once per step
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [i]: drafts kept at position i


@dataclass
class IterationStats:
    """Everything that happened since the stat loggers last looked (normally one step)."""

    num_prompt_tokens: int = 0  # counted once per request, when its prefill completes
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which found
    mm_cache_queries: int = 0  # images whose encoder output a request needed
    mm_cache_hits: int = 0  # of which the encoder cache held
    step_num_tokens: list[int] = field(default_factory=list)  # tokens computed by each step
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)
    kv_blocks: KVBlockEvents = field(default_factory=KVBlockEvents)
    spec: SpecDecodingStats = field(default_factory=SpecDecodingStats)

    def record_drafts(self, num_draft_tokens: int) -> None:
        self.spec.num_drafts += 1
        self.spec.num_draft_tokens += num_draft_tokens

    def record_accepted(self, num_accepted: int) -> None:
        """The first num_accepted drafts of one request's verification were kept."""
        spec = self.spec
        spec.num_accepted_tokens += num_accepted
        if len(spec.accepted_per_pos) < num_accepted:
            spec.accepted_per_pos.extend([0] * (num_accepted - len(spec.accepted_per_pos)))
        for pos in range(num_accepted):
            spec.accepted_per_pos[pos] += 1

