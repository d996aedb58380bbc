"""The decoder stack in one native call (sluice/models/decoder_stack.py) gives bit for bit the
tokens and logprobs of the same layers run one by one: the default model on its Q4_1 blocks, a
Qwen2 (q/k/v bias) on packed bf16 panels and on int8 blocks; batches mixing prompt chunks and
decodes; after sleep mode moved the weights. Where a layer is not plain (LoRA) the model runs
layer by layer."""

from __future__ import annotations

import pytest
import torch
import transformers

from sluice import LLM, SamplingParams
from sluice.platform import current_platform
from sluice.quantization.gguf import kernel_available

from tests.utils import model_folder_factory, random_model

pytestmark = pytest.mark.skipif(not current_platform("cpu").native_kernels(torch.bfloat16),
                                reason="the native bf16 kernels need AVX-512 BF16")

PROMPTS = ["The capital of France is", "Write a poem about the sea and the wind that blows over it.",
           "1, 2, 3, 4,", "Once upon a time"]
# a small token budget: prompt chunks share steps with other requests' decodes
ENGINE = dict(dtype="bfloat16", max_model_len=256, kv_cache_memory_bytes=32 << 20, max_num_batched_tokens=12,
              enable_prefix_caching=False)


def inner_model(llm: LLM):
    return llm.engine_core.executor.worker.runner.model.model


def generate(llm: LLM) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    outs = [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    return [(o.token_ids, [entry[token].logprob for token, entry in zip(o.token_ids, o.logprobs)]) for o in outs]


def stack_and_layers(llm: LLM):
    """The outputs with the stack, then with the same layers one by one."""
    model = inner_model(llm)
    assert model.decoder_stack is not None
    with_stack = generate(llm)
    stack, model.decoder_stack = model.decoder_stack, None
    try:
        return with_stack, generate(llm)
    finally:
        model.decoder_stack = stack


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    config = transformers.Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                                      initializer_range=0.3)  # head_dim 32: the native attention kernel's
    return model_folder_factory(tmp_path_factory, lambda _: random_model(config), "stack-qwen2")("qwen2")


@pytest.mark.skipif(not kernel_available(), reason="GGUF blocks run on the VNNI kernel only")
def test_default_model_on_its_blocks():
    llm = LLM(**ENGINE)
    assert llm.engine_core.quantization == "gguf"
    with_stack, by_layer = stack_and_layers(llm)
    assert with_stack == by_layer
    weights = inner_model(llm).decoder_stack.pointers.clone()
    llm.sleep()
    llm.wake_up()  # the weights are back at other addresses: the stack was rebuilt
    assert not torch.equal(inner_model(llm).decoder_stack.pointers, weights)
    assert generate(llm) == with_stack


def test_qwen2_with_bias_on_packed_bf16_panels(qwen2_folder, monkeypatch):
    monkeypatch.setenv("SLUICE_LINEAR_PATH", "native")  # every layer on the packed kernel, not a timed choice
    llm = LLM(qwen2_folder, quantization="none", **ENGINE)
    with_stack, by_layer = stack_and_layers(llm)
    assert with_stack == by_layer


@pytest.mark.skipif(not kernel_available(), reason="int8 blocks run on the VNNI kernel only")
def test_qwen2_with_bias_on_int8_blocks(qwen2_folder):
    llm = LLM(qwen2_folder, quantization="int8", **ENGINE)
    with_stack, by_layer = stack_and_layers(llm)
    assert with_stack == by_layer


def test_layers_that_are_not_plain_run_one_by_one(qwen2_folder):
    """With LoRA on, every projection may carry an adapter: no stack. In float32 the stack (bf16
    kernels) has none to serve."""
    assert inner_model(LLM(qwen2_folder, enable_lora=True, max_lora_rank=8, **ENGINE)).decoder_stack is None
    llm = LLM(qwen2_folder, **{**ENGINE, "dtype": "float32"})
    stack = inner_model(llm).decoder_stack
    assert stack is None or not stack.serves(torch.zeros(1, 128))
    assert len(generate(llm)[0][0]) == 16
