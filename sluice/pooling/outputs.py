"""vLLM's offline pooling outputs: LLM.encode / embed / classify / score return these."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PoolingOutput:
    data: torch.Tensor


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ClassificationOutput:
    probs: list[float]  # softmax over the labels (sigmoid for a single label)

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    score: float  # the cross-encoder's relevance, sigmoid of its logit


@dataclass
class PoolingRequestOutput:
    request_id: str
    outputs: PoolingOutput | EmbeddingOutput | ClassificationOutput | ScoringOutput
    prompt_token_ids: list[int]
    finished: bool = True


# vLLM's names for the typed forms
EmbeddingRequestOutput = ClassificationRequestOutput = ScoringRequestOutput = PoolingRequestOutput


def class_probs(logits: list[float]) -> list[float]:
    """vLLM's default classify activation: softmax over labels, sigmoid for a single label."""
    values = torch.tensor(logits)
    return (values.sigmoid() if len(logits) == 1 else values.softmax(-1)).tolist()
