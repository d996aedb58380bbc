"""Vision-encoder outputs by image content hash, least recently used evicted past a budget of
embeddings: an image is encoded once while it stays here, however many requests (or prefill
chunks of one request) place it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from sluice.multimodal.inputs import MultiModalFeature

DEFAULT_BUDGET_TOKENS = 16384  # embeddings kept (LLaVA-1.5: 28 images of 576)


class EncoderCache:
    def __init__(self, encode: Callable[..., Sequence[torch.Tensor]], device: torch.device,
                 budget_tokens: int = DEFAULT_BUDGET_TOKENS) -> None:
        # pixel values [N, C, H, W] -> embeddings [N, tokens, hidden]; with patch grids (Qwen2-VL),
        # (patches [sum of patches, values], grids [N, 3]) -> N embeddings [tokens, hidden]
        self.encode = encode
        self.device = device
        self.budget_tokens = budget_tokens
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.num_tokens = 0

    def __contains__(self, identifier: str) -> bool:
        return identifier in self.entries

    def get_many(self, features: list[MultiModalFeature]) -> dict[str, torch.Tensor]:
        """Each feature's embeddings [length, hidden]; the missing ones encoded as one batch."""
        missing = list({f.identifier: f for f in features if f.identifier not in self.entries}.values())
        found = {f.identifier: self._touch(f.identifier) for f in features if f.identifier in self.entries}
        if missing:
            pixels = [torch.frombuffer(bytearray(f.pixel_values), dtype=torch.float32).view(f.shape) for f in missing]
            if missing[0].grid_thw is None:  # images of one size, as a batch
                outputs = self.encode(torch.stack(pixels).to(self.device))
            else:  # Qwen2-VL: every image's patches in one sequence, split by their grids
                outputs = self.encode(torch.cat(pixels).to(self.device), torch.tensor([f.grid_thw for f in missing]))
            for feature, embeds in zip(missing, outputs, strict=True):
                if embeds.shape[0] != feature.length:
                    raise ValueError(f"the vision encoder made {embeds.shape[0]} embeddings for an image with "
                                     f"{feature.length} placeholder tokens")
                found[feature.identifier] = embeds
                self._put(feature.identifier, embeds)
        return found

    def _touch(self, identifier: str) -> torch.Tensor:
        self.entries.move_to_end(identifier)
        return self.entries[identifier]

    def _put(self, identifier: str, embeds: torch.Tensor) -> None:
        self.entries[identifier] = embeds
        self.num_tokens += embeds.shape[0]
        while self.num_tokens > self.budget_tokens and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.num_tokens -= old.shape[0]
