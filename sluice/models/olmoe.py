"""OLMoE is Llama with routed experts in every layer (softmax top-k, renormalized only when
norm_topk_prob) and an RMSNorm over all of q's heads at once and all of k's (not per head, as
Qwen3's), after which q, k and v may be clipped to +-clip_qkv."""

from collections.abc import Iterable

import torch

from sluice.layers.attention import AttentionMetadata
from sluice.layers.fused_moe import FusedMoE, stack_expert_weights
from sluice.layers.norm import RMSNorm
from sluice.models.llama import LlamaAttention, LlamaForCausalLM


class OlmoeAttention(LlamaAttention):
    def __init__(self, config, head_dim: int, qkv_bias: bool, o_bias: bool, qk_norm: bool):
        super().__init__(config, head_dim, qkv_bias, o_bias, qk_norm=False)
        self.q_norm = RMSNorm(self.num_heads * head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.num_kv_heads * head_dim, config.rms_norm_eps)
        self.clip_qkv = getattr(config, "clip_qkv", None)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        qkv = torch.cat((self.q_norm(q), self.k_norm(k), v), dim=-1)
        if self.clip_qkv is not None:
            qkv = qkv.clamp_(-self.clip_qkv, self.clip_qkv)
        return self.o_proj(self.attn(qkv, cos, sin, kv_cache, meta), residual=residual)


def olmoe_moe(config, layer_idx: int) -> FusedMoE:
    return FusedMoE(config.num_experts, config.num_experts_per_tok, config.hidden_size, config.intermediate_size,
                    renormalize=config.norm_topk_prob, activation=config.hidden_act)


class OlmoeForCausalLM(LlamaForCausalLM):
    @classmethod
    def layer_options(cls, config) -> dict:
        return {**super().layer_options(config), "attention_class": OlmoeAttention, "make_mlp": olmoe_moe}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(stack_expert_weights(weights, self.config.num_experts))
