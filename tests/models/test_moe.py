"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) against transformers, and the
fused MoE layer's own rules: routing, grouping by expert, the packed native expert path, loading.

Tiny random models (2 layers, hidden 64, 4-8 experts): greedy tokens through the engine
(float32 for each architecture, bfloat16 for one), logits through the paged cache, and the
scheduler paths on the model with the most parts (Qwen2-MoE: shared expert, a dense layer among
sparse ones, q/k/v bias); a GGUF file written with gguf.GGUFWriter (Qwen2-MoE). Two prompts,
batched together, keep it fast: MoE generation in transformers loops over experts in Python.
"""

from __future__ import annotations

import gguf
import pytest
import torch
import transformers

from sluice import LLM
from sluice.loader import iter_weights, load_hf_config, resolve_model
from sluice.layers.fused_moe import FusedMoE, StackedExperts, route, stack_expert_weights
from sluice.models.registry import get_model_class
from sluice.platform import current_platform

from tests.engine.test_scheduler_paths import COMMON, prompts, tokens
from tests.models.test_gguf_families import add_byte_tokenizer, add_decoder_metadata, converted
from tests.models.test_model_forward import MiniRunner, hf_logits
from tests.models.test_parity import check_bfloat16, check_float32, hf_greedy, prompt_ids, run_sluice
from tests.utils import model_folder_factory

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
            max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
            initializer_range=0.3)  # peaky logits and routers: near-ties stay rare

CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**TINY, intermediate_size=64, num_local_experts=4,
                                                  num_experts_per_tok=2),
    # layer 1 keeps a dense MLP; the shared expert and q/k/v bias are on
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**TINY, intermediate_size=128, moe_intermediate_size=32,
                                                     shared_expert_intermediate_size=96, num_experts=8,
                                                     num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1]),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**TINY, head_dim=16, intermediate_size=128,
                                                     moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3,
                                                     norm_topk_prob=True),
    "olmoe": lambda: transformers.OlmoeConfig(**TINY, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                              norm_topk_prob=False),
}


def hf_model(arch: str, **overrides) -> transformers.PreTrainedModel:
    config = CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF inits biases/norm weights to 0/1; make them non-trivial
        for name, param in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return hf


@pytest.fixture(scope="module")
def moe_model_dir(tmp_path_factory):
    """Factory: arch -> folder saved by transformers (per-expert tensors, as checkpoints ship)."""
    return model_folder_factory(tmp_path_factory, hf_model, "tiny")


def ours_from(hf: transformers.PreTrainedModel, weights) -> torch.nn.Module:
    config = hf.config
    config.architectures = [type(hf).__name__]
    model = get_model_class(config)(config).eval()
    model.load_weights(weights)
    return model


def parity_prompts() -> list[list[int]]:
    return prompt_ids()[:2]  # a short and a long one


def test_logits_match_transformers():
    """Prefill of four prompts in one varlen step, then three decode steps, through the paged cache;
    the weights come as transformers holds them (experts already stacked)."""
    hf = hf_model("qwen2_moe")
    ours = ours_from(hf, hf.state_dict().items())
    gen = torch.Generator().manual_seed(1)
    batch = {rid: torch.randint(1000, (n,), generator=gen).tolist() for rid, n in enumerate([5, 11, 2, 8])}
    runner = MiniRunner(ours)
    out = runner.step(batch)
    for rid, toks in batch.items():
        torch.testing.assert_close(out[rid], hf_logits(hf, toks), atol=1e-4, rtol=1e-4)
    for _ in range(3):
        step = {rid: [int(out[rid][-1].argmax())] for rid in batch}
        out = runner.step(step)
        for rid, tok in step.items():
            batch[rid] = batch[rid] + tok
            torch.testing.assert_close(out[rid][-1], hf_logits(hf, batch[rid])[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", CONFIGS)
def test_greedy_parity_float32(arch, moe_model_dir):
    """The engine on the saved checkpoint (per-expert tensors) gives transformers' greedy tokens."""
    folder = moe_model_dir(arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for ids, out in zip(parity_prompts(), run_sluice(folder, "float32", prompts=parity_prompts())):
        theirs, logits = hf_greedy(hf, ids)
        check_float32(out.token_ids, theirs, logits, f"{arch} {ids[:4]}")


def test_greedy_parity_bfloat16(moe_model_dir):
    """bf16 (the packed native experts where the CPU has the kernels; the portable leg reruns it on
    F.linear): at the first divergence each side's token is in the other's top-5."""
    folder = moe_model_dir("mixtral")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    for ids, out in zip(parity_prompts(), run_sluice(folder, "bfloat16", logprobs=5, prompts=parity_prompts())):
        theirs, logits = hf_greedy(hf, ids)
        check_bfloat16(out.token_ids, [set(d) for d in out.logprobs], theirs, logits, "mixtral bf16")


@pytest.fixture(scope="module")
def qwen2_moe_lone(moe_model_dir) -> list[list[int]]:
    llm = LLM(moe_model_dir("qwen2_moe"), **COMMON, enable_prefix_caching=False, kv_cache_memory_bytes=64 << 20)
    return [tokens(llm, [p])[0] for p in prompts()]


@pytest.mark.parametrize("path", ["chunked", "preempted", "prefix_warm"])
def test_scheduler_paths_equal_lone(path, moe_model_dir, qwen2_moe_lone):
    """Greedy MoE output never depends on batching, chunk size, preemption or cache hits (the
    experts see different row groupings on each path; every path also batches the four prompts)."""
    kwargs = {"chunked": dict(enable_prefix_caching=False, kv_cache_memory_bytes=64 << 20, max_num_batched_tokens=32),
              "preempted": dict(enable_prefix_caching=False, num_gpu_blocks_override=14),
              "prefix_warm": dict(enable_prefix_caching=True, kv_cache_memory_bytes=64 << 20)}[path]
    llm = LLM(moe_model_dir("qwen2_moe"), **COMMON, **kwargs)
    batch = prompts()
    if path == "prefix_warm":
        assert tokens(llm, batch[:1]) + tokens(llm, batch[1:]) == qwen2_moe_lone
        assert llm.get_metrics()["vllm:prefix_cache_hits"] >= 3 * 32
    assert tokens(llm, batch) == qwen2_moe_lone
    if path == "preempted":
        assert llm.get_metrics()["vllm:num_preemptions"] > 0


def naive_moe(moe: FusedMoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: what FusedMoE's grouped computation must equal."""
    weights, ids = route(moe.gate(x), moe.top_k, moe.scoring_func, moe.renormalize)
    experts, I = moe.experts, moe.experts.intermediate_size
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), ids[t].tolist()):
            gate_up = experts.gate_up_proj[e] @ x[t]
            out[t] += w * (experts.down_proj[e] @ (torch.nn.functional.silu(gate_up[:I]) * gate_up[I:]))
    return out


@pytest.mark.parametrize("scoring_func, renormalize", [("softmax", True), ("softmax", False), ("sigmoid", True),
                                                       ("sigmoid", False)])
def test_grouped_experts_equal_naive(scoring_func, renormalize):
    torch.manual_seed(0)
    moe = FusedMoE(6, 2, 32, 16, renormalize=renormalize, scoring_func=scoring_func)
    for param in moe.parameters():
        torch.nn.init.normal_(param, std=0.3)
    x = torch.randn(9, 32)
    weights, _ = route(moe.gate(x), 2, scoring_func, renormalize)
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(9))
    residual = torch.randn(9, 32)
    torch.testing.assert_close(moe(x, residual), residual + naive_moe(moe, x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not current_platform("cpu").native_kernels(torch.bfloat16),
                    reason="the native kernels need AVX-512 BF16")
def test_packed_experts_match_torch_path(monkeypatch):
    """bf16: the packed experts in one native call (moe.c) give F.linear's numbers, at decode and prompt sizes."""
    monkeypatch.setenv("SLUICE_LINEAR_PATH", "native")
    torch.manual_seed(0)
    experts = StackedExperts(8, 128, 64).to(torch.bfloat16)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    packed = StackedExperts(8, 128, 64).to(torch.bfloat16)
    packed.load_state_dict(experts.state_dict())
    assert packed.pack() == 2 and packed.gate_up_proj.numel() == packed.down_proj.numel() == 0
    for rows in (1, 16, 64):
        x = torch.randn(rows, 128, dtype=torch.bfloat16)
        weights, ids = route(torch.randn(rows, 8), 2, "softmax", True)
        torch.testing.assert_close(packed(x, weights, ids), experts(x, weights, ids), atol=2e-2, rtol=2e-2)


def test_stack_expert_weights():
    """Per-expert w1/w3/w2 become gate_up [E, 2I, H] (gate rows first) and down [E, H, I]; a missing
    expert or one beyond the config is named."""
    E, I, H = 3, 4, 5
    w = {(e, p): torch.randn(I, H) if p != "w2" else torch.randn(H, I) for e in range(E) for p in ("w1", "w2", "w3")}
    names = {f"model.layers.0.mlp.experts.{e}.{p}.weight": t for (e, p), t in w.items()}
    stacked = dict(stack_expert_weights([("model.norm.weight", torch.ones(H)), *names.items()], E))
    assert set(stacked) == {"model.norm.weight", "model.layers.0.mlp.experts.gate_up_proj",
                            "model.layers.0.mlp.experts.down_proj"}
    torch.testing.assert_close(stacked["model.layers.0.mlp.experts.gate_up_proj"][1],
                               torch.cat((w[1, "w1"], w[1, "w3"])))
    torch.testing.assert_close(stacked["model.layers.0.mlp.experts.down_proj"][2], w[2, "w2"])
    missing = {k: v for k, v in names.items() if k != "model.layers.0.mlp.experts.1.w3.weight"}
    with pytest.raises(ValueError, match=r"never loaded: model\.layers\.0\.mlp\.experts\.gate_up_proj \(expert 1 up\)"):
        list(stack_expert_weights(missing.items(), E))
    with pytest.raises(ValueError, match=r"experts\.3\.w1\.weight': expert 3 but the config has 3 experts"):
        list(stack_expert_weights([("model.layers.0.mlp.experts.3.w1.weight", torch.zeros(I, H))], E))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported for experts"):
        FusedMoE(4, 2, 8, 8, renormalize=True, activation="gelu")
    with pytest.raises(ValueError, match="num_experts_per_tok=5 must be between 1 and the number of experts"):
        FusedMoE(4, 5, 8, 8, renormalize=True)


# Hugging Face module -> llama.cpp tensor, from the gguf package's own constants, so the loader's
# mapping is checked against an independent table.
_GGUF_NAMES = {
    "model.embed_tokens": gguf.MODEL_TENSOR.TOKEN_EMBD, "model.norm": gguf.MODEL_TENSOR.OUTPUT_NORM,
    "lm_head": gguf.MODEL_TENSOR.OUTPUT,
    "input_layernorm": gguf.MODEL_TENSOR.ATTN_NORM, "post_attention_layernorm": gguf.MODEL_TENSOR.FFN_NORM,
    "self_attn.q_proj": gguf.MODEL_TENSOR.ATTN_Q, "self_attn.k_proj": gguf.MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": gguf.MODEL_TENSOR.ATTN_V, "self_attn.o_proj": gguf.MODEL_TENSOR.ATTN_OUT,
    "self_attn.q_norm": gguf.MODEL_TENSOR.ATTN_Q_NORM, "self_attn.k_norm": gguf.MODEL_TENSOR.ATTN_K_NORM,
    "mlp.gate": gguf.MODEL_TENSOR.FFN_GATE_INP, "mlp.shared_expert_gate": gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP,
    "mlp.shared_expert.gate_proj": gguf.MODEL_TENSOR.FFN_GATE_SHEXP,
    "mlp.shared_expert.up_proj": gguf.MODEL_TENSOR.FFN_UP_SHEXP,
    "mlp.shared_expert.down_proj": gguf.MODEL_TENSOR.FFN_DOWN_SHEXP,
}


def gguf_tensors(hf: transformers.PreTrainedModel, arch: str):
    """(llama.cpp name, float32 array) for every weight of a transformers MoE model."""
    for name, tensor in hf.state_dict().items():
        array = converted(name, tensor.float().numpy(), arch, hf.config)
        module, _, leaf = name.rpartition(".")
        layer = None
        if module.startswith("model.layers."):
            _, _, layer, module = module.split(".", 3)
        if module == "mlp.experts":  # stacked: gate_up [E, 2I, H] (gate rows, then up rows), down [E, H, I]
            half = array.shape[1] // 2
            parts = ({gguf.MODEL_TENSOR.FFN_GATE_EXP: array[:, :half], gguf.MODEL_TENSOR.FFN_UP_EXP: array[:, half:]}
                     if leaf == "gate_up_proj" else {gguf.MODEL_TENSOR.FFN_DOWN_EXP: array})
            for kind, part in parts.items():
                yield gguf.TENSOR_NAMES[kind].format(bid=layer) + ".weight", part.copy()
            continue
        if module == "mlp.shared_expert_gate":
            array = array[0]  # llama.cpp keeps this [1, H] gate as a vector
        yield gguf.TENSOR_NAMES[_GGUF_NAMES[module]].format(bid=layer) + "." + leaf, array


def write_gguf(hf: transformers.PreTrainedModel, path: str, arch: str,
               expert_types: dict[str, gguf.GGMLQuantizationType] | None = None,
               linear_type: gguf.GGMLQuantizationType | None = None) -> None:
    """A float32 GGUF of a tiny MoE model, with a byte-level tokenizer; expert_types quantizes the
    expert tensors by projection ("gate", "up", "down") with the gguf package, linear_type every
    other matrix. Mixtral and OLMoE state their experts' size as feed_forward_length, as
    llama.cpp's converter writes them."""
    config = hf.config
    writer = gguf.GGUFWriter(path, arch)
    add_decoder_metadata(writer, config)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if getattr(config, "moe_intermediate_size", None):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if getattr(config, "shared_expert_intermediate_size", None):
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    add_byte_tokenizer(writer)
    for name, array in gguf_tensors(hf, arch):
        proj = name.split(".")[2].removeprefix("ffn_").removesuffix("_exps") if "_exps." in name else None
        qtype = expert_types.get(proj) if expert_types and proj else linear_type if array.ndim == 2 else None
        if qtype is not None:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch, gguf_arch", [("qwen2_moe", "qwen2moe"), ("qwen3_moe", "qwen3moe"),
                                             ("mixtral", "llama"), ("olmoe", "olmoe")])
def test_gguf_loads_the_same_model(arch, gguf_arch, tmp_path):
    """A tiny model written to GGUF by the gguf package (experts stacked per projection) loads with
    its expert sizes, the same weights as from transformers, and the same logits. transformers
    reads the Qwen-MoE configs; sluice builds Mixtral's (a llama file with experts) and OLMoE's."""
    # llama.cpp's Qwen-MoE graphs make every layer sparse; the byte tokenizer's vocabulary is small
    hf = hf_model(arch, vocab_size=300, **({"mlp_only_layers": []} if arch == "qwen2_moe" else {}))
    path = str(tmp_path / f"tiny-{arch}.gguf")
    write_gguf(hf, path, gguf_arch)
    src = resolve_model(path)
    config = load_hf_config(src)
    assert config.architectures == [type(hf).__name__]
    sizes = ("num_experts", "num_experts_per_tok", "intermediate_size", "moe_intermediate_size")
    assert [getattr(config, k, None) for k in sizes] == [getattr(hf.config, k, None) for k in sizes]
    from_gguf = get_model_class(config)(config).eval()
    from_gguf.load_weights(iter_weights(src, config, torch.float32))
    from_hf = ours_from(hf, hf.state_dict().items())
    theirs = dict(from_hf.named_parameters())
    for name, param in from_gguf.named_parameters():
        assert torch.equal(param, theirs[name]), name
    batch = {0: [1, 50, 200, 42, 299, 9]}
    torch.testing.assert_close(MiniRunner(from_gguf).step(batch)[0], MiniRunner(from_hf).step(batch)[0])
