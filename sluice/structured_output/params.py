"""What a request's output must match: vLLM's `StructuredOutputsParams`, checked at the edge.

A plain dataclass so it travels to the core process inside SamplingParams (msgspec encodes it).
It imports neither torch nor xgrammar: the API process checks the shape here and the grammar
with `backend.check_spec`; the core compiles it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """Exactly one constraint: a JSON schema, a regex, a list of choices, an EBNF grammar, or
    any JSON object. Errors name the field (`structured_outputs.choice ...`)."""

    json: str | dict | None = None  # a JSON schema, as a dict or JSON text
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (GBNF), rule `root` first
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [kind for kind in KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            got = f"got {', '.join(given)}" if given else "got none"
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(KINDS)}; {got}")
        getattr(self, f"_check_{given[0]}")()

    @property
    def kind(self) -> str:
        return next(kind for kind in KINDS if getattr(self, kind) not in (None, False))

    def field_name(self) -> str:
        return f"structured_outputs.{self.kind}"

    def spec(self) -> tuple[str, str]:
        """(kind, text): what the grammar is built from, and the key its compilation is cached on."""
        kind = self.kind
        if kind == "json":
            return kind, self.json if isinstance(self.json, str) else _dumps(self.json)
        if kind == "choice":
            return kind, _dumps(self.choice)
        if kind == "json_object":
            return kind, ""
        return kind, getattr(self, kind)

    # ---- shape checks, one per kind ----
    def _check_json(self) -> None:
        schema = self.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(schema).__name__}")
        try:
            _dumps(schema)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"structured_outputs.json must be JSON-serializable: {exc}") from None

    def _check_regex(self) -> None:
        if not isinstance(self.regex, str) or not self.regex:
            raise ValueError(f"structured_outputs.regex must be a non-empty string, got {self.regex!r}")

    def _check_choice(self) -> None:
        choice = self.choice
        if not isinstance(choice, (list, tuple)) or not choice:
            raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {choice!r}")
        for item in choice:
            if not isinstance(item, str):
                raise ValueError(f"structured_outputs.choice must hold only strings, got {item!r}")
        self.choice = list(choice)

    def _check_grammar(self) -> None:
        if not isinstance(self.grammar, str) or not self.grammar.strip():
            raise ValueError(f"structured_outputs.grammar must be a non-empty EBNF string, got {self.grammar!r}")

    def _check_json_object(self) -> None:
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
