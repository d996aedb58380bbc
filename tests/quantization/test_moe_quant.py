"""Quantized experts of mixture-of-experts layers: GGUF expert blocks kept as stored and
`--quantization int8` (Q8_0 blocks per expert), on moe.c's native call and the portable path.

Kernel level: a layer's experts against the float reference on their dequantized weights (within
the error 8-bit activations bring, twice: into gate/up and into down), batch invariance, and the
portable path. Model level: a tiny Mixtral whose experts a GGUF stores as Q8_0 runs them as
blocks and gives the dequantized path's greedy tokens; with mixed expert types it loads them
dequantized and says so; `--quantization int8` on a checkpoint Q8_0 represents exactly gives the
tokens of quantization none on it; a compressed-tensors W8A8 checkpoint (int8 experts with a scale
per channel, made here) runs its experts as Q8_0 blocks with its dequantized twin's tokens.
"""

from __future__ import annotations

import json
import logging

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

from sluice import LLM, SamplingParams
from sluice.layers.fused_moe import StackedExperts, route
from sluice.quantization.gguf import GGUFMoEMethod, dequantize, kernel_available
from sluice.quantization.int8 import Int8MoEMethod, q8_0_from_channel_int8, quantize_per_channel, quantize_q8_0

from tests.models.test_moe import hf_model, write_gguf
from tests.quantization.test_int8 import COMPRESSED_CONFIG
from tests.quantization.test_gguf_kernels import quantized_weight, relative_error
from tests.utils import smollm2_tokenizer

Q = gguf.GGMLQuantizationType
needs_kernel = pytest.mark.skipif(not kernel_available(), reason="needs AVX-512 VNNI and the native kernels")
E, TOP_K = 4, 2


def reference(experts: StackedExperts, gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor,
              weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The float64 MoE over dense weights gate_up [E, 2I, H], down [E, H, I], token by token."""
    I = experts.intermediate_size
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), ids[t].tolist()):
            gate, up = (gate_up[e].double() @ x[t].double()).split(I)
            out[t] += w * (down[e].double() @ (torch.nn.functional.silu(gate) * up))
    return out


def gguf_experts(gate_up_type: Q, down_type: Q, H: int, I: int) -> StackedExperts:
    experts = StackedExperts(E, H, I)
    experts.quant_method = GGUFMoEMethod(gate_up_type, down_type)
    experts.quant_method.create_weights(experts)
    with torch.no_grad():
        experts.gate_up_proj.copy_(quantized_weight(gate_up_type, E * 2 * I, H, seed=1).view(E, 2 * I, -1))
        experts.down_proj.copy_(quantized_weight(down_type, E * H, I, seed=2).view(E, H, -1))
    return experts


def dense_weights(experts: StackedExperts) -> tuple[torch.Tensor, torch.Tensor]:
    method = experts.quant_method
    gate_up = dequantize(experts.gate_up_proj.reshape(-1, experts.gate_up_proj.shape[-1]), method.gate_up_type,
                         torch.float64)
    down = dequantize(experts.down_proj.reshape(-1, experts.down_proj.shape[-1]), method.down_type, torch.float64)
    return gate_up.view(E, 2 * experts.intermediate_size, -1), down.view(E, experts.hidden_size, -1)


def routed(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return route(torch.randn(rows, E, generator=torch.Generator().manual_seed(seed)), TOP_K, "softmax", True)


@needs_kernel
@pytest.mark.parametrize("gate_up_type, down_type", [(Q.Q4_0, Q.Q4_0), (Q.Q4_1, Q.Q8_0), (Q.Q5_0, Q.Q5_1),
                                                     (Q.Q4_K, Q.Q6_K), (Q.Q5_K, Q.Q5_K)],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gguf_experts_match_the_float_reference(gate_up_type, down_type, dtype):
    """The native call against the dequantized weights in float64: within 8-bit activations' error."""
    experts = gguf_experts(gate_up_type, down_type, 256, 256)
    gate_up, down = dense_weights(experts)
    for rows in (1, 9):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(dtype)
        weights, ids = routed(rows, rows)
        ours = experts(x, weights, ids)
        assert ours.dtype == dtype and ours.shape == x.shape
        assert relative_error(ours, reference(experts, gate_up, down, x, weights, ids)) < 0.03


@needs_kernel
def test_gguf_experts_do_not_depend_on_the_batch():
    """float32: a token's output is the same alone or among others routed to the same experts."""
    experts = gguf_experts(Q.Q4_1, Q.Q6_K, 256, 256)
    x = torch.randn(23, 256)
    weights, ids = routed(23, 0)
    together = experts(x, weights, ids)
    alone = torch.cat([experts(x[t:t + 1], weights[t:t + 1], ids[t:t + 1]) for t in range(23)])
    assert torch.equal(together, alone)


def test_gguf_experts_portable_path(monkeypatch):
    """Without the kernel, each touched expert's blocks are dequantized per call: the float result."""
    monkeypatch.setattr("sluice.quantization.gguf.kernel_available", lambda: False)
    experts = gguf_experts(Q.Q8_0, Q.Q4_0, 64, 32)
    gate_up, down = dense_weights(experts)
    x = torch.randn(7, 64)
    weights, ids = routed(7, 3)
    torch.testing.assert_close(experts(x, weights, ids).double(), reference(experts, gate_up, down, x, weights, ids),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("portable", [False, True], ids=["kernel", "portable"])
def test_int8_experts_quantized_at_load(portable, monkeypatch):
    """Float experts become Q8_0 blocks (a scale per output channel and 32 inputs); the output stays
    within int8's error of the float experts."""
    if portable:
        monkeypatch.setattr("sluice.quantization.gguf.kernel_available", lambda: False)
    elif not kernel_available():
        pytest.skip("needs AVX-512 VNNI and the native kernels")
    torch.manual_seed(0)
    experts = StackedExperts(E, 64, 96)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    float_gate_up, float_down = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    experts.quant_method = Int8MoEMethod()
    experts.quant_method.process_weights_after_loading(experts)
    assert experts.gate_up_proj.dtype == torch.uint8 and experts.gate_up_proj.shape == (E, 192, 68)
    torch.testing.assert_close(experts.down_proj[2], quantize_q8_0(float_down[2]))
    x = torch.randn(6, 64)
    weights, ids = routed(6, 5)
    assert experts.pack() == 0  # quantized experts never go on the bf16 panels
    assert relative_error(experts(x, weights, ids), reference(experts, float_gate_up, float_down, x, weights,
                                                              ids)) < 0.03


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
PROMPTS = [{"prompt_token_ids": [1, 50, 200, 42, 299, 9, 77]}, {"prompt_token_ids": [1, 120, 3, 250]}]


def greedy(path: str, quantization: str, **kwargs) -> list:
    llm = LLM(path, dtype="float32", quantization=quantization, max_model_len=128, kv_cache_memory_bytes=16 << 20,
              **kwargs)
    return [o.outputs[0] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def assert_same_tokens(ours: list, reference: list) -> None:
    """Token for token, but for a near-tie the different arithmetic may flip: at the first
    divergence each side's token is in the other's top-5, and nothing is compared after it."""
    for a, b in zip(ours, reference):
        for step, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
            if x != y:
                assert x in b.logprobs[step] and y in a.logprobs[step], f"step {step}: {x} vs {y}"
                break


@pytest.fixture(scope="module")
def mixtral():
    return hf_model("mixtral", vocab_size=300)


@needs_kernel
def test_gguf_model_runs_expert_blocks(mixtral, tmp_path, caplog):
    """Q8_0 experts in the file run as blocks (the load log says so) with the dequantized path's tokens."""
    path = str(tmp_path / "moe-q8.gguf")
    write_gguf(mixtral, path, "llama", expert_types={"gate": Q.Q8_0, "up": Q.Q8_0, "down": Q.Q8_0})
    with caplog.at_level(logging.INFO, logger="sluice"):
        ours = greedy(path, "gguf")
    assert "2 experts GGUF Q8_0 (VNNI kernel)" in caplog.text
    assert_same_tokens(ours, greedy(path, "none"))


def test_gguf_experts_in_mixed_types_load_dequantized(mixtral, tmp_path, caplog):
    """gate and up in different types can't share the fused gate_up blocks: dequantized, named in the log."""
    path = str(tmp_path / "moe-mixed.gguf")
    write_gguf(mixtral, path, "llama", expert_types={"gate": Q.Q8_0, "up": Q.Q4_0, "down": Q.Q8_0})
    with caplog.at_level(logging.INFO, logger="sluice"):
        ours = greedy(path, "gguf")
    assert "2 x experts Q8_0 / Q4_0 / Q8_0" in caplog.text and "2 experts unquantized" in caplog.text
    assert [o.token_ids for o in ours] == [o.token_ids for o in greedy(path, "none")]


@needs_kernel
def test_int8_model_matches_its_dequantized_twin(mixtral, tmp_path, caplog):
    """A checkpoint whose every linear and expert weight Q8_0 holds exactly: --quantization int8 keeps
    those weights bit for bit, so only its 8-bit activations differ from quantization none."""
    folder = tmp_path / "mixtral-q8-exact"
    mixtral.save_pretrained(folder)
    smollm2_tokenizer().save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    for name, tensor in tensors.items():
        if tensor.dim() >= 2 and "embed" not in name and "norm" not in name and tensor.shape[-1] % 32 == 0:
            blocks = quantize_q8_0(tensor.reshape(-1, tensor.shape[-1]))
            tensors[name] = dequantize(blocks, Q.Q8_0, torch.float32).view(tensor.shape)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="sluice"):
        ours = greedy(str(folder), "int8")
    assert "2 experts int8 blocks of 32 (VNNI kernel)" in caplog.text
    assert_same_tokens(ours, greedy(str(folder), "none"))


def test_compressed_tensors_experts_match_the_dequantized_twin(mixtral, tmp_path, caplog):
    """Every linear and expert weight int8 per channel (compressed-tensors' scheme; the router and
    lm_head ignored, as llm-compressor leaves them): the experts load as Q8_0 blocks holding the
    stored int8 values and scales, and give the tokens of the same weights dequantized."""
    q = torch.randint(-127, 128, (6, 64), dtype=torch.int8)
    scale = torch.rand(6) / 100 + 1e-3
    blocks = q8_0_from_channel_int8(q, scale)
    torch.testing.assert_close(dequantize(blocks, Q.Q8_0, torch.float32), q.float() * scale.half().float()[:, None])
    target, twin = tmp_path / "w8a8", tmp_path / "twin"
    mixtral.save_pretrained(twin)
    tensors = load_file(twin / "model.safetensors")
    quantized = {}
    for name, tensor in tensors.items():
        if tensor.dim() == 2 and not any(part in name for part in ("embed", "lm_head", ".gate.")):
            q, scale = quantize_per_channel(tensor)
            quantized[name], quantized[name + "_scale"] = q, scale[:, None].contiguous()
            tensors[name] = q.float() * scale[:, None]
        else:
            quantized[name] = tensor
    save_file(tensors, twin / "model.safetensors", metadata={"format": "pt"})
    target.mkdir()
    save_file(quantized, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((twin / "config.json").read_text())
    declared = {**COMPRESSED_CONFIG, "ignore": ["lm_head", "re:.*\\.gate$"]}
    (target / "config.json").write_text(json.dumps({**config, "quantization_config": declared}))
    for folder in (twin, target):
        smollm2_tokenizer().save_pretrained(folder)
    with caplog.at_level(logging.INFO, logger="sluice"):
        ours = greedy(str(target), "auto")
    assert "2 experts int8 per channel as Q8_0 blocks" in caplog.text and "loaded dequantized" not in caplog.text
    assert_same_tokens(ours, greedy(str(twin), "none"))
