"""Tool calls in chat output: the schema that forces them, the parsers that find them, streaming.

tool_choice "required" or a named function constrains the output with a JSON schema, so the
call always parses and no parser is needed. tool_choice "auto" lets the model write freely and a
parser picked with --tool-call-parser finds the calls in its text: `hermes` (`<tool_call>{...}
</tool_call>` blocks, the format of Hermes, Qwen and many others) or `json` (the whole output is
one call object or a list of them).
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

TOOL_CALL_ID_PREFIX = "chatcmpl-tool-"
ANY_ARGUMENTS = {"type": "object"}  # a function without a parameters schema takes an empty object


@dataclass
class FunctionCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def to_openai(self) -> dict:
        return {"id": f"{TOOL_CALL_ID_PREFIX}{uuid.uuid4().hex}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def _call(name: Any, arguments: Any) -> FunctionCall | None:
    """A call from parsed JSON, or None when it is not one (arguments: an object, or its JSON text)."""
    if not isinstance(name, str) or not name:
        return None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return FunctionCall(name, json.dumps(arguments, ensure_ascii=False))


def _load(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


# ---- forcing calls with a grammar -------------------------------------------------------------
def required_calls_schema(tools: list[dict], parallel: bool = True) -> dict:
    """tool_choice "required": a JSON array of {"name", "parameters"} objects, one shape per tool."""
    shapes = [
        {"type": "object",
         "properties": {"name": {"const": t["function"]["name"]},
                        "parameters": t["function"].get("parameters") or ANY_ARGUMENTS},
         "required": ["name", "parameters"]}
        for t in tools
    ]
    schema: dict = {"type": "array", "minItems": 1, "items": shapes[0] if len(shapes) == 1 else {"anyOf": shapes}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def named_call_schema(tool: dict) -> dict:
    """A named tool_choice: the output is that function's arguments object."""
    return tool["function"].get("parameters") or ANY_ARGUMENTS


# ---- extractors ------------------------------------------------------------------------------------
class ToolCallExtractor(ABC):
    """Finds the tool calls in a choice's text."""

    # The choice's finish_reason once calls were found (None: keep the engine's).
    finish_reason: str | None = "tool_calls"

    @abstractmethod
    def extract(self, text: str) -> tuple[str | None, list[FunctionCall]]:
        """(content, calls) of a finished text; text without calls that parse is all content."""

    @abstractmethod
    def content_end(self, text: str) -> int:
        """How many leading characters of an unfinished text are content whatever comes next."""


class ForcedToolCalls(ToolCallExtractor):
    """Output constrained by `required_calls_schema` (name None) or `named_call_schema`."""

    def __init__(self, name: str | None) -> None:
        self.name = name
        if name is not None:
            self.finish_reason = None  # OpenAI ends a forced named call with "stop"

    def extract(self, text: str) -> tuple[str | None, list[FunctionCall]]:
        value = _load(text)
        if self.name is not None:
            call = _call(self.name, value)
            return (None, [call]) if call else (text, [])
        if not isinstance(value, list) or not value:
            return text, []
        calls = [_call(item.get("name"), item.get("parameters")) if isinstance(item, dict) else None for item in value]
        return (text, []) if None in calls else (None, calls)

    def content_end(self, text: str) -> int:
        return 0  # all of it is the call


class HermesToolParser(ToolCallExtractor):
    """Content, then `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks."""

    START, END = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def extract(self, text: str) -> tuple[str | None, list[FunctionCall]]:
        start = text.find(self.START)
        if start < 0:
            return text, []
        calls = []
        for block in self._BLOCK.findall(text[start:]):
            value = _load(block.strip())
            call = _call(value.get("name"), value.get("arguments", value.get("parameters"))) \
                if isinstance(value, dict) else None
            if call is None:
                return text, []
            calls.append(call)
        return text[:start] or None, calls

    def content_end(self, text: str) -> int:
        start = text.find(self.START)
        if start >= 0:
            return start
        # Hold back a tail that may be the start of the marker ("<tool" of "<tool_call>").
        for keep in range(min(len(self.START) - 1, len(text)), 0, -1):
            if self.START.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)


class JsonToolParser(ToolCallExtractor):
    """The whole output is one {"name", "arguments"} object or a list of them."""

    def extract(self, text: str) -> tuple[str | None, list[FunctionCall]]:
        value = _load(text)
        items = value if isinstance(value, list) else [value]
        calls = [
            _call(item.get("name"), item.get("arguments", item.get("parameters"))) if isinstance(item, dict) else None
            for item in items
        ]
        if not calls or None in calls:
            return text, []
        return None, calls

    def content_end(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or stripped[0] in "[{":
            return 0  # may be a call: hold it until the end
        return len(text)


TOOL_PARSERS: dict[str, type[ToolCallExtractor]] = {"hermes": HermesToolParser, "json": JsonToolParser}


# ---- streaming -------------------------------------------------------------------------------------
class ToolCallStream:
    """One choice's text deltas -> OpenAI deltas: content as soon as it is surely content, the
    calls (header, then arguments) when the text ends and they parse."""

    def __init__(self, extractor: ToolCallExtractor) -> None:
        self.extractor = extractor
        self.text = ""
        self.sent = 0  # characters of content already streamed
        self.called = False

    def feed(self, delta: str, finished: bool) -> tuple[str, list[dict]]:
        """(content delta, tool-call deltas) after `delta`."""
        self.text += delta
        if not finished:
            end = max(self.sent, self.extractor.content_end(self.text))
            content, self.sent = self.text[self.sent:end], end
            return content, []
        content, calls = self.extractor.extract(self.text)
        self.called = bool(calls)
        return (content or "")[self.sent:], [d for i, call in enumerate(calls) for d in call_deltas(i, call)]


def call_deltas(index: int, call: FunctionCall) -> list[dict]:
    """OpenAI's streamed shape of one call: id, type and name first, then the arguments."""
    head = call.to_openai()
    head["function"]["arguments"] = ""
    return [{"index": index, **head}, {"index": index, "function": {"arguments": call.arguments}}]
