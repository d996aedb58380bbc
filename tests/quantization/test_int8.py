"""int8 weights: the per-channel W8A8 kernel against exact and float references, the weight-only
path, the default model quantized at load (perplexity within 2% of bf16), and a compressed-tensors
W8A8 checkpoint (made here) loading as it is and matching its dequantized float twin."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sluice import LLM, SamplingParams
from sluice.layers.linear import Linear
from sluice.loader import ModelLoadError
from sluice.quantization.int8 import ChannelInt8Method, kernel_available, quantize_per_channel

from tests.quantization.utils import ENGINE, INTEGER_PATH, perplexity

needs_kernel = pytest.mark.skipif(not kernel_available(), reason="needs AVX-512 VNNI and the native kernels")


def int8_layer(in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> tuple[Linear, torch.Tensor]:
    """A Linear on the per-channel int8 method, and its weight as the method holds it (q * scale, float64)."""
    torch.manual_seed(in_features * out_features)
    layer = Linear(in_features, out_features, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        if bias:
            layer.bias.normal_()
    q, scale = quantize_per_channel(layer.weight.detach())
    layer.quant_method = ChannelInt8Method()
    layer.quant_method.set_weights(layer, q, scale)
    return layer, q.double() * scale.double()[:, None]


def per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: each row round(x * 127 / amax) * (amax / 127), in float32."""
    x = x.float().numpy()
    amax = np.abs(x).max(axis=1, keepdims=True)
    inverse = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    return torch.from_numpy(np.rint(x * inverse).astype(np.float64) * (amax / np.float32(127)).astype(np.float64))


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference).norm() / reference.norm()).item()


@needs_kernel
@pytest.mark.parametrize("shape", [(96, 80), (66, 130)], ids=["aligned", "K-not-multiple-of-4"])
@pytest.mark.parametrize("rows", [1, 7, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_w8a8_kernel_matches_references(shape, rows, dtype):
    layer, weight = int8_layer(*shape, bias=True, dtype=dtype)
    x = torch.randn(rows, shape[0]).to(dtype)
    with torch.no_grad():
        ours = layer(x)
    bias = layer.bias.double()
    exact = per_token_int8(x) @ weight.T + bias
    rounding = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(ours.double(), exact, atol=rounding * exact.abs().max().item(), rtol=rounding)
    assert relative_error(ours, x.double() @ weight.T + bias) < 0.02


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_w8a8_epilogues_equal_the_separate_ops(dtype):
    """The residual add and GELU in the kernel's output pass give what the separate torch ops give
    on its plain output: the add exactly, GELU within its erf approximation (1.5e-7)."""
    layer, _ = int8_layer(66, 130, bias=True, dtype=dtype)
    x, residual = torch.randn(9, 66).to(dtype), torch.randn(9, 130).to(dtype)
    with torch.no_grad():
        plain = layer(x)
        assert torch.equal(layer(x, residual), residual + plain)
        torch.testing.assert_close(layer.gelu(x), torch.nn.functional.gelu(plain), atol=4e-6, rtol=0)


def test_weight_only_path(monkeypatch):
    monkeypatch.setattr("sluice.quantization.int8.kernel_available", lambda: False)
    layer, weight = int8_layer(64, 48, bias=True, dtype=torch.bfloat16)
    assert getattr(layer, "int8_packed", None) is None
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert relative_error(layer(x), x.double() @ weight.T + layer.bias.double()) < 0.01


def test_default_model_quantized_at_load():
    """int8 on the integer kernel against the bf16 weights it was made from (the GGUF dequantized at load)."""
    dense = perplexity(LLM(quantization="none", **ENGINE))
    llm = LLM(quantization="int8", **INTEGER_PATH, **ENGINE)
    assert llm.engine_core.quantization == "int8"
    value = perplexity(llm)
    assert abs(value / dense - 1) < 0.02, (value, dense)


COMPRESSED_CONFIG = {
    "quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
    }},
}


def write_checkpoints(source: str, target: str, twin: str) -> None:
    """`target`: the tiny model in compressed-tensors W8A8 (int8 weights, float32 scales per
    channel); `twin`: the same weights dequantized (q * scale), a plain float checkpoint."""
    state = load_file(os.path.join(source, "model.safetensors"))
    quantized, dequantized = {}, {}
    for name, tensor in state.items():
        if name.endswith("_proj.weight"):
            q, scale = quantize_per_channel(tensor)
            quantized[name], quantized[name + "_scale"] = q, scale[:, None].contiguous()
            dequantized[name] = q.float() * scale[:, None]
        else:
            quantized[name] = dequantized[name] = tensor
    for folder, tensors in ((target, quantized), (twin, dequantized)):
        os.makedirs(folder)
        for name in os.listdir(source):
            if name != "model.safetensors":
                os.symlink(os.path.join(source, name), os.path.join(folder, name))
        save_file(tensors, os.path.join(folder, "model.safetensors"))
    config = json.loads(open(os.path.join(source, "config.json")).read())
    os.unlink(os.path.join(target, "config.json"))
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump({**config, "quantization_config": COMPRESSED_CONFIG}, f)


def test_compressed_tensors_checkpoint_loads_as_stored(tiny_model_dir, tmp_path, monkeypatch):
    """Weight-only, it is its float twin to float rounding; W8A8 rounds activations too, so there
    the outputs may part only at near-ties."""
    target, twin = str(tmp_path / "w8a8"), str(tmp_path / "twin")
    write_checkpoints(tiny_model_dir("llama"), target, twin)
    engine = dict(ENGINE, dtype="float32", max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    prompts = [{"prompt_token_ids": list(range(100 + 7 * i, 140 + 7 * i))} for i in range(4)]

    def run(folder: str):
        llm = LLM(folder, **engine)
        assert llm.engine_core.quantization == ("compressed-tensors" if folder == target else "none")
        return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]

    theirs = run(twin)
    for a, b in zip(run(target), theirs):
        step = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
        if step is not None:
            assert a.token_ids[step] in b.logprobs[step] and b.token_ids[step] in a.logprobs[step]
    monkeypatch.setattr("sluice.quantization.int8.kernel_available", lambda: False)
    for a, b in zip(run(target), theirs):
        assert a.token_ids == b.token_ids
        assert abs(a.logprobs[0][a.token_ids[0]].logprob - b.logprobs[0][b.token_ids[0]].logprob) < 1e-3

    with pytest.raises(ModelLoadError, match="quantization='int8'.*stored quantized with 'compressed-tensors'"):
        LLM(target, quantization="int8", **engine)


def test_unsupported_compressed_tensors_scheme_is_refused(tiny_model_dir, tmp_path):
    target = str(tmp_path / "w4")
    write_checkpoints(tiny_model_dir("llama"), target, str(tmp_path / "twin"))
    config = json.loads(open(os.path.join(target, "config.json")).read())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 4
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ModelLoadError, match="config_groups.group_0: weights 4-bit int.*supported: 8-bit int"):
        LLM(target, **dict(ENGINE, max_model_len=256))
