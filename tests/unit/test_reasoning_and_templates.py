"""Reasoning parsers (whole and streamed) and what the server reads from a chat template."""

from __future__ import annotations

import pytest

from sluice.entrypoints.openai.chat_template import fim_prompt, fim_tokens, resolve_content_format
from sluice.entrypoints.openai.reasoning import REASONING_PARSERS, ReasoningStream
from tests.utils import smollm2_tokenizer

CASES = [  # (parser, output, reasoning, content)
    ("deepseek_r1", "<think>Let me see.</think>Paris.", "Let me see.", "Paris."),
    ("deepseek_r1", "Let me see.</think>\n\nParis.", "Let me see.", "\n\nParis."),  # <think> was in the prompt
    ("deepseek_r1", "Still thinking", "Still thinking", ""),
    ("qwen3", "<think>Hmm</think>Yes", "Hmm", "Yes"),
    ("qwen3", "Yes, directly.", "", "Yes, directly."),  # enable_thinking=false: no think block
    ("qwen3", "<think>cut off by max_tok", "cut off by max_tok", ""),
]


@pytest.mark.parametrize("name, output, reasoning, content", CASES)
def test_whole_output_is_split(name, output, reasoning, content):
    assert REASONING_PARSERS[name]().split(output, finished=True) == (reasoning, content)


@pytest.mark.parametrize("name, output, reasoning, content", CASES)
@pytest.mark.parametrize("step", [1, 2, 5])
def test_streamed_deltas_add_up_to_the_whole_split(name, output, reasoning, content, step):
    """Split tags (`</thi` + `nk>`) never leak into either part."""
    stream = ReasoningStream(REASONING_PARSERS[name]())
    got_reasoning = got_content = ""
    pieces = [output[i:i + step] for i in range(0, len(output), step)]
    for i, piece in enumerate(pieces):
        r, c = stream.feed(piece, finished=i == len(pieces) - 1)
        assert "<" not in r + c or "<" in reasoning + content
        got_reasoning, got_content = got_reasoning + r, got_content + c
    assert (got_reasoning, got_content) == (reasoning, content)


def test_content_format_is_read_from_the_template():
    smol = smollm2_tokenizer().chat_template
    assert resolve_content_format("auto", smol) == "string"
    parts = "{% for m in messages %}{% for part in m['content'] %}{{ part.text }}{% endfor %}{% endfor %}"
    assert resolve_content_format("auto", parts) == "openai"
    filtered = "{% for m in messages %}{% for p in m.content | selectattr('type', 'equalto', 'text') %}{% endfor %}{% endfor %}"
    assert resolve_content_format("auto", filtered) == "openai"
    assert resolve_content_format("string", parts) == "string" and resolve_content_format("openai", smol) == "openai"


def test_fim_prompt_only_where_the_model_has_fim_tokens():
    tokenizer = smollm2_tokenizer()
    assert fim_tokens(tokenizer) is None
    with pytest.raises(ValueError, match="fill-in-the-middle tokens"):
        fim_prompt(tokenizer, "def f(", "):")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]})
    text = fim_prompt(tokenizer, "def f(", "):\n    return x")
    assert text == "<fim_prefix>def f(<fim_suffix>):\n    return x<fim_middle>"
    ids = tokenizer.encode(text, add_special_tokens=False)  # each FIM marker is one token
    assert ids[0] == tokenizer.convert_tokens_to_ids("<fim_prefix>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<fim_middle>")
    with pytest.raises(ValueError, match="text prompt"):
        fim_prompt(tokenizer, [1, 2], "x")
