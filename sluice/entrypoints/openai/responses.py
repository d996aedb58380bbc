"""OpenAI's Responses API (`POST /v1/responses`), over the chat completions path.

`input` (text or a list of messages, function calls and their outputs) and `instructions`
become chat messages (`input_image` parts become image_url parts, for a vision-language
model); function tools, `tool_choice`, `text.format` and `max_output_tokens` map onto their
chat counterparts. Streaming sends the Responses API's typed events
(`response.created`, `response.output_text.delta`, ..., `response.completed`).

Nothing is stored: `store: true`, `background: true` and `previous_response_id` need a
response store this server does not keep, so they are refused by name (the openai SDK sends
none of them unless asked).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from sluice.entrypoints.openai.chat_adapter import chat_chunks, closing_chunks, image_part, run_chat, sse_event
from sluice.entrypoints.openai.protocol import APIError, OpenAIModel

RENAMES = {"max_completion_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None
    verbosity: str | None = None  # describes the caller's wish; no effect here


class ResponsesRequest(OpenAIModel):
    """Unknown fields follow the server's policy (warned once, or a 400 with --strict-request-fields)."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = Field(default=None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    store: bool | None = None
    background: bool | None = None
    previous_response_id: str | None = None
    # Accepted and ignored: they describe the caller or ask for what has no effect here.
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    truncation: str | None = None
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None
    stream_options: dict[str, Any] | None = None

    def refuse_stored_state(self) -> None:
        if self.store:
            raise APIError("store=true is not supported: this server keeps no responses (send store=false or "
                           "leave it out)", param="store")
        if self.background:
            raise APIError("background=true is not supported: this server keeps no responses to poll",
                           param="background")
        if self.previous_response_id is not None:
            raise APIError("previous_response_id is not supported: this server keeps no responses; send the "
                           "whole conversation as input", param="previous_response_id")

    def to_chat(self) -> dict[str, Any]:
        """The equivalent chat completion request body."""
        body: dict[str, Any] = {"model": self.model, "messages": self.messages(), "stream": bool(self.stream)}
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        for name, value in (("max_completion_tokens", self.max_output_tokens), ("temperature", self.temperature),
                            ("top_p", self.top_p), ("parallel_tool_calls", self.parallel_tool_calls)):
            if value is not None:
                body[name] = value
        if self.top_logprobs:
            body["logprobs"], body["top_logprobs"] = True, self.top_logprobs
        if self.tools:
            body["tools"] = [chat_tool(tool, i) for i, tool in enumerate(self.tools)]
        if self.tool_choice is not None:
            body["tool_choice"] = chat_tool_choice(self.tool_choice)
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type != "text":
            body["response_format"] = ({"type": "json_object"} if fmt.type == "json_object" else {
                "type": "json_schema",
                "json_schema": {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict, "description": fmt.description},
            })
        return body

    def messages(self) -> list[dict[str, Any]]:
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}]
        for i, item in enumerate(self.input):
            message = chat_message(item, f"input.{i}", messages)
            if message is not None:
                messages.append(message)
        return messages


def chat_message(item: dict[str, Any], where: str, messages: list) -> dict[str, Any] | None:
    """One input item as a chat message (a function call joins the assistant turn before it)."""
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise APIError(f"{where}.role must be user, assistant, system or developer, got {role!r}",
                           param=f"{where}.role")
        return {"role": role, "content": message_content(item.get("content"), f"{where}.content")}
    if kind == "function_call":
        call = {"id": item.get("call_id") or item.get("id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
            last["tool_calls"].append(call)
            return None
        return {"role": "assistant", "content": "", "tool_calls": [call]}  # "": templates read .content
    if kind == "function_call_output":
        output = item.get("output")
        return {"role": "tool", "tool_call_id": item.get("call_id"),
                "content": output if isinstance(output, str) else text_of(output, f"{where}.output")}
    raise APIError(f"{where}.type {kind!r} is not supported (message, function_call and function_call_output are)",
                   param=f"{where}.type")


def message_content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content: its text, or chat parts (text and image_url) when it holds
    `input_image` parts, which go down the chat path's image route."""
    if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") == "input_image"
                                                for p in content):
        return text_of(content, where)
    parts = []
    for i, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "input_image":
            parts.append(input_image(part, f"{where}.{i}"))
        else:
            parts.append({"type": "text", "text": text_of([part], where, first=i)})
    return parts


def input_image(part: dict[str, Any], where: str) -> dict[str, Any]:
    """An `input_image` part (`image_url`: a data: or http(s) URL) as a chat image part."""
    if part.get("file_id") is not None:
        raise APIError(f"{where}.file_id: images by file id are not supported (this server keeps no files); "
                       "send image_url as a data: or http(s) URL", param=f"{where}.file_id")
    url = part.get("image_url")
    if not isinstance(url, str) or not url:
        raise APIError(f"{where}.image_url must be a data: or http(s) URL string", param=f"{where}.image_url")
    return image_part(url, f"{where}.image_url")


def text_of(content: Any, where: str, first: int = 0) -> str:
    """Message content as text: a string, or input_text / output_text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(f"{where} must be a string or a list of text parts", param=where)
    texts = []
    for i, part in enumerate(content, first):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise APIError(f"{where}.{i}: content part {kind!r} is not supported here (text parts; "
                           "input_image in messages)", param=f"{where}.{i}")
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def chat_tool(tool: dict[str, Any], index: int) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise APIError(f"tools.{index}.type {tool.get('type')!r} is not supported (function tools only)",
                       param=f"tools.{index}.type")
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
    return {"type": "function", "function": function}


def chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not choice.get("name"):
            raise APIError('tool_choice must be "auto", "none", "required" or {"type": "function", "name": ...}',
                           param="tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


# ---- results -------------------------------------------------------------------------------
def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage(chat_usage: dict | None) -> dict | None:
    if chat_usage is None:
        return None
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chat_usage["total_tokens"],
    }


def text_item(item_id: str, text: str, status: str = "completed") -> dict:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def call_item(item_id: str, call: dict, status: str = "completed") -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"] if status == "completed" else "", "status": status}


class ResponseShell:
    """The response object's fields that do not depend on the output."""

    def __init__(self, request: ResponsesRequest, model: str) -> None:
        self.id = _id("resp")
        self.created_at = int(time.time())
        self.request = request
        self.model = model

    def body(self, status: str, output: list[dict], chat_usage: dict | None = None,
             finish_reason: str | None = None) -> dict:
        r = self.request
        incomplete = status == "completed" and finish_reason == "length"
        fmt = r.text.format.model_dump(by_alias=True, exclude_none=True) if r.text and r.text.format else {"type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "model": self.model,
            "status": "incomplete" if incomplete else status,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "error": None, "output": output, "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens, "temperature": r.temperature, "top_p": r.top_p,
            "tools": r.tools or [], "tool_choice": r.tool_choice or "auto",
            "parallel_tool_calls": r.parallel_tool_calls is not False, "text": {"format": fmt},
            "previous_response_id": None, "reasoning": None, "store": False, "background": False,
            "truncation": r.truncation or "disabled", "metadata": r.metadata or {}, "user": r.user,
            "usage": usage(chat_usage),
        }


def output_items(message: dict) -> list[dict]:
    items = [text_item(_id("msg"), message["content"])] if message.get("content") else []
    items += [call_item(_id("fc"), call) for call in message.get("tool_calls") or ()]
    return items


class EventStream:
    """Chat chunks -> the Responses API's streaming events, each numbered in order."""

    def __init__(self, shell: ResponseShell) -> None:
        self.shell = shell
        self.sequence = 0
        self.output: list[dict] = []  # finished items
        self.item: dict | None = None  # the item being streamed
        self.text = ""
        self.calls: dict[int, dict] = {}  # chat tool call index -> its call dict

    def event(self, kind: str, **data) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return sse_event(kind, data)

    def run(self, chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
        return closing_chunks(self._run(chunks), chunks)

    async def _run(self, chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
        yield self.event("response.created", response=self.shell.body("in_progress", []))
        yield self.event("response.in_progress", response=self.shell.body("in_progress", []))
        chat_usage, finish_reason = None, None
        try:
            async for chunk in chunks:
                chat_usage = chunk.get("usage") or chat_usage
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        for frame in self.text_delta(delta["content"]):
                            yield frame
                    for call in delta.get("tool_calls") or ():
                        for frame in self.call_delta(call):
                            yield frame
                    finish_reason = choice.get("finish_reason") or finish_reason
        except APIError as error:
            yield self.event("error", code=error.code, message=error.message, param=error.param)
            yield self.event("response.failed", response={**self.shell.body("failed", self.output),
                                                          "error": {"code": error.code or "server_error",
                                                                    "message": error.message}})
            return
        for frame in self.close_item():
            yield frame
        final = self.shell.body("completed", self.output, chat_usage, finish_reason)
        yield self.event("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                         response=final)

    def text_delta(self, text: str) -> list[str]:
        frames = []
        if self.item is None or self.item["type"] != "message":
            frames += self.close_item()
            self.item, self.text = text_item(_id("msg"), "", "in_progress"), ""
            frames.append(self.event("response.output_item.added", output_index=len(self.output), item=self.item))
            frames.append(self.event("response.content_part.added", item_id=self.item["id"],
                                     output_index=len(self.output), content_index=0,
                                     part={"type": "output_text", "text": "", "annotations": []}))
        self.text += text
        frames.append(self.event("response.output_text.delta", item_id=self.item["id"], output_index=len(self.output),
                                 content_index=0, delta=text, logprobs=[]))
        return frames

    def call_delta(self, delta: dict) -> list[str]:
        frames = []
        index = delta.get("index", 0)
        function = delta.get("function") or {}
        if index not in self.calls:
            frames += self.close_item()
            call = {"id": delta.get("id") or _id("call"), "function": {"name": function.get("name"), "arguments": ""}}
            self.calls[index] = call
            self.item = call_item(_id("fc"), call, "in_progress")
            self.item["call"] = call
            frames.append(self.event("response.output_item.added", output_index=len(self.output),
                                     item={k: v for k, v in self.item.items() if k != "call"}))
        arguments = function.get("arguments")
        if arguments:
            self.calls[index]["function"]["arguments"] += arguments
            frames.append(self.event("response.function_call_arguments.delta", item_id=self.item["id"],
                                     output_index=len(self.output), delta=arguments))
        return frames

    def close_item(self) -> list[str]:
        """The done events of the item being streamed, if any."""
        item, self.item = self.item, None
        if item is None:
            return []
        index = len(self.output)
        if item["type"] == "message":
            done = text_item(item["id"], self.text)
            part = done["content"][0]
            frames = [
                self.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                           text=self.text, logprobs=[]),
                self.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                           part=part),
            ]
        else:
            done = call_item(item["id"], item["call"])
            frames = [self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                 name=done["name"], arguments=done["arguments"])]
        self.output.append(done)
        frames.append(self.event("response.output_item.done", output_index=index, item=done))
        return frames


# ---- the route -----------------------------------------------------------------------------
async def create_response(serving, request: ResponsesRequest,
                          trace_headers: dict[str, str] | None = None) -> dict | AsyncIterator[str]:
    request.refuse_stored_state()
    model = serving.check_model(request.model)
    shell = ResponseShell(request, model)
    result = await run_chat(serving, request.to_chat(), RENAMES, trace_headers)
    if isinstance(result, dict):
        choice = result["choices"][0]
        return shell.body("completed", output_items(choice["message"]), result.get("usage"), choice["finish_reason"])
    return EventStream(shell).run(chat_chunks(result))


def add_responses_routes(app: FastAPI, serving, respond, trace_headers) -> None:
    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        return await respond(request, create_response(serving, body, trace_headers(request)))
