"""Qwen2-MoE is Qwen2 (q/k/v bias) whose sparse layers route each token to top-k of many small
experts (softmax, renormalized only when norm_topk_prob) and add a shared expert scaled by
sigmoid(shared_expert_gate(x)). Layers listed in mlp_only_layers, or off the decoder_sparse_step
grid, keep a dense MLP of intermediate_size."""

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from sluice.layers.fused_moe import FusedMoE, expert_checkpoint_names, stack_expert_weights
from sluice.models.llama import DecoderOptions, LlamaMLP
from sluice.models.qwen2 import Qwen2ForCausalLM


def is_sparse_layer(config, layer_idx: int) -> bool:
    """Whether this layer's MLP is routed experts (Qwen2-MoE's and Qwen3-MoE's rule)."""
    return (layer_idx not in (config.mlp_only_layers or []) and config.num_experts > 0
            and (layer_idx + 1) % config.decoder_sparse_step == 0)


def qwen2_moe_mlp(config, layer_idx: int) -> nn.Module:
    if not is_sparse_layer(config, layer_idx):
        return LlamaMLP(config, DecoderOptions())
    shared_expert = LlamaMLP(config, DecoderOptions(), intermediate_size=config.shared_expert_intermediate_size,
                             reduce_results=False)
    return FusedMoE(config.num_experts, config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size,
                    renormalize=config.norm_topk_prob, activation=config.hidden_act, shared_expert=shared_expert,
                    shared_expert_gate=True)


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    @classmethod
    def decoder_options(cls, config) -> DecoderOptions:
        return dataclasses.replace(super().decoder_options(config), qkv_bias=getattr(config, "qkv_bias", True),
                                   make_mlp=qwen2_moe_mlp)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(stack_expert_weights(weights, self.config.num_experts))

    def checkpoint_names(self) -> list[str]:
        return expert_checkpoint_names(super().checkpoint_names())
