"""Bad input never reaches the core: each is a 4xx in OpenAI's error shape naming the field,
and the server serves a good request correctly afterwards."""

from __future__ import annotations

import json

import pytest

from tests.server.conftest import MODEL_NAME

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]


def chat(**fields):
    return {"model": MODEL_NAME, "messages": MESSAGES, **fields}


def completion(**fields):
    return {"model": MODEL_NAME, "prompt": "Hi", **fields}


# (path, JSON body or raw bytes, expected status, the field the error must name)
BAD_REQUESTS = [
    (CHAT, b'{"model": "x", "messages": [', 400, None),  # malformed JSON
    (CHAT, b'["not", "an", "object"]', 400, None),
    (CHAT, {"model": MODEL_NAME}, 400, "messages"),
    (CHAT, chat(messages=[]), 400, "messages"),
    (CHAT, chat(messages=[{"role": "wizard", "content": "Hi"}]), 400, "role"),
    (CHAT, chat(messages=[{"role": "user", "content": 42}]), 400, "content"),
    (CHAT, chat(temperature=-1), 400, "temperature"),
    (CHAT, chat(temperature="hot"), 400, "temperature"),
    (CHAT, chat(top_p=0), 400, "top_p"),
    (CHAT, chat(top_p=1.5), 400, "top_p"),
    (CHAT, chat(top_k=-2), 400, "top_k"),
    (CHAT, chat(min_p=2), 400, "min_p"),
    (CHAT, chat(n=0), 400, "n"),
    (CHAT, chat(n=1000), 400, "n"),
    (CHAT, chat(max_tokens=0), 400, "max_tokens"),
    (CHAT, chat(max_completion_tokens=-3), 400, "max_completion_tokens"),
    (COMPLETIONS, completion(max_tokens=5000), 400, "max_tokens"),
    (COMPLETIONS, completion(prompt="word " * 1100), 400, "prompt"),
    (CHAT, chat(messages=[{"role": "user", "content": "word " * 1100}]), 400, "messages"),
    (CHAT, chat(stream=True, stream_options={"include_usage": [1]}), 400, "include_usage"),
    (COMPLETIONS, completion(max_tokens=0), 400, "max_tokens"),  # only with echo (scoring)
    (COMPLETIONS, completion(truncate_prompt_tokens=0), 400, "truncate_prompt_tokens"),
    (COMPLETIONS, completion(prompt_logprobs=99), 400, "prompt_logprobs"),
    (COMPLETIONS, completion(suffix="end"), 400, "suffix"),  # the default model has no FIM tokens
    (CHAT, chat(bad_words=[""]), 400, "bad_words"),
    (CHAT, chat(cache_salt=""), 400, "cache_salt"),
    (COMPLETIONS, completion(logprobs=50), 400, "logprobs"),
    (CHAT, chat(top_logprobs=3), 400, "top_logprobs"),
    (COMPLETIONS, completion(stop=7), 400, "stop"),
    (COMPLETIONS, completion(prompt=[1, 2, 10**7]), 400, "prompt"),
    (COMPLETIONS, completion(prompt=""), 400, "prompt"),
    (COMPLETIONS, completion(prompt=[]), 400, "prompt"),
    (CHAT, chat(presence_penalty=5), 400, "presence_penalty"),
    (CHAT, chat(repetition_penalty=0), 400, "repetition_penalty"),
    (COMPLETIONS, completion(seed="abc"), 400, "seed"),
    (COMPLETIONS, completion(best_of=3), 400, "best_of"),
    (CHAT, chat(logit_bias={"42": 500}), 400, "logit_bias"),
    (CHAT, chat(priority=5), 400, "priority"),
    (CHAT, chat(model="no-such-model"), 404, "model"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/tokenize", {}, 400, None),
    # strict types, as OpenAI's API: booleans and numeric strings are not numbers
    (CHAT, chat(max_tokens=True), 400, "max_tokens"),
    (COMPLETIONS, completion(max_tokens="8"), 400, "max_tokens"),
    (CHAT, chat(temperature=True), 400, "temperature"),
    (CHAT, chat(n="2"), 400, "n"),
    (CHAT, chat(logprobs=1), 400, "logprobs"),
    (CHAT, chat(messages=[{"role": "user", "content": []}]), 400, "content"),
    # values the engine cannot take (these were 500s)
    (COMPLETIONS, completion(seed=2**70), 400, "seed"),
    (CHAT, chat(seed=-(2**63) - 1), 400, "seed"),
    (COMPLETIONS, completion(stop_token_ids=[2**64]), 400, "stop_token_ids"),
    (COMPLETIONS, json.dumps(completion(prompt="a \ud800 b")).encode(), 400, "prompt"),
    (CHAT, json.dumps(chat(messages=[{"role": "user", "content": "\udfff"}])).encode(), 400, "messages"),
    ("/tokenize", json.dumps({"prompt": "\ud800"}).encode(), 400, "prompt"),
    # one request's fan-out and size
    (COMPLETIONS, completion(prompt=["Hi"] * 65), 400, "prompt"),
    (COMPLETIONS, completion(prompt=["Hi"] * 5, n=16), 400, "prompt"),
    (COMPLETIONS, completion(prompt="ab " * 30_000), 400, "prompt"),  # more characters than can ever fit
    (COMPLETIONS, completion(prompt="a" * 3_000_000), 413, None),
    # bodies that are not JSON objects
    (CHAT, b'{"model": "x", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),  # not UTF-8
    (CHAT, b'{"metadata": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001, 400, None),  # nested too deeply
]

# (method, path, body, content type, expected status): failures before any field is read
BAD_HTTP = [
    ("DELETE", CHAT, b"", None, 405),
    ("GET", COMPLETIONS, b"", None, 405),
    ("BREW", "/v1/models", b"", None, 405),
    ("GET", "/v1/no-such-endpoint", b"", None, 404),
    ("POST", CHAT, json.dumps(chat()).encode(), "text/plain", 415),
    ("POST", CHAT, json.dumps(chat()).encode(), "application/x-www-form-urlencoded", 415),
]


@pytest.mark.parametrize("path,body,status,field", BAD_REQUESTS,
                         ids=[f"{i}-{entry[3] or 'body'}" for i, entry in enumerate(BAD_REQUESTS)])
def test_bad_request_is_refused_naming_the_field(server, path, body, status, field):
    with server.http() as http:
        if isinstance(body, bytes):
            response = http.post(path, content=body, headers={"content-type": "application/json"})
        else:
            response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if field is not None:
        assert field in error["message"] or field in (error["param"] or ""), error


@pytest.mark.parametrize("method,path,body,content_type,status", BAD_HTTP,
                         ids=[f"{method}-{path}-{status}" for method, path, _, _, status in BAD_HTTP])
def test_bad_http_is_refused_in_openai_error_shape(server, method, path, body, content_type, status):
    headers = {"content-type": content_type} if content_type else {}
    with server.http() as http:
        response = http.request(method, path, content=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_server_still_serves_correctly_after_bad_requests(server, client):
    for path, body, _, _ in BAD_REQUESTS[:5]:
        with server.http() as http:
            http.post(path, json=body) if not isinstance(body, bytes) else http.post(path, content=body)
    first = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", temperature=0, max_tokens=8)
    again = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", temperature=0, max_tokens=8)
    assert "Paris" in first.choices[0].text
    assert again.choices[0].text == first.choices[0].text
    metrics = server.metrics()
    assert metrics["vllm:num_requests_running"] == 0 and metrics["vllm:num_requests_waiting"] == 0


def test_deprecated_fields_are_accepted(client):
    reply = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, extra_body={"best_of": 1})
    assert reply.usage.completion_tokens == 3
