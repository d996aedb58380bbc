"""Helpers shared by tests: the default tokenizer and tiny model configs."""

from __future__ import annotations

import functools
import os

from sluice.loader import resolve_model

TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    path = resolve_model(None).path
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def model_folder_factory(tmp_path_factory, make_model, prefix: str):
    """Factory: key -> a folder holding make_model(key) as transformers saves it, with the SmolLM2
    tokenizer; each key built once."""
    cache: dict[str, str] = {}

    def build(key: str) -> str:
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{prefix}-{key}")
            make_model(key).save_pretrained(folder)
            smollm2_tokenizer().save_pretrained(folder)
            cache[key] = str(folder)
        return cache[key]

    return build


def random_model(config):
    """A transformers model of this config with seeded random float32 weights."""
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def memoryless_llama(folder, vocab_size: int = 64) -> dict:
    """Save a tiny random Llama over `vocab_size` tokens whose attention output is zeroed (its next
    token depends on the current one only) with the SmolLM2 tokenizer; returns its state dict."""
    import torch

    config = tiny_config("llama")
    config.vocab_size = vocab_size
    model = random_model(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    model.save_pretrained(folder)
    smollm2_tokenizer().save_pretrained(folder)
    return model.state_dict()


def tiny_config(arch: str):
    """2 layers, hidden 64, GQA (4 heads, 2 KV heads), the real SmolLM2 vocabulary."""
    import transformers

    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=(arch == "llama"),
        initializer_range=0.3,  # peaky logits: greedy near-ties stay rare
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common, rope_theta=10000.0)
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=16)
    raise ValueError(arch)




def fake_runner_output(scheduler, out, token: int = 7, tokens: dict[str, int] | None = None):
    """What a forward pass would answer a model-free scheduler: for each request that samples this
    step, `tokens[request id]` (default `token`)."""
    from sluice.core.sched_output import RunnerOutput

    sampled = {}
    for rid in out.num_scheduled_tokens:
        request = scheduler.requests.get(rid)
        if request is not None and request.num_computed_tokens == request.num_tokens:
            sampled[rid] = [(tokens or {}).get(rid, token)]
    return RunnerOutput(sampled_token_ids=sampled)
