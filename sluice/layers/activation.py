"""The MLP's gated activation: act(gate) * up over the fused gate_up projection's output.

Names are transformers' ACT2FN keys (config.hidden_act / hidden_activation); a config naming
one not listed here is refused at load rather than run with the wrong function.
"""

from collections.abc import Callable

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


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Gemma's gelu_pytorch_tanh(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def gelu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Exact (erf) gelu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate) * up


GATED_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": silu_and_mul,
    "swish": silu_and_mul,
    "gelu": gelu_and_mul,
    "gelu_pytorch_tanh": gelu_tanh_and_mul,
}


def get_gated_activation(name: str, field: str = "hidden_act") -> Callable[[torch.Tensor], torch.Tensor]:
    """The act(gate) * up function for a config's activation name; refuses names not implemented."""
    if name not in GATED_ACTIVATIONS:
        raise ValueError(f"{field}={name!r} is not supported; supported: {', '.join(GATED_ACTIVATIONS)}")
    return GATED_ACTIVATIONS[name]
