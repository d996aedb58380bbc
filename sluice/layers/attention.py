"""Paged attention over a flattened varlen batch.

With the native kernel (bfloat16, AVX-512 BF16), every scheduled token is one query row that
reads its request's blocks straight from the cache, up to its own position: decodes and
prompt chunks in one call, no padding. Otherwise, the PyTorch path below:
a step's T scheduled tokens (all requests concatenated) are split into two groups:
decodes (one query token each) and prefills (a chunk of prompt each, possibly after
tokens already cached). Each group is attended as one padded batch: its requests' K/V
are gathered from the paged cache a whole block at a time, and a bool mask encodes
causality, each request's context length and padding, so one SDPA call covers it.

KV cache, per layer: one tensor [2, num_blocks, block_size, num_kv_heads, head_dim] whose
blocks are laid out for the native decode kernel's bf16 dot-product instruction, which
multiplies pairs: K keeps a block as [num_kv_heads, head_dim/2, block_size, 2] (pairs of
dims, tokens along the row: 16 keys scored per instruction), V as [num_kv_heads,
block_size/2, head_dim, 2] (pairs of tokens, dims along the row). `write_kv`, `gather_k`
and `gather_v` hide both; block_size must be even.
Block 0 is the null block used for padding block tables. Every slot of a gathered block is
read, masked or not, so the cache must hold finite values everywhere (the runner zeroes it):
masking is additive (-inf), and NaN garbage would leak into real rows.
"""

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sluice.layers import native


@dataclass
class AttentionGroup:
    """Requests attended together as one padded batch."""
    token_index: torch.Tensor  # [B, Q] int64 index into the flat T dimension (padding points at a valid token)
    query_valid: torch.Tensor  # [B, Q] bool
    block_table: torch.Tensor  # [B, NB] int64 block ids, padded with 0 (null block)
    mask: torch.Tensor  # [B, 1, Q, NB*block_size] bool, True = may attend; padded rows attend key 0 only
    seq_lens: torch.Tensor  # [B] int64 keys of each request once this step's tokens are written
    fresh: bool = False  # every request starts at position 0: its keys are exactly its new tokens


class AttentionMetadata:
    """One step's attention inputs. The padded decode/prefill groups only the PyTorch path reads
    are built on first use, so the native path never pays for their masks."""

    def __init__(self, slot_mapping: torch.Tensor, num_tokens: int, token_block_table: torch.Tensor,
                 token_seq_lens: torch.Tensor, group_inputs: tuple, device) -> None:
        self.slot_mapping = slot_mapping  # [T] int64 flat slot where each scheduled token's new K/V is written
        self.num_tokens = num_tokens  # T
        # Per token, for the native kernel that treats every query row (decode or prompt) alike:
        self.token_block_table = token_block_table  # [T, NB] int64 its request's block table
        self.token_seq_lens = token_seq_lens  # [T] int64 keys it may see: its position + 1
        self._group_inputs = group_inputs  # (qlens, ctx, starts, seq_lens, num_blocks, table, block_size)
        self._device = device

    @functools.cached_property
    def decode(self) -> AttentionGroup | None:
        """Requests with exactly one query token this step."""
        qlens = self._group_inputs[0]
        return _group(np.flatnonzero(qlens == 1), *self._group_inputs, self._device)

    @functools.cached_property
    def prefill(self) -> AttentionGroup | None:
        """Requests with more than one query token this step."""
        qlens = self._group_inputs[0]
        return _group(np.flatnonzero(qlens > 1), *self._group_inputs, self._device)


def build_attention_metadata(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
                             block_size: int, device) -> AttentionMetadata:
    """query_lens[i] tokens of request i are scheduled this step, laid out consecutively in
    request order; context_lens[i] of its tokens are already cached, so its queries sit at
    positions context_lens[i] .. context_lens[i] + query_lens[i] - 1. block_tables[i] must
    cover context_lens[i] + query_lens[i] positions (extra entries are ignored).

    Python work is one short loop over requests; everything per token is numpy/torch.
    """
    qlens = np.asarray(query_lens, dtype=np.int64).reshape(-1)
    ctx = np.asarray(context_lens, dtype=np.int64).reshape(-1)
    num_reqs = len(qlens)
    if len(ctx) != num_reqs or len(block_tables) != num_reqs:
        raise ValueError("query_lens, context_lens and block_tables must have one entry per request")
    seq_lens = ctx + qlens
    num_blocks = -(-seq_lens // block_size)
    table = np.zeros((num_reqs, int(num_blocks.max(initial=0))), dtype=np.int64)
    for i, blocks in enumerate(block_tables):
        n = int(num_blocks[i])
        if len(blocks) < n:
            raise ValueError(f"request {i}: block table has {len(blocks)} blocks, needs {n}")
        table[i, :n] = blocks[:n]

    starts = np.cumsum(qlens) - qlens
    num_tokens = int(qlens.sum())
    req = np.repeat(np.arange(num_reqs), qlens)  # request of each flat token
    pos = ctx[req] + np.arange(num_tokens) - starts[req]
    slots = table[req, pos // block_size] * block_size + pos % block_size
    return AttentionMetadata(
        slot_mapping=torch.from_numpy(slots).to(device),
        num_tokens=num_tokens,
        token_block_table=torch.from_numpy(table[req]).to(device),
        token_seq_lens=torch.from_numpy(pos + 1).to(device),
        group_inputs=(qlens, ctx, starts, seq_lens, num_blocks, table, block_size),
        device=device,
    )


def _group(ids: np.ndarray, qlens: np.ndarray, ctx: np.ndarray, starts: np.ndarray, seq_lens: np.ndarray,
           num_blocks: np.ndarray, table: np.ndarray, block_size: int, device) -> AttentionGroup | None:
    """The requests `ids` as one padded batch, with the bool mask SDPA takes."""
    if len(ids) == 0:
        return None
    q, c = qlens[ids], ctx[ids]
    nb = int(num_blocks[ids].max())
    qi = np.arange(int(q.max()))
    valid = qi[None, :] < q[:, None]
    token_index = starts[ids][:, None] + np.minimum(qi[None, :], q[:, None] - 1)
    # position of each query row; padding rows get 0 so they see exactly key 0
    qpos = torch.from_numpy(np.where(valid, c[:, None] + qi[None, :], 0)).to(device)
    mask = torch.arange(nb * block_size, device=device) <= qpos[:, :, None]
    return AttentionGroup(
        token_index=torch.from_numpy(token_index).to(device),
        query_valid=torch.from_numpy(valid).to(device),
        block_table=torch.from_numpy(np.ascontiguousarray(table[ids, :nb])).to(device),
        mask=mask.unsqueeze(1),
        seq_lens=torch.from_numpy(np.ascontiguousarray(seq_lens[ids])).to(device),
        fresh=bool(c.max() == 0),
    )


def _k_layout(block_size: int, Hkv: int, D: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A K block's shape in memory, and the permutation that puts it in token order."""
    return (Hkv, D // 2, block_size, 2), (0, 3, 1, 2, 4)


def _v_layout(block_size: int, Hkv: int, D: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return (Hkv, block_size // 2, D, 2), (0, 2, 4, 1, 3)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K/V [T, Hkv, D] at their slots, in the paired layouts."""
    if native.write_kv(kv_cache[0], kv_cache[1], k, v, slot_mapping):
        return
    _, num_blocks, block_size, Hkv, D = kv_cache.shape
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_blocks = kv_cache[0].view(num_blocks, *_k_layout(block_size, Hkv, D)[0])
    k_blocks[blocks, :, :, offsets, :] = k.view(-1, Hkv, D // 2, 2)
    v_blocks = kv_cache[1].view(num_blocks, *_v_layout(block_size, Hkv, D)[0])
    v_blocks[blocks, :, offsets // 2, :, offsets % 2] = v


def _gather_blocks(cache: torch.Tensor, block_table: torch.Tensor, layout) -> torch.Tensor:
    """Whole blocks in token order: [B, NB] block ids -> [B, NB*block_size, Hkv, D]."""
    num_blocks, block_size, Hkv, D = cache.shape
    B, NB = block_table.shape
    shape, to_token_order = layout(block_size, Hkv, D)
    blocks = cache.view(num_blocks, *shape).index_select(0, block_table.view(-1))
    return blocks.permute(*to_token_order).reshape(B, NB * block_size, Hkv, D)


def gather_k(k_cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    return _gather_blocks(k_cache, block_table, _k_layout)


def gather_v(v_cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    return _gather_blocks(v_cache, block_table, _v_layout)


def _attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, g: AttentionGroup, scale: float, gather_q: bool) -> torch.Tensor:
    """Decode rows read the paged cache in place through the native kernel when it is built."""
    rows = q.index_select(0, g.token_index.view(-1)) if gather_q else q
    out = native.paged_decode_attention(rows.contiguous(), k_cache, v_cache, g.block_table, g.seq_lens, scale)
    if out is None:
        return _attend(q, k, v, k_cache, v_cache, g, scale, gather_q)
    return out


def _attend_fresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: AttentionGroup,
                  scale: float, gather_q: bool) -> torch.Tensor:
    """Prompts starting at position 0 attend causally to their own new K/V: no cache gather,
    no mask (padding keys sit after every valid query, so causality already hides them)."""
    B, Q = g.token_index.shape
    if gather_q:
        index = g.token_index.view(-1)
        q, k, v = q.index_select(0, index), k.index_select(0, index), v.index_select(0, index)
    H, D, Hkv = q.shape[1], q.shape[2], k.shape[1]
    qb, kb, vb = (t.view(B, Q, t.shape[1], D).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=Hkv != H)
    return o.transpose(1, 2).reshape(B * Q, H, D)


def _attend(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor, g: AttentionGroup, scale: float, gather_q: bool) -> torch.Tensor:
    """Attention for one group -> [B*Q, H, D], row b*Q + i for query i of request b."""
    if g.fresh:
        return _attend_fresh(q, k_new, v_new, g, scale, gather_q)
    B, Q = g.token_index.shape
    H, D = q.shape[1], q.shape[2]
    Hkv = k_cache.shape[2]
    G = H // Hkv
    L = g.block_table.shape[1] * k_cache.shape[1]
    # Gather whole blocks with index_select (row memcpy; advanced indexing goes element by
    # element and is ~5x slower on CPU), then reorder them into token order.
    k = gather_k(k_cache, g.block_table).transpose(1, 2)
    v = gather_v(v_cache, g.block_table).transpose(1, 2)
    if gather_q:
        q = q.index_select(0, g.token_index.view(-1))
    # GQA: fold the G query heads that share a KV head into the query-row dimension
    # (HF order: head h uses kv head h // G), so K/V are never expanded. On CPU this is
    # several times faster than enable_gqa=True for decode, and no slower for prefill.
    q = q.view(B, Q, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Q, D)
    mask = g.mask
    if G > 1 and Q > 1:
        mask = mask.unsqueeze(2).expand(B, 1, G, Q, L).reshape(B, 1, G * Q, L)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o.view(B, Hkv, G, Q, D).permute(0, 3, 1, 2, 4).reshape(B * Q, H, D)


def cached_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float) -> torch.Tensor | None:
    """q [T, H, D] -> [T, H*D] once this step's K/V are in the cache; None without the native kernel.

    Every row, decode or prompt, reads its keys straight from the cache: one call, no padding,
    no gather (about 3x faster than SDPA for prompts here, as well as for decodes).
    """
    T, H, D = q.shape
    if not native.has_fast_path(q.dtype, D):
        return None
    out = native.paged_decode_attention(q.contiguous(), kv_cache[0], kv_cache[1], meta.token_block_table,
                                        meta.token_seq_lens, scale)
    return None if out is None else out.view(T, H * D)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] for the new tokens -> [T, H*D].

    Writes the new K/V into the cache first, so each request then attends to its cached
    context and its own new tokens through the same gathered blocks.
    """
    T, H, D = q.shape
    write_kv(kv_cache, k, v, meta.slot_mapping)
    out = cached_attention(q, kv_cache, meta, scale)
    if out is not None:
        return out
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    groups = [(g, fn) for g, fn in ((meta.decode, _attend_decode), (meta.prefill, _attend)) if g is not None]
    if len(groups) == 1 and groups[0][0].token_index.numel() == T:
        # one group, no padding: its rows are the flat batch in order (pure decode, or
        # prefills of equal length), so skip the gather and scatter
        g, attend = groups[0]
        return attend(q, k, v, k_cache, v_cache, g, scale, gather_q=False).reshape(T, H * D)
    out = q.new_empty(T, H, D)
    for g, attend in groups:
        o = attend(q, k, v, k_cache, v_cache, g, scale, gather_q=True)
        index = g.token_index.view(-1)
        if g.token_index.shape[1] > 1 and not bool(g.query_valid.all()):  # drop padding rows
            valid = g.query_valid.view(-1).nonzero().squeeze(1)
            index, o = index.index_select(0, valid), o.index_select(0, valid)
        out.index_copy_(0, index, o)
    return out.view(T, H * D)
