"""Rotary position embedding (neox / half-rotation style, as in HF Llama).

cos/sin are precomputed once for every position up to max_position_embeddings and
indexed by each token's absolute position, so a varlen batch with arbitrary
positions (decodes, chunks starting mid-prompt) needs one gather per forward.

The scaled variants follow transformers' `modeling_rope_utils` formula for formula. A position's
angles depend on that position only, so greedy output never depends on batching or chunking:
- dynamic (NTK): transformers grows the base only once a sequence passes
  max_position_embeddings, and the engine never runs a sequence that long, so the tables are
  the default ones.
- longrope (Phi-3 "su"): transformers' rotary module picks the long factors once a forward's
  sequence passes original_max_position_embeddings; here each position picks by its own index
  (short below, long from there on). Both keep the keys already cached, so decodes match
  transformers' model with a KV cache exactly; a prompt longer than original_max_position_embeddings
  rotates its early tokens with the short factors where transformers would use the long ones
  (and transformers' generate drops its cache at the crossing to re-rotate everything).
"""

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from sluice.layers import native

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
_REQUIRED = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
             "yarn": ("original_max_position_embeddings",),
             "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}
_ALIASES = {"su": "longrope", "mrope": "default"}  # original Qwen2-VL configs say "mrope"


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """The config's RoPE settings as one flat dict with at least rope_type and rope_theta.

    transformers 5 keeps them in config.rope_parameters (rope_theta included; keyed by layer type
    for Gemma 3); older configs have config.rope_theta plus an optional config.rope_scaling dict.
    """
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "full_attention" in params:  # per layer type (Gemma 3): the global layers' unless asked otherwise
        params = params[layer_type or "full_attention"]
    params = dict(params)
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    params.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    rope_type = params.get("rope_type", params.get("type")) or "default"
    params["rope_type"] = _ALIASES.get(rope_type, rope_type)
    if "original_max_position_embeddings" not in params and hasattr(config, "original_max_position_embeddings"):
        params["original_max_position_embeddings"] = config.original_max_position_embeddings
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


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(head_dim: int, base: float, params: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies by `factor`, keep the high ones, ramp linearly
    between the dims that rotate beta_slow and beta_fast times over the original context;
    cos/sin are scaled by the attention factor (mscale)."""
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    keep = 1 - ramp  # 1: extrapolate (high frequency), 0: interpolate
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention_factor)


def _longrope_attention_factor(params: dict, max_position: int) -> float:
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position / original
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))


def rotary_dim(params: dict, head_dim: int) -> int:
    """How many of a head's dims rotate (partial_rotary_factor: Phi-4-mini rotates 3/4 of them)."""
    factor = params.get("partial_rotary_factor", 1.0)
    dim = int(head_dim * factor)
    if not 0 < dim <= head_dim or dim % 2:
        raise ValueError(f"partial_rotary_factor={factor} (rope_parameters) gives {dim} rotary dims of head_dim "
                         f"{head_dim}; it must give an even number between 2 and head_dim")
    return dim


def rotary_order(head_dim: int, dim: int, num_heads: int, num_kv_heads: int) -> torch.Tensor | None:
    """With partial rotary, an order of a fused qkv row's columns under which the half-rotation
    over each whole head (pairs i, i + head_dim/2) rotates exactly transformers' pairs (i, i + dim/2)
    of its first `dim` dims and pairs the rest with each other at angle 0 (unchanged). q and k heads
    take the same order, so q.k is unchanged; v keeps its own. None when every dim rotates."""
    if dim == head_dim:
        return None
    half, rest = dim // 2, (head_dim - dim) // 2
    head = torch.cat([torch.arange(0, half), torch.arange(dim, dim + rest),
                      torch.arange(half, dim), torch.arange(dim + rest, head_dim)])
    qk_heads = num_heads + num_kv_heads
    qk = (torch.arange(qk_heads)[:, None] * head_dim + head).flatten()
    return torch.cat((qk, torch.arange(qk_heads * head_dim, (qk_heads + num_kv_heads) * head_dim)))


class RotaryEmbedding(nn.Module):
    """Holds cos/sin tables [max_position, head_dim/2]; forward(positions) -> (cos, sin),
    each [T, 1, head_dim] in the full-width form apply_rotary wants. With partial rotary the
    columns past dim/2 stay at angle 0 (see rotary_order)."""

    def __init__(self, head_dim: int, max_position: int, params: dict):
        super().__init__()
        rope_type = params["rope_type"]
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {rope_type!r} (config field rope_parameters / rope_scaling); "
                             f"supported: {', '.join(ROPE_TYPES)}")
        missing = [key for key in _REQUIRED.get(rope_type, ()) if params.get(key) is None]
        if missing:
            raise ValueError(f"rope_type {rope_type!r} needs rope_parameters field(s) {', '.join(missing)}")
        dim = rotary_dim(params, head_dim)
        base = float(params["rope_theta"])
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        inv_freq = 1.0 / (base ** exponents)
        positions = torch.arange(max_position, dtype=torch.float32)[:, None]
        scale = 1.0
        if rope_type == "linear":
            inv_freq = inv_freq / params["factor"]
        elif rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, params, max_position)
        elif rope_type == "yarn":
            inv_freq, scale = _yarn(dim, base, params, max_position)
        freqs = positions * inv_freq[None, :]
        if rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(params[key]) != dim // 2:
                    raise ValueError(f"rope_parameters.{key} has {len(params[key])} entries; "
                                     f"longrope needs one per rotary frequency ({dim // 2})")
            short, long = (1.0 / (torch.tensor(params[key], dtype=torch.float32) * base ** exponents)
                           for key in ("short_factor", "long_factor"))
            is_long = positions >= params["original_max_position_embeddings"]
            freqs = torch.where(is_long, positions * long[None, :], positions * short[None, :])
            scale = _longrope_attention_factor(params, max_position)
        # float32 like HF; the tables follow model.to(dtype) afterwards, which matches HF
        # casting cos/sin to the activation dtype before use.
        unrotated = (head_dim - dim) // 2
        self.register_buffer("cos", F.pad(freqs.cos() * scale, (0, unrotated), value=1.0), persistent=False)
        self.register_buffer("sin", F.pad(freqs.sin() * scale, (0, unrotated), value=0.0), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Done once per forward and shared by all layers."""
        cos, sin = self.cos.index_select(0, positions), self.sin.index_select(0, positions)
        return torch.cat((cos, cos), -1).unsqueeze(1), torch.cat((-sin, sin), -1).unsqueeze(1)


class MRotaryEmbedding(RotaryEmbedding):
    """M-RoPE (Qwen2-VL): the rotary frequencies fall into three runs of `mrope_section` sizes,
    turned by a token's temporal, height and width position. forward takes positions [3, T]
    (text tokens have three equal rows); 1-D positions are plain rotary, which equal rows give."""

    def __init__(self, head_dim: int, max_position: int, params: dict):
        super().__init__(head_dim, max_position, params)
        sections = [int(s) for s in params["mrope_section"]]
        if len(sections) != 3 or sum(sections) * 2 != head_dim or rotary_dim(params, head_dim) != head_dim:
            raise ValueError(f"rope_parameters.mrope_section={sections} must be three sizes summing to head_dim / 2 "
                             f"({head_dim // 2}), with every dim rotating")
        bounds = [0, *itertools.accumulate(sections)]
        self.sections = list(zip(bounds[:-1], bounds[1:]))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().forward(positions)
        cos, sin = (torch.cat([table.index_select(0, row)[:, lo:hi] for row, (lo, hi) in zip(positions, self.sections)],
                              -1) for table in (self.cos, self.sin))
        return torch.cat((cos, cos), -1).unsqueeze(1), torch.cat((-sin, sin), -1).unsqueeze(1)


def get_rope(config, head_dim: int, layer_type: str | None = None) -> RotaryEmbedding:
    params = rope_parameters(config, layer_type)
    rope_class = MRotaryEmbedding if params.get("mrope_section") else RotaryEmbedding
    return rope_class(head_dim, config.max_position_embeddings, params)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated pairwise (i, i + D/2), i.e. HF's x*cos + rotate_half(x)*sin:
    rotate_half(x) = cat(-x2, x1) = roll(x, D/2) * [-1.., 1..], and that sign is folded
    into `sin`. cos/sin [T, 1, D] come from RotaryEmbedding.forward, in x's dtype."""
    out = native.rotary(x, cos, sin)  # one pass in bfloat16, same rounding
    if out is not None:
        return out
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin
