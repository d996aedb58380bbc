"""Structured outputs through the offline LLM on the default model: at temperature 1.0 and several
seeds every output matches its spec; constraints never disturb unconstrained requests; grammar
state survives preemption; compilation stays off the engine loop's critical path."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from sluice import LLM, SamplingParams, StructuredOutputsParams
from sluice.core.request import Request, RequestStatus

SEEDS = range(4)
PERSON = {  # compact JSON finishes well inside 60 tokens; free whitespace often does not
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "vegetarian": {"type": "boolean"},
    },
    "required": ["name", "age", "vegetarian"],
}
ASK_PERSON = [{"role": "user", "content": "Describe a person as JSON with name, age and whether they are vegetarian."}]
GREETING = 'root ::= greeting " " name "!"\ngreeting ::= "Hello" | "Hi"\nname ::= [A-Z] [a-z]{1,8}'


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=512, kv_cache_memory_bytes=64 << 20)  # bf16: validity does not need float32


@pytest.fixture(scope="module")
def llm32() -> LLM:
    """float32 (greedy outputs independent of the batch) with a cache small enough to preempt:
    six 16-token blocks."""
    return LLM(max_model_len=256, dtype="float32", enable_prefix_caching=False, num_gpu_blocks_override=6,
               block_size=16)


def seeded(max_tokens: int, **spec) -> list[SamplingParams]:
    return [SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens,
                           structured_outputs=StructuredOutputsParams(**spec)) for seed in SEEDS]


def completions(outs) -> list:
    return [c for out in outs for c in out.outputs]


def test_json_schema_outputs_are_compact_valid_and_finish(llm):
    outs = completions(llm.chat([ASK_PERSON] * len(SEEDS), seeded(60, json=PERSON), use_tqdm=False))
    for c in outs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PERSON)
        between_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', c.text)
        assert "\n" not in between_strings and "  " not in between_strings  # at most single spaces


def test_json_object_outputs_are_objects(llm):
    """Any object: at temperature 1.0 this model may write one longer than max_tokens."""
    greedy = SamplingParams(temperature=0.0, max_tokens=60,
                            structured_outputs=StructuredOutputsParams(json_object=True))
    [first] = completions(llm.chat(ASK_PERSON, greedy, use_tqdm=False))
    assert first.finish_reason == "stop" and isinstance(json.loads(first.text), dict)
    for c in completions(llm.chat([ASK_PERSON] * len(SEEDS), seeded(40, json_object=True), use_tqdm=False)):
        assert c.text.startswith('{"') and "\n" not in c.text, c.text
        assert c.finish_reason == "length" or isinstance(json.loads(c.text), dict)


def test_regex_outputs_match(llm):
    pattern = r"[A-Z][a-z]{2,8} is \d{1,2} years old\."
    outs = completions(llm.generate(["Tell me about someone:"] * len(SEEDS), seeded(30, regex=pattern), use_tqdm=False))
    for c in outs:
        assert re.fullmatch(pattern, c.text), c.text
        assert c.finish_reason == "stop"


def test_choice_outputs_are_choices(llm):
    choices = ["yes", "no", "it depends"]
    params = seeded(10, choice=choices)
    params[0].n = 3  # each of n children follows its own matcher
    outs = completions(llm.generate(["Is the sky green?"] * len(SEEDS), params, use_tqdm=False))
    assert len(outs) == len(SEEDS) + 2
    for c in outs:
        assert c.text in choices and c.finish_reason == "stop"


def test_ebnf_grammar_outputs_parse(llm):
    outs = completions(llm.generate(["Greet someone:"] * len(SEEDS), seeded(20, grammar=GREETING), use_tqdm=False))
    for c in outs:
        assert re.fullmatch(r"(Hello|Hi) [A-Z][a-z]{1,8}!", c.text), c.text


@pytest.mark.parametrize("spec, message", [
    ({"json": {"type": "foo"}}, 'structured_outputs.json: invalid JSON schema: Unsupported type "foo"'),
    ({"regex": "[a-"}, "structured_outputs.regex: invalid regex"),
    ({"choice": []}, "structured_outputs.choice must be a non-empty list of strings"),
    ({"grammar": "root ::= undefined_rule"}, "structured_outputs.grammar: invalid EBNF grammar"),
])
def test_bad_specs_raise_naming_the_field(llm, spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate(["Hi"], SamplingParams(structured_outputs=StructuredOutputsParams(**spec)), use_tqdm=False)
    assert not llm.engine_core.has_unfinished_requests()


def test_compile_timeout_fails_the_request_clearly(llm, monkeypatch):
    monkeypatch.setattr(llm.engine_core.scheduler.structured_output, "timeout", 1e-9)
    spec = {"json": {"type": "object", "properties": {"timeout_test": {"type": "string"}}}}  # not compiled before
    out = llm.generate(["Hi"], SamplingParams(structured_outputs=StructuredOutputsParams(**spec)), use_tqdm=False)
    completion = out[0].outputs[0]
    assert completion.finish_reason == "error"
    assert completion.error == ("structured_outputs.json: the grammar did not compile within 1e-09 s "
                                "(--structured-outputs-compile-timeout)")
    assert not llm.engine_core.has_unfinished_requests()


def test_other_requests_keep_decoding_while_a_grammar_compiles(llm):
    """A 60-property pattern schema takes seconds to compile; the engine decodes meanwhile."""
    core = llm.engine_core
    slow_schema = {"type": "object", "required": [f"p{i}" for i in range(60)],
                   "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{3,30}"} for i in range(60)}}
    slow = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(json=slow_schema))
    free = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    tokenize = llm.input_processor.tokenize_prompt
    core.add_request(llm.input_processor.make_request("slow", tokenize("Hi")[1], slow))
    core.add_request(llm.input_processor.make_request("free", tokenize("Hello")[1], free))
    slow_request: Request = core.scheduler.requests["slow"]
    decoded_while_compiling, finished = 0, {}
    while core.has_unfinished_requests():
        compiling = slow_request.status is RequestStatus.WAITING_FOR_GRAMMAR
        for output in core.step():
            if output.request_id == "free" and compiling:
                decoded_while_compiling += len(output.new_token_ids)
            if output.finish_reason is not None:
                finished[output.request_id] = output.finish_reason
    assert decoded_while_compiling > 0
    assert finished == {"free": "length", "slow": "length"}


def test_free_requests_in_a_mixed_batch_keep_their_greedy_tokens(llm32):
    free_prompts = ["The capital of France is", "List three colors:", "Once upon a time"]
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm32.generate(free_prompts, greedy, use_tqdm=False)]
    constrained = seeded(10, regex=r"[a-z ]{5,40}")[:2]
    mixed = llm32.generate(["Write words:", *free_prompts, "More words:"],
                           [constrained[0], greedy, greedy, greedy, constrained[1]], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[1:4]] == alone
    for o in (mixed[0], mixed[4]):
        assert re.fullmatch(r"[a-z ]{5,40}", o.outputs[0].text)


def test_grammar_state_survives_preemption(llm32):
    """Three constrained greedy requests outgrow 5 KV blocks: some are preempted and recomputed,
    yet each produces what it produces alone (its matcher is never advanced twice)."""
    system = "You are a helpful assistant who answers with lists of numbers, separated by commas. "
    prompts = [system + q for q in ("Primes:", "Squares:", "Even numbers:")]
    params = SamplingParams(temperature=0.0, max_tokens=20,
                            structured_outputs=StructuredOutputsParams(regex=r"(\d, ){5}\d"))
    alone = [llm32.generate([p], params, use_tqdm=False)[0].outputs[0] for p in prompts]
    before = llm32.get_metrics()["vllm:num_preemptions"]
    together = [o.outputs[0] for o in llm32.generate(prompts, params, use_tqdm=False)]
    assert llm32.get_metrics()["vllm:num_preemptions"] > before
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    for c in together:
        assert re.fullmatch(r"(\d, ){5}\d", c.text) and c.finish_reason == "stop"
