"""One step's attention inputs, shared by every backend: where each new token's K/V goes (the
slot mapping), each query row's block table and key count (what the native kernel reads), and,
built on first use, the padded decode and prefill groups the PyTorch backend attends.

A step's T scheduled tokens (all requests concatenated) are either decodes (one query token
each) or prefills (a chunk of prompt each, possibly after tokens already cached). Block 0 is
the null block used for padding block tables.
"""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AttentionGroup:
    """Requests attended together as one padded batch, for layers with one window (or none).
    Its keys start at the block holding its first row's first key: a windowed layer gathers
    only the blocks its window reaches."""
    token_index: torch.Tensor  # [B, Q] int64 index into the flat T dimension (padding points at a valid token)
    query_valid: torch.Tensor  # [B, Q] bool
    block_table: torch.Tensor  # [B, NB] int64 block ids from that first block on, padded with 0 (null block)
    mask: torch.Tensor  # [B, 1, Q, NB*block_size] bool, True = may attend; padded rows attend their first key only
    seq_lens: torch.Tensor  # [B] int64 keys of each request once this step's tokens are written
    fresh: bool = False  # every request starts at position 0: its keys are exactly its new tokens


class AttentionMetadata:
    """One step's attention inputs. The padded decode/prefill groups only the PyTorch backend
    reads are built on first use, once per window, so the native backend never pays for their masks."""

    def __init__(self, slot_mapping: torch.Tensor, num_tokens: int, token_block_table: torch.Tensor,
                 token_seq_lens: torch.Tensor, group_inputs: tuple, device) -> None:
        self.slot_mapping = slot_mapping  # [T] int64 flat slot where each scheduled token's new K/V is written
        self.num_tokens = num_tokens  # T
        # Per token, for the native kernel that treats every query row (decode or prompt) alike:
        self.token_block_table = token_block_table  # [T, NB] int64 its request's block table
        self.token_seq_lens = token_seq_lens  # [T] int64 keys it may see: its position + 1
        self._group_inputs = group_inputs  # (qlens, ctx, starts, seq_lens, num_blocks, table, block_size)
        self._device = device
        self._groups: dict[int | None, tuple[AttentionGroup | None, AttentionGroup | None]] = {}
        # the step's metadata per KV cache group (block tables differ, positions do not): a layer
        # reads its group's; one group: this one
        self.by_kv_group: list[AttentionMetadata] = [self]

    def groups(self, window: int | None = None) -> tuple[AttentionGroup | None, AttentionGroup | None]:
        """(decodes, prefills) for layers with this sliding window (None: full attention):
        requests with exactly one query token this step, and those with more; None where empty."""
        if window not in self._groups:
            qlens = self._group_inputs[0]
            self._groups[window] = tuple(_group(np.flatnonzero(ids), *self._group_inputs, window, self._device)
                                         for ids in (qlens == 1, qlens > 1))
        return self._groups[window]


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
           num_blocks: np.ndarray, table: np.ndarray, block_size: int, window: int | None,
           device) -> AttentionGroup | None:
    """The requests `ids` as one padded batch, with the bool mask SDPA takes."""
    if len(ids) == 0:
        return None
    q, c = qlens[ids], ctx[ids]
    # the first block any row of a request reaches: its first row's window starts earliest
    first = np.zeros_like(c) if window is None else np.maximum(c - window + 1, 0) // block_size
    nb = int((num_blocks[ids] - first).max())
    columns = first[:, None] + np.arange(nb)
    in_table = columns < num_blocks[ids][:, None]
    blocks = np.where(in_table, table[ids[:, None], np.minimum(columns, table.shape[1] - 1)], 0)
    qi = np.arange(int(q.max()))
    valid = qi[None, :] < q[:, None]
    token_index = starts[ids][:, None] + np.minimum(qi[None, :], q[:, None] - 1)
    # position of each query row; a padding row sits at its request's first gathered key and sees only it
    qpos = torch.from_numpy(np.where(valid, c[:, None] + qi[None, :], first[:, None] * block_size)).to(device)
    kpos = torch.from_numpy(first * block_size).to(device)[:, None] + torch.arange(nb * block_size, device=device)
    mask = kpos[:, None, :] <= qpos[:, :, None]
    if window is not None:
        mask &= kpos[:, None, :] > qpos[:, :, None] - window
    return AttentionGroup(
        token_index=torch.from_numpy(token_index).to(device),
        query_valid=torch.from_numpy(valid).to(device),
        block_table=torch.from_numpy(blocks).to(device),
        mask=mask.unsqueeze(1),
        seq_lens=torch.from_numpy(np.ascontiguousarray(seq_lens[ids])).to(device),
        fresh=bool(c.max() == 0),
    )
