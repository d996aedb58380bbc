"""Our model files against transformers' implementations, through the paged cache."""

import random

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from sluice.layers.attention import build_attention_metadata
from sluice.layers.rotary import get_rope
from sluice.models.registry import MODEL_REGISTRY, get_model_class

SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-6)

GEMMA = dict(head_dim=16, attention_bias=True)  # transformers' Gemma defaults to head_dim 256
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, vocab_size=300, architectures=["LlamaForCausalLM"]),
    "llama31_tied": lambda: transformers.LlamaConfig(
        **SMALL, vocab_size=300, architectures=["LlamaForCausalLM"], tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}, rope_theta=50.0),
    "llama_gelu_yarn": lambda: transformers.LlamaConfig(
        **SMALL, vocab_size=300, architectures=["LlamaForCausalLM"], hidden_act="gelu", rope_theta=100.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": lambda: transformers.MistralConfig(**SMALL, vocab_size=512, architectures=["MistralForCausalLM"]),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, vocab_size=1000, architectures=["Qwen2ForCausalLM"],
                                              tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, vocab_size=400, head_dim=32,
                                              architectures=["Qwen3ForCausalLM"]),
    "gemma": lambda: transformers.GemmaConfig(**SMALL, **GEMMA, vocab_size=300, architectures=["GemmaForCausalLM"]),
    "gemma2": lambda: transformers.Gemma2Config(
        **SMALL, **GEMMA, vocab_size=300, architectures=["Gemma2ForCausalLM"], query_pre_attn_scalar=24,
        sliding_window=4, attn_logit_softcapping=0.5, final_logit_softcapping=0.5),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **SMALL, **GEMMA, vocab_size=300, architectures=["Gemma3ForCausalLM"], query_pre_attn_scalar=24,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}}),
    "phi3": lambda: transformers.Phi3Config(**SMALL, vocab_size=300, pad_token_id=0, sliding_window=5,
                                            architectures=["Phi3ForCausalLM"]),
    "phi4_partial_rotary": lambda: transformers.Phi3Config(**SMALL, vocab_size=300, pad_token_id=0,
                                                           partial_rotary_factor=0.75, architectures=["Phi3ForCausalLM"]),
    "granite": lambda: transformers.GraniteConfig(
        **SMALL, vocab_size=300, architectures=["GraniteForCausalLM"], embedding_multiplier=6.0,
        attention_multiplier=0.1, residual_multiplier=0.3, logits_scaling=4.0, mlp_bias=True),
    "olmo2": lambda: transformers.Olmo2Config(**SMALL, vocab_size=300, pad_token_id=0,
                                              architectures=["Olmo2ForCausalLM"]),
}


def make_pair(name: str):
    return pair_from_config(CONFIGS[name]())


def pair_from_config(config):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # HF inits biases/norm weights to 0/1; make them non-trivial
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    ours = get_model_class(config)(config).eval()
    ours.load_weights(hf.state_dict().items())
    return hf, ours


class MiniRunner:
    """Just enough of a model runner: paged KV caches, shuffled block tables, varlen steps."""

    def __init__(self, model, num_blocks: int = 64, block_size: int = 4):
        self.model, self.block_size = model, block_size
        self.kv_caches = [torch.zeros(2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
                          for _ in range(model.num_layers)]
        self.free = list(range(1, num_blocks))
        random.Random(0).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    @torch.no_grad()
    def step(self, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Run one forward over {request id: tokens to schedule}; returns logits per request."""
        ids, positions, qlens, ctxs, tables = [], [], [], [], []
        for rid, toks in chunks.items():
            ctx = self.lens.get(rid, 0)
            table = self.tables.setdefault(rid, [])
            while len(table) * self.block_size < ctx + len(toks):
                table.append(self.free.pop())
            ids += toks
            positions += range(ctx, ctx + len(toks))
            qlens.append(len(toks))
            ctxs.append(ctx)
            tables.append(table)
            self.lens[rid] = ctx + len(toks)
        meta = build_attention_metadata(qlens, ctxs, tables, self.block_size, "cpu")
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.kv_caches, meta)
        assert hidden.shape == (len(ids), self.model.config.hidden_size)
        logits = self.model.compute_logits(hidden).float()
        return dict(zip(chunks, logits.split(qlens)))


@torch.no_grad()
def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    return hf(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_then_decode_matches_hf(name):
    hf, ours = make_pair(name)
    vocab = hf.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = {rid: torch.randint(vocab, (n,), generator=gen).tolist() for rid, n in enumerate([5, 11, 2, 8])}
    runner = MiniRunner(ours)

    out = runner.step(prompts)  # all prompts in one varlen forward
    for rid, toks in prompts.items():
        torch.testing.assert_close(out[rid], hf_logits(hf, toks), atol=1e-4, rtol=1e-4)

    seqs = {rid: list(toks) for rid, toks in prompts.items()}
    nxt = {rid: [int(out[rid][-1].argmax())] for rid in prompts}
    for _ in range(3):
        out = runner.step(nxt)
        for rid, tok in nxt.items():
            seqs[rid] += tok
            torch.testing.assert_close(out[rid][0], hf_logits(hf, seqs[rid])[-1], atol=1e-4, rtol=1e-4)
        nxt = {rid: [int(out[rid][0].argmax())] for rid in prompts}


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2", "gemma3", "phi4_partial_rotary", "granite", "olmo2"])
def test_bfloat16_close_to_hf(name):
    hf, ours = make_pair(name)
    hf, ours = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
    runner = MiniRunner(ours)
    runner.kv_caches = [c.to(torch.bfloat16) for c in runner.kv_caches]
    prompts = {0: list(range(3, 20)), 1: list(range(40, 45))}
    out = runner.step(prompts)
    for rid, toks in prompts.items():
        torch.testing.assert_close(out[rid], hf_logits(hf, toks), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_chunked_prefill_matches_single_prefill(name):
    _, ours = make_pair(name)
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(ours.config.vocab_size, (19,), generator=gen).tolist()
    other = torch.randint(ours.config.vocab_size, (6,), generator=gen).tolist()
    whole = MiniRunner(ours).step({0: prompt})[0]

    runner = MiniRunner(ours)
    first = runner.step({0: prompt[:7], 1: other})  # chunk 1 alongside another prompt
    second = runner.step({1: [3], 0: prompt[7:13]})  # chunk 2 alongside a decode
    third = runner.step({0: prompt[13:]})
    chunked = torch.cat([first[0], second[0], third[0]])
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 64,
            "short_factor": [1.0 + 0.01 * i for i in range(64)], "long_factor": [1.0 + 0.5 * i for i in range(64)]}


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16},
    LONGROPE,
], ids=lambda r: r["rope_type"])
def test_rope_tables_match_hf(rope_scaling):
    """Each position's angles (and attention scaling) are the ones transformers uses for a
    sequence ending at that position."""
    config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=512,
                                      rope_scaling=rope_scaling, rope_theta=500000.0)
    rope = get_rope(config, 128)
    positions = torch.tensor([0, 1, 63, 64, 77, 300, 511])
    cos, sin = rope(positions)
    for i, position in enumerate(positions.tolist()):
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_scaling["rope_type"]](config, "cpu", seq_len=position + 1)
        freqs = position * inv_freq
        torch.testing.assert_close(cos[i, 0], torch.cat([freqs.cos()] * 2) * scale)
        torch.testing.assert_close(sin[i, 0], torch.cat([-freqs.sin(), freqs.sin()]) * scale)


def test_phi3_longrope_decode_matches_transformers_with_a_kv_cache():
    """Decoding past original_max_position_embeddings switches the new positions to the long
    factors, as transformers' model does with a KV cache: the cached keys keep their short-factor
    rotation. (transformers' generate instead drops its cache at the crossing and recomputes the
    sequence with the long factors; sluice does not recompute.)"""
    config = CONFIGS["phi3"]()
    config.original_max_position_embeddings = 8
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                              "original_max_position_embeddings": 8,
                              "short_factor": [1.0 + 0.1 * i for i in range(8)],
                              "long_factor": [2.0 + 3.0 * i for i in range(8)]}
    hf, ours = pair_from_config(config)
    tokens = [5, 17, 42, 7, 99, 3]
    runner = MiniRunner(ours)
    with torch.no_grad():
        out = hf(torch.tensor([tokens]), use_cache=True)
        ours_logits = runner.step({0: tokens})[0][-1]
        for _ in range(6):  # positions 6 .. 11: short up to 7, long from 8
            torch.testing.assert_close(ours_logits, out.logits[0, -1].float(), atol=1e-4, rtol=1e-4)
            token = int(out.logits[0, -1].argmax())
            out = hf(torch.tensor([[token]]), cache=out.cache, use_cache=True)
            ours_logits = runner.step({0: [token]})[0][0]


@pytest.mark.parametrize("name, field, value, message", [
    ("llama", "hidden_act", "relu2", "hidden_act='relu2' is not supported; supported: silu"),
    ("llama", "rope_parameters", {"rope_type": "foo", "rope_theta": 1e4},
     "unsupported rope_type 'foo' .*; supported: default, linear, dynamic, yarn, longrope, llama3"),
    ("llama", "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0},
     "rope_type 'yarn' needs rope_parameters field.s. original_max_position_embeddings"),
    ("phi3", "partial_rotary_factor", 0.1, "partial_rotary_factor=0.1 .* gives 1 rotary dims of head_dim 16"),
    ("gemma2", "hidden_activation", "relu", "hidden_activation='relu' is not supported"),
    ("gemma3", "use_bidirectional_attention", True, "use_bidirectional_attention=True is not supported"),
])
def test_refused_config_values_name_the_field(name, field, value, message):
    """A config value that changes the arithmetic in a way sluice does not implement is refused."""
    config = CONFIGS[name]()
    if field == "partial_rotary_factor":
        config.rope_parameters[field] = value
    else:
        setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        get_model_class(config)(config)


def test_unsupported_architecture():
    config = transformers.GPT2Config(architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel; supported: LlamaForCausalLM"):
        get_model_class(config)
    assert get_model_class(CONFIGS["qwen3"]()) is MODEL_REGISTRY["Qwen3ForCausalLM"].model_class()


def test_load_weights_errors():
    hf, ours = make_pair("qwen2")
    state = dict(hf.state_dict())
    bad = dict(state)
    bad["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    with pytest.raises(ValueError, match="k_proj.weight"):
        ours.load_weights(bad.items())
    with pytest.raises(ValueError, match="unexpected parameter 'model.layers.9.mlp.up_proj.weight'"):
        ours.load_weights([*state.items(), ("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    missing = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.v_proj.bias"}
    with pytest.raises(ValueError, match=r"never loaded: model\.layers\.1\.self_attn\.v_proj\.bias"):
        ours.load_weights(missing.items())
    # tied: no lm_head.weight in the stream, rotary buffers ignored
    ok = {k: v for k, v in state.items() if k != "lm_head.weight"}
    ours.load_weights([*ok.items(), ("model.rotary_emb.inv_freq", torch.zeros(8))])
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_mistral_sliding_window_on_every_layer():
    _, ours = make_pair("mistral")
    assert [layer.self_attn.attn.params.sliding_window for layer in ours.model.layers] == [4096, 4096]


def test_a_refused_config_fails_llm_with_the_field(tmp_path, tiny_model_dir):
    import json
    import shutil

    from sluice import LLM

    folder = tmp_path / "relu2"
    shutil.copytree(tiny_model_dir("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "relu2"}))
    with pytest.raises(ValueError, match="hidden_act='relu2' is not supported"):
        LLM(str(folder), dtype="float32")
