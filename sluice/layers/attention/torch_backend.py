"""The portable backend: PyTorch ops only, so it runs on any CPU and on CUDA unchanged.

A block is kept in token order, [block_size, num_kv_heads, head_dim] for K and for V, so
gathering a request's blocks is one index_select with no permute (a compact cache is gathered
the same way, then dequantized). Decodes and prefills are attended as two padded batches (see
AttentionGroup): their K/V gathered a whole block at a time, and a bool mask encodes causality,
each request's context length and padding, so one SDPA call covers each group. A windowed layer
narrows the mask and gathers only the blocks its window reaches; a soft-capped layer computes
transformers' eager formula, which SDPA has no option for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sluice.layers.attention.backend import AttentionBackend, AttentionParams
from sluice.layers.attention.metadata import AttentionGroup, AttentionMetadata


class TorchBackend(AttentionBackend):
    name = "torch"

    def _write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        _, _, _, Hkv, D = kv_cache.shape
        kv_cache[0].view(-1, Hkv, D).index_copy_(0, slot_mapping, k)
        kv_cache[1].view(-1, Hkv, D).index_copy_(0, slot_mapping, v)

    def _read_kv(self, kv_cache: torch.Tensor, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # index_select copies whole rows; advanced indexing goes element by element (~5x slower on CPU)
        _, _, block_size, Hkv, D = kv_cache.shape
        B, NB = block_table.shape
        index = block_table.reshape(-1)
        return tuple(kv_cache[i].index_select(0, index).view(B, NB * block_size, Hkv, D) for i in (0, 1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
               meta: AttentionMetadata, params: AttentionParams) -> torch.Tensor:
        T, H, D = q.shape
        groups = [g for g in meta.groups(params.sliding_window) if g is not None]
        if len(groups) == 1 and groups[0].token_index.numel() == T:
            # one group, no padding: its rows are the flat batch in order (pure decode, or
            # prefills of equal length), so skip the gather and scatter
            return self._attend_group(q, k, v, kv_cache, groups[0], params, gather=False).reshape(T, H * D)
        out = q.new_empty(T, H, D)
        for g in groups:
            o = self._attend_group(q, k, v, kv_cache, g, params, gather=True)
            index = g.token_index.view(-1)
            if g.token_index.shape[1] > 1 and not bool(g.query_valid.all()):  # drop padding rows
                valid = g.query_valid.view(-1).nonzero().squeeze(1)
                index, o = index.index_select(0, valid), o.index_select(0, valid)
            out.index_copy_(0, index, o)
        return out.view(T, H * D)

    def _attend_group(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, kv_cache: torch.Tensor,
                      g: AttentionGroup, params: AttentionParams, gather: bool) -> torch.Tensor:
        """Attention for one group -> [B*Q, H, D], row b*Q + i for query i of request b."""
        if g.fresh:
            return _attend_fresh(q, k_new, v_new, g, params, gather)
        B, Q = g.token_index.shape
        H, D = q.shape[1], q.shape[2]
        Hkv = kv_cache.shape[3]
        G = H // Hkv
        k, v = (t.transpose(1, 2) for t in self.read_kv(kv_cache, g.block_table, q.dtype))
        L = k.shape[2]
        if gather:
            q = q.index_select(0, g.token_index.view(-1))
        # GQA: fold the G query heads that share a KV head into the query-row dimension
        # (HF order: head h uses kv head h // G), so K/V are never expanded. On CPU this is
        # several times faster than enable_gqa=True for decode, and no slower for prefill.
        q = q.reshape(B, Q, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Q, D)
        mask = g.mask
        if G > 1 and Q > 1:
            mask = mask.unsqueeze(2).expand(B, 1, G, Q, L).reshape(B, 1, G * Q, L)
        o = _attention(q, k, v, mask, params)
        return o.view(B, Hkv, G, Q, D).permute(0, 3, 1, 2, 4).reshape(B * Q, H, D)


def _attend_fresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: AttentionGroup, params: AttentionParams,
                  gather: bool) -> torch.Tensor:
    """Prompts starting at position 0 attend causally to their own new K/V: no cache gather, and
    SDPA's own causal mask unless a window or soft cap needs one of ours (padding keys sit after
    every valid query, so causality already hides them)."""
    B, Q = g.token_index.shape
    if gather:
        index = g.token_index.view(-1)
        q, k, v = q.index_select(0, index), k.index_select(0, index), v.index_select(0, index)
    H, D, Hkv = q.shape[1], q.shape[2], k.shape[1]
    qb, kb, vb = (t.reshape(B, Q, t.shape[1], D).transpose(1, 2) for t in (q, k, v))
    window = params.sliding_window
    if params.logits_soft_cap is None and (window is None or window >= Q):
        o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=params.scale, enable_gqa=Hkv != H)
    else:
        mask = torch.ones(Q, Q, dtype=torch.bool, device=q.device).tril()
        if window is not None:
            mask = mask.triu(1 - window)
        o = _attention(qb, kb, vb, mask, params)
    return o.transpose(1, 2).reshape(B * Q, H, D)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               params: AttentionParams) -> torch.Tensor:
    """q [B, H, Q, D] over k, v [B, Hkv, L, D] where mask (broadcast to [B, H, Q, L]) allows.
    With a soft cap, transformers' eager steps in its order and dtypes (SDPA has no cap)."""
    H, Hkv = q.shape[1], k.shape[1]
    cap = params.logits_soft_cap
    if cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=params.scale, enable_gqa=Hkv != H)
    if Hkv != H:
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scores = torch.tanh(q @ k.transpose(-1, -2) * params.scale / cap) * cap
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(v.dtype)
    return weights @ v
