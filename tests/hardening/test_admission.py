"""Admission counts what a request costs: what can never fit the queue limits is a 400 naming
`n` or the prompts and the limit, even on an idle server; only a request that waiting would let
in gets a 503 with Retry-After."""

from __future__ import annotations

import contextlib
import json
import time

import pytest

from tests.hardening.conftest import AUTH, assert_openai_error, raw_request
from tests.server.conftest import MODEL_NAME
from tests.server.utils import RemoteServer, parse_metrics

MAX_QUEUED_REQS = 2
MAX_QUEUED_TOKENS = 60


@pytest.fixture(scope="module")
def queued():
    """One request runs at a time; two may wait."""
    server = RemoteServer("--api-key", AUTH["Authorization"].split()[1], "--max-num-seqs", "1",
                          "--max-num-queued-reqs", str(MAX_QUEUED_REQS),
                          "--max-num-queued-tokens", str(MAX_QUEUED_TOKENS))
    yield server
    server.stop()


@pytest.fixture
def http(queued):
    with queued.http(headers=AUTH) as client:
        yield client


def completion(**fields) -> dict:
    return {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2, **fields}


def test_more_children_than_the_queue_holds_is_400_naming_n(http):
    error = assert_openai_error(http.post("/v1/completions", json=completion(n=MAX_QUEUED_REQS + 1)), 400, param="n")
    assert f"--max-num-queued-reqs {MAX_QUEUED_REQS}" in error["message"]


def test_more_prompts_than_the_queue_holds_is_400_naming_the_prompts(http):
    error = assert_openai_error(http.post("/v1/completions", json=completion(prompt=["Hi"] * 3)), 400, param="prompt")
    assert "3 prompts" in error["message"] and f"--max-num-queued-reqs {MAX_QUEUED_REQS}" in error["message"]


def test_prompts_holding_more_tokens_than_the_queue_admits_is_400(http):
    prompts = ["one two three four five six seven eight nine ten " * 4] * 2
    error = assert_openai_error(http.post("/v1/completions", json=completion(prompt=prompts)), 400, param="prompt")
    assert f"--max-num-queued-tokens {MAX_QUEUED_TOKENS}" in error["message"]


def test_children_that_fit_run_on_an_idle_server(http):
    reply = http.post("/v1/completions", json=completion(n=MAX_QUEUED_REQS, temperature=1))
    assert reply.status_code == 200 and len(reply.json()["choices"]) == MAX_QUEUED_REQS


def test_a_full_queue_is_503_with_retry_after_for_what_waiting_would_let_in(queued, http):
    long = json.dumps(completion(prompt="Tell me a story.", max_tokens=1000, ignore_eos=True)).encode()

    def wait_for(running: int, waiting: int) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            metrics = parse_metrics(http.get("/metrics").text)
            if (metrics["vllm:num_requests_running"], metrics["vllm:num_requests_waiting"]) == (running, waiting):
                return
            time.sleep(0.05)
        pytest.fail(f"never saw {running} running and {waiting} waiting")

    with contextlib.ExitStack() as held:  # dropping these sockets aborts their requests
        held.enter_context(raw_request(queued.port, "POST", "/v1/completions", long))
        wait_for(1, 0)
        for waiting in range(1, MAX_QUEUED_REQS + 1):  # one at a time, so each is counted where it is
            held.enter_context(raw_request(queued.port, "POST", "/v1/completions", long))
            wait_for(1, waiting)
        for n in (1, MAX_QUEUED_REQS):
            refused = http.post("/v1/completions", json=completion(n=n))
            assert_openai_error(refused, 503, code="queue_full")
            assert refused.headers["Retry-After"] == "1"
    wait_for(0, 0)
    assert http.post("/v1/completions", json=completion(n=MAX_QUEUED_REQS)).status_code == 200
