"""One unified token-budget scheduler (no separate prefill and decode phases).

Every step hands out at most `max_num_batched_tokens` tokens: first to running requests (a
decode is one token, an unfinished prompt gets its next chunk), then to waiting ones. A request
is only ever `num_computed_tokens` catching up with `num_tokens`. A request preempted after it
was given tokens in the same step gives them back to the budget.

`schedule()` returns plain data for the worker (sched_output.py): requests it has not seen in
full, the others as differences; `update_from_output` takes a list of tokens per request.

Speculative decoding is more of the same: a decoding request's drafts are scheduled as extra
tokens after its known ones, and the positions the worker rejects are taken back from
`num_computed_tokens` (their KV is overwritten later; no block leaks).

Pipeline parallel keeps several steps in flight (`num_micro_batches`, one per stage): a request
whose step has not come back (`in_flight`) is neither scheduled again nor preempted until its
output is applied, so the batches in flight are disjoint, and each batch takes at most its share
of the requests, so the next stage's batch is not left empty.
"""

from __future__ import annotations

import logging
import time

from sluice.config import SchedulerConfig, SpeculativeConfig
from sluice.core.kv_cache_manager import KVCacheManager, cdiv
from sluice.core.request import Request, RequestStatus
from sluice.core.request_queue import create_request_queue
from sluice.core.sched_output import GrammarBitmask, NewRequestData, RunnerOutput, SchedulerOutput
from sluice.distributed.kv_transfer.base import KVConnectorOutput, KVConnectorScheduler
from sluice.engine.messages import EngineCoreOutput
from sluice.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats
from sluice.structured_output.manager import GrammarError, StructuredOutputManager

logger = logging.getLogger("sluice")

# With nothing else to run, how long one step may block waiting for a grammar to compile.
GRAMMAR_IDLE_WAIT_S = 0.01
# Steps a request proposes nothing after a lone draft was refused.
SPEC_REST_STEPS = 8


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 structured_output: StructuredOutputManager | None = None,
                 speculative: SpeculativeConfig | None = None, max_loras: int | None = None,
                 connector: KVConnectorScheduler | None = None) -> None:
        self.config = config
        self.max_loras = max_loras  # distinct adapters running at once; None: LoRA is off
        self.speculative = speculative or SpeculativeConfig()
        self.kv = kv
        self.max_model_len = max_model_len
        self.structured_output = structured_output
        self.waiting = create_request_queue(config.scheduling_policy)
        self.waiting_for_grammar: list[Request] = []  # out of the queue until their grammar compiles
        self.running: list[Request] = []
        self.in_flight: set[str] = set()  # requests of scheduled steps whose output is not applied yet
        self.num_micro_batches = 1  # batches in flight at most (pipeline stages); set by the engine core
        self.num_waiting_for_lora = 0  # waiting requests passed over last step: their adapter had no slot
        self.requests: dict[str, Request] = {}
        self.finished_outputs: list[EngineCoreOutput] = []  # finished outside a step (aborts, errors)
        # What the worker must still hear: requests it holds that finished, or lost their blocks.
        self.finished_for_worker: list[str] = []
        self.preempted_for_worker: list[str] = []
        self.stats = IterationStats()  # what happened since the stat loggers last took it
        self.whole_prompts = False  # encoder-only models: a prompt runs in one step or waits
        # Disaggregated prefill (kv_transfer_config): requests whose prompt KV is being pulled, finished
        # requests whose blocks wait for a consumer's pull (until a deadline), and requests aborted mid-pull
        # (their blocks go back once the worker stops writing them).
        self.connector = connector
        self.waiting_for_remote_kvs: dict[str, Request] = {}
        self.kv_held: dict[str, tuple[Request, float]] = {}
        self.kv_free_after_load: dict[str, Request] = {}
        self.kv_new_holds = False  # a prefill finished with its blocks held: the worker must hear of it now

    # ---- queue management -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request the input processor checked (it fits max_model_len and the KV cache)."""
        request.queued_time = time.time()
        self.requests[request.request_id] = request
        if request.sampling_params.structured_outputs is not None:
            self._start_grammar(request)
            return
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.add(request)

    def _start_grammar(self, request: Request) -> None:
        request.status = RequestStatus.WAITING_FOR_GRAMMAR
        self.waiting_for_grammar.append(request)
        if self.structured_output is None:
            self._finish_with_error(request, "structured outputs are not available in this engine")
            return
        request.grammar = self.structured_output.start(request.sampling_params, request.eos_token_ids)

    def abort_requests(self, request_ids: list[str]) -> None:
        """Finish requests by the client's or output processor's wish; frees their blocks now."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None and not request.status.finished:
                self._finish(request, RequestStatus.FINISHED_ABORTED)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.finished_outputs or self.waiting_for_grammar
                    or self.kv_transfers_pending())

    def kv_transfers_pending(self) -> bool:
        """KV transfers in flight or blocks held for one: the engine keeps stepping to hear of them."""
        return bool(self.waiting_for_remote_kvs or self.kv_held or self.kv_free_after_load)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.waiting_for_grammar) + len(self.waiting_for_remote_kvs)

    def num_waiting_tokens(self) -> int:
        """Prompt tokens the waiting queue still has to compute (backpressure and metrics)."""
        return sum(r.num_tokens - r.num_computed_tokens for queue in (self.waiting, self.waiting_for_grammar)
                   for r in queue)

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
            num_waiting_capacity=len(self.waiting) - self.num_waiting_for_lora,
            num_waiting_deferred=len(self.waiting_for_grammar) + self.num_waiting_for_lora
            + len(self.waiting_for_remote_kvs),
            num_waiting_tokens=self.num_waiting_tokens(),
            kv_cache_usage=pool.usage(),
            num_free_blocks=pool.num_free_blocks(),
            num_total_blocks=pool.num_usable_blocks,
            running_lora_adapters=_adapter_names(self.running),
            waiting_lora_adapters=_adapter_names(self.waiting),
            max_lora=self.max_loras or 0,
        )

    # ---- the step ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if self.waiting_for_grammar:
            self._admit_compiled_grammars()
        if self.kv_held:
            self._release_expired_holds()
        scheduled: dict[Request, int] = {}  # request -> tokens this step, in batch order
        budget = self.config.max_num_batched_tokens
        cap = self._batch_cap()
        budget, preempted = self._schedule_running(scheduled, budget, cap)
        self.num_waiting_for_lora = 0
        if not preempted:  # nothing new joins a step that had to preempt
            self._schedule_waiting(scheduled, budget, cap)
        out = self._output(scheduled)
        if self.connector is not None:
            out.kv_connector_metadata = self.connector.build_connector_meta() or None
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
                self._enqueue(request)

    def _chunk(self, remaining: int, budget: int, num_computed: int) -> int:
        """Tokens to schedule for a request with `remaining` uncomputed tokens after num_computed,
        no more than the whole cache holds at once (a windowed prompt may be longer than that)."""
        if self.whole_prompts:
            return remaining if remaining <= budget else 0
        if remaining > 1:
            remaining = min(remaining, self.config.long_prefill_token_threshold,
                            max(self.kv.spec.max_new_tokens(num_computed), 1))
        return min(remaining, budget)

    def _batch_cap(self) -> int:
        """Requests this step may take: with micro-batches in flight, a share of the live requests,
        so every stage gets a batch."""
        if self.num_micro_batches == 1:
            return self.config.max_num_seqs
        return cdiv(len(self.running) + len(self.waiting), self.num_micro_batches)

    def _schedule_running(self, scheduled: dict[Request, int], budget: int, cap: int) -> tuple[int, bool]:
        """Returns the budget left, and whether a request had to be preempted."""
        index, preempted = 0, False
        speculate = self.speculative.speculates(len(self.running))
        while index < len(self.running) and budget > 0 and len(scheduled) < cap:
            request = self.running[index]
            if request.request_id in self.in_flight:  # its last step is still in the pipeline
                index += 1
                continue
            if request.spec_token_ids and not speculate:
                request.spec_token_ids = []
            num_known = request.num_tokens - request.num_computed_tokens
            num_new = self._chunk(num_known + len(request.spec_token_ids), budget, request.num_computed_tokens)
            if num_new <= 0:
                index += 1
                continue
            if num_new < num_known + len(request.spec_token_ids):  # the budget cuts the drafts short
                del request.spec_token_ids[max(num_new - num_known, 0):]
            lookahead = self.speculative.num_lookahead_tokens if speculate else 0
            while self.kv.allocate_slots(request, num_new, num_lookahead_tokens=lookahead) is None:
                if request.spec_token_ids or lookahead:  # give up speculating before anyone's blocks
                    num_new -= len(request.spec_token_ids)
                    request.spec_token_ids, lookahead = [], 0
                    continue
                victim = self._victim(request)
                if victim is None:  # only requests in flight could give blocks back: wait for them
                    index += 1
                    break
                if victim is request and len(self.running) == 1:
                    self._finish_with_error(request, self._outgrown_message(request))
                    break
                if self.running.index(victim) < index:
                    index -= 1
                budget += self._preempt(victim, scheduled)
                preempted = True
                if victim is request:
                    break
            else:
                scheduled[request] = num_new
                budget -= num_new
                index += 1
        return budget, preempted

    def _schedule_waiting(self, scheduled: dict[Request, int], budget: int, cap: int) -> None:
        num_partial = sum(
            1 for r in self.running if r.num_tokens - r.num_computed_tokens > 1
        )
        adapters = {r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}
        passed_over: list[Request] = []  # their adapter would be one too many this step
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(scheduled) < cap):
            request = self.waiting.peek()
            if num_partial >= self.config.max_num_partial_prefills:
                break
            if not self._adapter_fits(request, adapters):
                passed_over.append(self.waiting.pop())
                continue
            if not self.kv.spec.fits(request.num_tokens):
                # preempted after its output outgrew the whole cache
                self._finish_with_error(request, self._outgrown_message(request))
                continue
            loaded = request.request_id in self.kv.req_blocks  # its prompt's KV was pulled into its blocks
            if loaded:
                hits, num_hit_tokens = [], request.num_computed_tokens
            else:
                hits, num_hit_tokens = self.kv.get_computed_blocks(request)
                num_external = self.connector.get_num_new_matched_tokens(request, num_hit_tokens) \
                    if self.connector is not None else 0
                if num_external:
                    if not self._start_load(request, hits, num_hit_tokens, num_external):
                        break
                    continue
            num_new = self._chunk(request.num_tokens - num_hit_tokens, budget, num_hit_tokens)
            if num_new == 0:  # a whole prompt waits for a step with room
                break
            lookahead = self.speculative.num_lookahead_tokens  # a draft model proposes after the prompt
            if self.kv.allocate_slots(request, num_new, hits, lookahead) is None and (
                    not lookahead or self.kv.allocate_slots(request, num_new, hits) is None):
                break
            if self.kv.enable_caching and not loaded:  # counted once admitted: a refused admission retries later
                self.stats.prefix_cache_queries += request.num_tokens
                self.stats.prefix_cache_hits += num_hit_tokens
            self.waiting.pop()
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.time()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if request.lora_request is not None:
                adapters.add(request.lora_request.lora_int_id)
            scheduled[request] = num_new
            budget -= num_new
            if request.num_tokens - request.num_computed_tokens - num_new > 0:
                num_partial += 1
        for request in reversed(passed_over):  # back in front, in their order
            self.waiting.add_preempted(request)
        self.num_waiting_for_lora = len(passed_over)

    def _start_load(self, request: Request, hits: list, num_hit_tokens: int, num_external: int) -> bool:
        """Allocate blocks for a request's external tokens and have the worker pull them; it waits
        outside the queue meanwhile. False: no room yet. The blocks are indexed in the prefix cache
        only once their contents arrived."""
        if self.kv.allocate_slots(request, num_external, hits, cache_blocks=False) is None:
            return False
        self.waiting.pop()
        request.num_computed_tokens = num_hit_tokens
        request.num_external_tokens = num_external
        self.connector.update_state_after_alloc(request, self.kv.block_ids(request.request_id), num_external)
        request.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        self.waiting_for_remote_kvs[request.request_id] = request
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.time()
        return True

    def _update_from_kv_transfers(self, done: KVConnectorOutput) -> None:
        """Free the blocks consumers pulled; requeue (in front) the requests whose KV arrived."""
        for request_id in done.finished_sending:
            held = self.kv_held.pop(request_id, None)
            if held is not None:
                self.kv.free(held[0])
        for request_id in done.finished_recving:
            self._load_ended(request_id, None)
        for request_id, reason in done.failed_recving.items():
            self._load_ended(request_id, reason)

    def _load_ended(self, request_id: str, error: str | None) -> None:
        aborted = self.kv_free_after_load.pop(request_id, None)
        if aborted is not None:
            self.kv.free(aborted)
            return
        request = self.waiting_for_remote_kvs.get(request_id)
        if request is None:
            return
        request.kv_loaded = True
        if error is not None and self.connector.config.kv_load_failure_policy == "fail":
            self._finish_with_error(request, error)
            return
        del self.waiting_for_remote_kvs[request_id]
        if error is None:
            request.num_computed_tokens += request.num_external_tokens
        else:  # kv_load_failure_policy "recompute": its prompt runs here instead
            logger.warning("request %s: %s; prefilling it locally", request_id, error)
            self.kv.free(request)
            request.num_computed_tokens = request.num_external_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.add_preempted(request)

    def _release_expired_holds(self) -> None:
        """Blocks held for a consumer that never pulled them go back after abort_request_timeout."""
        now = time.monotonic()
        for request_id, (request, deadline) in list(self.kv_held.items()):
            if deadline <= now:
                del self.kv_held[request_id]
                self.connector.release(request_id)
                self.kv.free(request)
                logger.warning("request %s: no consumer pulled its KV within abort_request_timeout=%s s; its "
                               "blocks are freed", request_id, self.connector.config.abort_request_timeout)

    def _adapter_fits(self, request: Request, adapters: set[int]) -> bool:
        """At most max_loras distinct adapters run at once (each holds a slot in every layer)."""
        lora = request.lora_request
        return lora is None or lora.lora_int_id in adapters or len(adapters) < (self.max_loras or 0)

    def _outgrown_message(self, request: Request) -> str:
        return self.kv.spec.describe(request.num_tokens)

    def _victim(self, request: Request) -> Request | None:
        """The running request to preempt so `request` gets blocks: the lowest-priority one not in
        flight; None when that is `request` itself while others are in flight (they come back soon)."""
        candidates = [r for r in self.running if r.request_id not in self.in_flight]
        victim = max(candidates, key=lambda r: r.sort_key(self.config.scheduling_policy))
        return None if victim is request and len(candidates) < len(self.running) else victim

    def _preempt(self, request: Request, scheduled: dict[Request, int]) -> int:
        """Free a running request's blocks; it recomputes from scratch (prefix cache permitting).
        Returns the tokens it had been given this step, back to the budget."""
        self.running.remove(request)
        refund = scheduled.pop(request, 0)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.stats.num_preemptions += 1
        if request.num_worker_blocks:
            request.num_worker_blocks = 0
            self.preempted_for_worker.append(request.request_id)
        self.waiting.add_preempted(request)
        return refund

    def _output(self, scheduled: dict[Request, int]) -> SchedulerOutput:
        """The step as plain data for the worker: new requests in full, known ones as differences."""
        out = SchedulerOutput()
        if not scheduled:
            return out  # notices for the worker wait for a step that runs
        out.finished_req_ids, self.finished_for_worker = self.finished_for_worker, []
        out.preempted_req_ids, self.preempted_for_worker = self.preempted_for_worker, []
        cached = out.cached_requests
        req_blocks = self.kv.req_blocks
        sampling_grammars: list[Request] = []
        spec = out.scheduled_spec_decode_tokens
        for request, num_new in scheduled.items():
            rid = request.request_id
            tables = req_blocks[rid]  # one per KV cache group, all of one length
            num_tokens = request.num_tokens
            if request.num_worker_tokens == 0:
                out.new_requests.append(NewRequestData(
                    rid, request.prompt_token_ids, request.sampling_params,
                    [[b.block_id for b in blocks] for blocks in tables],
                    request.num_computed_tokens, sorted(request.stop_token_ids), request.pooling_params,
                    request.lora_request, request.mm_features or None,
                ))
            else:
                cached.req_ids.append(rid)
                cached.new_token_ids.append(request.all_token_ids[request.num_worker_tokens:])
                sent = request.num_worker_blocks
                cached.new_block_ids.append([[b.block_id for b in blocks[sent:]] for blocks in tables])
                cached.num_computed_tokens.append(request.num_computed_tokens)
            request.num_worker_tokens = num_tokens
            request.num_worker_blocks = len(tables[0])
            request.num_computed_tokens += num_new
            if request.spec_token_ids:
                spec[rid] = request.spec_token_ids
                self.stats.record_drafts(len(request.spec_token_ids))
            budget = self._draft_budget(request) if self.speculative.enabled else 0
            if budget:
                out.max_drafts[rid] = budget
            if request.grammar is not None and request.num_computed_tokens >= num_tokens:
                sampling_grammars.append(request)
        out.num_scheduled_tokens = {r.request_id: n for r, n in scheduled.items()}
        self.in_flight.update(out.num_scheduled_tokens)
        out.total_num_scheduled_tokens = sum(scheduled.values())
        self.stats.step_num_tokens.append(out.total_num_scheduled_tokens)
        if sampling_grammars:
            rows = [(r.request_id, r.grammar, r.spec_token_ids) for r in sampling_grammars]
            bitmask = self.structured_output.fill_bitmask([(grammar, drafts) for _, grammar, drafts in rows])
            out.grammar_bitmask = GrammarBitmask(
                [rid for rid, _, drafts in rows for _ in range(len(drafts) + 1)], bitmask)
        return out

    # ---- after the forward pass -------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, result: RunnerOutput) -> list[EngineCoreOutput]:
        """Take each request's sampled tokens one by one, up to the first that finishes it
        (tokens after a stop are dropped)."""
        self.in_flight.difference_update(out.num_scheduled_tokens)
        for rid, message in result.errors.items():
            request = self.requests.get(rid)
            if request is not None and not request.status.finished:
                # this step's KV is not the request's: its blocks must not stay in the prefix cache
                request.num_computed_tokens -= out.num_scheduled_tokens.get(rid, 0)
                self._finish_with_error(request, message)
        if result.kv_connector_output:
            self._update_from_kv_transfers(result.kv_connector_output)
        outputs = self.finished_outputs
        self.finished_outputs = []
        now = time.time()
        prompt_logprobs = result.prompt_logprobs
        self.stats.mm_cache_queries += result.mm_cache_queries
        self.stats.mm_cache_hits += result.mm_cache_hits
        if result.pooler_output:
            self._finish_pooled(result.pooler_output, outputs, now)
        for rid, tokens in result.sampled_token_ids.items():
            request = self.requests.get(rid)
            if request is None or request.status.finished:  # aborted since it was scheduled
                continue
            drafts = out.scheduled_spec_decode_tokens.get(rid)
            if drafts:  # the rejected drafts' positions are computed again later
                num_accepted = len(tokens) - 1
                request.num_computed_tokens -= len(drafts) - num_accepted
                self.stats.record_accepted(num_accepted)
                # verify about as many as were kept, and rest after a lone draft fails: text with
                # nothing to copy then costs almost nothing (k=4 every step made it 1.09x plain ITL)
                if num_accepted == len(drafts):
                    request.max_spec_tokens = 2 * len(drafts)
                else:
                    request.max_spec_tokens = 0 if len(drafts) == 1 else num_accepted + 1
            request.spec_token_ids = []
            status = None
            accepted = 0
            for token in tokens:
                request.append_output_token(token)
                self._record_token(request, now)
                accepted += 1
                status = self._advance_grammar(request, token) or self._check_stop(request, token)
                if status is not None:
                    break
            logprobs = result.logprobs.get(rid) if result.logprobs else None
            output = EngineCoreOutput(
                rid,
                tokens[:accepted],
                new_logprobs=logprobs[:accepted] if logprobs else None,
                new_prompt_logprobs=prompt_logprobs.get(rid) if prompt_logprobs else None,
                num_cached_tokens=max(request.num_cached_tokens, 0),
                num_preemptions=request.num_preemptions,
            )
            if status is not None:
                self._finish(request, status, emit=False)
                output.kv_transfer_params = request.kv_transfer_params_out
                output.finish_reason = status.finish_reason
                output.stop_reason = request.stop_reason
                output.error = request.error
            else:
                self._count_rest(request)
                if rid in result.spec_token_ids:
                    request.spec_token_ids = self._usable_drafts(request, result.spec_token_ids[rid])
            outputs.append(output)
        for rid, plp in prompt_logprobs.items():  # prompt chunks that sampled nothing yet
            if rid not in result.sampled_token_ids and rid in self.requests:
                outputs.append(EngineCoreOutput(rid, [], new_prompt_logprobs=plp))
        return outputs

    def _finish_pooled(self, pooled: dict[str, list[float]], outputs: list[EngineCoreOutput], now: float) -> None:
        """Pooling requests end with their prompt: one output carrying the vector, blocks freed."""
        for rid, vector in pooled.items():
            request = self.requests.get(rid)
            if request is None or request.status.finished:  # aborted since it was scheduled
                continue
            request.first_token_time = request.last_token_time = now
            self.stats.num_prompt_tokens += request.num_prompt_tokens
            self.stats.time_to_first_tokens.append(now - request.arrival_time)
            self._finish(request, RequestStatus.FINISHED_STOPPED, emit=False)
            outputs.append(EngineCoreOutput(rid, [], finish_reason="stop", pooling_output=vector,
                                            num_cached_tokens=max(request.num_cached_tokens, 0),
                                            num_preemptions=request.num_preemptions))

    @staticmethod
    def _count_rest(request: Request) -> None:
        """A request resting after its lone draft failed drafts one token again SPEC_REST_STEPS
        steps later."""
        if request.max_spec_tokens == 0:
            request.spec_rest_steps += 1
            if request.spec_rest_steps >= SPEC_REST_STEPS:
                request.spec_rest_steps, request.max_spec_tokens = 0, 1

    def _draft_budget(self, request: Request) -> int:
        """Drafts the worker may propose for the request in this step, to verify in the next: none
        while it rests, so a draft model or head costs nothing then (its drafts would be dropped)."""
        if request.max_spec_tokens == 0:
            return 1 if request.spec_rest_steps + 1 >= SPEC_REST_STEPS else 0
        k = self.speculative.num_speculative_tokens
        return k if request.max_spec_tokens is None else min(request.max_spec_tokens, k)

    def _usable_drafts(self, request: Request, drafts: list[int]) -> list[int]:
        """The proposed drafts the request can use: as many as its recent drafts earned, never past
        max_tokens or max_model_len (the token after the drafts is sampled too), and for a grammar,
        only the prefix it accepts."""
        room = min(request.max_tokens - request.num_output_tokens, self.max_model_len - request.num_tokens) - 1
        if request.max_spec_tokens is not None:
            room = min(room, request.max_spec_tokens)
        drafts = drafts[: max(room, 0)]
        if request.grammar is not None and drafts:
            drafts = request.grammar.valid_prefix(drafts)
        return drafts

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
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        elif request.status == RequestStatus.WAITING_FOR_GRAMMAR:
            self.waiting_for_grammar.remove(request)
        elif request.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
            del self.waiting_for_remote_kvs[request.request_id]
        mid_load = request.status == RequestStatus.WAITING_FOR_REMOTE_KVS and not request.kv_loaded
        if request.num_worker_tokens:
            self.finished_for_worker.append(request.request_id)
        if request.grammar is not None:
            self.structured_output.release()
            request.grammar = None
        request.status = status
        self._release_blocks(request, mid_load)
        self.requests.pop(request.request_id, None)
        self.stats.finished.append(finished_request_stats(request))
        if emit:
            self.finished_outputs.append(
                EngineCoreOutput(
                    request.request_id, [], finish_reason=status.finish_reason, error=request.error,
                    num_cached_tokens=max(request.num_cached_tokens, 0),
                    num_preemptions=request.num_preemptions, kv_transfer_params=request.kv_transfer_params_out,
                )
            )

    def _release_blocks(self, request: Request, mid_load: bool) -> None:
        """Free a finished request's blocks, unless a transfer still needs them: a consumer's worker
        writing them (freed when its load ends), or a producer's consumer yet to pull them."""
        if mid_load:
            self.kv_free_after_load[request.request_id] = request
            return
        if self.connector is not None:
            block_ids = self.kv.block_ids(request.request_id)
            hold, request.kv_transfer_params_out = self.connector.request_finished(request, block_ids)
            if hold:
                deadline = time.monotonic() + self.connector.config.abort_request_timeout
                self.kv_held[request.request_id] = (request, deadline)
                self.kv_new_holds = True
                return
        self.kv.free(request)

    def _finish_with_error(self, request: Request, message: str) -> None:
        request.error = message
        self._finish(request, RequestStatus.FINISHED_ERROR)


def _adapter_names(requests) -> dict[str, int]:
    """Requests per adapter name."""
    names: dict[str, int] = {}
    for request in requests:
        if request.lora_request is not None:
            names[request.lora_request.lora_name] = names.get(request.lora_request.lora_name, 0) + 1
    return names


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
        num_external_tokens=request.num_external_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        trace_headers=request.trace_headers,
    )
