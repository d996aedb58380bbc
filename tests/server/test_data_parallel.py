"""Data parallelism: one server running two engine cores (internal load balancing), and two
single-rank servers behind vllm-router (external load balancing). Both answer as one engine does."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import httpx
import openai
import pytest

from sluice import LLM, SamplingParams
from tests.server.utils import RemoteServer, free_port, parse_samples, start_vllm_router

PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):", "Once upon a time",
           "The three primary colours are", "My favourite food is"]
MAX_TOKENS = 8


def complete(client: openai.OpenAI, prompt: str) -> str:
    out = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    return out.choices[0].text


def successes_by_engine(server: RemoteServer) -> dict[str, float]:
    counts: dict[str, float] = {}
    for name, labels, value in parse_samples(httpx.get(server.url + "/metrics", timeout=30).text):
        if name == "vllm:request_success_total":
            counts[labels["engine"]] = counts.get(labels["engine"], 0.0) + value
    return counts


@pytest.fixture(scope="module")
def reference() -> list[str]:
    """One engine in this process, each prompt alone (as each reaches a core alone below)."""
    llm = LLM(dtype="float32", max_model_len=1024, kv_cache_memory_bytes=256 << 20)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    return [llm.generate([p], params, use_tqdm=False)[0].outputs[0].text for p in PROMPTS]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two engine cores need two CPUs")
def test_two_engine_cores_share_the_requests_and_answer_as_one(reference):
    server = RemoteServer("--dtype", "float32", "--data-parallel-size", "2")
    try:
        assert "engine core bound to CPUs" in server.logs()
        client = server.client()
        assert [complete(client, p) for p in PROMPTS] == reference  # one at a time: taken in turn
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # all at once: by load
            assert list(pool.map(lambda p: complete(client, p), PROMPTS)) == reference
        counts = successes_by_engine(server)
        assert set(counts) == {"0", "1"}
        assert counts["0"] >= 4 and counts["1"] >= 4 and counts["0"] + counts["1"] == 2 * len(PROMPTS)
    finally:
        server.stop()


def test_bad_data_parallel_settings_are_refused():
    with pytest.raises(ValueError, match=r"data_parallel_rank must be an int in \[0, data_parallel_size - 1 = 1\]"):
        LLM(data_parallel_size=2, data_parallel_rank=2)
    with pytest.raises(ValueError, match="LLM\\(...\\) runs one engine in this process"):
        LLM(data_parallel_size=2)
    done = subprocess.run([sys.executable, "-m", "sluice.entrypoints.cli", "serve", "--port", str(free_port()),
                           "--data-parallel-size", "4096"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "data_parallel_size=4096 (--data-parallel-size) needs a CPU per engine core" in done.stderr


def _router(*workers: str) -> tuple[subprocess.Popen, str]:
    return start_vllm_router("--policy", "round_robin", "--worker-urls", *workers)


def test_replicas_behind_vllm_router(reference):
    """Each replica is rank r of 2 (its metrics say engine=r); the router spreads requests over
    both, and routes around one that was killed."""
    replicas = [RemoteServer("--dtype", "float32", "--data-parallel-size", "2", "--data-parallel-rank", str(rank))
                for rank in (0, 1)]
    router = None
    try:
        router, url = _router(*(replica.url for replica in replicas))
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        assert [complete(client, p) for p in PROMPTS] == reference
        assert successes_by_engine(replicas[0]) == {"0": len(PROMPTS) / 2}
        assert successes_by_engine(replicas[1]) == {"1": len(PROMPTS) / 2}
        replicas[1].stop()
        assert [complete(client, p) for p in PROMPTS[:3]] == reference[:3]
        assert successes_by_engine(replicas[0]) == {"0": len(PROMPTS) / 2 + 3}
    finally:
        if router is not None:
            router.kill()
            router.wait()
        for replica in replicas:
            replica.stop()
