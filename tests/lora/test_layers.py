"""The LoRA delta on each linear path: dense F.linear and the packed native kernel (its fused
residual add and its gate/up panel order), rows of two adapters and the base model in one call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sluice.layers.activation import silu_and_mul
from sluice.layers.linear import GateUpLinear, Linear
from sluice.lora.adapter import LoRAWeights
from sluice.lora.layers import LoRALayer, LoRAStep

ROWS = 6
SLOT_ROWS = {0: [0, 3], 1: [1, 2, 5]}  # row 4: the base model


def hooked(layer: Linear, step: LoRAStep) -> dict[int, torch.Tensor]:
    """Give the layer two slots of random adapters (rank 4 and 8); each slot's dense delta weight."""
    torch.manual_seed(1)
    layer.lora = LoRALayer([(0, layer.out_features)], layer.in_features, layer.out_features, 2, 8,
                           torch.float32, torch.device("cpu"), step)
    deltas = {}
    for slot, rank in enumerate((4, 8)):
        w = LoRAWeights(torch.randn(rank, layer.in_features) * 0.1, torch.randn(layer.out_features, rank) * 0.1)
        layer.lora.set_slot(slot, [w])
        deltas[slot] = w.lora_b @ w.lora_a
    return deltas


def expected_pre_activation(layer: Linear, weight: torch.Tensor, x: torch.Tensor, deltas) -> torch.Tensor:
    out = F.linear(x.float(), weight.float())
    for slot, rows in SLOT_ROWS.items():
        out[rows] += x[rows].float() @ deltas[slot].T
    return out


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_delta_on_each_path(packed):
    torch.manual_seed(0)
    mask = torch.zeros(ROWS, 2)
    for slot, rows in SLOT_ROWS.items():
        mask[rows, slot] = 1
    step = LoRAStep(mask=mask)
    down, gate_up = Linear(64, 64, bias=False).bfloat16(), GateUpLinear(64, 128).bfloat16()
    weights = {id(m): m.weight.detach().clone() for m in (down, gate_up)}
    deltas = {id(m): hooked(m, step) for m in (down, gate_up)}
    if packed and not (down.pack(drop_weight=False) and gate_up.pack(drop_weight=False)):
        pytest.skip("the native kernel does not run on this CPU")
    x, residual = torch.randn(ROWS, 64).bfloat16(), torch.randn(ROWS, 64).bfloat16()
    with torch.inference_mode():
        got_down = down(x, residual=residual).float()
        got_mlp = gate_up.silu_and_mul(x).float()
    want_down = residual.float() + expected_pre_activation(down, weights[id(down)], x, deltas[id(down)])
    want_mlp = silu_and_mul(expected_pre_activation(gate_up, weights[id(gate_up)], x, deltas[id(gate_up)]))
    torch.testing.assert_close(got_down, want_down, atol=0.05, rtol=0.02)
    torch.testing.assert_close(got_mlp, want_mlp, atol=0.05, rtol=0.02)
