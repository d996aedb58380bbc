"""Reasoning parsers (`--reasoning-parser`): split a reply's `<think>...</think>` part into
`reasoning_content`, the rest into `content`, whole or streamed, as vLLM's parsers do.

- deepseek_r1: the template may open `<think>` in the prompt, so everything before `</think>`
  is reasoning, with or without the opening tag; no `</think>` yet: all of it is reasoning.
- qwen3: reasoning only inside an output that opens with `<think>`; a reply without it (e.g.
  `enable_thinking: false`, whose template closes an empty think block in the prompt) is content.
"""

from __future__ import annotations

START, END = "<think>", "</think>"


class ReasoningParser:
    """Splits text-so-far; the split only ever grows (reasoning, then content), so a stream of
    deltas is the difference between successive splits."""

    requires_start: bool  # whether output without an opening <think> is all content

    def split(self, text: str, finished: bool) -> tuple[str, str]:
        """(reasoning, content) of the text so far. While not finished, a tail that may be the
        start of a tag is held back from both."""
        if not text.startswith(START):
            if not finished and START.startswith(text):
                return "", ""  # maybe the opening tag, still arriving
            if self.requires_start:
                return "", text
        else:
            text = text[len(START):]
        if END in text:
            reasoning, content = text.split(END, 1)
            return reasoning, content
        return (text if finished else text[: len(text) - _partial_tag(text, END)]), ""


class DeepSeekR1ReasoningParser(ReasoningParser):
    requires_start = False


class Qwen3ReasoningParser(ReasoningParser):
    requires_start = True


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "qwen3": Qwen3ReasoningParser,
}


class ReasoningStream:
    """One streamed choice: text deltas in, (reasoning delta, content delta) out."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent_reasoning = 0
        self.sent_content = 0

    def feed(self, delta: str, finished: bool) -> tuple[str, str]:
        self.text += delta
        reasoning, content = self.parser.split(self.text, finished)
        new = reasoning[self.sent_reasoning:], content[self.sent_content:]
        self.sent_reasoning, self.sent_content = len(reasoning), len(content)
        return new


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of text that is a proper start of tag."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
