"""What one pooling request asks for; crosses to the engine core with its request (msgspec)."""

from __future__ import annotations

from dataclasses import dataclass

# score is classify on a (query, document) pair; reward is the classifier's head on every prompt token
POOLING_TASKS = ("embed", "classify", "encode", "reward")


@dataclass
class PoolingParams:
    """vLLM's PoolingParams: `task` picks the head; `dimensions` keeps the first n values of an
    embedding (Matryoshka) before normalizing; `normalize` None: the model's pooler config."""

    task: str = "embed"
    dimensions: int | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.task not in POOLING_TASKS:
            raise ValueError(f"task must be one of {', '.join(POOLING_TASKS)}; got {self.task!r}")
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)
                                            or self.dimensions < 1):
            raise ValueError(f"dimensions must be an int >= 1, got {self.dimensions!r}")
