"""The attention layer models call: rotary, the KV write and paged attention, through the
backend the platform picked for this layer's dtype and shape. Models reach nothing below it."""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from sluice.layers.attention.backend import AttentionBackend, AttentionParams
from sluice.layers.attention.metadata import AttentionMetadata
from sluice.layers.attention.native_backend import NativeBackend
from sluice.layers.attention.torch_backend import TorchBackend
from sluice.platform import current_platform
from sluice.quantization.kv_cache import get_kv_cache_quant

logger = logging.getLogger(__name__)

BACKENDS: dict[str, type[AttentionBackend]] = {"native": NativeBackend, "torch": TorchBackend}


@functools.lru_cache(maxsize=None)
def get_attn_backend(num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                     kv_cache_dtype: str = "auto") -> AttentionBackend:
    """The platform's backend for this shape and KV cache dtype (config.py's kv_cache_dtype), one
    instance per choice, logged once."""
    name = current_platform(device).attention_backend_name(dtype, num_heads, head_dim, kv_cache_dtype)
    logger.info("attention backend: %s (%s, %d heads of %d, on %s; KV cache %s)", name, dtype, num_heads, head_dim,
                device, kv_cache_dtype)
    return BACKENDS[name](get_kv_cache_quant(kv_cache_dtype))


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None,
                 backend: AttentionBackend | None = None):
        """sliding_window and logits_soft_cap as in AttentionParams (None: off). The backend
        defaults to the platform's choice for torch's default dtype and device, which the model
        runner sets while it builds the model."""
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.params = AttentionParams(head_dim ** -0.5 if scale is None else scale, sliding_window, logits_soft_cap)
        self.backend = backend or get_attn_backend(num_heads, head_dim, torch.get_default_dtype(),
                                                   torch.get_default_device())
        self.kv_group = 0  # the KV cache group whose block tables it reads (the runner sets it)

    def set_kv_cache_dtype(self, kv_cache_dtype: str, dtype: torch.dtype, device: torch.device) -> None:
        """Serve a KV cache of this dtype (config.py's kv_cache_dtype): the platform's backend for it."""
        self.backend = get_attn_backend(self.num_heads, self.head_dim, dtype, device, kv_cache_dtype)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return self.backend.kv_cache_shape(num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def kv_cache_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.backend.kv_cache_dtype(dtype)

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        return self.backend.bytes_per_block(block_size, self.num_kv_heads, self.head_dim, dtype)

    def forward(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """Fused projection qkv [T, (H + 2 Hkv) * D] (q and k not yet rotated) -> [T, H * D]."""
        meta = meta.by_kv_group[self.kv_group]
        q, k, v = self.backend.rope_and_write(qkv, cos, sin, kv_cache, meta.slot_mapping, self.num_heads,
                                              self.num_kv_heads, self.head_dim)
        return self.backend.attend(q, k, v, kv_cache, meta, self.params)


def attention_layers(model: nn.Module) -> list[Attention]:
    """The model's attention layers in order: one KV cache each."""
    return [module for module in model.modules() if isinstance(module, Attention)]


def layer_windows(model: nn.Module) -> list[int | None]:
    """Each attention layer's sliding window (None: full attention): what groups the KV cache."""
    return [layer.params.sliding_window for layer in attention_layers(model)]
