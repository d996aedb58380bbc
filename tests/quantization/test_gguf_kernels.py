"""GGUF block matmuls (quant.c, and the portable dequantize-per-call path) against float references.

Weights are random, quantized by the gguf package's own quantizers. Two references per type:
the exact one (activations quantized to int8 per 32-block in numpy, as the kernel does, then
summed in float64), which the kernel must match to float rounding; and the float one (the
dequantized weight times the unquantized activations), which it must match within the error
8-bit activations bring (about 1% of the output's scale).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sluice.layers.linear import GateUpLinear, Linear
from sluice.quantization.gguf import (KERNEL_TYPES, REPACKED_TYPES, GGUFLinearMethod, dequantize, gguf_linear,
                                      kernel_available, repack, repacked_rows, as_stored)

Q = gguf.GGMLQuantizationType
TYPES = sorted(KERNEL_TYPES, key=lambda t: t.name)
K_TYPES = {Q.Q4_K, Q.Q5_K, Q.Q6_K}
needs_kernel = pytest.mark.skipif(not kernel_available(), reason="needs AVX-512 VNNI and the native kernels")


def quantized_weight(qtype, out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Random weights in GGML blocks [out, row bytes]: quantized by the gguf package, or for the
    K-quants (which it can only dequantize) random block bytes with small float16 scales."""
    rng = np.random.default_rng(seed)
    if qtype not in K_TYPES:
        weight = rng.normal(0, 0.05, (out_features, in_features)).astype(np.float32)
        return torch.from_numpy(gguf.quants.quantize(weight, qtype))
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (out_features * in_features // block_size, type_size), dtype=np.uint8)
    scales = rng.uniform(1e-3, 4e-3, (len(blocks), 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        blocks[:, 208:210] = scales[:, :2]  # d (the int8 sub-block scales stay random)
    else:
        blocks[:, 0:4] = scales  # d, dmin
    return torch.from_numpy(blocks.reshape(out_features, -1))


def int8_activations(x: np.ndarray) -> np.ndarray:
    """x as the kernel sees it: per row and block of 32, round(x * 127 / amax) * (amax / 127), in float32."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    inverse = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.rint(blocks * inverse)
    return (q.astype(np.float64) * (amax / np.float32(127)).astype(np.float64)).reshape(x.shape)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference).norm() / reference.norm()).item()


@needs_kernel
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_matches_references(qtype, rows, dtype):
    in_features, out_features = (512 if qtype in K_TYPES else 96), 80
    blocks = quantized_weight(qtype, out_features, in_features)
    weight = dequantize(blocks, qtype, torch.float64)
    torch.manual_seed(rows)
    x = torch.randn(rows, in_features).to(dtype)
    ours = gguf_linear(x, blocks, qtype, out_features)
    assert ours is not None and ours.dtype == dtype and ours.shape == (rows, out_features)

    exact = torch.from_numpy(int8_activations(x.double().numpy())) @ weight.T
    rounding = 1e-5 if dtype == torch.float32 else 8e-3  # bf16 output: half an ulp of 2^-8
    torch.testing.assert_close(ours.double(), exact, atol=rounding * exact.abs().max().item(), rtol=rounding)
    assert relative_error(ours, x.double() @ weight.T) < 0.02


@needs_kernel
@pytest.mark.parametrize("qtype", sorted(REPACKED_TYPES, key=lambda t: t.name), ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_repacked_kernel_matches_the_blocks_as_stored(qtype, dtype):
    """The 16-row interleaved layout (a row count that isn't a multiple of 16 is padded): the same
    products as the stored blocks to float rounding, with bias and residual, each row on its own,
    and the embedding's rows read back exactly."""
    out_features, in_features = 83, 96
    blocks = quantized_weight(qtype, out_features, in_features)
    packed = repack(blocks, qtype)
    assert packed.shape == (96, blocks.shape[1])  # 83 rows padded to 96: the file's bytes per row
    weight = dequantize(blocks, qtype, torch.float64)
    torch.manual_seed(0)
    x, bias = torch.randn(45, in_features).to(dtype), torch.randn(out_features)
    residual = torch.randn(45, out_features).to(dtype)
    ours = gguf_linear(x, packed, qtype, out_features, bias, residual)
    exact = torch.from_numpy(int8_activations(x.double().numpy())) @ weight.T + bias.double() + residual.double()
    rounding = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(ours.double(), exact, atol=rounding * exact.abs().max().item(), rtol=rounding)
    alone = torch.cat([gguf_linear(x[i : i + 1], packed, qtype, out_features, bias, residual[i : i + 1])
                       for i in range(45)])
    assert torch.equal(ours, alone)
    ids = torch.tensor([[0, 17], [82, 16]])
    torch.testing.assert_close(repacked_rows(packed, qtype, ids, in_features, torch.float32).double(),
                               weight[ids.reshape(-1)], atol=1e-6, rtol=1e-6)
    assert torch.equal(as_stored(packed, qtype, out_features), blocks)


@needs_kernel
def test_kernel_reads_strided_rows_and_leading_dims():
    qtype = Q.Q4_1
    blocks = quantized_weight(qtype, 64, 64)
    wide = torch.randn(5, 96, dtype=torch.bfloat16)
    x = wide[:, :64]  # rows 96 apart
    expected = gguf_linear(x.contiguous(), blocks, qtype, 64)
    torch.testing.assert_close(gguf_linear(x, blocks, qtype, 64), expected, atol=0, rtol=0)
    batched = gguf_linear(x.contiguous().view(1, 5, 64), blocks, qtype, 64)
    torch.testing.assert_close(batched.view(5, 64), expected, atol=0, rtol=0)


@needs_kernel
@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.Q6_K], ids=lambda t: t.name)
def test_kernel_output_does_not_depend_on_the_batch(qtype):
    """Each output is computed from its own input row only, in the same order whatever the tile
    (float32, where no output rounding hides a difference): greedy output can't change with batching."""
    blocks = quantized_weight(qtype, 203, 512)
    x = torch.randn(67, 512)
    together = gguf_linear(x, blocks, qtype, 203)
    alone = torch.cat([gguf_linear(x[i : i + 1], blocks, qtype, 203) for i in range(67)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0], ids=lambda t: t.name)
def test_linear_layer_on_its_method(qtype, monkeypatch):
    """A Linear holding GGUF blocks: bias, residual and the fused gate/up activation, on the kernel
    (where the CPU has it) and on the portable path; each layer loaded as the loader does (create,
    copy, process: repacked where the kernel runs)."""
    weight = quantized_weight(qtype, 96, 64)
    bias = torch.randn(96, dtype=torch.bfloat16)
    reference_weight = dequantize(weight, qtype, torch.float64)
    x, residual = torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(4, 96, dtype=torch.bfloat16)
    reference = x.double() @ reference_weight.T + bias.double()
    for portable in (False, True):
        if portable:
            monkeypatch.setattr("sluice.quantization.gguf.kernel_available", lambda: False)
        layer = Linear(64, 96, bias=True).to(torch.bfloat16)
        method = layer.quant_method = GGUFLinearMethod(qtype)
        method.create_weights(layer)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        method.process_weights_after_loading(layer)
        assert relative_error(layer(x), reference) < 0.02
        assert relative_error(layer(x, residual=residual), reference + residual.double()) < 0.02

    gate_up = GateUpLinear(64, 32).to(torch.bfloat16)
    gate_up.quant_method = GGUFLinearMethod(qtype)
    gate_up.quant_method.create_weights(gate_up)
    with torch.no_grad():
        gate_up.weight.copy_(quantized_weight(qtype, 64, 64))
    dense = dequantize(gate_up.weight, qtype, torch.float64)
    gate_up.quant_method.process_weights_after_loading(gate_up)
    gate, up = (x.double() @ dense.T).chunk(2, dim=-1)
    assert relative_error(gate_up.silu_and_mul(x), F.silu(gate) * up) < 0.03
