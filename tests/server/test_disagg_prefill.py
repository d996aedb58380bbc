"""Disaggregated prefill over HTTP: a producer and a consumer server on loopback, driven by the
official openai client (kv_transfer_params in extra_body, as vLLM's proxy passes them) and by
vllm-router's prefill/decode mode in front of them. The consumer answers as one engine does,
computes only the last prompt token of each prompt, and neither side keeps a block afterwards."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

from tests.server.utils import RemoteServer, free_port, parse_samples, start_vllm_router

MODEL = "tiny"
PROMPT = "The quick brown fox jumps over the lazy dog, and then the dog runs far away into the woods"
CHAT = [{"role": "user", "content": "Tell me a story about a fox and a dog"}]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def servers(tiny_model_dir):
    """(producer, consumer), started together."""
    common = (tiny_model_dir("llama"), "--dtype", "float32", "--served-model-name", MODEL, "--block-size", "16",
              "--max-model-len", "512")
    configs = [{"kv_connector": "SluiceZmqConnector", "kv_role": "kv_producer", "kv_port": free_port()},
               {"kv_connector": "SluiceZmqConnector", "kv_role": "kv_consumer"}]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        started = [pool.submit(RemoteServer, *common, "--kv-transfer-config", json.dumps(c)) for c in configs]
        pair = [future.result() for future in started]
    yield pair
    for server in pair:
        server.stop()


def by_source(server: RemoteServer) -> dict[str, float]:
    return {labels["source"]: value for name, labels, value in parse_samples(httpx.get(server.url + "/metrics").text)
            if name == "vllm:prompt_tokens_by_source_total"}


def wait_for_no_held_blocks(*servers: RemoteServer) -> None:
    """A producer frees pulled blocks on its next engine steps: within moments, not at once."""
    deadline = time.monotonic() + 30
    while any(s.metrics()["vllm:kv_cache_usage_perc"] for s in servers):
        assert time.monotonic() < deadline, "blocks still held 30 s after the requests finished"
        time.sleep(0.1)


def test_prefill_on_the_producer_decode_on_the_consumer(servers):
    producer, consumer = servers
    reference = producer.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                     temperature=0)
    prefill = producer.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0,
                                                   extra_body={"kv_transfer_params": {"do_remote_decode": True}})
    params = prefill.model_extra["kv_transfer_params"]
    assert params["do_remote_prefill"] and params["remote_host"] == "127.0.0.1" and params["remote_block_ids"]
    before = by_source(consumer)
    out = consumer.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                               extra_body={"kv_transfer_params": params})
    assert out.choices[0].text == reference.choices[0].text
    after = by_source(consumer)
    num_prompt = out.usage.prompt_tokens
    assert after["external_kv_transfer"] - before["external_kv_transfer"] == num_prompt - 1
    assert after["local_compute"] - before["local_compute"] == 1  # the last prompt token, for its logits
    wait_for_no_held_blocks(producer, consumer)


def test_behind_vllm_router_prefill_decode_mode(servers):
    """vllm-router sends each request to the producer with max_tokens=1 and kv_transfer_params
    {"do_remote_decode": true}, then to the consumer with the producer's answer."""
    producer, consumer = servers
    direct = producer.client()
    completion = direct.completions.create(model=MODEL, prompt=PROMPT + " again", max_tokens=MAX_TOKENS,
                                           temperature=0)
    chat_completion = direct.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    expected_text, expected_chat = completion.choices[0].text, chat_completion.choices[0].message.content
    router, url = start_vllm_router("--vllm-pd-disaggregation", "--policy", "round_robin",
                                    "--prefill", producer.url, "--decode", consumer.url)
    try:
        client = type(direct)(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        before = by_source(consumer)
        text = client.completions.create(model=MODEL, prompt=PROMPT + " again", max_tokens=MAX_TOKENS,
                                         temperature=0).choices[0].text
        chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
        stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                                stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    finally:
        router.kill()
        router.wait()
    assert (text, chat.choices[0].message.content, streamed) == (expected_text, expected_chat, expected_chat)
    after = by_source(consumer)
    prompts = [completion.usage.prompt_tokens] + 2 * [chat_completion.usage.prompt_tokens]
    # pulled, or found in the consumer's prefix cache (PROMPT's first block; the first chat's blocks)
    loaded = {source: after[source] - before[source] for source in ("external_kv_transfer", "local_cache_hit")}
    assert loaded["local_cache_hit"] >= 16 and sum(loaded.values()) == sum(prompts) - len(prompts)
    assert after["local_compute"] - before["local_compute"] == len(prompts)  # one prompt token per request
    wait_for_no_held_blocks(producer, consumer)


def test_bad_kv_transfer_params_are_a_400(servers):
    _, consumer = servers
    bad = [({"do_remote_prefill": True, "remote_block_ids": "1"}, "kv_transfer_params.remote_block_ids"),
           ({"do_remote_prefill": True, "remote_block_ids": [1], "remote_host": "127.0.0.1", "remote_port": 0,
             "remote_request_id": "x"}, "kv_transfer_params.remote_port must be an int in [1, 65535]")]
    with consumer.http() as http:
        for params, message in bad:
            response = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2,
                                                          "kv_transfer_params": params})
            assert response.status_code == 400
            error = response.json()["error"]
            assert message in error["message"] and error["param"] == "kv_transfer_params"
        response = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "n": 2,
                                                      "kv_transfer_params": {"do_remote_decode": True}})
        assert response.status_code == 400 and "n must be 1" in response.json()["error"]["message"]
