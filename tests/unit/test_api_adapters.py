"""The Responses and Messages requests as chat requests, without a server: what each shape of
input becomes, and what each chat finish becomes."""

from __future__ import annotations

import pytest

from sluice.entrypoints.openai.anthropic import MessagesRequest, stop_fields
from sluice.entrypoints.openai.protocol import APIError
from sluice.entrypoints.openai.responses import ResponsesRequest


def test_responses_items_become_chat_turns():
    request = ResponsesRequest.model_validate({"instructions": "sys", "max_output_tokens": 7, "input": [
        {"role": "developer", "content": [{"type": "input_text", "text": "be "}, {"type": "input_text", "text": "terse"}]},
        {"role": "user", "content": "q"},
        {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "b", "name": "g", "arguments": "{\"x\": 1}"},
        {"type": "function_call_output", "call_id": "a", "output": "1"},
    ], "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "f"}, "text": {"format": {"type": "json_object"}}})
    chat = request.to_chat()
    assert chat["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "developer", "content": "be terse"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [  # consecutive calls: one assistant turn
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "1"},
    ]
    assert chat["max_completion_tokens"] == 7 and chat["response_format"] == {"type": "json_object"}
    assert chat["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}


def test_messages_turns_become_chat_turns():
    request = MessagesRequest.model_validate({"model": "m", "max_tokens": 5, "stop_sequences": ["END"],
                                              "system": [{"type": "text", "text": "S"}], "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "text", "text": "let me"},
                                          {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "R"}]},
                                     {"type": "text", "text": "thanks"}]},
    ], "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "tools": [{"name": "f", "input_schema": {"type": "object"}}]})
    chat = request.to_chat()
    assert chat["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "let me", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "R"},  # the result before the user's words
        {"role": "user", "content": "thanks"},
    ]
    assert (chat["stop"], chat["max_completion_tokens"], chat["tool_choice"], chat["parallel_tool_calls"]) == (
        ["END"], 5, "required", False)


def test_messages_refusals_name_the_block():
    for block, param in [({"type": "document", "source": {}}, "messages.0.content.0.type"),
                         ({"type": "image", "source": {}}, "messages.0.content.0.source.type")]:
        request = MessagesRequest.model_validate({"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": [block]}]})
        with pytest.raises(APIError) as info:
            request.to_chat()
        assert info.value.param == param
    thinking = MessagesRequest.model_validate({"model": "m", "max_tokens": 5, "thinking": {"type": "enabled"},
                                               "messages": [{"role": "user", "content": "q"}]})
    with pytest.raises(APIError) as info:
        thinking.to_chat()
    assert info.value.param == "thinking"


@pytest.mark.parametrize("finish, stop_reason, called, expected", [
    ("stop", None, False, ("end_turn", None)),
    ("stop", "END", False, ("stop_sequence", "END")),
    ("stop", 2, False, ("end_turn", None)),  # a stop token id is the model's own end
    ("length", None, False, ("max_tokens", None)),
    ("stop", None, True, ("tool_use", None)),  # OpenAI's named tool_choice ends with "stop"
    ("tool_calls", None, True, ("tool_use", None)),
])
def test_anthropic_stop_reasons(finish, stop_reason, called, expected):
    fields = stop_fields(finish, stop_reason, ["END"], called)
    assert (fields["stop_reason"], fields["stop_sequence"]) == expected


def test_image_parts_keep_the_callers_field_names():
    """Image parts become chat image_url parts; image_origins maps the chat path's field name
    back to the caller's (instructions, system and tool results shift the message index)."""
    from sluice.entrypoints.openai.chat_adapter import image_origins

    url = "data:image/png;base64,AAAA"
    body = ResponsesRequest.model_validate({"instructions": "be brief", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "what"}, {"type": "input_image", "image_url": url}]}],
    }).to_chat()
    assert image_origins(body["messages"]) == {"messages.1.content.1.image_url": "input.0.content.1.image_url"}
    assert body["messages"][1]["content"] == [{"type": "text", "text": "what"},
                                              {"type": "image_url", "image_url": {"url": url}}]
    body = MessagesRequest.model_validate({"model": "m", "max_tokens": 5, "system": "s", "messages": [
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": "r"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}],
    }).to_chat()
    assert image_origins(body["messages"]) == {"messages.2.content.0.image_url": "messages.0.content.1.source"}
    assert body["messages"][2]["content"] == [{"type": "image_url", "image_url": {"url": url}}]
