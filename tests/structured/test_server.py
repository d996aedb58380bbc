"""Structured outputs and forced tool calls over the OpenAI API, on a real server with no tool-call
parser: at temperature 1.0 and several seeds every answer validates; bad specs are 400s naming
the field."""

from __future__ import annotations

import json
import os
import re

import jsonschema
import openai
import pytest

from tests.server.conftest import MODEL_NAME
from tests.server.utils import RemoteServer

SEEDS = range(4)
TEMPLATE = os.path.join(os.path.dirname(__file__), "tool_template.jinja")
ASK = [{"role": "user", "content": "What is the weather like in Paris, and what time is it there?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "required": ["city", "unit"], "properties": {
        "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a timezone",
    "parameters": {"type": "object", "required": ["timezone"], "properties": {
        "timezone": {"type": "string", "maxLength": 16}}}}}
TOOLS = [WEATHER, CLOCK]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PERSON = {"type": "object", "required": ["name", "age"], "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}}


@pytest.fixture(scope="module")
def server():
    srv = RemoteServer("--chat-template", TEMPLATE)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def chat(client, seed: int, **kwargs):
    kwargs.setdefault("messages", ASK)
    kwargs.setdefault("temperature", 1.0)
    return client.chat.completions.create(model=MODEL_NAME, seed=seed, **kwargs)


def assert_valid_call(call, name: str | None = None) -> None:
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert name is None or call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


# ---- constrained outputs ----------------------------------------------------------------------
def test_response_format_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for seed in SEEDS:
        choice = chat(client, seed, response_format=fmt, max_tokens=50).choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_response_format_json_object(client):
    reply = chat(client, 0, temperature=0.0, response_format={"type": "json_object"}, max_tokens=60,
                 messages=[{"role": "user", "content": "Describe a person as JSON with name and age."}])
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_structured_outputs_on_completions(client):
    pattern = r"\d{3}-\d{4}"
    for seed in SEEDS:
        reply = client.completions.create(model=MODEL_NAME, prompt="Call me at", temperature=1.0, seed=seed,
                                          max_tokens=12, extra_body={"structured_outputs": {"regex": pattern}})
        assert re.fullmatch(pattern, reply.choices[0].text) and reply.choices[0].finish_reason == "stop"
    grammar = 'root ::= ("red" | "green" | "blue") ", " ("cat" | "dog")'
    reply = client.completions.create(model=MODEL_NAME, prompt="Pick:", temperature=1.0, seed=1, max_tokens=12,
                                      extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"(red|green|blue), (cat|dog)", reply.choices[0].text)


def test_structured_outputs_choice_on_chat_streamed(client):
    choices = ["sunny", "rainy", "cloudy with a chance of meatballs"]
    for seed in SEEDS:
        stream = chat(client, seed, max_tokens=40, stream=True, extra_body={"structured_outputs": {"choice": choices}})
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text in choices


# ---- forced tool calls ------------------------------------------------------------------------
def test_required_tool_calls_always_parse(client):
    for seed in SEEDS:
        # One call each: the grammar lets parallel calls go on, and this model at temperature 1.0
        # often makes call after call until max_tokens cuts the list.
        choice = chat(client, seed, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                      max_tokens=60).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert_valid_call(call)


def test_required_parallel_tool_calls(client):
    choice = chat(client, 0, tools=TOOLS, tool_choice="required", max_tokens=150).choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) > 1
    for call in choice.message.tool_calls:
        assert_valid_call(call)


def test_named_tool_calls_always_parse(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in SEEDS:
        choice = chat(client, seed, tools=TOOLS, tool_choice=named, max_tokens=60).choices[0]
        assert choice.finish_reason == "stop"  # as OpenAI answers a forced function
        [call] = choice.message.tool_calls
        assert_valid_call(call, "get_time")


def test_streamed_required_call_arrives_as_deltas(client):
    stream = chat(client, 3, tools=TOOLS, tool_choice="required", max_tokens=100, stream=True,
                  parallel_tool_calls=False)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        assert not delta.content
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
            call["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    call = calls[0]
    assert call["id"].startswith("chatcmpl-tool-")
    jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])


def test_tool_results_go_back_through_the_template(client):
    call = {"id": "chatcmpl-tool-1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "18 degrees, light rain", "tool_call_id": "chatcmpl-tool-1"}]
    with_result = chat(client, 0, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=4)
    without = chat(client, 0, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert with_result.choices[0].message.tool_calls is None
    assert with_result.usage.prompt_tokens > without.usage.prompt_tokens + 20  # the call and its result


# ---- refusals ---------------------------------------------------------------------------------
BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "banana"}}}},
     "response_format.json_schema.schema", 'Unsupported type "banana"'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "items": {"type": "string"}, "uniqueItems": True}}}},
     "response_format.json_schema.schema", "'uniqueItems' is not supported"),
    ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "structured_outputs.regex", "invalid regex"),
    ({"extra_body": {"structured_outputs": {"choice": []}}}, "structured_outputs.choice", "non-empty list"),
    ({"extra_body": {"structured_outputs": {"json": "{oops"}}}, "structured_outputs.json", "not valid JSON"),
    ({"extra_body": {"structured_outputs": {"grammar": "root ::= nothing"}}}, "structured_outputs.grammar",
     'Rule "nothing" is not defined'),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock_price"}}}, "tool_choice",
     "'get_stock_price', which is not among tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer", "not": {"const": 3}}}}}}], "tool_choice": "required"},
     "tools.0.function.parameters", "'not' is not supported"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "--tool-call-parser"),
    ({"tools": TOOLS}, "tool_choice", "--tool-call-parser"),  # tools alone mean "auto"
    ({"response_format": {"type": "json_object"}, "extra_body": {"structured_outputs": {"regex": "a"}}},
     "response_format", "both constrain the output"),
]


@pytest.mark.parametrize("kwargs, param, fragment", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_specs_are_400s_naming_the_field(client, kwargs, param, fragment):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, 0, max_tokens=5, **kwargs)
    error = info.value.body
    assert error["param"] == param and fragment in error["message"], error


def test_bad_spec_on_completions(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=5,
                                  extra_body={"structured_outputs": {"regex": "[z-a]"}})
    assert info.value.body["param"] == "structured_outputs.regex"
