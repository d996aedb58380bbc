from __future__ import annotations

import pytest

from tests.server.utils import RemoteServer

MODEL_NAME = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def server():
    """The shared server; tests that need other flags or kill the server start their own.

    float32, so that its greedy outputs can be held token for token to the offline LLM's: in
    bfloat16 a prefix-cache hit or another batch shape can flip an exact tie between two tokens.
    """
    srv = RemoteServer("--dtype", "float32")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    return server.client()
