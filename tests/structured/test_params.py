"""Structured-output specs without a model: shape checks, grammar checks naming the field, the
wire format, and the configuration flags."""

from __future__ import annotations

import argparse

import msgspec
import pytest

from sluice.config import EngineConfig
from sluice.entrypoints.cli import add_engine_args, engine_kwargs
from sluice.engine.messages import ADD, EngineCoreRequest, decode, encode
from sluice.sampling_params import SamplingParams, StructuredOutputsParams
from sluice.structured_output.backend import check_spec, choice_ebnf, unsupported_keyword

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("kwargs, message", [
    ({}, "structured_outputs must set exactly one of json, regex, choice, grammar, json_object; got none"),
    ({"regex": "a", "choice": ["b"]}, "got regex, choice"),
    ({"json": "{not json"}, "structured_outputs.json is not valid JSON"),
    ({"json": "[1, 2]"}, "structured_outputs.json must be a JSON schema object, got list"),
    ({"json": {"a": object()}}, "structured_outputs.json must be JSON-serializable"),
    ({"regex": ""}, "structured_outputs.regex must be a non-empty string"),
    ({"choice": []}, "structured_outputs.choice must be a non-empty list of strings"),
    ({"choice": ["a", 3]}, "structured_outputs.choice must hold only strings, got 3"),
    ({"grammar": "  "}, "structured_outputs.grammar must be a non-empty EBNF string"),
    ({"json_object": "yes"}, "structured_outputs.json_object must be a bool"),
])
def test_shape_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StructuredOutputsParams(**kwargs)


def test_spec_is_the_compilation_key():
    assert StructuredOutputsParams(json=SCHEMA).spec() == StructuredOutputsParams(json='{"type":"object",'
        '"properties":{"a":{"type":"integer"}},"required":["a"]}').spec()
    assert StructuredOutputsParams(choice=("x", "y")).spec() == ("choice", '["x","y"]')
    assert StructuredOutputsParams(json_object=True).spec() == ("json_object", "")
    assert StructuredOutputsParams(json_object=False, regex="a+").kind == "regex"


@pytest.mark.parametrize("kwargs, field, fragment", [
    ({"json": {"type": "foo"}}, "structured_outputs.json", 'invalid JSON schema: Unsupported type "foo"'),
    ({"json": {"type": "string", "pattern": "(["}}, "structured_outputs.json", "invalid JSON schema: Regex parsing"),
    ({"json": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}, "structured_outputs.json",
     "the keyword 'uniqueItems' is not supported"),
    ({"regex": "(ab"}, "structured_outputs.regex",
     "invalid regex: Regex parsing error at position 4: The parenthesis is not closed"),
    ({"grammar": "root ::= foo"}, "structured_outputs.grammar", 'Rule "foo" is not defined'),
    ({"grammar": "root ::= 'a'"}, "structured_outputs.grammar", "invalid EBNF grammar"),
])
def test_bad_grammars_name_the_field(kwargs, field, fragment):
    with pytest.raises(ValueError) as info:
        check_spec(StructuredOutputsParams(**kwargs))
    message = str(info.value)
    assert message.startswith(f"{field}: ") and fragment in message and ".cc:" not in message


def test_check_spec_names_a_caller_field_and_passes_good_specs():
    with pytest.raises(ValueError, match=r"^response_format\.json_schema\.schema: invalid JSON schema"):
        check_spec(StructuredOutputsParams(json={"type": 5}), "response_format.json_schema.schema")
    for kwargs in ({"json": SCHEMA}, {"regex": r"\d+"}, {"choice": ['say "hi"', "back\\slash", "é"]},
                   {"grammar": 'root ::= "a" | "b"'}, {"json_object": True}):
        check_spec(StructuredOutputsParams(**kwargs))


def test_unsupported_keywords_are_found_in_subschemas_not_in_property_names():
    assert unsupported_keyword({"properties": {"not": {"type": "string"}}}) is None
    assert unsupported_keyword({"properties": {"x": {"not": {"type": "null"}}}}) == "not"
    assert unsupported_keyword({"anyOf": [{"type": "string"}, {"items": {"contains": {}}}]}) == "contains"
    assert unsupported_keyword({"$defs": {"d": {"if": {}, "then": {}}}}) == "if"


def test_choice_ebnf_escapes_quotes():
    assert choice_ebnf(['a"b', "c"]) == 'root ::= "a\\"b" | "c"'


def test_sampling_params_carry_the_spec_over_the_wire():
    params = SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    request = EngineCoreRequest("r", [1, 2], params, eos_token_ids=(2,))
    [decoded] = decode(ADD, encode([request]))
    assert decoded.sampling_params.structured_outputs == params.structured_outputs
    assert params.clone().structured_outputs == params.structured_outputs
    with pytest.raises(ValueError, match="structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"regex": "a"})
    with pytest.raises(msgspec.ValidationError):  # the spec is checked again when it arrives
        msgspec.msgpack.Decoder(StructuredOutputsParams).decode(msgspec.msgpack.encode({"regex": "a", "grammar": "b"}))


def test_flags_reach_the_config():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--structured-outputs-compile-timeout", "2.5", "--structured-outputs-any-whitespace"])
    config = EngineConfig.from_kwargs(**engine_kwargs(args)).structured_outputs
    assert config.structured_outputs_compile_timeout == 2.5 and config.structured_outputs_any_whitespace
    default = EngineConfig.from_kwargs(**engine_kwargs(parser.parse_args([]))).structured_outputs
    assert default.structured_outputs_compile_timeout == 30.0 and not default.structured_outputs_any_whitespace
    with pytest.raises(ValueError, match="structured_outputs_compile_timeout must be a number of seconds > 0"):
        EngineConfig.from_kwargs(structured_outputs_compile_timeout=0)
