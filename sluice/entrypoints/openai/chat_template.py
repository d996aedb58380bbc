"""What the server needs to know about a chat template and a tokenizer before rendering:
the content format a template expects, and the model's fill-in-the-middle tokens."""

from __future__ import annotations

import functools

import jinja2
import jinja2.nodes

CONTENT_FORMATS = ("auto", "string", "openai")
# (prefix, suffix, middle) spellings of FIM tokens: StarCoder/SantaCoder, then Qwen2.5-Coder.
_FIM_SPELLINGS = (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
                  ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))


def resolve_content_format(option: str, template: str | None) -> str:
    """"string" or "openai": `auto` reads the template, as vLLM does: one that loops over a
    message's content expects OpenAI's list of parts, any other a string."""
    if option != "auto":
        return option
    return _detect_content_format(template) if template else "string"


@functools.lru_cache(maxsize=16)
def _detect_content_format(template: str) -> str:
    try:
        ast = jinja2.Environment().parse(template)
    except jinja2.TemplateError:
        return "string"
    for loop in ast.find_all(jinja2.nodes.For):
        if _reads_content(loop.iter):
            return "openai"
    return "string"


def _reads_content(node: jinja2.nodes.Node) -> bool:
    """`x.content`, `x['content']` (possibly behind a filter such as `| selectattr`)."""
    while isinstance(node, jinja2.nodes.Filter) and node.node is not None:
        node = node.node
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content"
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content"
    return False


def fim_tokens(tokenizer) -> tuple[str, str, str] | None:
    """The model's (prefix, suffix, middle) FIM tokens, or None when it has none."""
    vocab = tokenizer.get_vocab()
    return next((spelling for spelling in _FIM_SPELLINGS if all(t in vocab for t in spelling)), None)


def fim_prompt(tokenizer, prompt: str | list[int], suffix: str) -> str:
    """A completions prompt with a suffix, in the fill-in-the-middle form the model was trained on
    (prefix-suffix-middle): the model writes what goes between prompt and suffix."""
    tokens = fim_tokens(tokenizer)
    if tokens is None:
        raise ValueError("suffix needs a model with fill-in-the-middle tokens (<fim_prefix>, <fim_suffix>, "
                         "<fim_middle>)")
    if not isinstance(prompt, str):
        raise ValueError("suffix needs a text prompt, not token ids")
    prefix_token, suffix_token, middle_token = tokens
    return f"{prefix_token}{prompt}{suffix_token}{suffix}{middle_token}"
