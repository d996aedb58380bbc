"""EAGLE and EAGLE-3 heads are lossless: greedy output with them equals greedy output without, on
every scheduler path, whatever the head guesses. Heads are written in the EAGLE repository's
layout in the test: one that copies a memoryless target (its drafts are always right) and random
ones (mostly wrong)."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import transformers

from sluice import LLM, SamplingParams

from tests.utils import memoryless_llama, tiny_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
COMMON = dict(dtype="float32", max_model_len=256, block_size=16)
VOCAB = 64


def prompts() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"prompt_token_ids": torch.randint(3, VOCAB, (n,), generator=g).tolist()} for n in (5, 23, 40, 9)]


def tokens(llm: LLM, batch: list[dict]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(batch, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A tiny Llama over 64 tokens whose next token depends on the current one only: its folder
    and weights."""
    folder = tmp_path_factory.mktemp("eagle-target")
    return str(folder), memoryless_llama(folder, VOCAB)


def _save_head(folder, config: transformers.LlamaConfig, tensors: dict[str, torch.Tensor]) -> str:
    """As the EAGLE repository ships heads: a Llama config naming the head's architecture."""
    config.architectures = ["LlamaForCausalLMEagle3" if "d2t" in tensors else "LlamaForCausalLM"]
    config.save_pretrained(folder)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def eagle_heads(tmp_path_factory, target) -> dict[str, str]:
    """EAGLE-1 heads: "perfect" repeats the target's layers on fc = [I | 0] (the embedding of token
    p + 1), so it outputs the target's hidden state for it (before the final norm, which only scales
    it): every draft is the target's greedy token. "random" has random layers and its own embeddings."""
    _, weights = target
    config = tiny_config("llama")
    config.vocab_size = VOCAB
    H = config.hidden_size
    perfect = {name.removeprefix("model."): tensor for name, tensor in weights.items()
               if name.startswith("model.layers.") and "layers.0.input_layernorm" not in name}
    perfect["fc.weight"] = torch.cat((torch.eye(H), torch.zeros(H, H)), dim=1)
    g = torch.Generator().manual_seed(2)
    random = {name: torch.randn(t.shape, generator=g) * 0.3 for name, t in perfect.items()}
    random["fc.bias"] = torch.randn(H, generator=g) * 0.3
    random["embed_tokens.weight"] = torch.randn(VOCAB, H, generator=g)
    return {"perfect": _save_head(tmp_path_factory.mktemp("eagle-perfect"), config, perfect),
            "random": _save_head(tmp_path_factory.mktemp("eagle-random"), config, random)}


@pytest.fixture(scope="module")
def eagle3_head(tmp_path_factory) -> str:
    """A random EAGLE-3 head over a reduced vocabulary of 32: draft id i stands for target id 2i."""
    config = tiny_config("llama")
    config.vocab_size = VOCAB
    config.num_hidden_layers = 1
    config.draft_vocab_size = 32
    config.eagle_aux_hidden_state_layer_ids = [0, 1, 1]
    H, D = config.hidden_size, config.hidden_size // config.num_attention_heads
    g = torch.Generator().manual_seed(3)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.3

    tensors = {
        "fc.weight": rand(H, 3 * H), "norm.weight": torch.ones(H), "lm_head.weight": rand(32, H),
        "d2t": torch.arange(32, dtype=torch.long), "t2d": torch.arange(VOCAB) % 2 == 0,
        "midlayer.self_attn.q_proj.weight": rand(config.num_attention_heads * D, 2 * H),
        "midlayer.self_attn.k_proj.weight": rand(config.num_key_value_heads * D, 2 * H),
        "midlayer.self_attn.v_proj.weight": rand(config.num_key_value_heads * D, 2 * H),
        "midlayer.self_attn.o_proj.weight": rand(H, config.num_attention_heads * D),
        "midlayer.mlp.gate_proj.weight": rand(config.intermediate_size, H),
        "midlayer.mlp.up_proj.weight": rand(config.intermediate_size, H),
        "midlayer.mlp.down_proj.weight": rand(H, config.intermediate_size),
        **{f"midlayer.{norm}.weight": torch.ones(H)
           for norm in ("input_layernorm", "hidden_norm", "post_attention_layernorm")},
    }
    return _save_head(tmp_path_factory.mktemp("eagle3"), config, tensors)


@pytest.fixture(scope="module")
def plain_reference(target) -> list[list[int]]:
    return tokens(LLM(target[0], **COMMON), prompts())


def _spec(method: str, head: str, k: int = 3) -> dict:
    return {"method": method, "model": head, "num_speculative_tokens": k}


@pytest.mark.parametrize("head", ["perfect", "random", "eagle3"])
def test_eagle_heads_equal_plain_lone_and_batched(target, eagle_heads, eagle3_head, plain_reference, head):
    method, path = ("eagle3", eagle3_head) if head == "eagle3" else ("eagle", eagle_heads[head])
    llm = LLM(target[0], **COMMON, speculative_config=_spec(method, path))
    assert [tokens(llm, [p])[0] for p in prompts()] == plain_reference
    assert tokens(llm, prompts()) == plain_reference
    metrics = llm.get_metrics()
    drafts, accepted = metrics["vllm:spec_decode_num_draft_tokens"], metrics["vllm:spec_decode_num_accepted_tokens"]
    assert drafts > 0
    if head == "perfect":
        assert accepted == drafts
    else:
        assert accepted < 0.5 * drafts


def test_eagle_with_preemption_chunks_and_prefix_hits_equals_plain(target, eagle_heads, plain_reference):
    llm = LLM(target[0], **COMMON, enable_prefix_caching=True, num_gpu_blocks_override=8, max_num_batched_tokens=16,
              speculative_config=_spec("eagle", eagle_heads["perfect"]))
    assert tokens(llm, prompts()) == plain_reference
    assert llm.get_metrics()["vllm:num_preemptions"] > 0
    assert tokens(llm, prompts()) == plain_reference
    metrics = llm.get_metrics()
    assert metrics["vllm:prefix_cache_hits"] > 0
    assert metrics["vllm:spec_decode_num_accepted_tokens"] > 0


def test_eagle3_in_a_worker_process_equals_plain(target, eagle3_head, plain_reference):
    llm = LLM(target[0], **COMMON, distributed_executor_backend="mp", speculative_config=_spec("eagle3", eagle3_head))
    assert tokens(llm, prompts()) == plain_reference


def test_eagle_heads_split_over_two_ranks_equal_one_rank(target, eagle_heads, eagle3_head, plain_reference):
    """TP=2 (gloo): each head's layers split as the target's (EAGLE-3's q/k/v over its doubled
    width by heads too), its own embedding and reduced lm_head whole on each rank. The perfect
    EAGLE-1 head (the target's embedding and lm_head, split by vocabulary) still drafts only right
    tokens; the random EAGLE-3 head drafts what it drafts on one rank (as many accepted)."""
    one = LLM(target[0], **COMMON, speculative_config=_spec("eagle3", eagle3_head))
    assert tokens(one, prompts()) == plain_reference
    want = one.get_metrics()["vllm:spec_decode_num_accepted_tokens"]
    for method, path in (("eagle", eagle_heads["perfect"]), ("eagle3", eagle3_head)):
        llm = LLM(target[0], **COMMON, tensor_parallel_size=2, speculative_config=_spec(method, path))
        try:
            assert tokens(llm, prompts()) == plain_reference
            metrics = llm.get_metrics()
            drafts, accepted = (metrics[f"vllm:spec_decode_num_{kind}_tokens"] for kind in ("draft", "accepted"))
            assert drafts > 0 and accepted == (drafts if method == "eagle" else want), (drafts, accepted, want)
        finally:
            llm.engine_core.shutdown()


def test_heads_that_do_not_fit_the_target_are_refused(tmp_path, target, eagle_heads, smollm2_gguf):
    with pytest.raises(ValueError, match="target has hidden_size 576 and vocab_size 49152"):
        LLM(smollm2_gguf, **COMMON, speculative_config=_spec("eagle", eagle_heads["random"]))
    folder = tmp_path / "eagle3-bad-d2t"
    folder.mkdir()
    head = transformers.LlamaConfig(**{**tiny_config("llama").to_dict(), "vocab_size": VOCAB, "num_hidden_layers": 1,
                                       "draft_vocab_size": 4})
    H = head.hidden_size
    tensors = {name: torch.zeros(shape) for name, shape in {
        "fc.weight": (H, 3 * H), "norm.weight": (H,), "lm_head.weight": (4, H),
        "midlayer.self_attn.q_proj.weight": (H, 2 * H), "midlayer.self_attn.k_proj.weight": (H // 2, 2 * H),
        "midlayer.self_attn.v_proj.weight": (H // 2, 2 * H), "midlayer.self_attn.o_proj.weight": (H, H),
        "midlayer.mlp.gate_proj.weight": (128, H), "midlayer.mlp.up_proj.weight": (128, H),
        "midlayer.mlp.down_proj.weight": (H, 128), "midlayer.input_layernorm.weight": (H,),
        "midlayer.hidden_norm.weight": (H,), "midlayer.post_attention_layernorm.weight": (H,)}.items()}
    tensors["d2t"] = torch.tensor([0, 0, 0, VOCAB], dtype=torch.long)  # the last maps past the vocabulary
    _save_head(folder, head, tensors)
    with pytest.raises(ValueError, match=r"EAGLE-3 reads 3 target layers, each in \[0, 1\]; "
                                         r"eagle_aux_hidden_state_layer_ids is \[2, 1, -1\]"):
        LLM(target[0], **COMMON, speculative_config=_spec("eagle3", str(folder)))
    head.eagle_aux_hidden_state_layer_ids = [0, 1, 1]
    _save_head(folder, head, tensors)
    with pytest.raises(ValueError, match="d2t maps draft tokens to ids in \\[0, 67\\], outside the target's vocabulary of 64"):
        LLM(target[0], **COMMON, speculative_config=_spec("eagle3", str(folder)))
