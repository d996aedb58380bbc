"""One image of a prompt as it travels from the API process to the worker: plain data (msgspec
encodes it over ZMQ), no torch here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MultiModalFeature:
    """An image's placeholder run in the prompt and the pixels its encoder reads."""

    identifier: str  # content hash: the encoder cache and the prefix cache key on it
    offset: int  # first prompt position of its placeholder tokens
    length: int  # placeholder tokens (= embeddings the encoder makes for it)
    pixel_values: bytes  # float32, C order
    shape: list[int]  # of pixel_values, without a batch dimension (Qwen2-VL: [patches, patch values])
    grid_thw: list[int] | None = None  # Qwen2-VL: the image's (temporal, height, width) patch grid

    def overlaps(self, start: int, end: int) -> bool:
        return self.offset < end and start < self.offset + self.length
