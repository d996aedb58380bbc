"""EAGLE proposals: a one-layer head reads the target's hidden states and guesses the next k tokens.

Like a draft model, the head keeps its KV in the target's blocks (its layer joins every block), so
the pool, prefix caching and preemption cover it. Its KV at position p holds (token p + 1, the
target's hidden state at p): each step, once the target has verified, the head reads every position
whose next token is now known (a prompt chunk's, the accepted drafts', the newest sampled token's),
then chains k greedy guesses from each request's newest one, writing lookahead slots that the next
step overwrites. Drafts are greedy, so the rejection sampler verifies them as certain proposals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sluice.layers.attention import build_attention_metadata
from sluice.spec_decode.draft_model import has_slot


def aux_hidden_state_layers(head_config, num_target_layers: int) -> tuple[int, ...]:
    """Which target layers' inputs EAGLE-3 reads: the head config's choice, else an early, a middle
    and a late layer (vLLM's default)."""
    ids = getattr(head_config, "eagle_aux_hidden_state_layer_ids", None) \
        or (2, num_target_layers // 2, num_target_layers - 3)
    if len(ids) != 3 or not all(0 <= i < num_target_layers for i in ids):
        raise ValueError(f"speculative_config model: EAGLE-3 reads 3 target layers, each in "
                         f"[0, {num_target_layers - 1}]; eagle_aux_hidden_state_layer_ids is {list(ids)}")
    return tuple(ids)


def check_draft_vocabulary(head: nn.Module, vocab_size: int, where: str) -> None:
    """EAGLE-3's reduced vocabulary must map into the target's."""
    targets = torch.arange(head.draft_vocab_size, device=head.d2t.device) + head.d2t
    if int(targets.min()) < 0 or int(targets.max()) >= vocab_size:
        raise ValueError(f"{where}: d2t maps draft tokens to ids in [{int(targets.min())}, {int(targets.max())}], "
                         f"outside the target's vocabulary of {vocab_size}")


@dataclass
class HeadBatch:
    """One ride-along of the head: for each request, the positions whose next token is known."""

    token_ids: list[int] = field(default_factory=list)  # the token after each position
    positions: list[int] = field(default_factory=list)
    target_rows: list[int] = field(default_factory=list)  # each position's row in the target's step
    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    # requests that draft from their newest position: (request id, row in this batch, position,
    # blocks, how many drafts it may get)
    starts: list[tuple[str, int, int, list[int], int]] = field(default_factory=list)

    def add(self, req_id: str, start: int, first_row: int, following: list[int], blocks: list[int],
            num_drafts: int) -> None:
        n = len(following)
        self.token_ids += following
        self.positions += range(start, start + n)
        self.target_rows += range(first_row, first_row + n)
        self.query_lens.append(n)
        self.context_lens.append(start)
        self.block_tables.append(blocks)
        if num_drafts:
            self.starts.append((req_id, len(self.token_ids) - 1, start + n - 1, blocks, num_drafts))


class EagleProposer:
    def __init__(self, model: nn.Module, target: nn.Module, max_position: int, block_size: int,
                 device: torch.device, aux_layers: tuple[int, ...] = ()) -> None:
        self.model = model
        self.max_position = max_position
        self.block_size = block_size
        self.device = device
        self.kv_caches: list[torch.Tensor] = []  # its layers' share of the runner's caches
        self.aux_layers = aux_layers
        self._aux: dict[int, torch.Tensor] = {}
        for i in set(aux_layers):  # EAGLE-3: keep the residual stream entering these target layers
            target.model.layers[i].register_forward_pre_hook(self._keeper(i))

    def _keeper(self, layer: int):
        def keep(_module: nn.Module, args: tuple) -> None:
            self._aux[layer] = args[0]
        return keep

    def target_features(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """What the head reads from the target's step: its final hidden states (EAGLE), or three
        intermediate ones side by side (EAGLE-3)."""
        if not self.aux_layers:
            return final_hidden
        return torch.cat([self._aux[i] for i in self.aux_layers], dim=-1)

    def ride_along(self, batch: HeadBatch, features: torch.Tensor) -> torch.Tensor:
        """Write the head's KV for the batch's positions; return its output at each."""
        meta = build_attention_metadata(batch.query_lens, batch.context_lens, batch.block_tables,
                                        self.block_size, self.device)
        rows = torch.tensor(batch.target_rows, dtype=torch.long, device=self.device)
        return self.model(self._ids(batch.token_ids), self._ids(batch.positions), features[rows],
                          self.kv_caches, meta)

    def propose(self, batch: HeadBatch, head_hidden: torch.Tensor) -> dict[str, list[int]]:
        """Greedy drafts for each starting request, up to its allowance; fewer where its blocks or
        positions run out."""
        active = batch.starts
        if not active:
            return {}
        hidden = head_hidden[[row for _, row, *_ in active]]
        drafts: dict[str, list[int]] = {rid: [] for rid, *_ in active}
        while True:
            proposed = self.model.draft_token_ids(self.model.compute_logits(hidden))
            keep, following = [], []
            for i, ((rid, _, pos, blocks, budget), token) in enumerate(zip(active, proposed.tolist())):
                drafts[rid].append(token)
                if len(drafts[rid]) < budget and has_slot(blocks, pos + 1, self.block_size, self.max_position):
                    keep.append(i)
                    following.append((rid, token, pos + 1, blocks, budget))
            if not following:
                return drafts
            meta = build_attention_metadata([1] * len(following), [pos for _, _, pos, _, _ in following],
                                            [blocks for _, _, _, blocks, _ in following], self.block_size, self.device)
            hidden = self.model(self._ids([t for _, t, *_ in following]),
                                self._ids([pos for _, _, pos, _, _ in following]), hidden[keep], self.kv_caches, meta)
            active = following

    def _ids(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
