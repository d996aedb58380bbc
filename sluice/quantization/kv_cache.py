"""A compact KV cache (--kv-cache-dtype fp8 | fp8_e4m3 | int8): one byte per element plus a scale
per token and KV head, so a block takes about half the bytes of a bf16 one.

Why per token and head: a token's K/V are quantized once, when written, whatever else shares its
block, so a prompt recomputed after preemption, or written in other chunks, or read back through a
prefix-cache hit, stores exactly the same bytes. (A per-block scale would have to requantize the
block's earlier tokens whenever a larger value arrives, and then depend on the write order.)

Layout of one block's K (or V), as bytes, for both attention backends and attention.c:
    data   [block_size, num_kv_heads, head_dim]  1 byte each (int8, or fp8 e4m3)
    scales [block_size, num_kv_heads]            bfloat16; element = data * scale
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.bfloat16
SCALE_BYTES = 2


@dataclass(frozen=True)
class KVCacheQuant:
    """One compact element format: how K/V rows are quantized, stored and read back."""
    name: str
    dtype: torch.dtype  # of one stored element
    qmax: float  # the largest magnitude the format holds: a row's absmax maps to it
    kernel_kind: int  # attention.c's KV_INT8 / KV_FP8

    @staticmethod
    def row_bytes(head_dim: int) -> int:
        """Bytes of one token's K (or V) in one head: its elements and their scale."""
        return head_dim + SCALE_BYTES

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., D] -> (elements [..., D] as uint8 bytes, scales [...] bf16). The scale is rounded
        to bf16 before dividing, so data * scale reconstructs x to the format's own precision."""
        x = x.float()
        scale = (x.abs().amax(-1) / self.qmax).clamp(min=torch.finfo(torch.float32).tiny).to(SCALE_DTYPE)
        scaled = (x / scale.float().unsqueeze(-1)).clamp(-self.qmax, self.qmax)
        if self.dtype == torch.int8:
            scaled = scaled.round()
        return scaled.to(self.dtype).view(torch.uint8), scale

    def dequantize(self, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Bytes [..., D] and scales [...] -> values [..., D] in dtype."""
        return (data.view(self.dtype).float() * scale.float().unsqueeze(-1)).to(dtype)

    def write(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize k/v [T, Hkv, D] into their flat slots; returns them as they will read back,
        so attention over new tokens sees what attention over cached ones does."""
        T, Hkv, D = k.shape
        stored = []
        for region, x in zip(kv_cache.unbind(0), (k, v)):
            data, scale = self.quantize(x)
            rows = torch.cat([data, scale.unsqueeze(-1).view(torch.uint8)], dim=-1)
            region.view(-1, Hkv, D + SCALE_BYTES).index_copy_(0, slot_mapping, rows)
            stored.append(self.dequantize(data, scale, x.dtype))
        return stored[0], stored[1]

    def read(self, kv_cache: torch.Tensor, block_table: torch.Tensor, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole blocks in token order, dequantized: [B, NB] -> k, v [B, NB*block_size, Hkv, D]."""
        _, _, block_size, Hkv, row = kv_cache.shape
        B, NB = block_table.shape
        index = block_table.reshape(-1)
        out = []
        for region in kv_cache.unbind(0):
            rows = region.index_select(0, index)
            scale = rows[..., -SCALE_BYTES:].view(SCALE_DTYPE)[..., 0]
            values = self.dequantize(rows[..., :-SCALE_BYTES], scale, dtype)
            out.append(values.view(B, NB * block_size, Hkv, row - SCALE_BYTES))
        return out[0], out[1]


FP8_E4M3 = KVCacheQuant("fp8_e4m3", torch.float8_e4m3fn, 448.0, kernel_kind=2)
INT8 = KVCacheQuant("int8", torch.int8, 127.0, kernel_kind=1)
# vLLM's names (fp8 is e4m3); "auto" (the model's dtype) has no entry
KV_CACHE_QUANTS = {"fp8": FP8_E4M3, "fp8_e4m3": FP8_E4M3, "int8": INT8}


def get_kv_cache_quant(kv_cache_dtype: str) -> KVCacheQuant | None:
    """The compact format of a --kv-cache-dtype value; None for auto (the model's dtype)."""
    return KV_CACHE_QUANTS.get(kv_cache_dtype)
