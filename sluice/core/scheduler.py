"""One unified token-budget scheduler (no separate prefill and decode phases).

Every step hands out at most `max_num_batched_tokens` tokens: first to running requests (a
decode is one token, an unfinished prompt gets its next chunk), then to waiting ones. A request
is only ever `num_computed_tokens` catching up with `num_tokens`.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from sluice.config import SchedulerConfig
from sluice.core.kv_cache_manager import KVCacheManager, cdiv
from sluice.core.request import Request, RequestStatus
from sluice.engine.messages import EngineCoreOutput
from sluice.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats
from sluice.structured_output.manager import GrammarBitmask, GrammarError, StructuredOutputManager

# With nothing else to run, how long one step may block waiting for a grammar to compile.
GRAMMAR_IDLE_WAIT_S = 0.01


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    num_computed_before: int  # tokens already in the KV cache before this step
    block_ids: list[int]

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the known tokens, so the model samples one more."""
        return self.num_computed_before + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_preempted: int = 0
    grammar_bitmask: GrammarBitmask | None = None  # None: no sampling row is constrained

    @property
    def total_num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 structured_output: StructuredOutputManager | None = None) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.structured_output = structured_output
        self.waiting: list[Request] = []  # kept sorted by the policy's key
        self.waiting_for_grammar: list[Request] = []  # out of the queue until their grammar compiles
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.finished_outputs: list[EngineCoreOutput] = []  # finished outside a step (aborts, errors)
        self.stats = IterationStats()  # what happened since the stat loggers last took it

    # ---- queue management -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        request.queued_time = time.time()
        self.requests[request.request_id] = request
        if cdiv(request.num_tokens + 1, self.kv.block_size) > self.kv.pool.num_usable_blocks:
            self._finish_with_error(
                request,
                f"prompt of {request.num_tokens} tokens cannot fit in the KV cache "
                f"({self.kv.pool.num_usable_blocks} blocks of {self.kv.block_size} tokens)",
            )
            return
        if request.sampling_params.structured_outputs is not None:
            self._start_grammar(request)
            return
        self._enqueue_waiting(request)

    def _start_grammar(self, request: Request) -> None:
        if self.structured_output is None:
            self._finish_with_error(request, "structured outputs are not available in this engine")
            return
        request.grammar = self.structured_output.start(request)
        request.status = RequestStatus.WAITING_FOR_GRAMMAR
        self.waiting_for_grammar.append(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        """Finish requests by the client's or output processor's wish; frees their blocks now."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None and not request.status.finished:
                self._finish(request, RequestStatus.FINISHED_ABORTED)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.finished_outputs or self.waiting_for_grammar)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.waiting_for_grammar)

    def num_waiting_tokens(self) -> int:
        """Prompt tokens the waiting queue still has to compute (backpressure and metrics)."""
        return sum(r.num_tokens - r.num_computed_tokens for r in self.waiting + self.waiting_for_grammar)

    # ---- statistics ---------------------------------------------------------------------
    def take_stats(self) -> IterationStats:
        """Hand over what happened since the last call, and start afresh."""
        stats, self.stats = self.stats, IterationStats()
        stats.kv_blocks = self.kv.pool.take_block_events()
        return stats

    def scheduler_stats(self) -> SchedulerStats:
        pool = self.kv.pool
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting_capacity=len(self.waiting),
            num_waiting_deferred=len(self.waiting_for_grammar),
            num_waiting_tokens=self.num_waiting_tokens(),
            kv_cache_usage=pool.usage(),
            num_free_blocks=pool.num_free_blocks(),
            num_total_blocks=pool.num_usable_blocks,
        )

    # ---- the step ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if self.waiting_for_grammar:
            self._admit_compiled_grammars()
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if out.num_preempted == 0:
            self._schedule_waiting(out, budget)
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
        if out.scheduled:
            self.stats.step_num_tokens.append(out.total_num_tokens)
        if self.structured_output is not None:
            out.grammar_bitmask = self.structured_output.grammar_bitmask(out.scheduled)
        return out

    def _admit_compiled_grammars(self) -> None:
        """Queue requests whose grammar compiled; fail those whose grammar failed or timed out."""
        if not (self.running or self.waiting):
            self.structured_output.wait([r.grammar for r in self.waiting_for_grammar], GRAMMAR_IDLE_WAIT_S)
        for request in list(self.waiting_for_grammar):
            try:
                ready = request.grammar.ready()
            except GrammarError as exc:
                self._finish_with_error(request, str(exc))
                continue
            if ready:
                self.waiting_for_grammar.remove(request)
                self._enqueue_waiting(request)

    def _chunk(self, remaining: int, budget: int) -> int:
        """Tokens to schedule for a request with `remaining` uncomputed tokens."""
        if remaining > 1:
            remaining = min(remaining, self.config.long_prefill_token_threshold)
        return min(remaining, budget)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._chunk(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:
                index += 1
                continue
            while self.kv.allocate_slots(request, num_new) is None:
                victim = max(self.running, key=lambda r: r.sort_key(self.config.scheduling_policy))
                if victim is request and len(self.running) == 1:
                    self._finish_with_error(
                        request,
                        f"request needs {cdiv(request.num_tokens, self.kv.block_size)} KV blocks; "
                        f"the cache holds {self.kv.pool.num_usable_blocks} blocks of {self.kv.block_size} tokens",
                    )
                    break
                if self.running.index(victim) < index:
                    index -= 1
                self._preempt(victim, out)
                if victim is request:
                    break
            else:
                out.scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
                index += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        num_partial = sum(
            1 for r in self.running if r.num_tokens - r.num_computed_tokens > 1
        )
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if num_partial >= self.config.max_num_partial_prefills:
                break
            if cdiv(request.num_tokens, self.kv.block_size) > self.kv.pool.num_usable_blocks:
                self.waiting.pop(0)
                self._finish_with_error(
                    request, f"request of {request.num_tokens} tokens no longer fits in the KV cache"
                )
                continue
            hits, num_hit_tokens = self.kv.get_computed_blocks(request)
            num_new = self._chunk(request.num_tokens - num_hit_tokens, budget)
            if self.kv.allocate_slots(request, num_new, hits) is None:
                break
            if self.kv.enable_caching:  # counted once admitted: a refused admission retries later
                self.stats.prefix_cache_queries += request.num_tokens
                self.stats.prefix_cache_hits += num_hit_tokens
            self.waiting.pop(0)
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.time()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            if request.num_tokens - request.num_computed_tokens - num_new > 0:
                num_partial += 1

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        return ScheduledRequest(
            request=request,
            num_new_tokens=num_new,
            num_computed_before=request.num_computed_tokens,
            block_ids=self.kv.block_ids(request.request_id),
        )

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Free a running request's blocks; it recomputes from scratch (prefix cache permitting)."""
        self.running.remove(request)
        out.scheduled = [s for s in out.scheduled if s.request is not request]
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.stats.num_preemptions += 1
        out.num_preempted += 1
        self._enqueue_waiting(request)

    def _enqueue_waiting(self, request: Request) -> None:
        if request.status != RequestStatus.PREEMPTED:
            request.status = RequestStatus.WAITING
        keys = [r.sort_key(self.config.scheduling_policy) for r in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, request.sort_key(self.config.scheduling_policy)), request)

    # ---- after the forward pass -------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int],
                           logprobs: dict[str, tuple] | None = None,
                           prompt_logprobs: dict[str, list] | None = None) -> list[EngineCoreOutput]:
        outputs = self.finished_outputs
        self.finished_outputs = []
        now = time.time()
        for s in out.scheduled:
            request = s.request
            if request.status.finished:
                continue
            token = sampled.get(request.request_id)
            plp = (prompt_logprobs or {}).get(request.request_id)
            if token is None:
                if plp:
                    outputs.append(EngineCoreOutput(request.request_id, [], new_prompt_logprobs=plp))
                continue
            request.append_output_token(token)
            self._record_token(request, now)
            status = self._advance_grammar(request, token) or self._check_stop(request, token)
            output = EngineCoreOutput(
                request.request_id,
                [token],
                new_logprobs=[logprobs[request.request_id]] if logprobs and request.request_id in logprobs else None,
                new_prompt_logprobs=plp,
                num_cached_tokens=max(request.num_cached_tokens, 0),
                num_preemptions=request.num_preemptions,
            )
            if status is not None:
                self._finish(request, status, emit=False)
                output.finish_reason = status.finish_reason
                output.stop_reason = request.stop_reason
                output.error = request.error
            outputs.append(output)
        return outputs

    def _record_token(self, request: Request, now: float) -> None:
        stats = self.stats
        stats.num_generation_tokens += 1
        if request.first_token_time is None:
            request.first_token_time = now
            stats.num_prompt_tokens += request.num_prompt_tokens
            stats.time_to_first_tokens.append(now - request.arrival_time)
        else:
            stats.inter_token_latencies.append(now - request.last_token_time)
        request.last_token_time = now

    @staticmethod
    def _advance_grammar(request: Request, token: int) -> RequestStatus | None:
        """Feed a sampled token to the request's matcher (once: a recomputed request resamples nothing)."""
        if request.grammar is None or request.grammar.accept(token):
            return None
        # Only when the mask left nothing to sample (e.g. min_tokens banning the grammar's only stop).
        request.error = f"{request.grammar.field}: sampled token {token} does not fit the grammar"
        return RequestStatus.FINISHED_ERROR

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if token in request.stop_token_ids and request.num_output_tokens >= params.min_tokens:
            if token in (params.stop_token_ids or ()):
                request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if request.grammar is not None and request.grammar.terminated:
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus, emit: bool = True) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        elif request in self.waiting_for_grammar:
            self.waiting_for_grammar.remove(request)
        if request.grammar is not None:
            self.structured_output.release()
            request.grammar = None
        request.status = status
        self.kv.free(request)
        self.requests.pop(request.request_id, None)
        self.stats.finished.append(finished_request_stats(request))
        if emit:
            self.finished_outputs.append(
                EngineCoreOutput(
                    request.request_id, [], finish_reason=status.finish_reason, error=request.error,
                    num_cached_tokens=max(request.num_cached_tokens, 0),
                    num_preemptions=request.num_preemptions,
                )
            )

    def _finish_with_error(self, request: Request, message: str) -> None:
        request.error = message
        self._finish(request, RequestStatus.FINISHED_ERROR)


def finished_request_stats(request: Request) -> FinishedRequestStats:
    params = request.sampling_params
    return FinishedRequestStats(
        request_id=request.request_id,
        finish_reason=request.status.finish_reason,
        num_prompt_tokens=request.num_prompt_tokens,
        num_generation_tokens=request.num_output_tokens,
        max_tokens=request.max_tokens,
        n=params.n,
        arrival_time=request.arrival_time,
        queued_time=request.queued_time,
        scheduled_time=request.first_scheduled_time,
        first_token_time=request.first_token_time,
        finished_time=time.time(),
        num_cached_tokens=max(request.num_cached_tokens, 0),
        num_preemptions=request.num_preemptions,
        temperature=params.temperature,
        top_p=params.top_p,
        trace_headers=request.trace_headers,
    )
