"""The MLP's gated activation: silu(gate) * up over the fused gate_up projection's output."""

import torch
import torch.nn.functional as F

from sluice.layers import native


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> [T, I]; one native pass in bfloat16, PyTorch otherwise."""
    out = native.silu_and_mul(gate_up)
    if out is not None:
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
