"""The OpenAI-compatible API of a real server, driven by the official `openai` client and httpx."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest

from sluice import LLM, SamplingParams
from sluice.quantization.gguf import kernel_available
from tests.server.conftest import MODEL_NAME

CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def offline_llm():
    return LLM(max_model_len=1024, kv_cache_memory_bytes=128 << 20, dtype="float32")


def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with server.http() as http:
        assert http.get("/health").status_code == 200
        assert http.get("/version").json()["version"]
        # vLLM's model card: OpenAI's fields, root and max_model_len, and the weights' quantization in use
        # (the default model is a GGUF: on its blocks where the kernel runs); the KV cache dtype is in the cache info
        card = client.models.retrieve(MODEL_NAME).to_dict()
        assert set(card) == {"id", "object", "created", "owned_by", "root", "max_model_len", "quantization"}
        quantization = "gguf" if kernel_available() else "none"
        assert card["quantization"] == quantization == client.models.list().data[0].to_dict()["quantization"]
        metrics = http.get("/metrics").text
        assert 'cache_dtype="auto"' in metrics.split("vllm:cache_config_info{")[-1]
        assert f'quantization="{quantization}"' in metrics.split("sluice:model_config_info{")[-1].split("\n")[0]


def test_chat_matches_offline_llm_streamed_and_not(client, offline_llm):
    expected = offline_llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, temperature=0, max_tokens=24)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.outputs[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.outputs[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_completion_matches_offline_llm_streamed_and_not(client, offline_llm):
    prompt = "The three primary colours are"
    expected = offline_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    reply = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=20)
    assert reply.choices[0].text == expected.outputs[0].text
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.completion_tokens == len(expected.outputs[0].token_ids)
    stream = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=20, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected.outputs[0].text

    # Token ids in, echo on: the prompt text comes back in front.
    ids = expected.prompt_token_ids
    echoed = client.completions.create(model=MODEL_NAME, prompt=ids, temperature=0, max_tokens=20, echo=True)
    assert echoed.choices[0].text == prompt + expected.outputs[0].text


def test_list_of_prompts_and_n(server, client):
    prompts = ["One, two,", "A, B,"]
    reply = client.completions.create(model=MODEL_NAME, prompt=prompts, n=2, temperature=1.0, seed=3, max_tokens=8)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
    assert 4 <= reply.usage.completion_tokens <= 4 * 8
    with server.http() as http:
        counts = [http.post("/tokenize", json={"prompt": p}).json()["count"] for p in prompts]
    assert reply.usage.prompt_tokens == sum(counts)  # each prompt counted once, whatever n is
    chat = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, n=2, temperature=1.0, seed=5, max_tokens=12)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content != chat.choices[1].message.content


def test_stop_string(client):
    prompt = "Count: 1, 2, 3, 4, 5,"
    full = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=16).choices[0].text
    assert " 7" in full, full
    cut = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=16, stop=[" 7"])
    assert cut.choices[0].text == full[: full.index(" 7")]
    assert cut.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=16, stop=" 7", stream=True)
    assert "".join(c.choices[0].text for c in chunks) == cut.choices[0].text


def test_logprobs(client):
    reply = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, temperature=0, max_tokens=6,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-4)

    completion = client.completions.create(model=MODEL_NAME, prompt="Hello there", temperature=0, max_tokens=4,
                                           logprobs=2, echo=True)
    logprobs = completion.choices[0].logprobs
    prompt_len = completion.usage.prompt_tokens
    assert len(logprobs.tokens) == prompt_len + completion.usage.completion_tokens
    assert logprobs.token_logprobs[0] is None and all(v <= 0 for v in logprobs.token_logprobs[1:])
    assert "".join(logprobs.tokens) == completion.choices[0].text


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        return client.completions.create(model=MODEL_NAME, prompt="Once upon a time", temperature=1.0, top_p=0.95,
                                         seed=seed, max_tokens=24).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_sixteen_concurrent_requests_get_their_own_greedy_output(client, offline_llm):
    prompts = [f"Write the number {i} in words:" for i in range(16)]
    expected = offline_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)

    def ask(prompt):
        return client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=16).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(ask, prompts))
    assert texts == [e.outputs[0].text for e in expected]


def test_tokenize_detokenize_roundtrip(server):
    with server.http() as http:
        tokens = http.post("/tokenize", json={"prompt": "Hello, world!"}).json()
        assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 1024
        text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
        assert text.endswith("Hello, world!")
        chat = http.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": True}).json()
        assert chat["count"] > tokens["count"]


def wait_for_idle(server, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        idle = metrics["vllm:num_requests_running"] == 0 and metrics["vllm:num_requests_waiting"] == 0
        if idle or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


LONG = {"model": MODEL_NAME, "prompt": "Tell me a very long story.", "max_tokens": 900, "ignore_eos": True,
        "temperature": 0}


def assert_aborted_and_freed(server, before: dict[str, float]) -> None:
    """The request stopped early (not run to max_tokens) and every block it held is free again."""
    after = wait_for_idle(server)
    assert after["vllm:num_requests_running"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0
    assert after["sluice:num_free_blocks"] == before["sluice:num_free_blocks"]
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < LONG["max_tokens"]


def test_client_disconnect_frees_blocks_streaming(server):
    before = wait_for_idle(server)
    with server.http() as http, http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        busy = server.metrics()
        assert busy["vllm:num_requests_running"] == 1 and busy["vllm:kv_cache_usage_perc"] > 0
    assert_aborted_and_freed(server, before)


def test_client_disconnect_frees_blocks_non_streaming(server):
    before = wait_for_idle(server)
    with pytest.raises(httpx.ReadTimeout), server.http() as http:
        http.post("/v1/completions", json=LONG, timeout=1.5)
    assert_aborted_and_freed(server, before)


def test_sse_framing(server):
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 3, "stream": True}
    with server.http() as http:
        raw = http.post("/v1/completions", json=body)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e.removeprefix("data: "))["object"] == "text_completion" for e in events[:-1])


def test_sampling_fields_reach_the_engine(client, offline_llm):
    """vLLM's extra sampling fields (extra_body for the openai client) act as they do offline."""
    prompt = "List the days of the week:"
    fields = {"repetition_penalty": 1.3, "top_k": 5, "min_p": 0.05, "ignore_eos": True, "min_tokens": 4}
    expected = offline_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, frequency_penalty=0.5, **fields),
                                    use_tqdm=False)[0].outputs[0].text
    reply = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=12,
                                      frequency_penalty=0.5, extra_body=fields)
    assert reply.choices[0].text == expected
    plain = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=12).choices[0].text
    assert plain != expected
    chat = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_completion_tokens=3, max_tokens=50)
    assert chat.usage.completion_tokens == 3  # max_completion_tokens wins, as in OpenAI's API


def test_busy_engine_logs_periodic_stats(server, client):
    started = time.monotonic()
    while time.monotonic() - started < 6:  # the core logs every 5 s while it has work
        client.completions.create(model=MODEL_NAME, prompt="Tell me a story.", max_tokens=64,
                                  extra_body={"ignore_eos": True})
    line = next(line for line in server.logs().splitlines() if "engine: prompt" in line)
    assert "generation" in line and "running" in line and "KV cache" in line and "prefix cache hit rate" in line
