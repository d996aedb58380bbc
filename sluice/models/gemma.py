"""Gemma, Gemma 2 and Gemma 3 (text): Llama's attention, MLP and weight loading, with Gemma's
norms, embedding scale and (from Gemma 2) decoder layer.

What differs from Llama:
- RMSNorm weights are offsets from 1 (GemmaRMSNorm); token embeddings are multiplied by
  sqrt(hidden_size), rounded to the model dtype as transformers does; lm_head is tied.
- The MLP's activation is gelu_pytorch_tanh (config.hidden_act in Gemma, hidden_activation in
  Gemma 2 and 3).
- Gemma 2 and 3 norm each sub-block's output too (post_attention_layernorm,
  post_feedforward_layernorm, with pre_feedforward_layernorm before the MLP), scale attention by
  query_pre_attn_scalar ** -0.5, and alternate sliding-window and global layers (layer_types).
- Gemma 2 soft-caps the final logits (final_logit_softcapping) and the attention scores
  (attn_logit_softcapping).
- Gemma 3 norms each q and k head, and its sliding layers rotate with their own rope base
  (rope_parameters keyed by layer type).
"""

import dataclasses

import torch
from torch import nn

from sluice.layers.attention import AttentionMetadata
from sluice.layers.norm import GemmaRMSNorm
from sluice.layers.rotary import get_rope
from sluice.models.llama import (DecoderOptions, LlamaAttention, LlamaForCausalLM, LlamaModel, feed_forward,
                                 refuse_unsupported)


class GemmaModel(LlamaModel):
    def __init__(self, config, head_dim: int, options: DecoderOptions, sliding_windows: list[int | None]):
        super().__init__(config, head_dim, options, sliding_windows)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        self.sliding = [kind == "sliding_attention" for kind in layer_types]
        per_type = "sliding_attention" in (getattr(config, "rope_parameters", None) or {})
        self.local_rotary_emb = get_rope(config, head_dim, "sliding_attention") if per_type else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        return x * torch.tensor(self.embed_tokens.embedding_dim ** 0.5).to(x.dtype)  # float32 first, as HF

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.stage_input(input_ids, inputs_embeds)
        global_rope = [t.to(x.dtype) for t in self.rotary_emb(positions)]
        local_rope = global_rope
        if self.local_rotary_emb is not None:
            local_rope = [t.to(x.dtype) for t in self.local_rotary_emb(positions)]
        for (i, layer), kv_cache in zip(self.local_layers(), kv_caches, strict=True):
            x = layer(x, *(local_rope if self.sliding[i] else global_rope), kv_cache, meta)
        return self.stage_output(x)


class Gemma2DecoderLayer(nn.Module):
    """Each sub-block normed on the way in and on the way out, then added to the residual."""

    def __init__(self, config, head_dim: int, options: DecoderOptions, layer_idx: int,
                 sliding_window: int | None):
        super().__init__()
        self.self_attn = LlamaAttention(config, head_dim, options, sliding_window)
        self.mlp = feed_forward(config, options, layer_idx)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2Model(GemmaModel):
    decoder_layer = Gemma2DecoderLayer


class GemmaForCausalLM(LlamaForCausalLM):
    model_class = GemmaModel

    @classmethod
    def decoder_options(cls, config) -> DecoderOptions:
        return dataclasses.replace(super().decoder_options(config), norm=GemmaRMSNorm)

    @classmethod
    def check_config(cls, config) -> None:
        refuse_unsupported(config, cls.__name__, "use_bidirectional_attention", (None, False))


class Gemma2ForCausalLM(GemmaForCausalLM):
    model_class = Gemma2Model

    def __init__(self, config):
        super().__init__(config)
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)

    @classmethod
    def decoder_options(cls, config) -> DecoderOptions:
        return dataclasses.replace(super().decoder_options(config), act_field="hidden_activation",
                                   attn_scale=config.query_pre_attn_scalar ** -0.5,
                                   attn_logits_soft_cap=getattr(config, "attn_logit_softcapping", None))

    @classmethod
    def sliding_windows(cls, config) -> list[int | None]:
        """transformers' Gemma 2/3 rule: config.sliding_window on the "sliding_attention" layers."""
        return [config.sliding_window if kind == "sliding_attention" else None for kind in config.layer_types]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    @classmethod
    def decoder_options(cls, config) -> DecoderOptions:
        return dataclasses.replace(super().decoder_options(config), qk_norm="head")
