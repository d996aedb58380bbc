"""OpenAI-compatible serving: requests -> engine calls, engine outputs -> OpenAI JSON or SSE.

Everything that can fail a request (unknown model, chat template, prompt length, full queue,
dead engine) fails before `chat` / `completions` return, so the HTTP layer can still answer
with a status code; once a stream has started, a failure arrives as an SSE error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sluice.engine.input_processor import truncate_prompt
from sluice.entrypoints.openai.chat_template import fim_prompt, resolve_content_format
from sluice.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    has_images,
    model_card,
    model_list,
    response_envelope,
    usage_info,
)
from sluice.entrypoints.openai.reasoning import REASONING_PARSERS, ReasoningParser, ReasoningStream
from sluice.entrypoints.openai.tool_calls import TOOL_PARSERS, ForcedToolCalls, ToolCallExtractor, ToolCallStream
from sluice.lora.request import LoRARequest
from sluice.multimodal.inputs import MultiModalFeature
from sluice.multimodal.media import MediaError
from sluice.multimodal.processor import split_images
from sluice.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput, SampleLogprobs
from sluice.sampling_params import SamplingParams

if TYPE_CHECKING:
    from sluice.entrypoints.openai.lora_routes import LoRARegistry

logger = logging.getLogger(__name__)
DEFAULT_MAX_NUM_SEQS_PER_REQUEST = 64  # prompts x n of one request (vLLM has no such cap)
TOKENIZER_THREADS = max(1, min(4, len(os.sched_getaffinity(0))))  # HF tokenizers encode without the GIL

_SSE_DONE = "data: [DONE]\n\n"
_MIN_LOGPROB = -9999.0  # JSON has no -inf
RETRY_AFTER_S = 1  # told to clients refused because the queue is full or the server drains

GenerationRequest = ChatCompletionRequest | CompletionRequest


# ---- errors ------------------------------------------------------------------------------------
def api_error_from_exception(exc: BaseException) -> APIError | None:
    """The APIError to answer for an engine exception; None for an unexpected one (a 500)."""
    from sluice.engine.async_llm import EngineDeadError, QueueFullError  # lazily: keeps this module light

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(str(exc) or "the server is overloaded; retry later", 503, code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineDeadError):
        return APIError(f"the engine is not available: {exc}", 503, code="engine_dead")
    if isinstance(exc, ValueError):  # the engine's request validation
        return APIError(str(exc), 400)
    return None


@contextlib.contextmanager
def _engine_errors(request: GenerationRequest):
    try:
        yield
    except Exception as exc:
        error = api_error_from_exception(exc)
        if error is None or error is exc:
            raise
        if isinstance(exc, ValueError):
            error.param = request.param_of(str(exc))
        raise error from exc


def _stream_error(exc: Exception) -> APIError:
    """What to put in the SSE error event once the response has started."""
    error = api_error_from_exception(exc)
    if error is None:
        logger.exception("stream failed")
        error = APIError(str(exc) or type(exc).__name__, 500)
    return error


def _raise_if_failed(output: CompletionOutput) -> None:
    if output.finish_reason == "error":
        raise APIError(output.error or "generation failed", 500)


# ---- engine streams ----------------------------------------------------------------------------
# Closing an engine stream aborts its request; every helper here closes what it gives up on.
_END = object()


async def _next(stream: AsyncIterator) -> Any:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return _END


async def _first(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    item = await _next(stream)
    if item is _END:
        raise RuntimeError("the engine stream ended without output")
    return item


async def _last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = await _first(stream)
    async for item in stream:
        last = item
    return last


async def _gather_or_close(streams: list[AsyncIterator], take: Callable) -> list:
    """`take(stream)` for every stream concurrently; if one fails (or we are cancelled), close
    all of them, aborting their requests, and re-raise."""
    tasks: list[asyncio.Future] = []
    try:
        if len(streams) == 1:
            return [await take(streams[0])]
        tasks = [asyncio.ensure_future(take(s)) for s in streams]
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # a running generator cannot be closed
        for stream in streams:
            await stream.aclose()
        raise


async def _replay(first: RequestOutput, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """An already-awaited first item, then the rest of the stream."""
    try:
        yield first
        async for item in stream:
            yield item
    finally:
        await stream.aclose()


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Items of several streams as they arrive, each tagged with its stream's index."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    pending = {asyncio.ensure_future(_next(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                item = task.result()
                if item is not _END:
                    pending[asyncio.ensure_future(_next(streams[i]))] = i
                    yield i, item
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


# ---- small shared pieces -----------------------------------------------------------------------
def _random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _finite(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


def _sampled(entry: dict[int, Logprob], token_id: int) -> Logprob:
    """The sampled token's entry (the engine puts it first)."""
    return entry.get(token_id) or next(iter(entry.values()))


def _top(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely tokens at one position (the sampled one only if it is among them)."""
    return sorted(entry.items(), key=lambda item: item[1].logprob, reverse=True)[:k]


@dataclass
class _Job:
    """One prompt of an API request, ready for the engine."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    trace_headers: dict[str, str] | None = None  # the HTTP request's trace context, for its span
    cache_salt: str | None = None
    lora_request: LoRARequest | None = None  # the adapter its `model` names
    mm_features: list[MultiModalFeature] | None = None  # its images


@dataclass
class _Head:
    """What every body of one API response shares."""

    object: str
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, choices: list[dict]) -> dict:
        return response_envelope(self.object, self.id, self.created, self.model, choices)


class _Usage:
    """Token counts of one API request (completions may carry several prompts); cached tokens
    are reported with --enable-prompt-tokens-details, as in vLLM."""

    def __init__(self, jobs: list[_Job], details: bool) -> None:
        self.prompt_tokens = sum(len(job.prompt_token_ids) for job in jobs)
        self.cached_tokens = [0] * len(jobs)
        self.completion_tokens = 0
        self.details = details

    def add(self, prompt_index: int, out: RequestOutput) -> None:
        # With n > 1 each child has its own count; report the first child's, streamed or not.
        if any(c.index == 0 for c in out.outputs):
            self.cached_tokens[prompt_index] = out.num_cached_tokens
        self.completion_tokens += sum(len(c.token_ids) for c in out.outputs)

    def info(self) -> dict:
        return usage_info(self.prompt_tokens, self.completion_tokens,
                          sum(self.cached_tokens) if self.details else None)


def _chat_chunk_choice(index: int, delta: dict, logprobs: dict | None = None,
                       finish_reason: str | None = None, stop_reason: int | str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def _chat_message(c: CompletionOutput, role: str, tools: ToolCallExtractor | None,
                  reasoning: ReasoningParser | None, include_reasoning: bool, echo: str) -> tuple[dict, str | None]:
    """The message of a finished choice, and its finish_reason."""
    text, message = c.text, {"role": role}
    if reasoning is not None:
        thought, text = reasoning.split(text, finished=True)
        if include_reasoning:
            message["reasoning_content"] = thought
    if tools is None:
        return {**message, "content": echo + text}, c.finish_reason
    content, calls = tools.extract(text)
    message["content"] = echo + (content or "") if content is not None or echo else None
    if not calls:
        return message, c.finish_reason
    message["tool_calls"] = [call.to_openai() for call in calls]
    return message, tools.finish_reason or c.finish_reason


def _tool_chunks(stream: ToolCallStream, c: CompletionOutput, text: str, logprobs: dict | None) -> Iterable[dict]:
    """Streamed chunks of a choice with tools: content, then the calls, then the finish."""
    finished = c.finish_reason is not None
    content, call_deltas = stream.feed(text, finished)
    if content or (logprobs and logprobs["content"]):
        yield _chat_chunk_choice(c.index, {"content": content}, logprobs)
    for delta in call_deltas:
        yield _chat_chunk_choice(c.index, {"tool_calls": [delta]})
    if finished:
        finish_reason = (stream.called and stream.extractor.finish_reason) or c.finish_reason
        yield _chat_chunk_choice(c.index, {}, None, finish_reason, c.stop_reason)


# ---- the server side -----------------------------------------------------------------------------
@dataclass
class ChatOptions:
    """Server-wide chat settings (vLLM's flags of the same names)."""

    chat_template: str | None = None  # the template text (None: the tokenizer's own)
    content_format: str = "auto"  # --chat-template-content-format
    response_role: str = "assistant"  # --response-role
    default_template_kwargs: dict[str, Any] = field(default_factory=dict)  # --default-chat-template-kwargs
    tool_parser: str | None = None  # a TOOL_PARSERS name, for tool_choice "auto"; None: "auto" is refused
    reasoning_parser: str | None = None  # a REASONING_PARSERS name
    exclude_tools_when_tool_choice_none: bool = False


class OpenAIServing:
    """The OpenAI API over one AsyncLLM. Methods raise APIError for anything the client did
    wrong or the server cannot do now; other exceptions are bugs (500)."""

    def __init__(self, engine, served_model_names: list[str], max_n: int, chat: ChatOptions | None = None,
                 log_requests: bool = False, max_log_len: int | None = None,
                 force_include_usage: bool = False, prompt_tokens_details: bool = False,
                 max_num_seqs_per_request: int = DEFAULT_MAX_NUM_SEQS_PER_REQUEST,
                 max_num_queued_reqs: int | None = None, max_num_queued_tokens: int | None = None) -> None:
        if not served_model_names:
            raise ValueError("served_model_names must not be empty")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.served_model_names = list(served_model_names)
        self.max_n = max_n
        self.chat_options = chat or ChatOptions()
        parser = self.chat_options.reasoning_parser
        self.reasoning = REASONING_PARSERS[parser]() if parser else None
        self.log_requests = log_requests
        self.max_log_len = max_log_len
        self.force_include_usage = force_include_usage  # --enable-force-include-usage
        self.prompt_tokens_details = prompt_tokens_details  # --enable-prompt-tokens-details
        self.max_num_seqs_per_request = max_num_seqs_per_request
        self.max_num_queued_reqs = max_num_queued_reqs  # the core's queue limits: what can never fit is a 400
        self.max_num_queued_tokens = max_num_queued_tokens
        # Chat templates and tokenization run here, never on the event loop, so a long prompt
        # does not stall every other request and /health.
        self.tokenizer_pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="sluice-tokenize")
        self.created = int(time.time())
        self.lora: LoRARegistry | None = None  # the adapters a request's model may name (--enable-lora)

    # ---- models ----
    def check_model(self, name: str | None) -> str:
        """The served name a request addresses (None: the first one)."""
        if name is None:
            return self.served_model_names[0]
        if name not in self.served_model_names and (self.lora is None or self.lora.get(name) is None):
            raise APIError(f"The model `{name}` does not exist.", 404, param="model", code="model_not_found")
        return name

    def models(self) -> dict:
        body = model_list(self.served_model_names, self.served_model_names[0], self.engine.max_model_len, self.created,
                          self.engine.quantization)
        body["data"] += [self.model(name) for name in (self.lora.adapters if self.lora else ())]
        return body

    def model(self, name: str) -> dict:
        card = model_card(self.check_model(name), self.served_model_names[0], self.engine.max_model_len, self.created,
                          self.engine.quantization)
        lora = self.lora.get(name) if self.lora else None
        if lora is not None:  # vLLM's adapter card: its files as root, the base model as parent
            card.update(root=lora.lora_path, parent=self.lora.parents[name])
        return card

    # ---- chat completions ----
    async def chat(self, request: ChatCompletionRequest, trace_headers: dict[str, str] | None = None,
                   request_id: str | None = None) -> dict | AsyncIterator[str]:
        """A chat.completion dict, or (stream=true) an iterator of SSE strings. request_id: the
        caller's X-Request-Id (else the body's request_id, else a random one)."""
        model = self.check_model(request.model)
        tools = self._tool_extractor(request)
        self._check_fan_out(request, num_prompts=1)
        content_format = self._content_format(request.chat_template)
        tools_shown = request.template_tools(self.chat_options.exclude_tools_when_tool_choice_none)
        mm_features = None
        if has_images(request.messages):
            text, token_ids, mm_features = await self._render_image_chat(request, content_format, tools_shown)
        else:
            messages = request.template_messages(content_format)
            text, token_ids = await self._off_loop(self._render_chat, request, messages, tools_shown)
        text, token_ids = self._truncate(request, text, token_ids)
        params = request.to_sampling_params(self.engine.max_model_len - len(token_ids), self.max_n,
                                            self.engine.default_sampling_params)
        job = _Job(_request_id("chatcmpl", request_id or request.request_id), text, token_ids, params, trace_headers,
                   request.cache_salt, self._lora_request(model), mm_features)
        role = self.chat_options.response_role if request.add_generation_prompt else request.messages[-1].role
        if request.stream:
            streams = await self._start_streams([job], request)
            return self._chat_stream(_Head("chat.completion.chunk", job.request_id, model), streams, request, job,
                                     role, tools)
        [out] = await self._run_to_end([job], request)
        choices = []
        for c in out.outputs:
            _raise_if_failed(c)
            message, finish_reason = _chat_message(c, role, tools, self.reasoning, request.include_reasoning is not False,
                                                   request.echo_text())
            choices.append({"index": c.index, "message": message,
                            "logprobs": self._chat_logprobs(c, params.logprobs, request.return_tokens_as_token_ids),
                            "finish_reason": finish_reason, "stop_reason": c.stop_reason})
            if request.return_token_ids:
                choices[-1]["token_ids"] = c.token_ids
        usage = _Usage([job], self.prompt_tokens_details)
        usage.add(0, out)
        body = {**_Head("chat.completion", job.request_id, model).body(choices), "usage": usage.info()}
        if out.kv_transfer_params is not None:  # a finished prefill: where the decode engine pulls its KV
            body["kv_transfer_params"] = out.kv_transfer_params
        if params.prompt_logprobs is not None:
            body["prompt_logprobs"] = _prompt_logprobs_json(out.prompt_logprobs)
        if request.return_token_ids:
            body["prompt_token_ids"] = job.prompt_token_ids
        return body

    def _tool_extractor(self, request: ChatCompletionRequest) -> ToolCallExtractor | None:
        """What finds the tool calls in this request's output (None: it makes none)."""
        mode = request.tool_choice_mode()
        if mode == "none" or not request.tools:
            return None
        if mode != "auto":
            return ForcedToolCalls(request.named_tool())
        if self.chat_options.tool_parser is None:
            raise APIError('tool_choice "auto" needs a server started with --tool-call-parser '
                           f"({' or '.join(TOOL_PARSERS)}); \"required\", a named function and \"none\" need none",
                           param="tool_choice")
        return TOOL_PARSERS[self.chat_options.tool_parser]()

    def _chat_stream(self, head: _Head, streams: list[AsyncIterator[RequestOutput]], request: ChatCompletionRequest,
                     job: _Job, role: str, tools: ToolCallExtractor | None) -> AsyncIterator[str]:
        params, as_ids = job.params, request.return_tokens_as_token_ids
        tool_streams = {i: ToolCallStream(tools) for i in range(params.n)} if tools is not None else {}
        include_reasoning = request.include_reasoning is not False
        reasoning_streams = {i: ReasoningStream(self.reasoning) for i in range(params.n)} if self.reasoning else {}

        def render_one(c: CompletionOutput) -> Iterable[dict]:
            logprobs = self._chat_logprobs(c, params.logprobs, as_ids)
            text = c.text
            if c.index in reasoning_streams:
                thought, text = reasoning_streams[c.index].feed(c.text, c.finish_reason is not None)
                if thought and include_reasoning:
                    yield _chat_chunk_choice(c.index, {"reasoning_content": thought})
            if c.index in tool_streams:
                yield from _tool_chunks(tool_streams[c.index], c, text, logprobs)
            elif text or c.finish_reason or (logprobs and logprobs["content"]):
                yield _chat_chunk_choice(c.index, {"content": text}, logprobs, c.finish_reason, c.stop_reason)

        def render(_: int, out: RequestOutput) -> Iterable[dict]:
            for c in out.outputs:
                _raise_if_failed(c)
                choices = list(render_one(c))
                if request.return_token_ids and c.token_ids:
                    choices = choices or [_chat_chunk_choice(c.index, {"content": ""})]
                    choices[0]["token_ids"] = c.token_ids
                yield from choices

        roles = [_chat_chunk_choice(i, {"role": role, "content": request.echo_text()}) for i in range(params.n)]
        if request.return_token_ids:
            for choice in roles:
                choice["prompt_token_ids"] = job.prompt_token_ids
        return self._sse_stream(head, streams, render, _Usage([job], self.prompt_tokens_details), request, roles)

    def _chat_logprobs(self, c: CompletionOutput, k: int | None, as_ids: bool | None) -> dict | None:
        """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
        if c.logprobs is None or k is None:
            return None
        content = []
        for token_id, entry in zip(c.token_ids, c.logprobs):
            item = self._chat_token(token_id, _sampled(entry, token_id), as_ids)
            item["top_logprobs"] = [self._chat_token(t, lp, as_ids) for t, lp in _top(entry, k)]
            content.append(item)
        return {"content": content}

    def _chat_token(self, token_id: int, logprob: Logprob, as_ids: bool | None) -> dict:
        text = self._token_text(token_id, logprob, as_ids)
        return {"token": text, "logprob": _finite(logprob.logprob), "bytes": list(text.encode("utf-8", "replace"))}

    def _content_format(self, request_template: str | None) -> str:
        template = request_template or self.chat_options.chat_template or getattr(self.tokenizer, "chat_template", None)
        return resolve_content_format(self.chat_options.content_format,
                                      template if isinstance(template, str) else None)

    async def _render_image_chat(self, request: ChatCompletionRequest | TokenizeRequest, content_format: str,
                                 tools: list[dict] | None) -> tuple[str, list[int], list[MultiModalFeature]]:
        """A chat with image parts: the images fetched and checked (a 400 names the bad part),
        the template rendered with the model's image placeholders, which its processor expands."""
        mm = self.engine.input_processor.mm_processor
        messages, images = split_images([m.to_template("openai") for m in request.messages], content_format,
                                        mm.placeholder if mm else "")
        if mm is None:
            raise APIError("this model takes text only; it cannot read images", param=images[0][1])
        try:
            mm.check_count([param for _, param in images])
            pictures = await self._off_loop(mm.load_images, images)
            text = await self._off_loop(self._chat_text, request, messages, tools)
            self.engine.input_processor.check_chars(text)
            return (text, *await self._off_loop(mm.process, text, pictures, bool(request.add_special_tokens),
                                                "messages"))
        except MediaError as exc:
            raise APIError(str(exc), param=exc.param) from None
        except ValueError as exc:  # the prompt's length
            raise APIError(str(exc), param="messages") from None

    def _render_chat(self, request: ChatCompletionRequest | TokenizeRequest, messages: list[dict],
                     tools: list[dict] | None = None) -> tuple[str, list[int]]:
        """Chat template -> prompt text and ids. The template already holds the special tokens
        (BOS), so encoding adds none unless add_special_tokens asks."""
        text = self._chat_text(request, messages, tools)
        return text, self._encode_prompt(text, bool(request.add_special_tokens), "messages")

    def _chat_text(self, request: ChatCompletionRequest | TokenizeRequest, messages: list[dict],
                   tools: list[dict] | None = None) -> str:
        template_kwargs = {**self.chat_options.default_template_kwargs, **(request.chat_template_kwargs or {})}
        documents = getattr(request, "documents", None)
        if documents is not None:
            template_kwargs["documents"] = documents
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                chat_template=request.chat_template or self.chat_options.chat_template, **template_kwargs,
            )
        except Exception as exc:  # jinja errors, raise_exception() in templates, no template at all
            raise APIError(f"chat template failed: {exc}", param="messages") from exc
        return text

    def _truncate(self, request: GenerationRequest, text: str | None, token_ids: list[int]) -> tuple[str | None, list[int]]:
        """truncate_prompt_tokens applied here too, so the room left for max_tokens counts the kept
        tokens; a cut prompt's text no longer matches its ids, so it is dropped."""
        try:
            kept = truncate_prompt(token_ids, request.truncate_prompt_tokens, self.engine.max_model_len)
        except ValueError as exc:
            raise APIError(str(exc), param="truncate_prompt_tokens") from None
        return (text if len(kept) == len(token_ids) else None), kept

    # ---- legacy completions ----
    async def completions(self, request: CompletionRequest, trace_headers: dict[str, str] | None = None,
                          request_id: str | None = None) -> dict | AsyncIterator[str]:
        """A text_completion dict, or (stream=true) an iterator of SSE strings. Several prompts run
        concurrently; choice index = prompt index * n + completion index."""
        model = self.check_model(request.model)
        request_id = _request_id("cmpl", request_id or request.request_id)
        prompts = request.prompts()
        self._check_fan_out(request, len(prompts))
        if request.kv_transfer_params is not None and len(prompts) > 1:
            raise APIError(f"kv_transfer_params describes one prompt's KV; got {len(prompts)} prompts",
                           param="kv_transfer_params")
        tokenized = await self._off_loop(lambda: [
            self._truncate(request, *self._tokenize_prompt(self._fim_prompt(prompt, request.suffix),
                                                           request.add_special_tokens))
            for prompt in prompts])
        self._check_queued_tokens(request, [token_ids for _, token_ids in tokenized])
        jobs = []
        for i, (text, token_ids) in enumerate(tokenized):
            params = request.to_sampling_params(self.engine.max_model_len - len(token_ids), self.max_n,
                                                self.engine.default_sampling_params)
            job_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            jobs.append(_Job(job_id, text, token_ids, params, trace_headers, request.cache_salt,
                             self._lora_request(model)))
        echo_texts = None
        if request.echo:  # the prompt as sent (not its FIM form), or the ids' text when truncated or ids
            echo_texts = [prompt if isinstance(prompt, str) and job.prompt is not None
                          else self.tokenizer.decode(job.prompt_token_ids) for prompt, job in zip(prompts, jobs)]
        head = _Head("text_completion", request_id, model)
        if request.stream:
            streams = await self._start_streams(jobs, request)
            if request.echo_only():
                streams = [_scoring(stream) for stream in streams]
            return self._completion_stream(head, streams, request, jobs, echo_texts)
        outs = await self._run_to_end(jobs, request)
        n, k = jobs[0].params.n, request.logprobs
        choices, usage = [], _Usage(jobs, self.prompt_tokens_details)
        for p, out in enumerate(outs):
            if request.echo_only():
                _drop_generated(out)
            usage.add(p, out)
            echo = (echo_texts[p], out.prompt_token_ids, out.prompt_logprobs) if echo_texts else None
            for c in out.outputs:
                _raise_if_failed(c)
                choice = self._completion_choice(p * n + c.index, c, k, echo, request.return_tokens_as_token_ids)
                if request.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = _prompt_logprobs_json(out.prompt_logprobs)
                if request.return_token_ids:
                    choice.update(prompt_token_ids=out.prompt_token_ids, token_ids=c.token_ids)
                choices.append(choice)
        body = {**head.body(choices), "usage": usage.info()}
        if outs[0].kv_transfer_params is not None:  # a finished prefill: where the decode engine pulls its KV
            body["kv_transfer_params"] = outs[0].kv_transfer_params
        return body

    def _fim_prompt(self, prompt: str | list[int], suffix: str | None) -> str | list[int]:
        if not suffix:
            return prompt
        try:
            return fim_prompt(self.tokenizer, prompt, suffix)
        except ValueError as exc:
            raise APIError(str(exc), param="suffix") from None

    def _completion_stream(self, head: _Head, streams: list[AsyncIterator[RequestOutput]],
                           request: CompletionRequest, jobs: list[_Job],
                           echo_texts: list[str] | None) -> AsyncIterator[str]:
        n, k, as_ids = jobs[0].params.n, request.logprobs, request.return_tokens_as_token_ids
        prompt_logprobs: dict[int, PromptLogprobs] = {}  # per prompt; they come on its first output
        sent: dict[int, int] = {}  # per choice: characters streamed so far (legacy text_offset)

        def render(p: int, out: RequestOutput) -> Iterable[dict]:
            first = out.prompt_logprobs is not None and p not in prompt_logprobs
            if out.prompt_logprobs is not None:
                prompt_logprobs.setdefault(p, out.prompt_logprobs)
            for c in out.outputs:
                _raise_if_failed(c)
                index = p * n + c.index
                echo = None
                if echo_texts and index not in sent:
                    echo = (echo_texts[p], jobs[p].prompt_token_ids, prompt_logprobs.get(p))
                if not (echo or c.text or c.finish_reason or ((k is not None or request.return_token_ids) and c.token_ids)):
                    continue
                choice = self._completion_choice(index, c, k, echo, as_ids, offset=sent.get(index, 0))
                if first and request.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = _prompt_logprobs_json(out.prompt_logprobs)
                if request.return_token_ids:
                    choice["token_ids"] = c.token_ids
                    if index not in sent:
                        choice["prompt_token_ids"] = jobs[p].prompt_token_ids
                sent[index] = sent.get(index, 0) + len(choice["text"])
                yield choice

        return self._sse_stream(head, streams, render, _Usage(jobs, self.prompt_tokens_details), request)

    def _completion_choice(self, index: int, c: CompletionOutput, k: int | None,
                           echo: tuple[str, list[int], PromptLogprobs | None] | None, as_ids: bool | None,
                           offset: int = 0) -> dict:
        """echo: (prompt text, prompt ids, prompt logprobs) to put before this output's text."""
        text, token_ids, entries = c.text, c.token_ids, c.logprobs or [None] * len(c.token_ids)
        if echo is not None:
            echo_text, echo_ids, echo_entries = echo
            text, token_ids = echo_text + text, echo_ids + token_ids
            entries = (echo_entries or [None] * len(echo_ids)) + entries
        logprobs = None if k is None else self._legacy_logprobs(token_ids, entries, k, offset, as_ids)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason}

    def _legacy_logprobs(self, token_ids: list[int], entries: SampleLogprobs | PromptLogprobs, k: int,
                         offset: int, as_ids: bool | None) -> dict:
        """Completions' shape: {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset};
        a position without an entry (the first prompt token) has None."""
        result: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in zip(token_ids, entries):
            value = top = None
            if entry is None:
                text = self._token_text(token_id, None, as_ids)
            else:
                sampled = _sampled(entry, token_id)
                text, value = self._token_text(token_id, sampled, as_ids), _finite(sampled.logprob)
                top = {self._token_text(t, lp, as_ids): _finite(lp.logprob)
                       for t, lp in [(token_id, sampled), *_top(entry, k)]}
            result["tokens"].append(text)
            result["token_logprobs"].append(value)
            result["top_logprobs"].append(top)
            result["text_offset"].append(offset)
            offset += len(text)
        return result

    def _tokenize_prompt(self, prompt: str | list[int], add_special_tokens: bool | None) -> tuple[str | None, list[int]]:
        try:
            if isinstance(prompt, str) and add_special_tokens is False:
                return prompt, self.engine.input_processor.encode(prompt, add_special_tokens=False)
            return self.engine.input_processor.tokenize_prompt(prompt)
        except ValueError as exc:
            raise APIError(str(exc), param="prompt") from exc

    async def _off_loop(self, fn: Callable, *args, **kwargs) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool,
                                                                functools.partial(fn, *args, **kwargs))

    def _encode_prompt(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        try:
            return self.engine.input_processor.encode(text, add_special_tokens)
        except ValueError as exc:
            raise APIError(str(exc), param=param) from exc

    # ---- what one request costs ----
    def _check_fan_out(self, request: GenerationRequest, num_prompts: int) -> None:
        """Sequences (prompts x n) one request asks for: more than --max-num-seqs-per-request, or
        more than the queue may ever hold, is a 400; a 503 would have the client retry for ever."""
        n = request.n or 1
        seqs = num_prompts * n
        what, param = (f"n={n}", "n") if num_prompts == 1 else (f"{num_prompts} prompts x n={n}", "prompt")
        if seqs > self.max_num_seqs_per_request:
            raise APIError(f"{what} asks for {seqs} sequences; one request may run at most "
                           f"{self.max_num_seqs_per_request} (--max-num-seqs-per-request)", param=param)
        if self.max_num_queued_reqs is not None and seqs > self.max_num_queued_reqs:
            raise APIError(f"{what} asks for {seqs} sequences, more than the waiting queue ever admits "
                           f"(--max-num-queued-reqs {self.max_num_queued_reqs})", param=param)

    def _check_queued_tokens(self, request: CompletionRequest, prompt_token_ids: list[list[int]]) -> None:
        """Several prompts are admitted one by one, so together they must fit the token queue
        limit (a single request always gets in when the queue is empty)."""
        if self.max_num_queued_tokens is None or len(prompt_token_ids) == 1:
            return
        total = sum(map(len, prompt_token_ids)) * (request.n or 1)
        if total > self.max_num_queued_tokens:
            raise APIError(f"{len(prompt_token_ids)} prompts x n={request.n or 1} hold {total} prompt tokens, more "
                           f"than the waiting queue ever admits (--max-num-queued-tokens "
                           f"{self.max_num_queued_tokens}); send them in separate requests", param="prompt")

    # ---- tokenizer endpoints ----
    async def tokenize(self, request: TokenizeRequest) -> dict:
        self.check_model(request.model)
        if request.messages is not None:
            content_format = self._content_format(request.chat_template)
            tools = [tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None
            if has_images(request.messages):  # counted as the engine will see them: placeholders expanded
                _, token_ids, _ = await self._render_image_chat(request, content_format, tools)
            else:
                messages = [m.to_template(content_format) for m in request.messages]
                _, token_ids = await self._off_loop(self._render_chat, request, messages, tools)
        else:
            token_ids = await self._off_loop(self._encode_prompt, request.prompt,
                                             request.add_special_tokens is not False, "prompt")
        result = {"count": len(token_ids), "max_model_len": self.engine.max_model_len, "tokens": token_ids}
        if request.return_token_strs:
            result["token_strs"] = self.tokenizer.convert_ids_to_tokens(token_ids)
        return result

    async def detokenize(self, request: DetokenizeRequest) -> dict:
        self.check_model(request.model)
        vocab_size = self.engine.input_processor.vocab_size
        bad = next((t for t in request.tokens if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(f"tokens must be ids in [0, {vocab_size}), got {bad}", param="tokens")
        try:
            return {"prompt": await self._off_loop(self.tokenizer.decode, request.tokens)}
        except Exception as exc:  # ids the model has but the tokenizer does not (padded vocabularies)
            raise APIError(f"cannot decode tokens: {exc}", param="tokens") from exc

    # ---- shared machinery ----
    def _generate(self, job: _Job, priority: int, stream: bool) -> AsyncIterator[RequestOutput]:
        self._log(job, priority)
        return self.engine.generate(job.prompt, job.prompt_token_ids, job.params, job.request_id,
                                    priority=priority, stream=stream, trace_headers=job.trace_headers,
                                    cache_salt=job.cache_salt, lora_request=job.lora_request,
                                    mm_features=job.mm_features)

    def _lora_request(self, model: str) -> LoRARequest | None:
        return self.lora.get(model) if self.lora is not None else None

    async def _start_streams(self, jobs: list[_Job], request: GenerationRequest) -> list[AsyncIterator[RequestOutput]]:
        """Starts every job and awaits its first output, so the engine's own checks (prompt
        length, full queue) fail here, while the HTTP layer can still send a status code."""
        streams = [self._generate(job, request.priority or 0, stream=True) for job in jobs]
        with _engine_errors(request):
            firsts = await _gather_or_close(streams, _first)
        return [_replay(first, stream) for first, stream in zip(firsts, streams)]

    async def _run_to_end(self, jobs: list[_Job], request: GenerationRequest) -> list[RequestOutput]:
        streams = [self._generate(job, request.priority or 0, stream=False) for job in jobs]
        with _engine_errors(request):
            return await _gather_or_close(streams, _last)

    async def _sse_stream(self, head: _Head, streams: list[AsyncIterator[RequestOutput]],
                          render: Callable[[int, RequestOutput], Iterable[dict]], usage: _Usage,
                          request: GenerationRequest,
                          first_choices: Iterable[dict] = ()) -> AsyncIterator[str]:
        """One chunk per rendered choice, the usage chunk when asked (or forced by
        --enable-force-include-usage), then [DONE]. Errors after the start become an error
        event; closing this iterator aborts the engine requests."""
        include_usage, continuous = request.include_usage() or self.force_include_usage, request.continuous_usage()

        def frame(choices: list[dict], usage_body: dict | None = None) -> str:
            body = head.body(choices)
            if include_usage:  # OpenAI: with include_usage every chunk has a usage key (null)
                body["usage"] = usage_body
            return _sse(body)

        merged = _merge(streams)
        try:
            for choice in first_choices:
                yield frame([choice])
            async for prompt_index, out in merged:
                usage.add(prompt_index, out)
                for choice in render(prompt_index, out):
                    yield frame([choice], usage.info() if continuous else None)
            if include_usage:
                yield frame([], usage.info())
        except Exception as exc:
            yield _sse(_stream_error(exc).body())
        finally:
            await merged.aclose()
        yield _SSE_DONE

    def _token_text(self, token_id: int, logprob: Logprob | None, as_ids: bool | None = False) -> str:
        """A token as logprobs show it: its text, or "token_id:N" with return_tokens_as_token_ids
        (text that is not valid UTF-8 on its own cannot be mapped back to a token)."""
        if as_ids:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id])

    def _log(self, job: _Job, priority: int) -> None:
        """Prompt text is logged only with log_requests (it may be private)."""
        if not self.log_requests:
            logger.debug("request %s: %d prompt tokens", job.request_id, len(job.prompt_token_ids))
            return
        prompt: Any = job.prompt if job.prompt is not None else job.prompt_token_ids
        if self.max_log_len is not None:
            prompt = prompt[: self.max_log_len]
        logger.info("request %s: %d prompt tokens, priority %d, params %s, prompt %r",
                    job.request_id, len(job.prompt_token_ids), priority, job.params, prompt)


def _request_id(prefix: str, base: str | None) -> str:
    return f"{prefix}-{base}" if base else _random_id(prefix)


def _prompt_logprobs_json(entries: PromptLogprobs | None) -> list[dict | None] | None:
    """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}}."""
    if entries is None:
        return None
    return [None if entry is None else
            {str(t): {"logprob": _finite(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
             for t, lp in entry.items()}
            for entry in entries]


def _drop_generated(out: RequestOutput) -> None:
    """echo with max_tokens=0: the one token the engine sampled is not part of the answer."""
    out.outputs = [dataclasses.replace(c, text="", token_ids=[], cumulative_logprob=None,
                                       logprobs=None if c.logprobs is None else [],
                                       finish_reason="length" if c.finish_reason in ("stop", "length") else c.finish_reason,
                                       stop_reason=None)
                   for c in out.outputs]


async def _scoring(stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """A stream with the generated part of each output dropped (echo with max_tokens=0)."""
    try:
        async for out in stream:
            _drop_generated(out)
            yield out
    finally:
        await stream.aclose()
