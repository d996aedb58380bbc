"""What the vision-language models share: a vision tower in front of one of our decoders, and
checkpoints whose tensor names are mapped by prefix onto ours.

A subclass builds `language_model` (our decoder, with the engine's paged attention) and its tower
(the module named `tower_name`, as the checkpoint names it), and says how images become
embeddings (`embed_images`); the runner places those at the image's placeholder tokens and calls
`forward(inputs_embeds=...)`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sluice.layers.attention import AttentionMetadata
from sluice.loader import copy_weight


class VisionLanguageModel(nn.Module):
    language_model: nn.Module
    tower_name: str  # the tower's attribute (and checkpoint prefix): vision_tower, visual
    prefixes: tuple[tuple[str, str], ...]  # checkpoint prefix -> ours, first match wins

    def tower(self) -> nn.Module:
        return getattr(self, self.tower_name)

    def tower_ffn_shape(self) -> tuple[int, int]:
        """(width, MLP width) of the tower's blocks, whatever its config calls them."""
        config = self.config.vision_config
        width = getattr(config, "embed_dim", None) or config.hidden_size
        return width, getattr(config, "intermediate_size", None) or int(width * config.mlp_ratio)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.language_model(input_ids, positions, kv_caches, attn_metadata, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    @property
    def lm_head(self) -> nn.Module:
        return self.language_model.lm_head

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Checkpoint names in any layout `prefixes` knows; the decoder's go through its own loader
        (which fuses q/k/v and gate/up), the rest are copied as they are."""
        params = dict(self.named_parameters())
        pending = {name for name in params if not name.startswith("language_model.")}
        self.language_model.load_weights(self._load_vision(weights, params, pending))
        if pending:
            raise ValueError(f"parameters never loaded: {', '.join(sorted(pending)[:10])}")

    def _load_vision(self, weights: Iterable[tuple[str, torch.Tensor]], params: dict[str, nn.Parameter],
                     pending: set[str]) -> Iterable[tuple[str, torch.Tensor]]:
        """Copy the tower's (and projector's) tensors as they stream by; yield the decoder's under
        its own names (one tensor held at a time)."""
        for hf_name, tensor in weights:
            name = next((ours + hf_name[len(theirs):] for theirs, ours in self.prefixes if hf_name.startswith(theirs)),
                        None)
            if name is not None and name.startswith("language_model."):
                yield name[len("language_model."):], tensor
                continue
            if name is not None and name.endswith("position_ids"):
                continue  # a buffer some checkpoints carry
            if name not in params:
                raise ValueError(f"unexpected parameter {hf_name!r} for {type(self).__name__}")
            copy_weight(params[name], tensor, hf_name)
            pending.discard(name)
