"""Request limits and errors: a 20 MB body is refused while reading, the HTTP metrics' label sets
stay bounded, one request cannot fan out without limit, former 500s are 400s naming the field,
and every failure class answers in OpenAI's error shape."""

from __future__ import annotations

import random
import statistics
import string
import threading
import time

import httpx
import pytest

from tests.hardening.conftest import AUTH, MAX_SEQS_PER_REQUEST, assert_openai_error
from tests.server.conftest import MODEL_NAME

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}
BIG_BODY = b'{"prompt": "' + b"a" * 20_000_000 + b'"}'


def chunks_of(body: bytes, size: int):
    for start in range(0, len(body), size):
        yield body[start : start + size]


def completion(**fields) -> dict:
    return {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 1, **fields}


def test_20mb_body_is_413_within_1s_and_a_concurrent_request_keeps_its_latency(hardened, http):
    """Rounds of (a good request alone, then one beside a 20 MB upload); the medians of each kind are
    compared, so one lucky or unlucky round cancels out while a stalled server would not."""
    quiet, during, refusals = [], [], []

    def good_request_s() -> float:
        started = time.monotonic()
        assert http.post(COMPLETIONS, json=completion()).status_code == 200
        return time.monotonic() - started

    def upload(content) -> None:
        with httpx.Client(base_url=hardened.url, headers=AUTH, timeout=60) as client:
            started = time.monotonic()
            refusals.append((client.post(COMPLETIONS, content=content, headers=JSON), time.monotonic() - started))

    for round_ in range(6):  # every other one chunked: no Content-Length to refuse it early
        content = BIG_BODY if round_ % 2 == 0 else chunks_of(BIG_BODY, 1 << 20)
        quiet.append(good_request_s())
        uploader = threading.Thread(target=upload, args=(content,))
        uploader.start()
        time.sleep(0.02)  # the upload is under way
        during.append(good_request_s())
        uploader.join()
    assert len(refusals) == 6
    for response, seconds in refusals:
        error = assert_openai_error(response, 413)
        assert "--max-request-body-bytes" in error["message"]
        assert seconds < 1.0, refusals
    assert statistics.median(during) <= 2 * statistics.median(quiet), (quiet, during)


def test_a_prompt_too_long_to_fit_is_refused_before_tokenizing(http):
    error = assert_openai_error(http.post(COMPLETIONS, json=completion(prompt="ab " * 30_000)), 400, param="prompt")
    assert "characters" in error["message"] and "max_model_len" in error["message"]


def test_metrics_lines_unchanged_after_1000_requests_with_random_methods(hardened, http):
    rng = random.Random(0)
    paths = ["/v1/completions", "/v1/models", "/health", "/metrics", "/no/such/path"]

    def send(method: str, path: str, with_key: bool) -> None:
        http.request(method, path, headers=AUTH if with_key else {"Authorization": ""})

    def made_up_method() -> str:
        return "".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 12)))

    for path in paths:  # every kind of target once: from here on no new label set may appear
        for with_key in (True, False):
            send(made_up_method(), path, with_key)
            send(made_up_method(), f"{path}/{rng.random()}", with_key)
    http.get("/metrics")
    before = http.get("/metrics").text.count("\n")
    for _ in range(1000):
        path = rng.choice(paths) + rng.choice(["", f"/{rng.random()}"])
        send(made_up_method(), path, rng.random() < 0.5)
    after = http.get("/metrics").text
    assert after.count("\n") == before
    assert 'method="other"' in after and 'handler="other"' in after


@pytest.mark.parametrize("prompts,n,param", [(3, 3, "prompt"), (1, MAX_SEQS_PER_REQUEST + 1, "n")])
def test_one_request_cannot_fan_out_beyond_max_num_seqs_per_request(http, prompts, n, param):
    prompt = ["Hi"] * prompts if prompts > 1 else "Hi"
    error = assert_openai_error(http.post(COMPLETIONS, json=completion(prompt=prompt, n=n)), 400, param=param)
    assert f"{prompts * n} sequences" in error["message"] and "--max-num-seqs-per-request" in error["message"]


def test_a_request_at_the_fan_out_cap_runs(http):
    reply = http.post(COMPLETIONS, json=completion(prompt=["Hi", "Hello"], n=MAX_SEQS_PER_REQUEST // 2, temperature=1))
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"]) == MAX_SEQS_PER_REQUEST


@pytest.mark.parametrize("path,body,param", [
    (COMPLETIONS, completion(seed=2**70), "seed"),
    (COMPLETIONS, completion(prompt="bad \ud800 text"), "prompt"),
    (COMPLETIONS, completion(prompt=["fine", "bad \udfff"]), "prompt"),
    (CHAT, {"model": MODEL_NAME, "messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 1}, "messages"),
    (CHAT, {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
            "stop_token_ids": [2**64]}, "stop_token_ids"),
])
def test_former_500s_are_400s_naming_the_field(http, path, body, param):
    # httpx would refuse to encode a lone surrogate; JSON's \ud800 escape is what a client sends.
    import json

    response = http.post(path, content=json.dumps(body).encode(), headers=JSON)
    assert_openai_error(response, 400, param=param)
    assert http.post(COMPLETIONS, json=completion()).status_code == 200


# (failure class, method, path, body bytes, extra headers, status, type, code, param)
ERROR_CLASSES = [
    ("validation", "POST", COMPLETIONS, b'{"prompt": "Hi", "temperature": -1}', JSON, 400,
     "invalid_request_error", None, "temperature"),
    ("strict type", "POST", COMPLETIONS, b'{"prompt": "Hi", "max_tokens": true}', JSON, 400,
     "invalid_request_error", None, "max_tokens"),
    ("JSON parse", "POST", COMPLETIONS, b'{"prompt": ', JSON, 400, "invalid_request_error", None, None),
    ("UTF-8 decode", "POST", COMPLETIONS, b'{"prompt": "\xff\xfe"}', JSON, 400, "invalid_request_error", None, None),
    ("nested JSON", "POST", COMPLETIONS, b'{"metadata": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001, JSON, 400,
     "invalid_request_error", None, None),
    ("wrong content type", "POST", COMPLETIONS, b'{"prompt": "Hi"}', {"content-type": "text/plain"}, 415,
     "invalid_request_error", None, None),
    ("body too large", "POST", COMPLETIONS, BIG_BODY[:4_000_000] + b'"}', JSON, 413,
     "invalid_request_error", None, None),
    ("method not allowed", "DELETE", COMPLETIONS, b"", {}, 405, "invalid_request_error", None, None),
    ("unknown route", "GET", "/v1/nothing-here", b"", {}, 404, "not_found_error", None, None),
    ("unknown model", "POST", COMPLETIONS, b'{"model": "nope", "prompt": "Hi"}', JSON, 404,
     "not_found_error", "model_not_found", "model"),
    ("no API key", "POST", COMPLETIONS, b'{"prompt": "Hi"}', {"Authorization": ""}, 401,
     "authentication_error", "invalid_api_key", None),
]


@pytest.mark.parametrize("name,method,path,body,headers,status,type_,code,param", ERROR_CLASSES,
                         ids=[entry[0] for entry in ERROR_CLASSES])
def test_every_failure_class_answers_in_openai_error_shape(http, name, method, path, body, headers, status, type_,
                                                           code, param):
    response = http.request(method, path, content=body, headers=headers)
    error = assert_openai_error(response, status, param=param, code=code)
    assert error["type"] == type_
