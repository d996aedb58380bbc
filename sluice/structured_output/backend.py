"""xgrammar behind a narrow interface.

`check_spec` builds a spec's grammar without a tokenizer (cheap, so the API process refuses a bad
spec before the engine sees it); `GrammarCompiler` compiles specs against the model's vocabulary
on worker threads, one cached future per distinct spec, so the engine loop never waits for
xgrammar (which releases the GIL while it compiles).
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import xgrammar as xgr

from sluice.structured_output.params import StructuredOutputsParams

COMPILE_THREADS = 2  # grammars compiling at once, and xgrammar's threads within one
CACHE_SIZE = 256  # distinct specs whose compiled grammars (or errors) are kept

# Keywords xgrammar accepts but does not enforce: output would "succeed" yet break the schema.
UNSUPPORTED_SCHEMA_KEYWORDS = (
    "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
    "propertyNames", "contains", "minContains", "maxContains", "uniqueItems",
)
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "unevaluatedProperties", "unevaluatedItems")
_KIND_NAMES = {"json": "JSON schema", "regex": "regex", "grammar": "EBNF grammar", "choice": "choice list",
               "json_object": "JSON object grammar"}

# A compiled grammar and when its compilation finished (time.monotonic()).
Compiled = tuple[xgr.CompiledGrammar, float]


# ---- checking a spec ---------------------------------------------------------------------------
def check_spec(params: StructuredOutputsParams, field: str | None = None) -> None:
    """Raises ValueError naming `field` (default: `structured_outputs.<kind>`) when the spec
    does not make a grammar; the message says what is wrong, e.g. an unsupported keyword."""
    error = _spec_error(*params.spec())
    if error is not None:
        raise ValueError(f"{field or params.field_name()}: {error}")


@functools.lru_cache(maxsize=CACHE_SIZE)
def _spec_error(kind: str, text: str) -> str | None:
    try:
        build_grammar(kind, text, any_whitespace=False)
    except Exception as exc:  # xgrammar reports bad specs as RuntimeError, ValueError, ...
        return f"invalid {_KIND_NAMES[kind]}: {describe_error(exc)}"
    return None


def describe_error(exc: BaseException) -> str:
    """xgrammar's message without its C++ log prefix ("[12:00:00] /path/file.cc:94: ")."""
    text = str(exc).strip()
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)
    return re.sub(r"^Check failed: \(.*?\) is false: ", "", text)


def build_grammar(kind: str, text: str, any_whitespace: bool) -> xgr.Grammar:
    """The grammar of a spec as made by `StructuredOutputsParams.spec()`."""
    if kind == "json":
        keyword = unsupported_keyword(json.loads(text))
        if keyword is not None:
            raise ValueError(f"the keyword '{keyword}' is not supported (it cannot be enforced while decoding)")
        return xgr.Grammar.from_json_schema(text, any_whitespace=any_whitespace)
    if kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}', strict_mode=False, any_whitespace=any_whitespace)
    if kind == "regex":
        return xgr.Grammar.from_regex(text)
    if kind == "choice":
        return xgr.Grammar.from_ebnf(choice_ebnf(json.loads(text)))
    if kind == "grammar":
        return xgr.Grammar.from_ebnf(text)
    raise ValueError(f"unknown structured output kind {kind!r}")


def choice_ebnf(choices: list[str]) -> str:
    """One alternative per choice; JSON string escapes are valid EBNF string escapes."""
    return "root ::= " + " | ".join(json.dumps(choice) for choice in choices)


def unsupported_keyword(schema: object) -> str | None:
    """The first keyword in a JSON schema (or its subschemas) that xgrammar would ignore."""
    if isinstance(schema, list):
        return next((k for k in map(unsupported_keyword, schema) if k is not None), None)
    if not isinstance(schema, dict):
        return None
    found = next((k for k in UNSUPPORTED_SCHEMA_KEYWORDS if k in schema), None)
    if found is not None:
        return found
    children = [schema.get(k) for k in _SUBSCHEMAS + _SUBSCHEMA_LISTS]
    children += [sub for k in _SUBSCHEMA_MAPS if isinstance(schema.get(k), dict) for sub in schema[k].values()]
    return unsupported_keyword([c for c in children if c is not None])


# ---- compiling ---------------------------------------------------------------------------------
class GrammarCompiler:
    """Compiles specs on worker threads; concurrent requests for one spec share one future.

    The tokenizer is loaded (and xgrammar's vocabulary tables built) on first use, inside the
    first compilation, so an engine that never sees a structured request never pays for it.
    """

    def __init__(self, load_tokenizer: Callable[[], object], vocab_size: int, any_whitespace: bool) -> None:
        self.load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size  # the logits' width, which may exceed the tokenizer's
        self.any_whitespace = any_whitespace
        self.executor = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="sluice-grammar")
        self.futures: OrderedDict[tuple[str, str], Future[Compiled]] = OrderedDict()  # engine thread only
        self._compiler: xgr.GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()

    def warm_up(self) -> None:
        """Load the tokenizer and build xgrammar's vocabulary tables now, in the background, so
        the first structured request neither waits for them nor spends its timeout on them."""
        self.executor.submit(self._xgrammar_compiler)

    def submit(self, spec: tuple[str, str]) -> Future[Compiled]:
        future = self.futures.get(spec)
        if future is not None:
            self.futures.move_to_end(spec)
            return future
        future = self.executor.submit(self._compile, *spec)
        self.futures[spec] = future
        if len(self.futures) > CACHE_SIZE:
            self.futures.popitem(last=False)
        return future

    def _compile(self, kind: str, text: str) -> Compiled:
        grammar = build_grammar(kind, text, self.any_whitespace)
        compiled = self._xgrammar_compiler().compile_grammar(grammar)
        return compiled, time.monotonic()

    def _xgrammar_compiler(self) -> xgr.GrammarCompiler:
        with self._compiler_lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.load_tokenizer(), vocab_size=self.vocab_size)
                # Our own cache keeps futures; xgrammar's would hold every grammar a second time.
                self._compiler = xgr.GrammarCompiler(info, max_threads=COMPILE_THREADS, cache_enabled=False)
            return self._compiler


# ---- bitmasks ----------------------------------------------------------------------------------
def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """[num_rows, ceil(vocab_size / 32)] int32, every token allowed."""
    return xgr.allocate_token_bitmask(num_rows, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set the logits of tokens a row's bitmask forbids to -inf, in place; other rows untouched."""
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
