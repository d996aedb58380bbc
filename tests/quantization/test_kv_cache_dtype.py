"""--kv-cache-dtype fp8 / int8 on the default model: perplexity close to the model-dtype cache,
twice the blocks in the same bytes, and greedy tokens that no scheduler path changes within a
dtype (preemption, prefix-cache hits)."""

from __future__ import annotations

import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sluice import LLM, SamplingParams

from tests.quantization.utils import ENGINE, perplexity
from tests.utils import model_folder_factory, random_model, tiny_config

COMPACT = ("fp8", "int8")


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    """Per KV cache dtype: the perplexity of the shipped text, the usable blocks and the bytes a
    block takes, all from one engine with the same KV cache budget."""
    results = {}
    for kv_cache_dtype in ("auto", *COMPACT):
        llm = LLM(**ENGINE, kv_cache_dtype=kv_cache_dtype)
        core = llm.engine_core
        results[kv_cache_dtype] = {"perplexity": perplexity(llm), "blocks": core.kv.pool.num_usable_blocks,
                                   "bytes_per_block": core.executor.describe()["bytes_per_block"]}
        del llm, core
    return results


@pytest.mark.parametrize("kv_cache_dtype", COMPACT)
def test_perplexity_within_2_percent_of_the_model_dtype_cache(runs, kv_cache_dtype):
    assert runs[kv_cache_dtype]["perplexity"] == pytest.approx(runs["auto"]["perplexity"], rel=0.02)


@pytest.mark.parametrize("kv_cache_dtype", COMPACT)
def test_same_budget_holds_twice_the_blocks(runs, kv_cache_dtype):
    """A bf16 row of head_dim elements becomes head_dim bytes and a 2-byte scale: 64 -> 66 bytes of
    128 for SmolLM2, 1.94x the blocks."""
    compact, bf16 = runs[kv_cache_dtype], runs["auto"]
    for run in (compact, bf16):
        assert run["blocks"] + 1 == ENGINE["kv_cache_memory_bytes"] // run["bytes_per_block"]  # one is reserved
    assert compact["bytes_per_block"] / bf16["bytes_per_block"] < 0.52
    assert compact["blocks"] / bf16["blocks"] > 1.9


GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
# float32, so batching itself changes no token; a tiny model so each path runs in a moment
PATHS = dict(dtype="float32", max_model_len=256, block_size=16)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """2 layers, 2 heads of 32 sharing one KV head: a head_dim the native kernel takes."""
    config = tiny_config("llama")
    config.num_attention_heads, config.num_key_value_heads = 2, 1
    return model_folder_factory(tmp_path_factory, lambda _: random_model(config), "kv8")("llama")


def greedy_tokens(llm: LLM, prompts: list[dict]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("kv_cache_dtype", COMPACT)
def test_preemption_and_prefix_hits_give_the_lone_tokens(tiny_llama, kv_cache_dtype, caplog):
    """Each request alone on a roomy cache, then all four on 11 usable blocks with prefix caching:
    they are preempted and recomputed, and hit the shared prefix's blocks, and the same batch
    once more hits whole cached prompts; every path gives the lone tokens."""
    shared = list(range(1000, 1040))
    prompts = [{"prompt_token_ids": shared + list(range(2000 + 50 * i, 2010 + 50 * i + 5 * i))} for i in range(4)]
    roomy = LLM(tiny_llama, **PATHS, kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False,
                kv_cache_memory_bytes=16 << 20)
    lone = [greedy_tokens(roomy, [p])[0] for p in prompts]
    del roomy
    with caplog.at_level(logging.INFO, logger="sluice"):
        tight = LLM(tiny_llama, **PATHS, kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=True,
                    num_gpu_blocks_override=12)
    assert f"kv_cache_dtype {kv_cache_dtype}" in caplog.text  # the startup log names it, and so does a gauge
    info = [sample for family in text_string_to_metric_families(tight.engine_core.metrics.render().decode())
            for sample in family.samples if sample.name == "vllm:cache_config_info"]
    assert [sample.labels["cache_dtype"] for sample in info] == [kv_cache_dtype]
    assert greedy_tokens(tight, prompts) == lone
    metrics = tight.get_metrics()
    assert metrics["vllm:num_preemptions"] > 0 and metrics["vllm:prefix_cache_hits"] > 0
    assert greedy_tokens(tight, prompts) == lone
    assert tight.get_metrics()["vllm:prefix_cache_hits"] > metrics["vllm:prefix_cache_hits"]
