"""Granite is Llama with four multipliers from its config: embeddings times
embedding_multiplier, attention scaled by attention_multiplier (instead of head_dim ** -0.5),
each sub-block's output times residual_multiplier before the residual add, and logits divided
by logits_scaling."""

import dataclasses

import torch

from sluice.layers.attention import AttentionMetadata
from sluice.models.llama import DecoderOptions, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class GraniteDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config, head_dim: int, options: DecoderOptions, layer_idx: int,
                 sliding_window: int | None):
        super().__init__(config, head_dim, options, layer_idx, sliding_window)
        self.residual_multiplier = config.residual_multiplier

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta) * self.residual_multiplier
        return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_multiplier


class GraniteModel(LlamaModel):
    decoder_layer = GraniteDecoderLayer

    def __init__(self, config, head_dim: int, options: DecoderOptions, sliding_windows: list[int | None]):
        super().__init__(config, head_dim, options, sliding_windows)
        self.embedding_multiplier = config.embedding_multiplier

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embedding_multiplier


class GraniteForCausalLM(LlamaForCausalLM):
    model_class = GraniteModel

    def __init__(self, config):
        super().__init__(config)
        self.logits_scaling = config.logits_scaling

    @classmethod
    def decoder_options(cls, config) -> DecoderOptions:
        return dataclasses.replace(super().decoder_options(config), attn_scale=config.attention_multiplier)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden) / self.logits_scaling
