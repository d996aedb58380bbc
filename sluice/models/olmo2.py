"""OLMo2 is Llama with its norms moved: nothing before attention or the MLP, an RMSNorm on
each sub-block's output before the residual add, and RMSNorm on the whole q and k projections
(not per head) before rotary. Its RMSNorm multiplies the weight in float32 before rounding."""

import dataclasses

import torch
from torch import nn

from sluice.layers.attention import AttentionMetadata
from sluice.layers.norm import Float32WeightRMSNorm
from sluice.models.llama import DecoderOptions, LlamaAttention, LlamaForCausalLM, LlamaModel, feed_forward


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, config, head_dim: int, options: DecoderOptions, layer_idx: int,
                 sliding_window: int | None):
        super().__init__()
        self.self_attn = LlamaAttention(config, head_dim, options, sliding_window)
        self.mlp = feed_forward(config, options, layer_idx)
        self.post_attention_layernorm = options.norm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = options.norm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, kv_cache, meta))
        return x + self.post_feedforward_layernorm(self.mlp(x))


class Olmo2Model(LlamaModel):
    decoder_layer = Olmo2DecoderLayer


class Olmo2ForCausalLM(LlamaForCausalLM):
    model_class = Olmo2Model

    @classmethod
    def decoder_options(cls, config) -> DecoderOptions:
        return dataclasses.replace(super().decoder_options(config), qk_norm="full", norm=Float32WeightRMSNorm)
