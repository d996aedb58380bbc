"""OpenAI request validation and conversion to SamplingParams (pure functions, no engine)."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from sluice.entrypoints.openai import protocol
from sluice.entrypoints.openai.protocol import (
    APIError,
    OpenAIModel,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
    model_list,
    response_envelope,
    usage_info,
    validation_error_to_api_error,
)

USER = [{"role": "user", "content": "Hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **fields})


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "Hello", **fields})


@pytest.fixture
def strict():
    """The server's --strict-request-fields: unknown fields are a 400."""
    OpenAIModel.strict_fields = True
    yield
    OpenAIModel.strict_fields = False


def invalid(model, body: dict) -> APIError:
    """The 400 a bad body turns into."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    error = validation_error_to_api_error(info.value)
    assert error.status_code == 400 and error.type == "invalid_request_error"
    return error


def refused(request, default_max_tokens: int = 100, max_n: int = 8) -> APIError:
    """The 400 a valid-looking request gets when converted to SamplingParams."""
    with pytest.raises(APIError) as info:
        request.to_sampling_params(default_max_tokens, max_n)
    assert info.value.status_code == 400
    return info.value


# ---- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("status, kind", [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (429, "rate_limit_error"), (500, "server_error"), (503, "server_error"),
])
def test_api_error_types_follow_openai(status, kind):
    assert APIError("x", status).type == kind


def test_api_error_body_and_fields():
    error = APIError("no such model", 404, param="model", code="model_not_found", headers={"X": "1"})
    assert error.body() == {"error": {"message": "no such model", "type": "not_found_error",
                                      "param": "model", "code": "model_not_found"}}
    assert str(error) == "no such model" and error.headers == {"X": "1"}
    assert APIError("bad", type="BadRequestError").type == "BadRequestError"
    assert error_body("m", "t") == {"error": {"message": "m", "type": "t", "param": None, "code": None}}


def test_fastapi_errors_drop_the_body_prefix():
    errors = [{"type": "missing", "loc": ("body", "messages"), "msg": "Field required", "input": {}}]
    error = validation_error_to_api_error(errors)
    assert error.param == "messages" and error.message == "messages: field required"


def test_invalid_json_body():
    errors = [{"type": "json_invalid", "loc": ("body", 7), "msg": "JSON decode error",
               "ctx": {"error": "Expecting value"}, "input": {}}]
    error = validation_error_to_api_error(errors)
    assert error.param is None and error.message == "request body: invalid JSON (Expecting value)"


def test_body_that_is_not_an_object():
    error = invalid(ChatCompletionRequest, [1, 2])
    assert error.param is None and error.message.startswith("request body: ")


def test_several_errors_are_all_named(strict):
    error = invalid(ChatCompletionRequest, {"messages": USER, "n": "many", "temprature": 0.5})
    assert error.param == "n"
    assert "n: Input should be a valid integer" in error.message and "(got 'many')" in error.message
    assert "temprature: unknown field" in error.message


def test_through_fastapi():
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.testclient import TestClient

    app = FastAPI()

    @app.exception_handler(RequestValidationError)
    async def handler(request, exc):
        error = validation_error_to_api_error(exc)
        return JSONResponse(error.body(), status_code=error.status_code)

    @app.post("/v1/chat/completions")
    async def route(body: ChatCompletionRequest) -> dict:
        return {"ok": True}

    client = TestClient(app)
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages.0.role"
    assert response.json()["error"]["type"] == "invalid_request_error"
    response = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "invalid JSON" in response.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json={"messages": USER}).json() == {"ok": True}


# ---- chat requests ---------------------------------------------------------------------------
def test_chat_minimal_and_defaults():
    request = chat()
    assert request.model is None and request.stream is False and request.add_generation_prompt is True
    assert request.template_messages() == [{"role": "user", "content": "Hi"}]
    assert not request.include_usage() and not request.continuous_usage()


def test_text_parts_are_joined():
    request = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert request.template_messages()[0]["content"] == "a\nb"


@pytest.mark.parametrize("message, param, fragment", [
    ({"role": "robot", "content": "x"}, "messages.0.role", "'system', 'user', 'assistant', 'tool' or 'developer'"),
    ({"content": "x"}, "messages.0.role", "field required"),
    ({"role": "user"}, "messages.0.content", "is required for role 'user'"),
    ({"role": "user", "content": None}, "messages.0.content", "is required for role 'user'"),
    ({"role": "user", "content": 5}, "messages.0.content", "must be a string or a list of content parts, got int"),
    ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
     "messages.0.content", "part 0 has type 'input_audio'; the parts taken are 'text' and 'image_url'"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"detail": "low"}}]},
     "messages.0.content", "part 0 needs an 'image_url' object with a string 'url'"),
    ({"role": "user", "content": [3]}, "messages.0.content", "part 0 must be an object, got int"),
    ({"role": "user", "content": [{"type": "text"}]}, "messages.0.content", "part 0 needs a string 'text'"),
])
def test_bad_messages_name_their_field(message, param, fragment):
    error = invalid(ChatCompletionRequest, {"messages": [message]})
    assert error.param == param and fragment in error.message and error.message.startswith(param)


def test_message_error_path_counts_messages():
    error = invalid(ChatCompletionRequest, {"messages": USER + [{"role": "assistant", "content": "ok"}, {"role": "x"}]})
    assert error.param == "messages.2.role"


def test_empty_or_missing_messages():
    assert invalid(ChatCompletionRequest, {"messages": []}).param == "messages"
    assert invalid(ChatCompletionRequest, {}).message == "messages: field required"


def test_roles_and_extra_message_keys():
    request = chat(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hi", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
    ])
    messages = request.template_messages()
    assert messages[0] == {"role": "system", "content": "Be brief."}  # templates only know system
    assert messages[1] == {"role": "user", "content": "Hi", "name": "ann"}
    assert messages[2] == {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}
    assert messages[3]["tool_call_id"] == "1"


@pytest.mark.parametrize("field", ["temprature", "max_token", "top_logprob", "stream_option"])
def test_unknown_top_level_fields_are_400_when_strict(strict, field):
    error = invalid(ChatCompletionRequest, {"messages": USER, field: 1})
    assert error.param == field and error.message == f"{field}: unknown field"


def test_ignored_openai_fields_are_accepted():
    request = chat(metadata={"a": "b"}, store=False, service_tier="auto", parallel_tool_calls=True, user="u1",
                   tool_choice="none", logit_bias={}, response_format={"type": "text"}, tools=[])
    assert request.to_sampling_params(100, 8).max_tokens == 100


def test_stream_options_are_strict(strict):
    assert invalid(ChatCompletionRequest, {"messages": USER, "stream_options": {"include_usge": True}}).param == \
        "stream_options.include_usge"
    request = chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert request.include_usage() and request.continuous_usage()
    assert not chat(stream_options={"continuous_usage_stats": True}).continuous_usage()  # needs include_usage


@pytest.mark.parametrize("fields, param, fragment", [
    ({"use_beam_search": True}, "use_beam_search", "not supported"),
    ({"logits_processors": ["my.Processor"]}, "logits_processors", "not supported"),
    ({"functions": [{"name": "f"}]}, "functions", "use tools"),
    ({"logit_bias": {"50256": 101}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"dog": 1}}, "logit_bias", "token ids"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", ">= 1"),
    ({"bad_words": ["ok", " "]}, "bad_words", "non-empty strings"),
    ({"allowed_token_ids": []}, "allowed_token_ids", "must not be empty"),
    ({"top_logprobs": 3}, "top_logprobs", "requires logprobs=true"),
])
def test_unsupported_features_are_refused_at_conversion(fields, param, fragment):
    error = refused(chat(**fields))
    assert error.param == param and fragment in error.message


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "text", "strict": True}}, "response_format.strict"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs.jsn"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    ({"logprobs": "maybe"}, "logprobs"),
    ({"top_logprobs": -1, "logprobs": True}, "top_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"n": 0}, "n"),
    ({"n": 1.5}, "n"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a", 1]}, "stop"),
    ({"stop_token_ids": ["x"]}, "stop_token_ids.0"),
    ({"stream": "often"}, "stream"),
    ({"priority": "high"}, "priority"),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ({"request_id": ""}, "request_id"),
    ({"cache_salt": ""}, "cache_salt"),
    ({"continue_final_message": True}, None),  # needs add_generation_prompt=false: the message says so
])
def test_bad_fields_name_their_path(strict, fields, param):
    assert invalid(ChatCompletionRequest, {"messages": USER, **fields}).param == param


def test_chat_template_kwargs_pass():
    assert chat(chat_template_kwargs={"enable_thinking": False}).chat_template_kwargs == {"enable_thinking": False}
    error = invalid(ChatCompletionRequest, {"messages": USER, "chat_template_kwargs": {"tokenize": True}})
    assert "may not set tokenize" in error.message


# ---- deprecated fields ---------------------------------------------------------------------------
@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(protocol, "_warned", set())


def test_best_of(fresh_warnings, caplog):
    with caplog.at_level(logging.WARNING, logger=protocol.logger.name):
        assert chat(best_of=1).to_sampling_params(100, 8).n == 1
        chat(best_of=1)
    assert sum("best_of is deprecated" in r.getMessage() for r in caplog.records) == 1  # once per process
    assert chat(best_of=None).best_of is None
    error = invalid(ChatCompletionRequest, {"messages": USER, "best_of": 2})
    assert error.param == "best_of" and "use n" in error.message
    assert invalid(CompletionRequest, {"prompt": "x", "best_of": 3}).param == "best_of"


@pytest.mark.parametrize("field, value, key", [
    ("guided_json", {"type": "object"}, "json"),
    ("guided_regex", "[0-9]+", "regex"),
    ("guided_choice", ["yes", "no"], "choice"),
    ("guided_grammar", 'root ::= "a"', "grammar"),
])
def test_guided_fields_map_to_structured_outputs(fresh_warnings, caplog, field, value, key):
    with caplog.at_level(logging.WARNING, logger=protocol.logger.name):
        request = completion(**{field: value})
    assert request.structured_outputs.model_dump(by_alias=True, exclude_none=True) == {key: value}
    assert any("deprecated" in r.getMessage() and "structured_outputs" in r.getMessage() for r in caplog.records)
    spec = request.to_sampling_params(10, 1).structured_outputs
    assert spec.kind == key and getattr(spec, key) == value


def test_guided_and_structured_outputs_merge_or_clash():
    request = chat(guided_regex="a+", structured_outputs={"choice": ["x"]})
    assert request.structured_outputs.regex == "a+" and request.structured_outputs.choice == ["x"]
    error = invalid(ChatCompletionRequest, {"messages": USER, "guided_json": {}, "structured_outputs": {"json": {}}})
    assert "guided_json and structured_outputs.json are both set" in error.message


def test_empty_structured_outputs_is_fine():
    params = chat(structured_outputs={}).to_sampling_params(10, 1)
    assert params.max_tokens == 10 and params.structured_outputs is None


# ---- chat -> SamplingParams ---------------------------------------------------------------------------
def test_chat_defaults_follow_vllm():
    params = chat().to_sampling_params(default_max_tokens=500, max_n=4)
    assert params.max_tokens == 500  # the rest of the context
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.n == 1
    assert params.logprobs is None and params.prompt_logprobs is None
    assert params.stop == [] and params.skip_special_tokens and not params.ignore_eos


def test_chat_max_tokens():
    assert chat(max_tokens=7).to_sampling_params(100, 1).max_tokens == 7
    assert chat(max_tokens=7, max_completion_tokens=9).to_sampling_params(100, 1).max_tokens == 9
    assert chat(max_tokens=100).to_sampling_params(100, 1).max_tokens == 100
    assert chat(max_tokens=None).to_sampling_params(100, 1).max_tokens == 100
    # A prompt that fills the context: left for the engine to refuse with its own message.
    assert chat().to_sampling_params(0, 1).max_tokens == 1
    assert chat(max_tokens=5).to_sampling_params(-3, 1).max_tokens == 1


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": 101}, "max_tokens"),
    ({"max_completion_tokens": 900}, "max_completion_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 900}, "max_completion_tokens"),
])
def test_chat_max_tokens_past_the_context_is_400(fields, param):
    error = refused(chat(**fields), default_max_tokens=100)
    assert error.param == param and "too large" in error.message and "room for 100 tokens" in error.message


def test_chat_logprobs():
    assert chat(logprobs=True).to_sampling_params(10, 1).logprobs == 0
    assert chat(logprobs=True, top_logprobs=5).to_sampling_params(10, 1).logprobs == 5
    assert chat(logprobs=False).to_sampling_params(10, 1).logprobs is None
    assert chat(logprobs=False, top_logprobs=0).to_sampling_params(10, 1).logprobs is None
    assert chat(logprobs=True).to_sampling_params(10, 1).prompt_logprobs is None


def test_n_is_capped():
    assert chat(n=4).to_sampling_params(10, max_n=4).n == 4
    error = refused(chat(n=5), max_n=4)
    assert error.param == "n" and "at most 4" in error.message and "5" in error.message


def test_vllm_extensions_pass_through():
    params = chat(
        top_k=40, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5,
        temperature=0.7, top_p=0.9, seed=123, stop=["\n\n", "END"], stop_token_ids=[2], ignore_eos=True,
        min_tokens=3, skip_special_tokens=False, spaces_between_special_tokens=False,
        include_stop_str_in_output=True,
    ).to_sampling_params(50, 1)
    assert (params.top_k, params.min_p, params.repetition_penalty) == (40, 0.05, 1.1)
    assert (params.presence_penalty, params.frequency_penalty, params.temperature, params.top_p) == (0.5, -0.5, 0.7, 0.9)
    assert params.seed == 123 and params.stop == ["\n\n", "END"] and params.stop_token_ids == [2]
    assert params.ignore_eos and params.min_tokens == 3 and not params.skip_special_tokens
    assert not params.spaces_between_special_tokens and params.include_stop_str_in_output


def test_nulls_mean_defaults():
    params = chat(temperature=None, top_p=None, n=None, stop=None, seed=None, ignore_eos=None,
                  presence_penalty=None, min_tokens=None).to_sampling_params(20, 1)
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.n == 1 and params.stop == []
    assert params.min_tokens == 0 and not params.ignore_eos


def test_single_stop_string():
    assert chat(stop="###").to_sampling_params(10, 1).stop == ["###"]
    assert chat(stop=["a", "b", "c", "d", "e"]).to_sampling_params(10, 1).stop == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("fields, param, fragment", [
    ({"temperature": -1}, "temperature", "temperature must be >= 0"),
    ({"top_p": 0}, "top_p", "top_p must be in (0, 1]"),
    ({"top_k": -2}, "top_k", "top_k must be -1"),
    ({"min_p": 1.5}, "min_p", "min_p must be in [0, 1]"),
    ({"presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
    ({"frequency_penalty": -3}, "frequency_penalty", "[-2, 2]"),
    ({"repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ({"stop": ["ok", ""]}, "stop", "empty strings"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", ">= 0"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens", "min_tokens must be <= max_tokens=10"),
    ({"temperature": float("inf")}, "temperature", "finite"),
])
def test_sampling_param_errors_become_400s_naming_the_field(fields, param, fragment):
    error = refused(chat(**fields))
    assert error.param == param and fragment in error.message


def test_min_tokens_over_max_completion_tokens_names_min_tokens():
    error = refused(chat(min_tokens=20, max_completion_tokens=10))
    assert error.param == "min_tokens"


# ---- completion requests ---------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, prompts", [
    ("Hello", ["Hello"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_prompt_forms(prompt, prompts):
    assert completion(prompt=prompt).prompts() == prompts


@pytest.mark.parametrize("prompt, fragment", [
    ("", "must not be empty"),
    ([], "must be a non-empty"),
    ([[]], "prompt 0 is empty"),
    (["a", ""], "prompt 1 is empty"),
    (["a", 1], "only strings, only token ids"),
    ([[1], "a"], "only strings, only token ids"),
    ([True, False], "only strings, only token ids"),
    ([1.5], "only strings, only token ids"),
    (5, "must be a non-empty"),
    ({"prompt": "x"}, "must be a non-empty"),
])
def test_bad_prompts_are_400(prompt, fragment):
    error = invalid(CompletionRequest, {"prompt": prompt})
    assert error.param == "prompt" and fragment in error.message


def test_prompt_is_required():
    assert invalid(CompletionRequest, {"max_tokens": 5}).message == "prompt: field required"


def test_completion_defaults_follow_vllm():
    params = completion().to_sampling_params(500, 1)
    assert params.max_tokens == 16 and params.temperature == 1.0
    assert params.logprobs is None and params.prompt_logprobs is None
    assert completion(max_tokens=None).to_sampling_params(500, 1).max_tokens == 500
    assert completion().to_sampling_params(10, 1).max_tokens == 10  # the default 16 is only a cap
    assert refused(completion(max_tokens=1000), default_max_tokens=500).param == "max_tokens"
    assert refused(completion(max_tokens=16), default_max_tokens=10).param == "max_tokens"  # asked for


def test_completion_logprobs_and_echo():
    assert completion(logprobs=3).to_sampling_params(10, 1).logprobs == 3
    assert completion(logprobs=0).to_sampling_params(10, 1).logprobs == 0
    params = completion(logprobs=2, echo=True).to_sampling_params(10, 1)
    assert params.logprobs == 2 and params.prompt_logprobs == 2
    assert completion(echo=True).to_sampling_params(10, 1).prompt_logprobs is None


def test_completion_refusals(strict):
    assert completion(suffix="").to_sampling_params(10, 1).max_tokens == 10
    assert refused(completion(max_tokens=0)).param == "max_tokens"  # only with echo
    assert refused(completion(n=3), max_n=2).param == "n"
    assert refused(completion(max_tokens=4, min_tokens=5)).param == "min_tokens"
    # Chat-only fields are unknown here, and the other way round.
    assert invalid(CompletionRequest, {"prompt": "x", "messages": USER}).param == "messages"
    assert invalid(CompletionRequest, {"prompt": "x", "top_logprobs": 2}).param == "top_logprobs"
    assert invalid(ChatCompletionRequest, {"messages": USER, "suffix": "x"}).param == "suffix"
    assert invalid(ChatCompletionRequest, {"messages": USER, "prompt": "x"}).param == "prompt"


# ---- tokenizer endpoints ----------------------------------------------------------------------------
def test_tokenize_request_forms():
    request = TokenizeRequest.model_validate({"prompt": "hi"})
    assert request.add_special_tokens is None and not request.return_token_strs
    request = TokenizeRequest.model_validate({"messages": USER, "add_generation_prompt": False})
    assert request.messages[0].to_template() == USER[0] and request.add_generation_prompt is False


@pytest.mark.parametrize("body", [{}, {"prompt": "hi", "messages": USER}])
def test_tokenize_needs_exactly_one_input(body):
    assert "exactly one of 'prompt' or 'messages'" in invalid(TokenizeRequest, body).message


def test_tokenize_and_detokenize_field_errors(strict):
    assert invalid(TokenizeRequest, {"prompt": "hi", "add_special_token": True}).param == "add_special_token"
    assert invalid(TokenizeRequest, {"messages": [{"role": "user", "content": 3}]}).param == "messages.0.content"
    assert DetokenizeRequest.model_validate({"tokens": [1, 2]}).tokens == [1, 2]
    assert invalid(DetokenizeRequest, {"tokens": [1, "x"]}).param == "tokens.1"
    assert invalid(DetokenizeRequest, {}).param == "tokens"


# ---- response pieces ---------------------------------------------------------------------------------
def test_usage_and_envelopes():
    assert usage_info(10, 5, 4) == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                                    "prompt_tokens_details": {"cached_tokens": 4}}
    assert response_envelope("text_completion", "cmpl-1", 7, "m", []) == {
        "id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m", "choices": []}
    models = model_list(["a", "b"], "a", 2048, 7, "gguf")
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["a", "b"]
    assert models["data"][0]["object"] == "model" and models["data"][1]["max_model_len"] == 2048
    assert models["data"][0]["quantization"] == "gguf"


# ---- vLLM's and OpenAI's newer fields ---------------------------------------------------------------
def test_unknown_fields_are_warned_once_per_name_and_dropped(caplog):
    with caplog.at_level(logging.WARNING, logger=protocol.logger.name):
        first = chat(frobnicate=1, stream_options={"include_usage": True, "wiggle": 2})
        chat(frobnicate=2)
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("'frobnicate'" in w for w in warnings) == 1 and sum("'wiggle'" in w for w in warnings) == 1
    assert first.model_extra == {} and first.stream_options.model_extra == {}
    assert first.to_sampling_params(100, 8).max_tokens == 100


def test_fields_that_describe_the_caller_are_accepted():
    request = chat(safety_identifier="s", prompt_cache_key="k", reasoning_effort="low", verbosity="low",
                   modalities=["text"], prediction={"type": "content", "content": "x"}, web_search_options={},
                   kv_transfer_params={}, vllm_xargs={"a": 1}, mm_processor_kwargs={}, length_penalty=1.0,
                   stream_options={"include_usage": True, "include_obfuscation": False})
    assert request.to_sampling_params(100, 8).max_tokens == 100


def test_token_controls_reach_sampling_params():
    params = chat(logit_bias={"5": 2.5, "7": -100}, bad_words=["cat"], allowed_token_ids=[1, 2],
                  truncate_prompt_tokens=-1, prompt_logprobs=2).to_sampling_params(100, 8)
    assert params.logit_bias == {5: 2.5, 7: -100.0} and params.bad_words == ["cat"]
    assert params.allowed_token_ids == [1, 2] and params.truncate_prompt_tokens == -1
    assert params.prompt_logprobs == 2 and params.logprobs is None


def test_echo_with_max_tokens_zero_scores_the_prompt():
    request = completion(echo=True, max_tokens=0, logprobs=1)
    params = request.to_sampling_params(100, 8)
    assert request.echo_only() and params.max_tokens == 1 and params.prompt_logprobs == 1
    assert completion(prompt_logprobs=3).to_sampling_params(100, 8).prompt_logprobs == 3


def test_continue_final_message_and_content_formats():
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]},
                {"role": "assistant", "content": "The answer is"}]
    request = chat(messages=messages, continue_final_message=True, add_generation_prompt=False, echo=True)
    assert request.echo_text() == "The answer is"
    assert request.template_messages("string")[0]["content"] == "a\nb"
    assert request.template_messages("openai")[0]["content"] == [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert request.template_messages("openai")[1]["content"] == [{"type": "text", "text": "The answer is"}]
    error = invalid(ChatCompletionRequest, {"messages": USER, "continue_final_message": True,
                                            "add_generation_prompt": False})
    assert "last message to be from the assistant" in error.message
