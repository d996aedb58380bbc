"""What the Responses and Anthropic Messages APIs share: each request becomes a chat completion
request, runs through the one chat path (template, tools, structured output, engine), and its
result or chunk stream is re-shaped into the other API's objects.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pydantic

from sluice.entrypoints.openai.protocol import APIError, ChatCompletionRequest, validation_error_to_api_error


def image_part(url: str, origin: str) -> dict[str, Any]:
    """A chat image_url part that remembers the caller's field (`origin`), so an error about the
    image (too large, not an image, over --limit-mm-per-prompt) names the caller's own field."""
    return {"type": "image_url", "image_url": {"url": url}, "origin": origin}


def image_origins(messages: list[dict[str, Any]]) -> dict[str, str]:
    """Take the origins out of a chat body's image parts: the chat path's name for each image
    part (`messages.1.content.0.image_url`) -> the caller's (`input.0.content.2.image_url`)."""
    origins = {}
    for i, message in enumerate(messages):
        for j, part in enumerate(message.get("content") if isinstance(message.get("content"), list) else ()):
            origin = part.pop("origin", None) if isinstance(part, dict) else None
            if origin is not None:
                origins[f"messages.{i}.content.{j}.image_url"] = origin
    return origins


async def run_chat(serving, body: dict[str, Any], renames: dict[str, str], trace_headers) -> dict | AsyncIterator[str]:
    """The chat path's result for an adapter's chat-shaped body; its errors name the caller's fields."""
    origins = image_origins(body["messages"])
    try:
        return await serving.chat(chat_request(body, renames), trace_headers)
    except APIError as error:
        if error.param in origins:
            error.message = error.message.replace(error.param, origins[error.param])
            error.param = origins[error.param]
        raise


def chat_request(body: dict[str, Any], renames: dict[str, str]) -> ChatCompletionRequest:
    """A ChatCompletionRequest from a chat-shaped dict; errors name the caller's own fields
    (`renames`: chat field -> the other API's)."""
    try:
        return ChatCompletionRequest.model_validate(body)
    except pydantic.ValidationError as exc:
        error = validation_error_to_api_error(exc)
        for chat_name, name in renames.items():
            error.message = error.message.replace(chat_name, name)
            if error.param and error.param.startswith(chat_name):
                error.param = name + error.param[len(chat_name):]
        raise error from exc


async def chat_chunks(frames: AsyncIterator[str]) -> AsyncIterator[dict]:
    """The chat.completion.chunk dicts of a chat SSE stream; its error event raises APIError.
    Closing this closes the stream, which aborts the engine request."""
    try:
        async for frame in frames:
            data = frame.removeprefix("data: ").strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                error = chunk["error"]
                raise APIError(error.get("message") or "generation failed", 500, type=error.get("type"),
                               param=error.get("param"), code=error.get("code"))
            yield chunk
    finally:
        await frames.aclose()


async def closing_chunks(frames: AsyncIterator[str], chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """An adapter's frames, then the chat chunks closed: closing them aborts the engine request
    when the client went away mid-stream."""
    try:
        async for frame in frames:
            yield frame
    finally:
        await chunks.aclose()


def sse_event(event: str, data: dict) -> str:
    """A named server-sent event, as both the Responses and the Messages API stream them."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"
