"""What an attention backend owns: the KV cache layout, the KV write, attention over paged
blocks for prompt and decode rows, and the bytes a block takes.

Every backend keeps a layer's cache as one tensor whose leading dims are [2 (K, V), num_blocks]
(the runner allocates it zeroed and faults it in region by region); what a block holds inside
is the backend's own business. A backend owns the cache's dtype too: the model's, or a compact
format (--kv-cache-dtype fp8/int8, sluice/quantization/kv_cache.py) both backends lay out alike,
bytes in token order with their scales. The runner zeroes the cache: backends may read every
slot of a block, masked or not, and NaN garbage would leak into real rows.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from sluice.layers.attention.metadata import AttentionMetadata
from sluice.layers.rotary import apply_rotary
from sluice.quantization.kv_cache import KVCacheQuant


@dataclass(frozen=True)
class AttentionParams:
    """How one layer turns scores into weights. Layers of a model may differ (Gemma alternates
    windowed and global layers); the step's metadata is the same for all of them."""
    scale: float
    # transformers' rule: a row at position p sees keys j with p - sliding_window < j <= p
    sliding_window: int | None = None
    # Gemma 2: scores become cap * tanh(score / cap) after scaling, before the mask
    logits_soft_cap: float | None = None

    def __post_init__(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive number of tokens, got {self.sliding_window}")
        if self.logits_soft_cap is not None and not self.logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap must be positive, got {self.logits_soft_cap}")


class AttentionBackend(ABC):
    name: ClassVar[str]

    def __init__(self, kv_quant: KVCacheQuant | None = None) -> None:
        self.kv_quant = kv_quant  # None: the cache holds the model's dtype

    def kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the cache tensor: bytes for a compact cache."""
        return model_dtype if self.kv_quant is None else torch.uint8

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """One layer's cache. With the model's dtype both backends give [2, num_blocks, block_size,
        num_kv_heads, head_dim] elements and differ in how a block's elements are ordered; a
        compact cache is [2, num_blocks, block_size, num_kv_heads, head_dim + 2] bytes (a scale
        after each row)."""
        row = head_dim if self.kv_quant is None else self.kv_quant.row_bytes(head_dim)
        return (2, num_blocks, block_size, num_kv_heads, row)

    def bytes_per_block(self, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """One layer's K and V bytes for one block, for a model of this dtype."""
        elements = math.prod(self.kv_cache_shape(1, block_size, num_kv_heads, head_dim))
        return elements * self.kv_cache_dtype(dtype).itemsize

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' k/v [T, Hkv, D] at their flat slots; returns them as they read
        back (quantized and restored, for a compact cache)."""
        if self.kv_quant is not None:
            return self.kv_quant.write(kv_cache, k, v, slot_mapping)
        self._write_kv(kv_cache, k, v, slot_mapping)
        return k, v

    def read_kv(self, kv_cache: torch.Tensor, block_table: torch.Tensor, dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole blocks in token order: [B, NB] block ids -> k, v [B, NB*block_size, Hkv, D], a compact
        cache's dequantized to dtype (the model's; default float32)."""
        if self.kv_quant is not None:
            return self.kv_quant.read(kv_cache, block_table, dtype or torch.float32)
        return self._read_kv(kv_cache, block_table)

    @abstractmethod
    def _write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """write_kv into a cache of the model's dtype, in this backend's block layout."""

    @abstractmethod
    def _read_kv(self, kv_cache: torch.Tensor, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """read_kv from a cache of the model's dtype."""

    def rope_and_write(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From a fused projection qkv [T, (H + 2 Hkv) * D]: rotary on q and k, the new k/v written
        to the cache. Returns q [T, H, D] and k, v [T, Hkv, D]. Backends may fuse the steps."""
        T, H, Hkv, D = qkv.shape[0], num_heads, num_kv_heads, head_dim
        # q and k sit side by side in qkv: one [T, H + Hkv, D] tensor, so rotary runs once for both
        qk, v = qkv.split([(H + Hkv) * D, Hkv * D], dim=-1)
        q, k = apply_rotary(qk.view(T, H + Hkv, D), cos, sin).split([H, Hkv], dim=1)
        v = v.view(T, Hkv, D)
        k, v = self.write_kv(kv_cache, k, v, slot_mapping)
        return q, k, v

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
               meta: AttentionMetadata, params: AttentionParams) -> torch.Tensor:
        """q [T, H, D] -> [T, H*D], once this step's k/v [T, Hkv, D] are in the cache: every row
        attends causally to its request's keys up to its own position (within its window)."""
