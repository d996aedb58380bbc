"""Rotary position embedding (neox / half-rotation style, as in HF Llama).

cos/sin are precomputed once for every position up to max_position_embeddings and
indexed by each token's absolute position, so a varlen batch with arbitrary
positions (decodes, chunks starting mid-prompt) needs one gather per forward.
"""

import math

import torch
from torch import nn

from sluice.layers import native


def rope_parameters(config) -> dict:
    """The config's RoPE settings as one flat dict with at least rope_type and rope_theta.

    transformers 5 keeps them in config.rope_parameters (rope_theta included); older
    configs have config.rope_theta plus an optional config.rope_scaling dict.
    """
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params)
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    return params


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict, max_position: int) -> torch.Tensor:
    """Llama 3.1 frequency rescaling: long wavelengths are slowed down by `factor`,
    short ones are kept, and the band in between is interpolated smoothly."""
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params.get("original_max_position_embeddings", max_position)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)  # in [0, 1] inside the band
    mixed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, mixed)
    return torch.where(wavelen < old_len / high, inv_freq, out)


class RotaryEmbedding(nn.Module):
    """Holds cos/sin tables [max_position, head_dim/2]; forward(positions) -> (cos, sin),
    each [T, 1, head_dim] in the full-width form apply_rotary wants."""

    def __init__(self, head_dim: int, max_position: int, params: dict):
        super().__init__()
        rope_type = params["rope_type"]
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        base = float(params["rope_theta"])
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if rope_type == "default":
            pass
        elif rope_type == "linear":
            inv_freq = inv_freq / params["factor"]
        elif rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, params, max_position)
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, linear, llama3")
        # float32 like HF; the tables follow model.to(dtype) afterwards, which matches HF
        # casting cos/sin to the activation dtype before use.
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Done once per forward and shared by all layers."""
        cos, sin = self.cos.index_select(0, positions), self.sin.index_select(0, positions)
        return torch.cat((cos, cos), -1).unsqueeze(1), torch.cat((-sin, sin), -1).unsqueeze(1)


def get_rope(config, head_dim: int) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, config.max_position_embeddings, rope_parameters(config))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated pairwise (i, i + D/2), i.e. HF's x*cos + rotate_half(x)*sin:
    rotate_half(x) = cat(-x2, x1) = roll(x, D/2) * [-1.., 1..], and that sign is folded
    into `sin`. cos/sin [T, 1, D] come from RotaryEmbedding.forward, in x's dtype."""
    out = native.rotary(x, cos, sin)  # one pass in bfloat16, same rounding
    if out is not None:
        return out
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin
