"""The runner's side of pooling: each prompt chunk's hidden states folded into the request's
running state, and the pooled vector finished (head, Matryoshka cut, normalization) once its
last prompt token has run. A chunk's rows are read once and dropped, so long prompts cost no
more memory pooled than generated."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sluice.pooling.config import PoolerConfig
from sluice.pooling.params import PoolingParams


@dataclass
class PoolingState:
    total: torch.Tensor | None = None  # MEAN: the sum of the rows seen so far
    first: torch.Tensor | None = None  # CLS: the row at position 0
    scores: list[torch.Tensor] = field(default_factory=list)  # ALL (reward): each chunk's rows through the head


class Pooler:
    def __init__(self, config: PoolerConfig, model: torch.nn.Module) -> None:
        self.config = config
        self.model = model
        self.states: dict[str, PoolingState] = {}

    def pooling_type(self, params: PoolingParams) -> str:
        """A classifier's head reads the state it was trained on (BERT's [CLS]), whatever the
        folder declares for embeddings; reward scores every token."""
        if params.task == "reward":
            return "ALL"
        if params.task == "classify":
            return getattr(self.model, "classify_pooling", self.config.pooling_type)
        return self.config.pooling_type

    def add_chunk(self, req_id: str, rows: torch.Tensor, start: int, num_prompt: int,
                  params: PoolingParams) -> torch.Tensor | None:
        """Fold hidden rows of positions [start, start + len(rows)) in; the pooled hidden state
        once the prompt is complete, else None. A chunk at position 0 starts afresh (a preempted
        request recomputes from there)."""
        if start == 0:
            self.states[req_id] = PoolingState()
        state = self.states.setdefault(req_id, PoolingState())  # LAST after a prefix-cache hit
        kind = self.pooling_type(params)
        if kind == "MEAN":
            part = rows.float().sum(dim=0)
            state.total = part if state.total is None else state.total + part
        elif kind == "CLS" and start == 0:
            state.first = rows[0].float()
        elif kind == "ALL":  # the head's few labels per row, not the hidden rows, wait for the last chunk
            state.scores.append(self.model.classify(rows.to(self.model_dtype)).float())
        if start + len(rows) < num_prompt:
            return None
        del self.states[req_id]
        if kind == "MEAN":
            return state.total / num_prompt
        if kind == "ALL":
            return torch.cat(state.scores)
        return state.first if kind == "CLS" else rows[-1].float()

    def drop(self, req_id: str) -> None:
        self.states.pop(req_id, None)

    def finish(self, pooled: torch.Tensor, params: PoolingParams) -> list[float]:
        """The request's answer: class logits (classify), every token's head logits row after row
        (reward, flat), or the embedding (embed / encode)."""
        if params.task == "reward":
            return pooled.flatten().tolist()
        if params.task == "classify":
            return self.model.classify(pooled[None].to(self.model_dtype))[0].float().tolist()
        dimensions = params.dimensions or self.config.dimensions
        if dimensions is not None:
            pooled = pooled[:dimensions]
        normalize = self.config.normalize if params.normalize is None else params.normalize
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
        return pooled.tolist()

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
