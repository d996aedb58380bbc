"""The embedding and lm_head split by vocabulary rows across tensor-parallel ranks.

Each rank holds ceil(vocab / ranks) rows (the last padded with zeros). The embedding looks up
the ids in its range, zeroes the others and all-reduces; lm_head computes its columns of the
logits and all-gathers them, trimmed back to the vocabulary. With one rank both are their
plain torch counterparts.
"""

from __future__ import annotations

import torch
from torch import nn

from sluice.distributed import get_tp_group
from sluice.distributed.sharding import cdiv
from sluice.layers.linear import Linear


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        tp = get_tp_group()
        self.per_rank = cdiv(num_embeddings, tp.world_size)
        super().__init__(self.per_rank, embedding_dim)
        self.vocab_start = tp.rank * self.per_rank

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        tp = get_tp_group()
        if tp.world_size == 1:
            return super().forward(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        x = super().forward(local.masked_fill(outside, 0))
        return tp.all_reduce(x.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(Linear):
    """hidden -> logits [.., vocab]: this rank's columns, gathered from every rank."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        tp = get_tp_group()
        super().__init__(hidden_size, cdiv(vocab_size, tp.world_size), bias=False)
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        tp = get_tp_group()
        out = super().forward(x, residual)
        if tp.world_size == 1:
            return out
        return tp.all_gather(out)[..., : self.vocab_size]

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)
