"""Core outputs -> RequestOutputs: detokenize, cut stop strings, gather logprobs, join n children.

Runs in the caller's process (the API server, or the offline LLM), never in the core loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sluice.engine.messages import EngineCoreOutput, EngineCoreRequest
from sluice.engine.detokenizer import IncrementalDetokenizer
from sluice.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput, SampleLogprobs
from sluice.sampling_params import SamplingParams


@dataclass
class ParentRequest:
    """A user request with n > 1: its children run as independent core requests."""

    request_id: str
    children: dict[int, "RequestState"] = field(default_factory=dict)
    n: int = 1

    def finished(self) -> bool:
        return len(self.children) == self.n and all(c.finish_reason for c in self.children.values())


class RequestState:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, tokenizer, parent: ParentRequest | None, index: int,
                 stream: bool = False) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.parent = parent
        self.index = index
        self.detokenizer = IncrementalDetokenizer(tokenizer, params, prompt_token_ids)
        self.token_ids: list[int] = []
        self.logprobs: SampleLogprobs | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.prompt_logprobs: PromptLogprobs | None = [None] if params.prompt_logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        self.num_cached_tokens = 0
        self.kv_transfer_params: dict | None = None
        self.num_preemptions = 0
        self.stream = stream
        self.num_sent_tokens = 0  # streaming: tokens (and their logprobs) already handed out
        self.prompt_logprobs_sent = False

    def completion(self) -> CompletionOutput:
        """Everything generated so far."""
        return self._completion(self.token_ids, self.logprobs, delta=False)

    def take_delta(self) -> CompletionOutput:
        """What was generated since the previous delta (streaming)."""
        start, self.num_sent_tokens = self.num_sent_tokens, len(self.token_ids)
        logprobs = self.logprobs[start:] if self.logprobs is not None else None
        return self._completion(self.token_ids[start:], logprobs, delta=True)

    def take_prompt_logprobs(self) -> PromptLogprobs | None:
        """Prompt logprobs go out once, with the first delta."""
        if self.prompt_logprobs_sent:
            return None
        self.prompt_logprobs_sent = True
        return self.prompt_logprobs

    def _completion(self, token_ids: list[int], logprobs: SampleLogprobs | None, delta: bool) -> CompletionOutput:
        finished = self.finish_reason is not None
        return CompletionOutput(
            index=self.index,
            text=self.detokenizer.get_next_output_text(finished, delta),
            token_ids=list(token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            error=self.error,
        )


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self.parents: dict[str, ParentRequest] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, parent_id: str | None = None, index: int = 0,
                    stream: bool = False) -> None:
        """stream=True: every step that advances the request yields a delta RequestOutput;
        otherwise one RequestOutput comes when the (whole parent) request finishes."""
        parent = None
        if parent_id is not None:
            parent = self.parents.setdefault(parent_id, ParentRequest(parent_id, n=params.n))
        state = RequestState(request_id, prompt, prompt_token_ids, params, self.tokenizer, parent, index, stream)
        if parent is not None:
            parent.children[index] = state
        self.states[request_id] = state

    def add_requests(self, request_id: str, prompt: str | None, core_requests: list[EngineCoreRequest],
                     stream: bool = False) -> None:
        """Track the core requests made from one user request (its n children)."""
        n = len(core_requests)
        for index, core_req in enumerate(core_requests):
            self.add_request(core_req.request_id, prompt, core_req.prompt_token_ids, core_req.sampling_params,
                             request_id if n > 1 else None, index, stream)

    def has_unfinished(self) -> bool:
        return bool(self.states)

    def abort_all(self, request_ids: list[str]) -> None:
        """Forget requests the caller gave up on (their core side is aborted separately)."""
        for request_id in request_ids:
            state = self.states.pop(request_id, None)
            if state is not None and state.parent is not None:
                self.parents.pop(state.parent.request_id, None)

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns RequestOutputs (streaming deltas, and finished non-streaming requests, whole
        parents once all children end) and the request ids the core must abort because a stop
        string matched."""
        results: list[RequestOutput] = []
        to_abort: list[str] = []
        for out in outputs:
            state = self.states.get(out.request_id)
            if state is None:
                continue
            self._apply(state, out)
            if out.new_token_ids:
                stop = state.detokenizer.update(out.new_token_ids, len(state.token_ids), out.finish_reason == "stop")
                if stop is not None and state.finish_reason is None:
                    state.finish_reason, state.stop_reason = "stop", stop
                    to_abort.append(state.request_id)
            if state.finish_reason is not None:
                del self.states[state.request_id]
            if state.stream:
                if out.new_token_ids or state.finish_reason is not None:
                    results.append(self._delta_output(state))
            elif state.finish_reason is not None:
                result = self._finished_output(state)
                if result is not None:
                    results.append(result)
        return results, to_abort

    def _apply(self, state: RequestState, out: EngineCoreOutput) -> None:
        state.token_ids.extend(out.new_token_ids)
        state.num_cached_tokens = out.num_cached_tokens
        state.num_preemptions = out.num_preemptions
        if out.new_logprobs and state.logprobs is not None:
            for ids, values, rank in out.new_logprobs:
                state.logprobs.append(self._logprob_dict(state, ids, values, rank))
                state.cumulative_logprob += values[0]
        if out.new_prompt_logprobs and state.prompt_logprobs is not None:
            for ids, values, rank in out.new_prompt_logprobs:
                state.prompt_logprobs.append(self._logprob_dict(state, ids, values, rank))
        if out.finish_reason is not None and state.finish_reason is None:
            state.finish_reason = out.finish_reason
            state.stop_reason = out.stop_reason
            state.error = out.error
            state.kv_transfer_params = out.kv_transfer_params

    @staticmethod
    def _logprob_dict(state: RequestState, ids: list[int], values: list[float], rank: int) -> dict[int, Logprob]:
        """The chosen token first (with its true rank), then the top-k alternatives."""
        result: dict[int, Logprob] = {}
        for position, (token_id, value) in enumerate(zip(ids, values)):
            if token_id in result:
                continue
            result[token_id] = Logprob(value, rank if position == 0 else position, state.detokenizer.decode_token(token_id))
        return result

    def _delta_output(self, state: RequestState) -> RequestOutput:
        parent = state.parent
        finished = state.finish_reason is not None
        if parent is not None:
            finished = parent.finished()
            if finished:
                del self.parents[parent.request_id]
        output = self._request_output(parent.request_id if parent else state.request_id, state,
                                      [state.take_delta()], state.num_preemptions)
        output.prompt_logprobs = state.take_prompt_logprobs()
        output.finished = finished
        return output

    def _finished_output(self, state: RequestState) -> RequestOutput | None:
        parent = state.parent
        if parent is None:
            return self._request_output(state.request_id, state, [state.completion()], state.num_preemptions)
        if not parent.finished():
            return None
        del self.parents[parent.request_id]
        children = [parent.children[i] for i in sorted(parent.children)]
        return self._request_output(parent.request_id, children[0], [c.completion() for c in children],
                                    sum(c.num_preemptions for c in children))

    @staticmethod
    def _request_output(request_id: str, first: RequestState, completions: list[CompletionOutput],
                        num_preemptions: int = 0) -> RequestOutput:
        return RequestOutput(
            request_id=request_id,
            prompt=first.prompt,
            prompt_token_ids=first.prompt_token_ids,
            prompt_logprobs=first.prompt_logprobs,
            outputs=completions,
            finished=True,
            num_cached_tokens=first.num_cached_tokens,
            metrics={"num_preemptions": num_preemptions},
            kv_transfer_params=first.kv_transfer_params,
        )
