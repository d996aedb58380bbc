"""Draft-model proposals: a small model with the target's vocabulary guesses the next k tokens.

Its KV cache lives in the same blocks as the target's (every block id holds both models' layers,
so one block table and one pool serve both): a cached prefix, a preemption or a freed request
covers the draft as it covers the target. Each step the draft reads the step's tokens alongside
the target (its prefill rides along), then, from each request's newest token, runs k single-token
steps greedily; the scheduler reserved those positions' slots as lookahead. Greedy drafts are a
certain proposal (q = 1 at the draft), which the rejection sampler verifies exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from sluice.layers.attention import AttentionMetadata, build_attention_metadata


def has_slot(blocks: list[int], position: int, block_size: int, max_position: int) -> bool:
    """Whether a proposer may write KV at `position`: inside the request's blocks and within the
    positions both models' rotary tables cover."""
    return min(len(blocks) * block_size, max_position) > position


class DraftModel:
    def __init__(self, model: nn.Module, max_position: int, block_size: int, device: torch.device) -> None:
        self.model = model
        self.max_position = max_position  # the draft's rotary tables end here
        self.block_size = block_size
        self.device = device
        self.kv_caches: list[torch.Tensor] = []  # its layers' share of the runner's caches

    def ride_along(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """Write the draft's KV for this step's tokens (the target's batch, as it is)."""
        self.model(input_ids, positions, self.kv_caches, meta)

    def propose(self, starts: list[tuple[str, int, int, list[int], int]]) -> dict[str, list[int]]:
        """starts: (request id, its newest token, that token's position, its block ids, how many
        drafts it may get). Greedy drafts, fewer where its blocks or the draft's positions run out."""
        active = [(rid, token, pos, blocks, budget) for rid, token, pos, blocks, budget in starts
                  if budget > 0 and has_slot(blocks, pos, self.block_size, self.max_position)]
        drafts: dict[str, list[int]] = {rid: [] for rid, *_ in active}
        while active:
            meta = build_attention_metadata([1] * len(active), [pos for _, _, pos, _, _ in active],
                                            [blocks for _, _, _, blocks, _ in active], self.block_size, self.device)
            ids = torch.tensor([token for _, token, *_ in active], dtype=torch.long, device=self.device)
            positions = torch.tensor([pos for _, _, pos, _, _ in active], dtype=torch.long, device=self.device)
            hidden = self.model(ids, positions, self.kv_caches, meta)
            proposed = self.model.compute_logits(hidden).argmax(dim=-1).tolist()
            following = []
            for (rid, _, pos, blocks, budget), token in zip(active, proposed):
                drafts[rid].append(token)
                if len(drafts[rid]) < budget and has_slot(blocks, pos + 1, self.block_size, self.max_position):
                    following.append((rid, token, pos + 1, blocks, budget))
            active = following
        return drafts
