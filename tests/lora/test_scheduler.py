"""max_loras in the scheduler (model-free), adapter-keyed prefix caching and an adapter that no
longer loads (a real engine)."""

from __future__ import annotations

import re
import shutil

from sluice import LLM, SamplingParams
from sluice.config import SchedulerConfig
from sluice.core.kv_cache_manager import KVCacheManager
from sluice.core.request import Request
from sluice.core.scheduler import Scheduler
from sluice.engine.messages import EngineCoreRequest
from sluice.lora import LoRARequest
from tests.utils import fake_runner_output


def add(sched: Scheduler, rid: str, lora: LoRARequest | None, prompt: list[int]) -> None:
    core = EngineCoreRequest(rid, prompt, SamplingParams(max_tokens=4, ignore_eos=True), eos_token_ids=(),
                             lora_request=lora)
    sched.add_request(Request(core, 4))


def test_at_most_max_loras_adapters_run_and_the_others_wait_deferred():
    sched = Scheduler(SchedulerConfig(), KVCacheManager(64, 4, True), 1024, max_loras=2)
    loras = [LoRARequest(name, i, f"/adapters/{name}") for i, name in enumerate("xyz", start=1)]
    for i, lora in enumerate([loras[0], loras[1], loras[2], None, loras[0]]):
        add(sched, f"r{i}", lora, [1, 2, 3, i])
    out = sched.schedule()
    # r2 (a third adapter) waits; the base-model request and a second x request pass it
    assert list(out.num_scheduled_tokens) == ["r0", "r1", "r3", "r4"]
    stats = sched.scheduler_stats()
    assert (stats.num_waiting_capacity, stats.num_waiting_deferred) == (0, 1)
    assert stats.running_lora_adapters == {"x": 2, "y": 1} and stats.waiting_lora_adapters == {"z": 1}
    while "r2" not in out.num_scheduled_tokens:
        sched.update_from_output(out, fake_runner_output(sched, out))
        out = sched.schedule()
    assert {r.lora_request.lora_name for r in sched.running if r.lora_request} == {"z"}


def test_prefix_cache_is_per_adapter(lora_models):
    model_dir, adapters = lora_models("llama")
    llm = LLM(model_dir, dtype="float32", max_model_len=64, kv_cache_memory_bytes=4 << 20, block_size=4,
              enable_lora=True, max_loras=2)
    a, b = (LoRARequest(name, i, adapters[name]) for i, name in enumerate("ab", start=1))
    prompt = {"prompt_token_ids": list(range(10, 30))}
    params = SamplingParams(temperature=0.0, max_tokens=2)

    def hits(lora) -> int:
        before = llm.get_metrics()["vllm:prefix_cache_hits"]
        llm.generate(prompt, params, use_tqdm=False, lora_request=lora)
        return llm.get_metrics()["vllm:prefix_cache_hits"] - before

    assert hits(a) == 0
    assert hits(b) == 0  # the same tokens under another adapter share no KV
    assert hits(None) == 0  # nor with the base model
    assert hits(b) == 16 and hits(a) == 16  # the same adapter hits its full blocks


def test_an_evicted_adapter_whose_files_are_gone_fails_its_request_only(lora_models, tmp_path):
    model_dir, adapters = lora_models("llama")
    llm = LLM(model_dir, dtype="float32", max_model_len=64, kv_cache_memory_bytes=4 << 20, enable_lora=True,
              max_loras=1, max_cpu_loras=1)
    x, y = (LoRARequest(name, i, str(shutil.copytree(adapters[name], tmp_path / name))) for i, name in
            enumerate("ac", start=1))
    prompt = {"prompt_token_ids": [3, 1, 4, 1, 5]}
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    want = {lora: llm.generate(prompt, params, use_tqdm=False, lora_request=lora)[0].outputs[0].token_ids
            for lora in (x, y, None)}  # y pushed x out of the slot and the CPU cache
    shutil.rmtree(x.lora_path)
    [failed] = llm.generate(prompt, params, use_tqdm=False, lora_request=x)
    assert failed.outputs[0].finish_reason == "error" and not failed.outputs[0].token_ids
    assert re.fullmatch("LoRA adapter 'a' could not be loaded: lora_path .* is not a directory", failed.outputs[0].error)
    for lora in (y, None):  # the engine is still up and right
        assert llm.generate(prompt, params, use_tqdm=False, lora_request=lora)[0].outputs[0].token_ids == want[lora]
