"""Servers with their own flags: API keys over TLS with two API processes, backpressure,
graceful shutdown, and a core process that dies under load."""

from __future__ import annotations

import signal
import ssl
import subprocess
import threading
import time

import httpx
import openai
import pytest

from tests.server.conftest import MODEL_NAME
from tests.server.utils import RemoteServer, parse_metrics

KEYS = ("key-one", "key-two")
ROUTES = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    ("POST", "/tokenize", {"prompt": "Hi"}),
    ("POST", "/detokenize", {"tokens": [1, 2]}),
    ("GET", "/metrics", None),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
]
PUBLIC = [("GET", "/health", None), ("GET", "/version", None)]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return str(cert), str(key)


@pytest.fixture(scope="module")
def guarded(tls_files):
    """Two API processes over TLS, two keys, one running request at a time and a queue of one."""
    server = RemoteServer("--api-key", KEYS[0], "--api-key", KEYS[1], "--api-server-count", "2",
                          "--max-num-seqs", "1", "--max-num-queued-reqs", "1", "--enable-log-requests",
                          "--max-log-len", "12", "--disable-access-log-for-endpoints", "/health,/metrics",
                          tls=tls_files)
    yield server
    assert server.stop() == 0


def test_api_keys_guard_every_route_but_health_and_version(guarded, tls_files):
    with https(guarded, tls_files) as http:
        for method, path, body in ROUTES:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS[0]}):
                response = http.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.json()["error"]["type"] == "authentication_error"
            for key in KEYS:
                response = http.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
                assert response.status_code == 200, (path, response.text)
        for method, path, body in PUBLIC:
            assert http.request(method, path).status_code == 200


def test_request_logs_are_cut_and_quiet_endpoints_unlogged(guarded, tls_files):
    with https(guarded, tls_files) as http:
        reply = http.post("/v1/completions", headers={"Authorization": f"Bearer {KEYS[0]}"},
                          json={"model": MODEL_NAME, "prompt": "PROMPTSTART-then-the-private-rest", "max_tokens": 1})
        assert reply.status_code == 200
        assert http.get("/health").status_code == 200
    logs = guarded.logs()
    assert "PROMPTSTART-" in logs and "private-rest" not in logs
    assert '"POST /v1/completions HTTP/1.1" 200' in logs
    assert '"GET /health HTTP/1.1"' not in logs and '"GET /metrics HTTP/1.1"' not in logs


def test_prompts_are_not_logged_by_default(server):
    with server.http() as http:
        http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "UNLOGGED-prompt-text", "max_tokens": 1})
    assert "UNLOGGED" not in server.logs()


def https(server: RemoteServer, tls_files) -> httpx.Client:
    return httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=tls_files[0]), timeout=120)


def test_tls_with_the_openai_client(guarded, tls_files):
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEYS[1], max_retries=0,
                           http_client=https(guarded, tls_files))
    reply = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens == 4
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0,
                      http_client=https(guarded, tls_files)).models.list()
    with pytest.raises(httpx.ConnectError):  # an unknown certificate is refused by default
        httpx.get(guarded.url + "/health")


def test_queue_over_limit_is_503_with_retry_after(guarded, tls_files):
    """max-num-seqs 1 and max-num-queued-reqs 1: one runs, one waits, the third is refused."""
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    long = {"model": MODEL_NAME, "prompt": "Tell me a story.", "max_tokens": 250, "ignore_eos": True}
    results = []

    def run_long():
        with https(guarded, tls_files) as http:
            results.append(http.post("/v1/completions", json=long, headers=headers).status_code)

    threads = [threading.Thread(target=run_long) for _ in range(2)]
    with https(guarded, tls_files) as http:

        def wait_for(running: int, waiting: int) -> None:
            # One at a time: two arriving before the first is scheduled would both count as waiting.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                metrics = parse_metrics(http.get("/metrics", headers=headers).text)
                if (metrics["vllm:num_requests_running"], metrics["vllm:num_requests_waiting"]) == (running, waiting):
                    return
                time.sleep(0.05)
            pytest.fail(f"never saw {running} running and {waiting} waiting; results so far {results}")

        threads[0].start()
        wait_for(1, 0)
        threads[1].start()
        wait_for(1, 1)
        refused = http.post("/v1/completions", json={**long, "max_tokens": 2}, headers=headers)
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "1"
    assert "max_num_queued_reqs=1" in refused.json()["error"]["message"]
    for thread in threads:
        thread.join()
    assert results == [200, 200]


def test_graceful_shutdown_finishes_short_requests_and_aborts_long_ones():
    server = RemoteServer("--shutdown-timeout", "4")
    client = server.client()
    outcomes: dict[str, object] = {}

    def run(name: str, max_tokens: int) -> None:
        stream = client.completions.create(model=MODEL_NAME, prompt="Count to a thousand:", max_tokens=max_tokens,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        chunks = list(stream)
        outcomes[name] = (sum(1 for c in chunks if c.choices and c.choices[0].text), chunks[-1].choices[0].finish_reason)

    threads = {name: threading.Thread(target=run, args=(name, n)) for name, n in (("short", 48), ("long", 1000))}
    for thread in threads.values():
        thread.start()
    time.sleep(1.5)
    core = server.core_process()
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.post(server.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi"}, timeout=10)
    assert refused.status_code == 503
    for thread in threads.values():
        thread.join(60)
    assert server.process.wait(30) == 0
    assert outcomes["short"][1] == "length"
    assert outcomes["long"][1] == "abort"
    assert not core.is_running()


def test_killed_core_fails_requests_and_exits_nonzero():
    server = RemoteServer("--served-model-name", "first-name", "second-name")
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["first-name", "second-name"]
    with pytest.raises(openai.NotFoundError):  # only the served names are known
        client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=1)
    errors = []

    def run() -> None:
        try:
            list(client.completions.create(model="second-name", prompt="Go on forever:", max_tokens=1000, stream=True,
                                           extra_body={"ignore_eos": True}))
        except openai.APIError as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.5)
    server.core_process().kill()
    thread.join(30)
    assert errors and "engine" in str(errors[0])
    try:
        health = httpx.get(server.url + "/health", timeout=5).status_code
    except httpx.HTTPError:
        health = None  # already gone: exiting is what we want
    assert health in (503, None)
    assert server.process.wait(30) != 0
