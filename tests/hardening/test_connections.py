"""Connection limits: idle, half-header and slow-body connections are closed within the read
timeout; beyond --limit-concurrency new requests get a 503 while /health stays fast; running out
of file descriptors is logged once, not once per failed accept(), and survived."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import psutil

from tests.hardening.conftest import (
    AUTH,
    KEEP_ALIVE_S,
    LIMIT_CONCURRENCY,
    READ_TIMEOUT_S,
    assert_openai_error,
    raw_request,
)
from tests.server.conftest import MODEL_NAME

SLACK_S = 4  # a loaded 2-core machine may run the server's timer late, never early


def seconds_until_closed(sock: socket.socket, trickle: bytes = b"", limit: float = READ_TIMEOUT_S + 15) -> float:
    """Time until the server closes `sock`, sending `trickle` every 0.2 s meanwhile."""
    started = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - started < limit:
        try:
            if trickle:
                sock.sendall(trickle)
            if sock.recv(65536) == b"":
                break
        except socket.timeout:
            continue
        except OSError:  # reset: closed with our trickle unread
            break
    return time.monotonic() - started


def test_idle_half_header_and_slow_body_connections_are_closed_within_the_timeout(hardened):
    body_headers = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: 100000\r\nAuthorization: {AUTH['Authorization']}\r\n\r\n").encode()
    cases = {
        "idle": (b"", b""),
        "half header": (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"a"),
        "slow body": (body_headers + b'{"prompt": "', b"a"),
    }
    elapsed: dict[str, float] = {}

    def watch(name: str, opening: bytes, trickle: bytes) -> None:
        with socket.create_connection(("127.0.0.1", hardened.port)) as sock:
            sock.sendall(opening)
            elapsed[name] = seconds_until_closed(sock, trickle)

    threads = [threading.Thread(target=watch, args=(name, *case)) for name, case in cases.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, seconds in elapsed.items():
        assert READ_TIMEOUT_S - 0.1 <= seconds <= READ_TIMEOUT_S + SLACK_S, (name, elapsed)
    assert httpx.get(hardened.url + "/health").status_code == 200


def test_idle_keep_alive_connection_is_closed(hardened):
    with socket.create_connection(("127.0.0.1", hardened.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(30)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert seconds_until_closed(sock) <= KEEP_ALIVE_S + SLACK_S


def test_requests_beyond_the_concurrency_limit_get_503_while_health_stays_fast(hardened):
    stream = json.dumps({"model": MODEL_NAME, "prompt": "Count to a thousand:", "max_tokens": 1000,
                         "ignore_eos": True, "stream": True}).encode()
    with contextlib.ExitStack() as held:
        for _ in range(LIMIT_CONCURRENCY):  # each holds a slot while its stream runs
            sock = held.enter_context(raw_request(hardened.port, "POST", "/v1/completions", stream))
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        with httpx.Client(base_url=hardened.url, headers=AUTH, timeout=60) as http:
            refused = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 1})
            started = time.monotonic()
            health = http.get("/health")
            health_s = time.monotonic() - started
    error = assert_openai_error(refused, 503, code="concurrency_limit")
    assert str(LIMIT_CONCURRENCY) in error["message"] and refused.headers["Retry-After"] == "1"
    assert health.status_code == 200 and health_s < 2.0, health_s
    # Dropped streams free their slots.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        reply = httpx.post(hardened.url + "/v1/completions", headers=AUTH, timeout=60,
                           json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 1})
        if reply.status_code == 200:
            break
        time.sleep(0.2)
    assert reply.status_code == 200, reply.text


def test_running_out_of_file_descriptors_is_logged_once_and_survived(hardened):
    process = psutil.Process(hardened.process.pid)
    soft, hard = process.rlimit(psutil.RLIMIT_NOFILE)
    log_before = len(hardened.logs())
    sockets = []
    try:
        process.rlimit(psutil.RLIMIT_NOFILE, (process.num_fds() + 8, hard))
        for _ in range(64):  # the kernel completes these handshakes; accept() then fails with EMFILE
            sockets.append(socket.create_connection(("127.0.0.1", hardened.port)))
        time.sleep(READ_TIMEOUT_S + 4)  # asyncio retries accept() every second meanwhile
    finally:
        process.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
        for sock in sockets:
            sock.close()
    log = hardened.logs()[log_before:]
    assert 1 <= log.count("socket.accept() out of system resource") <= 2, log[-3000:]
    assert len(log.splitlines()) < 200, log[-3000:]
    deadline = time.monotonic() + 30
    while httpx.get(hardened.url + "/health", timeout=10).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    reply = httpx.post(hardened.url + "/v1/completions", headers=AUTH, timeout=60,
                       json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 1})
    assert reply.status_code == 200, reply.text
