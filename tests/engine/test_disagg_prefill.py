"""Disaggregated prefill between two engines in this process (their KV moves over loopback TCP):
a prompt prefilled on the producer and decoded on the consumer gives one engine's tokens, the
consumer computes only the last prompt token, no block leaks on either side, and a transfer that
fails or expires falls back to a local prefill (or fails the request, if asked)."""

from __future__ import annotations

import time

import pytest

from sluice import LLM, SamplingParams
from sluice.config import EngineConfig
from tests.server.utils import free_port

COMMON = dict(dtype="float32", max_model_len=256, block_size=16, kv_cache_memory_bytes=16 << 20)
PROMPT = list(range(100, 150))  # 50 tokens: 3 full blocks and a partial one
MAX_TOKENS = 12


def connector(role: str, **extra) -> dict:
    return {"kv_connector": "SluiceZmqConnector", "kv_role": role, **extra}


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    """A producer (worker in this process, short hold timeout) and a consumer (worker in a
    process of its own, so the transfer plans cross the executor's wire)."""
    folder = tiny_model_dir("llama")
    producer = LLM(folder, **COMMON, kv_transfer_config=connector(
        "kv_producer", kv_port=free_port(), kv_connector_extra_config={"abort_request_timeout": 1.0}))
    consumer = LLM(folder, **COMMON, distributed_executor_backend="mp", kv_transfer_config=connector(
        "kv_consumer", kv_connector_extra_config={"transfer_timeout": 2.0}))
    return producer, consumer


def greedy(max_tokens: int = MAX_TOKENS, kv_transfer_params: dict | None = None) -> SamplingParams:
    extra = None if kv_transfer_params is None else {"kv_transfer_params": kv_transfer_params}
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra)


def prefill(producer: LLM, prompt: list[int]) -> dict:
    """vLLM's proxy step one: max_tokens=1 on the producer; its kv_transfer_params say where the KV is."""
    out = producer.generate([prompt], greedy(1, {"do_remote_decode": True}), use_tqdm=False)[0]
    params = out.kv_transfer_params
    assert params["do_remote_prefill"] is True and params["remote_port"] > 0
    return params


def decode(consumer: LLM, prompt: list[int], params: dict) -> list[int]:
    return consumer.generate([prompt], greedy(kv_transfer_params=params), use_tqdm=False)[0].outputs[0].token_ids


def sources(llm: LLM) -> dict[str, float]:
    """Prompt tokens of finished requests by where their KV came from (vLLM's metric)."""
    samples = llm.engine_core.metrics.registry.collect()
    return {s.labels["source"]: s.value for family in samples if family.name == "vllm:prompt_tokens_by_source"
            for s in family.samples if s.name.endswith("_total")}


def held_blocks(llm: LLM) -> int:
    pool = llm.engine_core.kv.pool
    return pool.num_usable_blocks - pool.num_free_blocks()


def step_until_released(producer: LLM, timeout: float = 10.0) -> None:
    """The producer frees pulled (or expired) blocks on its next steps; an idle offline engine
    takes one per generate call, so step it by hand here."""
    deadline = time.monotonic() + timeout
    while producer.engine_core.scheduler.kv_held and time.monotonic() < deadline:
        producer.engine_core.step()
    assert not producer.engine_core.scheduler.kv_held


def test_prefilled_on_one_decoded_on_another_gives_one_engines_tokens(engines):
    producer, consumer = engines
    reference = producer.generate([PROMPT], greedy(), use_tqdm=False)[0].outputs[0].token_ids
    before = sources(consumer)
    params = prefill(producer, PROMPT)
    assert held_blocks(producer) == 4  # the prompt's blocks wait for the pull
    assert decode(consumer, PROMPT, params) == reference
    after = sources(consumer)
    assert after["external_kv_transfer"] - before["external_kv_transfer"] == len(PROMPT) - 1
    assert after["local_compute"] - before["local_compute"] == 1  # the last prompt token, for its logits
    step_until_released(producer)
    assert held_blocks(producer) == 0 and held_blocks(consumer) == 0


def test_a_consumer_prefix_hit_pulls_only_the_rest(engines):
    producer, consumer = engines
    prompt = PROMPT[:32] + list(range(300, 340))
    reference = producer.generate([prompt], greedy(), use_tqdm=False)[0].outputs[0].token_ids
    consumer.generate([PROMPT], greedy(1), use_tqdm=False)  # the consumer caches the first two blocks
    before = sources(consumer)
    assert decode(consumer, prompt, prefill(producer, prompt)) == reference
    after = sources(consumer)
    assert after["local_cache_hit"] - before["local_cache_hit"] == 32
    assert after["external_kv_transfer"] - before["external_kv_transfer"] == len(prompt) - 1 - 32
    step_until_released(producer)
    assert held_blocks(producer) == 0 and held_blocks(consumer) == 0


def test_unpulled_blocks_expire_and_a_late_pull_prefills_locally(engines):
    producer, consumer = engines
    prompt = list(range(400, 440))
    reference = producer.generate([prompt], greedy(), use_tqdm=False)[0].outputs[0].token_ids
    params = prefill(producer, prompt)
    time.sleep(1.1)  # abort_request_timeout=1.0
    step_until_released(producer)
    assert held_blocks(producer) == 0
    before = sources(consumer)
    assert decode(consumer, prompt, params) == reference  # "released" answer: recomputed here
    after = sources(consumer)
    assert after["external_kv_transfer"] == before["external_kv_transfer"]
    assert held_blocks(consumer) == 0


def test_a_failed_pull_prefills_locally_or_fails_the_request(engines, tiny_model_dir):
    producer, consumer = engines
    prompt = list(range(500, 530))
    reference = producer.generate([prompt], greedy(), use_tqdm=False)[0].outputs[0].token_ids
    nobody = {"do_remote_prefill": True, "remote_block_ids": [1, 2], "remote_host": "127.0.0.1",
              "remote_port": free_port(), "remote_request_id": "gone"}
    started = time.monotonic()
    assert decode(consumer, prompt, nobody) == reference  # transfer_timeout=2.0, then a local prefill
    assert time.monotonic() - started < 30
    assert held_blocks(consumer) == 0
    strict = LLM(tiny_model_dir("llama"), **{**COMMON, "block_size": 32}, kv_transfer_config=connector(
        "kv_consumer", kv_load_failure_policy="fail"))
    params = prefill(producer, prompt)  # block_size 16 there, 32 here: the layouts differ
    failed = strict.generate([prompt], greedy(kv_transfer_params=params), use_tqdm=False)[0].outputs[0]
    assert failed.finish_reason == "error" and "KV cache layouts differ" in failed.error
    assert held_blocks(strict) == 0
    step_until_released(producer)  # the refused pull left the hold to its timeout


@pytest.mark.parametrize("config, message", [
    ({"kv_connector": "NixlConnector", "kv_role": "kv_both"}, "kv_connector must be one of SluiceZmqConnector"),
    ({"kv_connector": "SluiceZmqConnector", "kv_role": "producer"}, "kv_role must be one of kv_producer"),
    ({"kv_connector": "SluiceZmqConnector", "kv_role": "kv_both", "kv_port": 70000},
     r"kv_port must be an int in \[1, 65535\]"),
    ({"kv_connector": "SluiceZmqConnector", "kv_role": "kv_both", "kv_buffer_device": "cuda"},
     "kv_buffer_device must be 'cpu'"),
    ({"kv_connector": "SluiceZmqConnector", "kv_role": "kv_both", "kv_bogus": 1}, "unknown key"),
    ({"kv_connector": "SluiceZmqConnector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"transfer_timeout": 0}}, "transfer_timeout must be a number of seconds > 0"),
])
def test_bad_kv_transfer_config_is_refused_at_start(config, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig.from_kwargs(kv_transfer_config=config)


def test_bad_kv_transfer_params_are_refused():
    with pytest.raises(ValueError, match="kv_transfer_params.remote_block_ids must be a non-empty list"):
        SamplingParams(extra_args={"kv_transfer_params": {"do_remote_prefill": True, "remote_block_ids": []}})
    with pytest.raises(ValueError, match="kv_transfer_params.remote_port must be an int"):
        SamplingParams(extra_args={"kv_transfer_params": {
            "do_remote_prefill": True, "remote_block_ids": [1], "remote_host": "h", "remote_port": "x"}})


def test_a_taken_kv_port_is_a_clear_error(engines, tiny_model_dir):
    producer, _ = engines
    port = producer.engine_core.config.kv_transfer.kv_port
    with pytest.raises(ValueError, match=f"cannot serve KV blocks on tcp://127.0.0.1:{port}"):
        LLM(tiny_model_dir("llama"), **COMMON, kv_transfer_config=connector("kv_both", kv_port=port))
