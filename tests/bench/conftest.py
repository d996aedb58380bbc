"""One real `sluice serve` (default model, bf16 by default) shared by every benchmark test, and a
helper that runs `sluice bench serve` in this process against it and returns the saved JSON."""

from __future__ import annotations

import json

import pytest

from sluice.entrypoints.cli import main
from sluice.loader import load_tokenizer, resolve_model
from tests.server.utils import RemoteServer

MODEL_NAME = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def bench_server():
    """One engine thread: these tests check the benchmark tool, not the engine's speed, and on a
    busy 2-core machine a 2-thread engine stalls at every OpenMP barrier whose other thread is
    descheduled (steps of a second instead of tens of ms)."""
    srv = RemoteServer("--enable-prompt-tokens-details", env={"OMP_NUM_THREADS": "1"})  # cached_tokens in usage
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(resolve_model(MODEL_NAME))


@pytest.fixture
def bench(bench_server, tmp_path):
    """bench(*flags) -> the JSON that `sluice bench serve ... --save-result` wrote."""

    def run(*flags: str) -> dict:
        out = tmp_path / "result.json"
        code = main(["bench", "serve", "--base-url", bench_server.url, "--model", MODEL_NAME, "--disable-tqdm",
                     "--save-result", "--result-dir", str(tmp_path), "--result-filename", out.name, *flags])
        assert code == 0
        with open(out) as f:
            return json.load(f)

    return run
