"""Anthropic's Messages API (`POST /v1/messages`), over the chat completions path, so the
official `anthropic` client works against sluice, streamed or not.

`system`, `messages` (text, tool_use and tool_result blocks), `max_tokens`, `stop_sequences`,
`temperature`, `top_p`, `top_k` (the current SDK sends these through `extra_body`), `tools`,
`tool_choice` and `output_config.format` (a JSON schema) map onto their chat counterparts;
the answer comes back as Anthropic's message object or its event stream (`message_start`,
`content_block_start`, `content_block_delta`, ..., `message_stop`). `image` blocks in user
turns (a base64 or url `source`) take the chat path's image route, for a vision-language
model; extended thinking is refused by name.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from sluice.entrypoints.openai.chat_adapter import chat_chunks, closing_chunks, image_part, run_chat, sse_event
from sluice.entrypoints.openai.protocol import APIError, OpenAIModel

RENAMES = {"max_completion_tokens": "max_tokens", "stop": "stop_sequences", "response_format": "output_config.format"}
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}
IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")  # what Anthropic's API takes


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class OutputFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    effort: str | None = None  # no effect here
    format: OutputFormat | None = None


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(OpenAIModel):
    """Unknown fields follow the server's policy (warned once, or a 400 with --strict-request-fields)."""

    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = None
    top_k: int | None = None
    stream: bool | None = False
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
    # Accepted and ignored: they describe the caller or tune what has no effect here.
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None
    inference_geo: str | None = None
    speed: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None
    diagnostics: Any = None

    def to_chat(self) -> dict[str, Any]:
        """The equivalent chat completion request body."""
        if self.thinking and self.thinking.get("type") != "disabled":
            raise APIError("thinking is not supported by this server", param="thinking")
        body: dict[str, Any] = {"model": self.model, "messages": self.chat_messages(),
                                "max_completion_tokens": self.max_tokens, "stream": bool(self.stream)}
        if self.stream:
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        for name, value in (("stop", self.stop_sequences), ("temperature", self.temperature),
                            ("top_p", self.top_p), ("top_k", self.top_k)):
            if value is not None:
                body[name] = value
        if self.output_config and self.output_config.format:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": self.output_config.format.schema_}}
        if self.tools:
            body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                               "parameters": t.input_schema}} for t in self.tools]
        if self.tool_choice is not None:
            choice = self.tool_choice
            if choice.type == "tool" and not choice.name:
                raise APIError('tool_choice.name is required for type "tool"', param="tool_choice.name")
            body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) or {
                "type": "function", "function": {"name": choice.name}}
            if choice.disable_parallel_tool_use:
                body["parallel_tool_calls"] = False
        return body

    def chat_messages(self) -> list[dict[str, Any]]:
        messages = []
        if self.system:
            messages.append({"role": "system", "content": block_text(self.system, "system")})
        for i, message in enumerate(self.messages):
            messages += chat_turn(message, f"messages.{i}")
        return messages


def block_text(content: str | list, where: str) -> str:
    """Text blocks (or a plain string) as one string."""
    if isinstance(content, str):
        return content
    texts = []
    for i, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise APIError(f"{where}.{i}: only text blocks are supported here", param=f"{where}.{i}")
        texts.append(str(block.get("text", "")))
    return "".join(texts)


def chat_turn(message: AnthropicMessage, where: str) -> list[dict[str, Any]]:
    """One Anthropic turn as chat messages: tool results become tool messages (before the
    user's text), tool_use blocks become the assistant's tool_calls."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    texts, calls, results, images = [], [], [], []
    parts = []  # text and image parts in block order, for a turn with images
    for i, block in enumerate(message.content):
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
            parts.append({"type": "text", "text": texts[-1]})
        elif kind == "image" and message.role == "user":
            images.append(image_block(block, f"{where}.content.{i}"))
            parts.append(images[-1])
        elif kind == "tool_use" and message.role == "assistant":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}})
        elif kind == "tool_result" and message.role == "user":
            content = block.get("content") or ""
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": block_text(content, f"{where}.content.{i}.content")})
        else:
            raise APIError(f"{where}.content.{i}: a {kind!r} block is not supported in a {message.role} turn "
                           "(text, tool_use from the assistant, tool_result and image from the user)",
                           param=f"{where}.content.{i}.type")
    # "" beside tool calls: templates read .content
    turn = {"role": message.role, "content": parts if images else "".join(texts)}
    if calls:
        turn["tool_calls"] = calls
    return results + ([turn] if texts or calls or images else [])


def image_block(block: dict[str, Any], where: str) -> dict[str, Any]:
    """An `image` block as a chat image part: a base64 source becomes a data: URL."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "url" and isinstance(source.get("url"), str):
        return image_part(source["url"], f"{where}.source")
    if kind != "base64":
        raise APIError(f"{where}.source must be {{\"type\": \"base64\", \"media_type\": ..., \"data\": ...}} or "
                       f"{{\"type\": \"url\", \"url\": ...}}; got type {kind!r}", param=f"{where}.source.type")
    media_type = source.get("media_type")
    if media_type not in IMAGE_MEDIA_TYPES:
        raise APIError(f"{where}.source.media_type must be one of {', '.join(IMAGE_MEDIA_TYPES)}; got {media_type!r}",
                       param=f"{where}.source.media_type")
    if not isinstance(source.get("data"), str) or not source["data"]:
        raise APIError(f"{where}.source.data must be the image's bytes in base64", param=f"{where}.source.data")
    return image_part(f"data:{media_type};base64,{source['data']}", f"{where}.source")


# ---- results -------------------------------------------------------------------------------
def stop_fields(finish_reason: str | None, stop_reason: int | str | None, stop_sequences: list[str] | None,
                called: bool) -> dict:
    """Anthropic's stop_reason / stop_sequence for a chat finish (`called`: it made tool calls,
    which OpenAI reports as "stop" for a named tool_choice and Anthropic always as "tool_use")."""
    if called:
        return {"stop_reason": "tool_use", "stop_sequence": None}
    if finish_reason == "stop" and isinstance(stop_reason, str) and stop_reason in (stop_sequences or ()):
        return {"stop_reason": "stop_sequence", "stop_sequence": stop_reason}
    return {"stop_reason": STOP_REASONS.get(finish_reason or "", "end_turn"), "stop_sequence": None}


def tool_input(arguments: str) -> dict:
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def anthropic_usage(chat_usage: dict | None) -> dict:
    chat_usage = chat_usage or {}
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": chat_usage.get("prompt_tokens", 0), "output_tokens": chat_usage.get("completion_tokens", 0),
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def message_body(message_id: str, model: str, content: list[dict], stop: dict, chat_usage: dict | None) -> dict:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            **stop, "usage": anthropic_usage(chat_usage)}


def content_blocks(message: dict) -> list[dict]:
    blocks = [{"type": "text", "text": message["content"]}] if message.get("content") else []
    blocks += [{"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                "input": tool_input(call["function"]["arguments"])} for call in message.get("tool_calls") or ()]
    return blocks


class EventStream:
    """Chat chunks -> Anthropic's streaming events."""

    def __init__(self, message_id: str, model: str, stop_sequences: list[str] | None) -> None:
        self.message_id = message_id
        self.model = model
        self.stop_sequences = stop_sequences
        self.index = -1  # the content block being streamed
        self.block_kind: str | None = None
        self.calls: set[int] = set()  # chat tool call indexes seen
        self.started = False

    def run(self, chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
        return closing_chunks(self._run(chunks), chunks)

    async def _run(self, chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
        chat_usage, finish_reason, stop_reason = None, None, None
        try:
            async for chunk in chunks:
                chat_usage = chunk.get("usage") or chat_usage
                if not self.started and chat_usage is not None:
                    yield self.start(chat_usage)
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        for frame in self.text_delta(delta["content"]):
                            yield frame
                    for call in delta.get("tool_calls") or ():
                        for frame in self.call_delta(call):
                            yield frame
                    if choice.get("finish_reason"):
                        finish_reason, stop_reason = choice["finish_reason"], choice.get("stop_reason")
        except APIError as error:
            yield sse_event("error", {"type": "error", "error": {"type": error.type, "message": error.message}})
            return
        if not self.started:
            yield self.start(chat_usage)
        for frame in self.close_block():
            yield frame
        yield sse_event("message_delta", {"type": "message_delta",
                                          "delta": stop_fields(finish_reason, stop_reason, self.stop_sequences,
                                                               bool(self.calls)),
                                          "usage": {"output_tokens": anthropic_usage(chat_usage)["output_tokens"]}})
        yield sse_event("message_stop", {"type": "message_stop"})

    def start(self, chat_usage: dict | None) -> str:
        self.started = True
        usage = {**anthropic_usage(chat_usage), "output_tokens": 0}
        return sse_event("message_start", {"type": "message_start", "message": message_body(
            self.message_id, self.model, [], {"stop_reason": None, "stop_sequence": None}, None) | {"usage": usage}})

    def open_block(self, kind: str, block: dict) -> list[str]:
        frames = self.close_block()
        self.index += 1
        self.block_kind = kind
        return frames + [sse_event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                           "content_block": block})]

    def close_block(self) -> list[str]:
        if self.block_kind is None:
            return []
        self.block_kind = None
        return [sse_event("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def text_delta(self, text: str) -> list[str]:
        frames = [] if self.block_kind == "text" else self.open_block("text", {"type": "text", "text": ""})
        return frames + [sse_event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                           "delta": {"type": "text_delta", "text": text}})]

    def call_delta(self, delta: dict) -> list[str]:
        frames = []
        function = delta.get("function") or {}
        if delta.get("index", 0) not in self.calls:
            self.calls.add(delta.get("index", 0))
            frames += self.open_block("tool_use", {"type": "tool_use", "id": delta.get("id") or f"toolu_{uuid.uuid4().hex}",
                                                   "name": function.get("name"), "input": {}})
        if function.get("arguments"):
            frames.append(sse_event("content_block_delta", {
                "type": "content_block_delta", "index": self.index,
                "delta": {"type": "input_json_delta", "partial_json": function["arguments"]}}))
        return frames


# ---- the route -----------------------------------------------------------------------------
async def create_message(serving, request: MessagesRequest,
                         trace_headers: dict[str, str] | None = None) -> dict | AsyncIterator[str]:
    model = serving.check_model(request.model)
    message_id = f"msg_{uuid.uuid4().hex}"
    result = await run_chat(serving, request.to_chat(), RENAMES, trace_headers)
    if isinstance(result, dict):
        choice = result["choices"][0]
        stop = stop_fields(choice["finish_reason"], choice.get("stop_reason"), request.stop_sequences,
                           bool(choice["message"].get("tool_calls")))
        return message_body(message_id, model, content_blocks(choice["message"]), stop, result.get("usage"))
    return EventStream(message_id, model, request.stop_sequences).run(chat_chunks(result))


def add_messages_routes(app: FastAPI, serving, respond, trace_headers) -> None:
    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request) -> Response:
        return await respond(request, create_message(serving, body, trace_headers(request)))
