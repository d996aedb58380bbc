"""One hardened server shared by the hardening tests: short timeouts, a concurrency limit, a key."""

from __future__ import annotations

import socket

import pytest

from tests.server.utils import RemoteServer

API_KEY = "sk-hardening"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
READ_TIMEOUT_S = 2
KEEP_ALIVE_S = 1
LIMIT_CONCURRENCY = 3
MAX_SEQS_PER_REQUEST = 8


@pytest.fixture(scope="session")
def hardened():
    server = RemoteServer("--api-key", API_KEY, "--timeout-request-read", str(READ_TIMEOUT_S),
                          "--timeout-keep-alive", str(KEEP_ALIVE_S), "--limit-concurrency", str(LIMIT_CONCURRENCY),
                          "--max-num-seqs-per-request", str(MAX_SEQS_PER_REQUEST))
    yield server
    server.stop()


@pytest.fixture
def http(hardened):
    with hardened.http(headers=AUTH) as client:
        yield client


def assert_openai_error(response, status: int, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape, exactly: {"error": {"message", "type", "param", "code"}}."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["type"], str)
    if status >= 500:
        assert error["type"] == "server_error"
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def raw_request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> socket.socket:
    """An HTTP/1.1 request sent over a plain socket, which the test can hold open or drop at will."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}",
             "Content-Type: application/json", *(f"{k}: {v}" for k, v in {**AUTH, **(headers or {})}.items())]
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
    return sock
