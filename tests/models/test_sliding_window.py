"""Sliding-window attention end to end: tiny random Mistral (a window on every layer) and Qwen2
(use_sliding_window: a window on layer 1 only) whose prompts run several windows long, against
transformers: logits through the paged cache, then greedy tokens through the engine (float32
token for token; bfloat16, the native kernel where the CPU has it, by vLLM's top-5 rule)."""

from __future__ import annotations

import pytest
import torch
import transformers

from sluice import LLM, SamplingParams
from sluice.core.kv_cache_manager import KVCacheSpec, kv_cache_groups
from sluice.layers.attention import layer_windows
from sluice.models.registry import get_model_class

from tests.models.test_model_forward import MiniRunner, hf_logits
from tests.models.test_parity import NUM_TOKENS, check_bfloat16, check_float32, hf_greedy
from tests.unit.test_hybrid_kv_cache import lone_request_fits
from tests.utils import model_folder_factory, random_model

WINDOW = 16
PROMPT_LENS = (101, 23, 70)  # six windows, under two, four
# head_dim 32: the native kernel's smallest shape
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, vocab_size=49152, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=2, initializer_range=0.3)
CONFIGS = {
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=WINDOW,
                                                  architectures=["MistralForCausalLM"]),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW,
                                              max_window_layers=1, architectures=["Qwen2ForCausalLM"]),
}


def windowed_config(arch: str):
    return CONFIGS[arch]()


@pytest.fixture(scope="session")
def windowed_model_dir(tmp_path_factory):
    """Factory: arch -> folder with a tiny random windowed model and the SmolLM2 tokenizer."""
    return model_folder_factory(tmp_path_factory, lambda arch: random_model(windowed_config(arch)), "windowed")


def long_prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def test_layer_windows_follow_transformers():
    mistral, qwen2 = (get_model_class(windowed_config(a))(windowed_config(a)) for a in ("mistral", "qwen2"))
    assert [layer.self_attn.attn.params.sliding_window for layer in mistral.model.layers] == [WINDOW, WINDOW]
    assert [layer.self_attn.attn.params.sliding_window for layer in qwen2.model.layers] == [None, WINDOW]
    # one KV cache group for Mistral, windowed; Qwen2's global and windowed layers form one group each
    assert [g.sliding_window for g in kv_cache_groups(layer_windows(mistral))] == [WINDOW]
    assert [(g.sliding_window, g.layers) for g in kv_cache_groups(layer_windows(qwen2))] == [(None, (0,)),
                                                                                            (WINDOW, (1,))]
    plain = transformers.Qwen2Config(**COMMON, sliding_window=WINDOW, max_window_layers=1,  # use_sliding_window off
                                     architectures=["Qwen2ForCausalLM"])
    assert [g.sliding_window for g in kv_cache_groups(layer_windows(get_model_class(plain)(plain)))] == [None]


@pytest.mark.parametrize("arch", CONFIGS)
def test_chunked_prefill_and_decode_logits_match_hf(arch, windowed_model_dir):
    """Chunks that start inside, at and past a window, beside another request, in blocks of 4."""
    folder = windowed_model_dir(arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = get_model_class(hf.config)(hf.config).eval()
    ours.load_weights(hf.state_dict().items())
    prompt, other = long_prompts()[0][:60], long_prompts()[1]
    runner = MiniRunner(ours, num_blocks=64, block_size=4)
    chunks = [runner.step({0: prompt[:13], 1: other})[0], runner.step({0: prompt[13:18]})[0],
              runner.step({1: [5], 0: prompt[18:60]})[0]]
    torch.testing.assert_close(torch.cat(chunks), hf_logits(hf, prompt), atol=1e-4, rtol=1e-4)
    seq = list(prompt)
    for _ in range(3):
        seq.append(int(chunks[-1][-1].argmax()))
        chunks.append(runner.step({0: seq[-1:]})[0])
        torch.testing.assert_close(chunks[-1][0], hf_logits(hf, seq)[-1], atol=1e-4, rtol=1e-4)


def run_sluice(folder: str, dtype: str, logprobs: int | None = None):
    llm = LLM(folder, dtype=dtype, max_model_len=512, kv_cache_memory_bytes=8 << 20)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=logprobs)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in long_prompts()], params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


@pytest.mark.parametrize("arch", CONFIGS)
def test_greedy_float32_matches_hf(arch, windowed_model_dir):
    folder = windowed_model_dir(arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for ids, out in zip(long_prompts(), run_sluice(folder, "float32")):
        theirs, logits = hf_greedy(hf, ids)
        check_float32(out.token_ids, theirs, logits, f"{arch} {len(ids)}-token prompt")


def test_greedy_bfloat16_matches_hf(windowed_model_dir):
    arch = "mistral"
    folder = windowed_model_dir(arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    for ids, out in zip(long_prompts(), run_sluice(folder, "bfloat16", logprobs=5)):
        theirs, logits = hf_greedy(hf, ids)
        check_bfloat16(out.token_ids, [set(d) for d in out.logprobs], theirs, logits, f"{arch} bf16 {len(ids)}")


def test_a_request_longer_than_the_whole_cache_runs_when_every_layer_is_windowed(windowed_model_dir):
    """4 usable blocks of 16 hold 64 tokens: Mistral's 101-token prompt plus 32 generated still
    fits (its prefill in chunks the cache holds, its blocks behind the window back to the pool),
    matching transformers; Qwen2's global layer keeps every block of its KV cache group, so the same
    prompt is refused (7 blocks of the full group and 2 of the sliding one)."""
    small = dict(dtype="float32", max_model_len=512, block_size=16, num_gpu_blocks_override=5)
    ids = long_prompts()[0]
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
    folder = windowed_model_dir("mistral")
    out = LLM(folder, **small).generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs, logits = hf_greedy(hf, ids)
    check_float32(out.token_ids, theirs, logits, "mistral, 101-token prompt in a 64-token cache")
    refused = r"a request of 102 tokens needs 9 KV blocks \(2 KV cache groups: 1 full attention, 1 sliding window 16\)"
    with pytest.raises(ValueError, match=refused + "; the whole cache holds 4 blocks"):
        LLM(windowed_model_dir("qwen2"), **small).generate([{"prompt_token_ids": ids}], params, use_tqdm=False)


@pytest.mark.parametrize("window, block_size", [(16, 16), (20, 8), (5, 4)])
def test_blocks_needed_is_what_a_lone_request_holds(window, block_size):
    """A cache of exactly blocks_needed(n) blocks (+ the null block) runs a lone windowed request
    to n tokens, in chunks as large as max_new_tokens allows, one token at a time, or any mix;
    one block fewer does not, at some step."""
    num_tokens = 150
    needed = KVCacheSpec(10**6, block_size, (window,)).blocks_needed(num_tokens)

    def run(num_blocks: int, max_chunk: int) -> bool:
        return lone_request_fits(num_blocks, block_size, (window,), num_tokens, max_chunk)

    assert all(run(needed, max_chunk) for max_chunk in (1, 3, 64, num_tokens))
    assert not run(needed - 1, 1)
    full, windowed = KVCacheSpec(4, 16), KVCacheSpec(4, 16, (16,))
    assert (full.blocks_needed(102), windowed.blocks_needed(102)) == (7, 2) and not full.fits(102)
