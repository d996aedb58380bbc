"""Greedy tokens under a LoRA adapter equal transformers + PEFT's, token for token in float32,
for each Llama-shaped family; a batch mixing adapters gives each request its lone tokens."""

from __future__ import annotations

import os

import peft
import pytest
import torch
import transformers

from sluice import LLM, SamplingParams
from sluice.lora import LoRARequest
from tests.lora.conftest import ADAPTERS
from tests.models.test_parity import check_float32

NUM_TOKENS = 8
PROMPTS = [[1, 17, 42, 7, 99, 3, 250, 8, 61], [5, 200, 31]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)


def peft_model(model_dir: str, adapters: dict[str, str]) -> peft.PeftModel:
    """The base model with every adapter loaded (set_adapter picks one; disable_adapter: none)."""
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = iter(adapters)
    first = next(names)
    model = peft.PeftModel.from_pretrained(base, adapters[first], adapter_name=first)
    for name in names:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def greedy(model, ids: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=NUM_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), [step[0].float() for step in out.logits]


def engine(model_dir: str, **kwargs) -> LLM:
    return LLM(model_dir, dtype="float32", max_model_len=64, kv_cache_memory_bytes=4 << 20, enable_lora=True,
               max_lora_rank=16, **kwargs)


# (arch, adapters): two ranks, rsLoRA or not, across the families
CASES = [("llama", "ab"), ("mistral", "c"), ("qwen2", "b"), ("qwen3", "a"), ("gemma2", "b"), ("phi3", "ac")]


@pytest.mark.parametrize("arch, names", CASES, ids=[arch for arch, _ in CASES])
def test_adapter_tokens_match_peft(arch, names, lora_models):
    model_dir, adapters = lora_models(arch)
    llm = engine(model_dir, max_loras=2)
    hf = peft_model(model_dir, {name: adapters[name] for name in names})
    for index, name in enumerate(names, start=1):
        hf.set_adapter(name)
        lora = LoRARequest(name, index, adapters[name])
        outs = llm.generate([{"prompt_token_ids": ids} for ids in PROMPTS], GREEDY, use_tqdm=False, lora_request=lora)
        for ids, out in zip(PROMPTS, outs):
            tokens, logits = greedy(hf, ids)
            check_float32(out.outputs[0].token_ids, tokens, logits, f"{arch} adapter {name} {ids}", NUM_TOKENS)
    with hf.disable_adapter():
        base, _ = greedy(hf, PROMPTS[-1])
    assert tokens != base, "the adapter should change the tokens"


def test_mixed_batch_equals_each_alone(lora_models):
    """Three adapters and the base model in one batch, max_loras=3: every request gets its lone tokens."""
    model_dir, adapters = lora_models("llama")
    loras = [None] + [LoRARequest(name, i, adapters[name]) for i, name in enumerate(ADAPTERS, start=1)]
    prompts = [{"prompt_token_ids": PROMPTS[i % 2]} for i in range(len(loras))]
    lone_llm = engine(model_dir, max_loras=1, enable_prefix_caching=False)
    lone = [lone_llm.generate([p], GREEDY, use_tqdm=False, lora_request=lora)[0].outputs[0].token_ids
            for p, lora in zip(prompts, loras)]
    assert len({tuple(t) for t in lone}) > 2, "adapters should give different tokens"
    mixed = engine(model_dir, max_loras=3).generate(prompts * 2, GREEDY, use_tqdm=False, lora_request=loras * 2)
    assert [o.outputs[0].token_ids for o in mixed] == lone * 2


def test_default_model_adapter_matches_peft(smollm2_gguf, tmp_path):
    """SmolLM2 (its GGUF dequantized, float32) under a rank-8 adapter on every projection."""
    from tests.lora.conftest import LLAMA_TARGETS, make_adapter
    from tests.models.test_parity import prompt_ids

    folder, name = os.path.dirname(smollm2_gguf), os.path.basename(smollm2_gguf)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=transformers.GgufConfig(dequantize=True)).eval()
    make_adapter(base, LLAMA_TARGETS, 8, 16, False, 0, tmp_path)
    hf = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    ids = prompt_ids()[0]
    llm = LLM(None, dtype="float32", quantization="none", max_model_len=128, kv_cache_memory_bytes=16 << 20,
              enable_lora=True, max_lora_rank=8)
    out = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False, lora_request=LoRARequest("s", 1, str(tmp_path)))
    tokens, logits = greedy(hf, ids)
    check_float32(out[0].outputs[0].token_ids, tokens, logits, "SmolLM2 adapter", NUM_TOKENS)
    with hf.disable_adapter():
        assert greedy(hf, ids)[0] != tokens, "the adapter should change the tokens"


def test_worker_process_gets_the_adapter(lora_models):
    """With the worker in a process of its own (mp): the adapter travels with the request, and a
    bad one is refused as a ValueError, the engine still serving."""
    model_dir, adapters = lora_models("llama")
    llm = engine(model_dir, distributed_executor_backend="mp")
    with pytest.raises(ValueError, match="lora_path"):
        llm.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, use_tqdm=False,
                     lora_request=LoRARequest("missing", 9, os.path.join(model_dir, "missing")))
    out = llm.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, use_tqdm=False,
                       lora_request=LoRARequest("a", 1, adapters["a"]))
    hf = peft_model(model_dir, {"a": adapters["a"]})
    tokens, logits = greedy(hf, PROMPTS[0])
    check_float32(out[0].outputs[0].token_ids, tokens, logits, "mp worker", NUM_TOKENS)


@pytest.fixture(scope="module")
def phi3_mixed(lora_models) -> tuple[str, list, list[dict], list[list[int]]]:
    """Phi-3, a batch mixing two adapters and the base model, and one rank's tokens for it."""
    model_dir, adapters = lora_models("phi3")
    loras = [None] + [LoRARequest(name, i, adapters[name]) for i, name in enumerate("ab", start=1)]
    prompts = [{"prompt_token_ids": PROMPTS[i % 2]} for i in range(len(loras))]
    one = [o.outputs[0].token_ids for o in engine(model_dir, max_loras=2).generate(
        prompts, GREEDY, use_tqdm=False, lora_request=loras)]
    assert len({tuple(t) for t in one}) == 3, "adapters should give different tokens"
    return model_dir, loras, prompts, one


@pytest.mark.parametrize("ranks", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}], ids=["tp2", "pp2"])
def test_split_adapters_equal_one_rank(ranks, phi3_mixed):
    """Phi-3's adapters split as its layers: under TP=2, B by output rows on the fused qkv_proj and
    gate_up_proj (by heads and columns, as their weights), A by input columns on o and down, whose
    partial deltas join the base's all-reduce; under PP=2, each stage holds its own layers'
    adapter weights. A batch mixing two adapters and the base model gives one rank's tokens."""
    model_dir, loras, prompts, one = phi3_mixed
    llm = engine(model_dir, max_loras=2, **ranks)
    try:
        two = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=loras)
        assert [o.outputs[0].token_ids for o in two] == one
    finally:
        llm.engine_core.shutdown()
