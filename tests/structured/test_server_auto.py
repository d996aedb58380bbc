"""tool_choice "auto" on a server with --tool-call-parser hermes. The default model rarely writes
tool calls by itself, so a regex makes it answer in the Hermes format; the parser then has to find
the call, in whole responses and in streamed ones."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.server.conftest import MODEL_NAME
from tests.server.utils import RemoteServer
from tests.structured.test_server import ASK, PARAMETERS, TEMPLATE, TOOLS

HERMES_ANSWER = (r'Let me check\. <tool_call>\{"name": "get_weather", "arguments": '
                 r'\{"city": "(Paris|Lyon|Nice)", "unit": "(celsius|fahrenheit)"\}\}</tool_call>')


@pytest.fixture(scope="module")
def client():
    server = RemoteServer("--chat-template", TEMPLATE, "--tool-call-parser", "hermes")
    yield server.client()
    server.stop()


def ask(client, seed: int, **kwargs):
    return client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, temperature=1.0, seed=seed,
                                          max_tokens=60, **kwargs)


def test_auto_finds_the_hermes_call(client):
    for seed in range(2):
        choice = ask(client, seed, extra_body={"structured_outputs": {"regex": HERMES_ANSWER}}).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check. "
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS["get_weather"])


def test_auto_streams_content_then_the_call(client):
    stream = ask(client, 1, stream=True, extra_body={"structured_outputs": {"regex": HERMES_ANSWER}})
    content, deltas, finish = "", [], None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        assert "<" not in (delta.content or "")  # the marker never leaks into content
        deltas += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Let me check. " and finish == "tool_calls"
    head, arguments = deltas
    assert head.index == arguments.index == 0 and head.function.name == "get_weather" and head.id
    jsonschema.validate(json.loads(head.function.arguments + arguments.function.arguments), PARAMETERS["get_weather"])


def test_auto_without_a_call_is_plain_content(client):
    choice = ask(client, 0, tool_choice="auto", extra_body={"structured_outputs": {"choice": ["It is sunny."]}}) \
        .choices[0]
    assert choice.message.content == "It is sunny." and choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
