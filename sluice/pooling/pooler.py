"""The runner's side of pooling: each prompt chunk's hidden states folded into the request's
running state, and the pooled vector finished (head, Matryoshka cut, normalization) once its
last prompt token has run. A chunk's rows are read once and dropped, so long prompts cost no
more memory pooled than generated. A step's requests are pooled together (one sum for all
mean-pooled chunks, one head or normalization per kind of finish): a few tensor ops per step,
not per request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sluice.pooling.config import PoolerConfig
from sluice.pooling.params import PoolingParams


@dataclass
class PoolingState:
    total: torch.Tensor | None = None  # MEAN: the sum of the rows seen so far
    first: torch.Tensor | None = None  # CLS: the row at position 0
    scores: list[torch.Tensor] = field(default_factory=list)  # ALL (reward): each chunk's rows through the head


class Chunk(NamedTuple):
    """One pooling request's rows in a step: hidden[first_row : first_row + count] are its
    prompt positions [start, start + count) of num_prompt."""

    req_id: str
    first_row: int
    count: int
    start: int
    num_prompt: int
    params: PoolingParams


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

    def pool_step(self, hidden: torch.Tensor, chunks: list[Chunk]) -> dict[str, list[float]]:
        """Fold every chunk of the step in; the answers of the requests whose prompt ended."""
        sums = self._mean_sums(hidden, chunks)
        done = []
        for i, chunk in enumerate(chunks):
            rows = hidden[chunk.first_row : chunk.first_row + chunk.count]
            pooled = self.add_chunk(chunk.req_id, rows, chunk.start, chunk.num_prompt, chunk.params, sums[i])
            if pooled is not None:
                done.append((chunk.req_id, pooled, chunk.params))
        return self.finish_many(done)

    def _mean_sums(self, hidden: torch.Tensor, chunks: list[Chunk]) -> torch.Tensor:
        """Row i: the float32 sum of chunk i's rows (zeros for chunks not mean-pooled), as one
        index_add over the step's rows (rows of no mean-pooled chunk go to a spare last row)."""
        spare = len(chunks)
        if not any(self.pooling_type(c.params) == "MEAN" for c in chunks):
            return torch.zeros(spare, 0)
        slots, counts, row = [], [], 0  # runs of rows in order: (slot, how many)
        for i, chunk in sorted(enumerate(chunks), key=lambda pair: pair[1].first_row):
            slots += [spare, i if self.pooling_type(chunk.params) == "MEAN" else spare]
            counts += [chunk.first_row - row, chunk.count]
            row = chunk.first_row + chunk.count
        index = torch.tensor(slots, device=hidden.device).repeat_interleave(torch.tensor(counts, device=hidden.device))
        sums = torch.zeros(spare + 1, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
        return sums.index_add_(0, index, hidden[:row].float())[:-1]

    def add_chunk(self, req_id: str, rows: torch.Tensor, start: int, num_prompt: int,
                  params: PoolingParams, total: torch.Tensor | None = None) -> torch.Tensor | None:
        """Fold hidden rows of positions [start, start + len(rows)) in (`total`: their float32
        sum, when already taken); the pooled hidden state once the prompt is complete, else None.
        A chunk at position 0 starts afresh (a preempted request recomputes from there)."""
        if start == 0:
            self.states[req_id] = PoolingState()
        state = self.states.setdefault(req_id, PoolingState())  # LAST after a prefix-cache hit
        kind = self.pooling_type(params)
        if kind == "MEAN":
            part = rows.float().sum(dim=0) if total is None else total
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

    def finish_many(self, done: list[tuple[str, torch.Tensor, PoolingParams]]) -> dict[str, list[float]]:
        """finish() for many requests: those that finish alike go through it as one batch."""
        groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
        for req_id, pooled, params in done:
            key = (params.task, params.dimensions, params.normalize, pooled.shape)
            groups.setdefault(key, []).append((req_id, pooled))
        answers = {}
        for (task, dimensions, normalize, _), members in groups.items():
            params = PoolingParams(task, dimensions, normalize)
            if task == "reward":  # a score per token: rows of different counts
                answers.update((req_id, self.finish(pooled, params)) for req_id, pooled in members)
                continue
            vectors = self.finish(torch.stack([pooled for _, pooled in members]), params)
            answers.update((req_id, vector) for (req_id, _), vector in zip(members, vectors))
        return answers

    def finish(self, pooled: torch.Tensor, params: PoolingParams) -> list:
        """The request's answer: class logits (classify), every token's head logits row after row
        (reward, flat), or the embedding (embed / encode)."""
        if params.task == "reward":
            return pooled.flatten().tolist()
        if params.task == "classify":  # one vector, or a batch of them (rows)
            return self.model.classify(pooled.to(self.model_dtype)).float().tolist()
        dimensions = params.dimensions or self.config.dimensions
        if dimensions is not None:
            pooled = pooled[..., :dimensions]
        normalize = self.config.normalize if params.normalize is None else params.normalize
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
        return pooled.tolist()

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
