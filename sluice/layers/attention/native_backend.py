"""The native CPU backend: sluice's C kernels (csrc/attention.c) on CPUs with AVX-512 BF16.

Blocks are laid out for the bf16 dot-product instruction, which multiplies pairs: K keeps a
block as [num_kv_heads, head_dim/2, block_size, 2] (pairs of dims, tokens along the row: 16 keys
scored per instruction), V as [num_kv_heads, block_size/2, head_dim, 2] (pairs of tokens, dims
along the row); block_size must be even. Every scheduled token is one query row that reads its
request's blocks straight from the cache up to its own position (from its window's start, in a
windowed layer): decodes and prompt chunks in one call, no padding, no gather. A compact
cache (int8 / fp8 bytes with a scale per token and head, sluice/quantization/kv_cache.py) keeps
token order; the kernel dequantizes each row in registers as it reads it.
"""

from __future__ import annotations

import torch

from sluice.layers import native
from sluice.layers.attention.backend import AttentionBackend, AttentionParams
from sluice.layers.attention.metadata import AttentionMetadata

MAX_HEAD_DIM, MAX_HEADS = 256, 64  # attention.c's compiled limits


def _k_layout(block_size: int, Hkv: int, D: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A K block's shape in memory, and the permutation that puts it in token order."""
    return (Hkv, D // 2, block_size, 2), (0, 3, 1, 2, 4)


def _v_layout(block_size: int, Hkv: int, D: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return (Hkv, block_size // 2, D, 2), (0, 2, 4, 1, 3)


class NativeBackend(AttentionBackend):
    name = "native"

    @staticmethod
    def supports(num_heads: int, head_dim: int) -> bool:
        """Shapes the vectorised kernel serves (the platform checks the CPU and the dtype)."""
        return head_dim % 32 == 0 and head_dim <= MAX_HEAD_DIM and num_heads <= MAX_HEADS

    def _write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if not native.write_kv(kv_cache[0], kv_cache[1], k, v, slot_mapping):
            raise RuntimeError("the native attention backend needs the native kernel library")

    def _read_kv(self, kv_cache: torch.Tensor, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, num_blocks, block_size, Hkv, D = kv_cache.shape
        B, NB = block_table.shape
        out = []
        for cache, layout in ((kv_cache[0], _k_layout), (kv_cache[1], _v_layout)):
            shape, to_token_order = layout(block_size, Hkv, D)
            blocks = cache.view(num_blocks, *shape).index_select(0, block_table.reshape(-1))
            out.append(blocks.permute(*to_token_order).reshape(B, NB * block_size, Hkv, D))
        return out[0], out[1]

    def rope_and_write(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One pass over qkv: rotated q out, rotated k and v straight into the cache (k, v: None).
        A compact cache is written by the shared quantizing path."""
        q = None
        if self.kv_quant is None:
            q = native.rope_qkv_cache(qkv, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads, head_dim)
        if q is None:
            return super().rope_and_write(qkv, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads, head_dim)
        return q, None, None

    def attend(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, kv_cache: torch.Tensor,
               meta: AttentionMetadata, params: AttentionParams) -> torch.Tensor:
        T, H, D = q.shape
        if self.kv_quant is not None:
            out = native.paged_attention_kv8(q.contiguous(), kv_cache, self.kv_quant.kernel_kind,
                                             meta.token_block_table, meta.token_seq_lens, params.scale,
                                             params.sliding_window, params.logits_soft_cap)
        else:
            out = native.paged_attention(q.contiguous(), kv_cache[0], kv_cache[1], meta.token_block_table,
                                         meta.token_seq_lens, params.scale, params.sliding_window,
                                         params.logits_soft_cap)
        if out is None:
            raise RuntimeError(f"the native attention kernel rejected q {tuple(q.shape)} {q.dtype}")
        return out.view(T, H * D)
