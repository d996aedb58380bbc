"""The LoRA delta on each linear path: dense F.linear and the packed native kernel (its fused
residual add and its gate/up panel order), with float32 LoRA weights (torch matmuls) and bf16
ones (the native LoRA kernel where the CPU has it); rows of two adapters and the base model in
one call, and rows of one adapter alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sluice.layers.activation import silu_and_mul
from sluice.layers.linear import GateUpLinear, Linear
from sluice.lora.adapter import LoRAWeights
from sluice.lora.layers import LoRALayer, LoRAStep

ROW_SLOTS = {"mixed": [0, 1, 1, 0, -1, 1], "one adapter": [1] * 6}  # -1: the base model


def hooked(layer: Linear, step: LoRAStep, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """Give the layer two slots of random adapters (rank 4 and 8); each slot's dense delta weight."""
    torch.manual_seed(1)
    packed_gate_up = isinstance(layer, GateUpLinear) and layer.packed is not None
    layer.lora = LoRALayer([(0, layer.out_features)], 8, layer.in_features, layer.out_features, 2, dtype,
                           torch.device("cpu"), step, panel_order=packed_gate_up)
    deltas = {}
    for slot, rank in enumerate((4, 8)):
        w = LoRAWeights(torch.randn(rank, layer.in_features) * 0.1, torch.randn(layer.out_features, rank) * 0.1)
        layer.lora.set_slot(slot, [LoRAWeights(w.lora_a.to(dtype), w.lora_b.to(dtype))])
        deltas[slot] = w.lora_b.to(dtype).float() @ w.lora_a.to(dtype).float()
    return deltas


def expected_pre_activation(weight: torch.Tensor, x: torch.Tensor, deltas, row_slots: list[int]) -> torch.Tensor:
    out = F.linear(x.float(), weight.float())
    for row, slot in enumerate(row_slots):
        if slot >= 0:
            out[row] += x[row].float() @ deltas[slot].T
    return out


@pytest.mark.parametrize("rows", list(ROW_SLOTS))
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_delta_on_each_path(packed, lora_dtype, rows):
    torch.manual_seed(0)
    row_slots = ROW_SLOTS[rows]
    step = LoRAStep(2, lora_dtype, torch.device("cpu"))
    step.set(row_slots)
    down, gate_up = Linear(96, 64, bias=False).bfloat16(), GateUpLinear(64, 128).bfloat16()
    weights = {id(m): m.weight.detach().clone() for m in (down, gate_up)}
    if packed and not (down.pack(drop_weight=False) and gate_up.pack(drop_weight=False)):
        pytest.skip("the native kernel does not run on this CPU")
    deltas = {id(m): hooked(m, step, lora_dtype) for m in (down, gate_up)}
    x, residual = torch.randn(len(row_slots), 64).bfloat16(), torch.randn(len(row_slots), 64).bfloat16()
    x_down = torch.randn(len(row_slots), 96).bfloat16()
    with torch.inference_mode():
        got_down = down(x_down, residual=residual).float()
        got_mlp = gate_up.silu_and_mul(x).float()
    want_down = residual.float() + expected_pre_activation(weights[id(down)], x_down, deltas[id(down)], row_slots)
    want_mlp = silu_and_mul(expected_pre_activation(weights[id(gate_up)], x, deltas[id(gate_up)], row_slots))
    torch.testing.assert_close(got_down, want_down, atol=0.05, rtol=0.02)
    torch.testing.assert_close(got_mlp, want_mlp, atol=0.05, rtol=0.02)
