"""Tool calling and response formats without a model: request conversion, the forcing schemas,
the parsers and the streamed deltas."""

from __future__ import annotations

import json

import jsonschema
import pytest

from sluice.entrypoints.openai.protocol import APIError, ChatCompletionRequest
from sluice.entrypoints.openai.tool_calls import (
    ForcedToolCalls,
    HermesToolParser,
    JsonToolParser,
    ToolCallStream,
    named_call_schema,
    required_calls_schema,
)

USER = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}  # no parameters
TOOLS = [WEATHER, CLOCK]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **fields})


def refused(request: ChatCompletionRequest) -> APIError:
    with pytest.raises(APIError) as info:
        request.to_sampling_params(100, 4)
    assert info.value.status_code == 400
    return info.value


# ---- request conversion -------------------------------------------------------------------------
def test_response_formats_become_specs():
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    spec = chat(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}) \
        .to_sampling_params(100, 4).structured_outputs
    assert spec.json == schema
    assert chat(response_format={"type": "json_object"}).to_sampling_params(100, 4).structured_outputs.json_object
    assert chat(response_format={"type": "text"}).to_sampling_params(100, 4).structured_outputs is None


def test_tool_choice_modes_and_their_grammars():
    assert chat().tool_choice_mode() == "none"
    assert chat(tools=TOOLS).tool_choice_mode() == "auto"  # OpenAI's default with tools
    assert chat(tools=TOOLS, tool_choice="auto").to_sampling_params(100, 4).structured_outputs is None
    assert chat(tools=TOOLS, tool_choice="none").to_sampling_params(100, 4).structured_outputs is None
    required = chat(tools=TOOLS, tool_choice="required").to_sampling_params(100, 4).structured_outputs
    assert required.json == required_calls_schema(TOOLS)
    named = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.to_sampling_params(100, 4).structured_outputs.json == WEATHER["function"]["parameters"]
    assert named.named_tool() == "get_weather" and named.tool_choice_mode() == "named"


def test_template_tools_follow_vllm():
    assert chat(tools=TOOLS, tool_choice="none").template_tools() == TOOLS  # still shown to the model
    assert chat(tools=TOOLS, tool_choice="none").template_tools(exclude_when_none=True) is None
    assert chat().template_tools() is None


def test_tool_messages_reach_the_template_with_object_arguments():
    request = chat(messages=[
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "22 C", "tool_call_id": "c1"},
    ])
    assistant, tool = request.template_messages()[1:]
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert tool == {"role": "tool", "content": "22 C", "tool_call_id": "c1"}


@pytest.mark.parametrize("fields, param, fragment", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "tool_choice names the function 'nope', which is not among tools (get_weather, get_time)"),
    ({"tool_choice": "required"}, "tool_choice", "tool_choice 'required' needs tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name", "'get_weather' is defined twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}]},
     "tools.0.function.parameters", 'invalid JSON schema: Unsupported type "foo"'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object",
      "properties": {"x": {"not": {}}}}}}}, "response_format.json_schema.schema", "the keyword 'not' is not supported"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}}, "response_format.json_schema.schema",
     "is required"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "response_format",
     "structured_outputs and response_format both constrain the output"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "response_format and tool_choice both constrain the output"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "must be a non-empty list"),
    ({"structured_outputs": {"regex": "(a"}}, "structured_outputs.regex", "invalid regex"),
])
def test_bad_specs_are_400s_naming_the_field(fields, param, fragment):
    error = refused(chat(**fields))
    assert error.param == param and fragment in error.message, error.message


# ---- forcing schemas ------------------------------------------------------------------------
def test_required_schema_takes_one_or_more_known_calls():
    schema = required_calls_schema(TOOLS)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}},
                         {"name": "get_time", "parameters": {}}], schema)
    for bad in ([], [{"name": "get_weather", "parameters": {"city": "Oslo"}}], [{"name": "other", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert required_calls_schema(TOOLS, parallel=False)["maxItems"] == 1
    assert named_call_schema(CLOCK) == {"type": "object"}


# ---- extraction -----------------------------------------------------------------------------
def test_forced_calls_parse_or_stay_content():
    calls = ForcedToolCalls(None).extract('[{"name": "get_time", "parameters": {}}, '
                                          '{"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    assert calls[0] is None and [(c.name, json.loads(c.arguments)) for c in calls[1]] == \
        [("get_time", {}), ("get_weather", {"city": "Oslo"})]
    assert ForcedToolCalls(None).extract('[{"name": "get_t') == ('[{"name": "get_t', [])  # cut by max_tokens
    content, [call] = ForcedToolCalls("get_weather").extract('{"city": "Oslo"}')
    assert content is None and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    assert ForcedToolCalls("get_weather").finish_reason is None and ForcedToolCalls(None).finish_reason == "tool_calls"


def test_hermes_parser():
    parser = HermesToolParser()
    text = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    content, calls = parser.extract(text)
    assert content == "Let me check. " and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}
    assert parser.extract("no calls here") == ("no calls here", [])
    assert parser.extract("<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>", [])
    _, [unclosed] = parser.extract('<tool_call>{"name": "get_time", "arguments": {}}')  # stopped before the tag
    assert unclosed.name == "get_time"
    assert parser.content_end("Hello <tool") == len("Hello ")
    assert parser.content_end("Hello <b>") == len("Hello <b>")


def test_json_parser():
    parser = JsonToolParser()
    _, [call] = parser.extract('{"name": "get_time", "arguments": {}}')
    assert call.name == "get_time" and call.arguments == "{}"
    _, calls = parser.extract('[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "arguments": "{\\"y\\": 2}"}]')
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1}), ("b", {"y": 2})]
    assert parser.extract('{"city": "Oslo"}') == ('{"city": "Oslo"}', [])  # no name: plain JSON content
    assert parser.content_end("  {") == 0 and parser.content_end("Sure") == 4


# ---- streaming -------------------------------------------------------------------------------
def stream(extractor, pieces: list[str]) -> tuple[str, list[dict], bool]:
    tool_stream = ToolCallStream(extractor)
    content, deltas = "", []
    for i, piece in enumerate(pieces):
        text, calls = tool_stream.feed(piece, i == len(pieces) - 1)
        content += text
        deltas += calls
    return content, deltas, tool_stream.called


def test_hermes_stream_sends_content_then_calls():
    pieces = ["Sure", ". <to", "ol_call>", '{"name": "get_time", ', '"arguments": {}}', "</tool_call>"]
    tool_stream = ToolCallStream(HermesToolParser())
    assert tool_stream.feed(pieces[0], False) == ("Sure", [])
    assert tool_stream.feed(pieces[1], False) == (". ", [])  # "<to" may open a call: held back
    content, deltas, called = stream(HermesToolParser(), pieces)
    assert content == "Sure. " and called
    head, args = deltas
    assert head["index"] == 0 and head["type"] == "function" and head["id"].startswith("chatcmpl-tool-")
    assert head["function"] == {"name": "get_time", "arguments": ""}
    assert args == {"index": 0, "function": {"arguments": "{}"}}


def test_streams_fall_back_to_content():
    assert stream(HermesToolParser(), ["a <", "b"]) == ("a <b", [], False)
    assert stream(JsonToolParser(), ['{"x"', ": 1}"]) == ('{"x": 1}', [], False)
    assert stream(ForcedToolCalls(None), ['[{"name"', ': "get_t']) == ('[{"name": "get_t', [], False)
    content, deltas, called = stream(ForcedToolCalls("get_time"), ["{", "}"])
    assert content == "" and called and [d["index"] for d in deltas] == [0, 0]
